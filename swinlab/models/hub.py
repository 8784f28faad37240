"""Pretrained Swin weights by name, through the Hugging Face Hub cache.

``pretrained:`` (and ``load_pretrained``) accept, besides a file path:

- ``hf-hub:<repo id>``, e.g. ``hf-hub:timm/swin_tiny_patch4_window7_224.ms_in1k``: that Hub repository's
  ``model.safetensors``;
- an official release file name without a folder, e.g. ``swin_tiny_patch4_window7_224`` or
  ``swin_tiny_patch4_window7_224.pth``: its timm copy on the Hub (``PUBLISHED``).

huggingface_hub downloads into, and reads from, its cache (``HF_HOME`` / ``HF_HUB_CACHE``); with
``HF_HUB_OFFLINE=1`` only the cache is used. Only ``model.safetensors`` is ever fetched: a Hub file cannot run code
when loaded. An existing local file of the same name wins over the Hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

HF_HUB_PREFIX = "hf-hub:"
WEIGHTS_FILE = "model.safetensors"


class PublishedWeights(NamedTuple):
    hub_id: str  # the timm copy of the official file on the Hugging Face Hub
    top1: float | None  # published ImageNet-1K top-1 (%); None: not in swin-facts.md, or a 22K (21841-class) model


# Official release names (github.com/microsoft/Swin-Transformer, file name without ``.pth``) -> timm Hub copies.
# Every official file has one (timm's pretrained configs name the official URL they were converted from), so no
# release URL is needed. Top-1: the official V1 numbers in /work/shared/reference/swin-facts.md.
PUBLISHED: dict[str, PublishedWeights] = {
    # Swin V1, ImageNet-1K
    "swin_tiny_patch4_window7_224": PublishedWeights("timm/swin_tiny_patch4_window7_224.ms_in1k", 81.2),
    "swin_small_patch4_window7_224": PublishedWeights("timm/swin_small_patch4_window7_224.ms_in1k", 83.2),
    "swin_base_patch4_window7_224": PublishedWeights("timm/swin_base_patch4_window7_224.ms_in1k", 83.5),
    "swin_base_patch4_window12_384": PublishedWeights("timm/swin_base_patch4_window12_384.ms_in1k", 84.5),
    # Swin V1, ImageNet-22K, and 22K fine-tuned on 1K
    "swin_tiny_patch4_window7_224_22k": PublishedWeights("timm/swin_tiny_patch4_window7_224.ms_in22k", None),
    "swin_tiny_patch4_window7_224_22kto1k_finetune": PublishedWeights(
        "timm/swin_tiny_patch4_window7_224.ms_in22k_ft_in1k", None
    ),
    "swin_small_patch4_window7_224_22k": PublishedWeights("timm/swin_small_patch4_window7_224.ms_in22k", None),
    "swin_small_patch4_window7_224_22kto1k_finetune": PublishedWeights(
        "timm/swin_small_patch4_window7_224.ms_in22k_ft_in1k", None
    ),
    "swin_base_patch4_window7_224_22k": PublishedWeights("timm/swin_base_patch4_window7_224.ms_in22k", None),
    "swin_base_patch4_window7_224_22kto1k": PublishedWeights(
        "timm/swin_base_patch4_window7_224.ms_in22k_ft_in1k", 85.2
    ),
    "swin_base_patch4_window12_384_22k": PublishedWeights("timm/swin_base_patch4_window12_384.ms_in22k", None),
    "swin_base_patch4_window12_384_22kto1k": PublishedWeights(
        "timm/swin_base_patch4_window12_384.ms_in22k_ft_in1k", 86.4
    ),
    "swin_large_patch4_window7_224_22k": PublishedWeights("timm/swin_large_patch4_window7_224.ms_in22k", None),
    "swin_large_patch4_window7_224_22kto1k": PublishedWeights(
        "timm/swin_large_patch4_window7_224.ms_in22k_ft_in1k", 86.3
    ),
    "swin_large_patch4_window12_384_22k": PublishedWeights("timm/swin_large_patch4_window12_384.ms_in22k", None),
    "swin_large_patch4_window12_384_22kto1k": PublishedWeights(
        "timm/swin_large_patch4_window12_384.ms_in22k_ft_in1k", 87.3
    ),
    # Swin V2, ImageNet-1K
    "swinv2_tiny_patch4_window8_256": PublishedWeights("timm/swinv2_tiny_window8_256.ms_in1k", None),
    "swinv2_tiny_patch4_window16_256": PublishedWeights("timm/swinv2_tiny_window16_256.ms_in1k", None),
    "swinv2_small_patch4_window8_256": PublishedWeights("timm/swinv2_small_window8_256.ms_in1k", None),
    "swinv2_small_patch4_window16_256": PublishedWeights("timm/swinv2_small_window16_256.ms_in1k", None),
    "swinv2_base_patch4_window8_256": PublishedWeights("timm/swinv2_base_window8_256.ms_in1k", None),
    "swinv2_base_patch4_window16_256": PublishedWeights("timm/swinv2_base_window16_256.ms_in1k", None),
    # Swin V2, ImageNet-22K at 192, and 22K fine-tuned on 1K at 256 / 384
    "swinv2_base_patch4_window12_192_22k": PublishedWeights("timm/swinv2_base_window12_192.ms_in22k", None),
    "swinv2_large_patch4_window12_192_22k": PublishedWeights("timm/swinv2_large_window12_192.ms_in22k", None),
    "swinv2_base_patch4_window12to16_192to256_22kto1k_ft": PublishedWeights(
        "timm/swinv2_base_window12to16_192to256.ms_in22k_ft_in1k", None
    ),
    "swinv2_base_patch4_window12to24_192to384_22kto1k_ft": PublishedWeights(
        "timm/swinv2_base_window12to24_192to384.ms_in22k_ft_in1k", None
    ),
    "swinv2_large_patch4_window12to16_192to256_22kto1k_ft": PublishedWeights(
        "timm/swinv2_large_window12to16_192to256.ms_in22k_ft_in1k", None
    ),
    "swinv2_large_patch4_window12to24_192to384_22kto1k_ft": PublishedWeights(
        "timm/swinv2_large_window12to24_192to384.ms_in22k_ft_in1k", None
    ),
}


def hub_repo_id(name: str) -> str | None:
    """The Hub repository a weights name stands for; None when ``name`` is no weights name (a file path)."""
    if name.startswith(HF_HUB_PREFIX):
        return name[len(HF_HUB_PREFIX) :]
    published = PUBLISHED.get(name.removesuffix(".pth"))
    return published.hub_id if published is not None else None


def fetch_command(repo_id: str) -> str:
    """The shell command that puts ``repo_id``'s weights into the Hub cache on a connected machine."""
    return (
        f'hf download {repo_id} {WEIGHTS_FILE}   (or: python -c "from huggingface_hub import hf_hub_download; '
        f"hf_hub_download('{repo_id}', '{WEIGHTS_FILE}')\")"
    )


def resolve_weights(path_or_name: str | Path) -> Path:
    """A checkpoint path as given; a weights name -> its ``model.safetensors`` in the Hub cache (fetched if online).

    Raises FileNotFoundError naming the model, the cache folder and the fetch command when the file is not cached
    and cannot be downloaded (offline), ValueError when the Hub has no such repository or file.
    """
    path = Path(path_or_name)
    repo_id = None if path.exists() else hub_repo_id(str(path_or_name))
    if repo_id is None:
        return path
    try:
        return Path(hf_hub_download(repo_id, WEIGHTS_FILE))
    except LocalEntryNotFoundError as err:  # not cached, and offline or the Hub unreachable
        why = "HF_HUB_OFFLINE=1 forbids downloading" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise FileNotFoundError(
            f"pretrained weights {str(path_or_name)!r} ({repo_id}/{WEIGHTS_FILE}) are not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} and {why}. On a connected machine run: {fetch_command(repo_id)} -- with the "
            "same HF_HUB_CACHE (or HF_HOME) -- then copy that cache folder here or point HF_HUB_CACHE at it."
        ) from err
    except (RepositoryNotFoundError, EntryNotFoundError) as err:
        raise ValueError(
            f"pretrained weights {str(path_or_name)!r}: the Hub has no {WEIGHTS_FILE} in {repo_id!r} ({err}); "
            f"use an 'hf-hub:<org>/<repo>' holding safetensors weights or a name from docs/weights.md"
        ) from err
