"""Any timm model as a swinlab backbone: ``create_model("timm/resnet50", num_classes=10)``.

Without ``out_indices`` the wrapper is timm's classifier (``forward`` gives logits). With ``out_indices`` it is
timm's ``features_only`` model at the four levels of strides 4, 8, 16, 32 (``out_indices`` counts those levels,
0 = stride 4, as for Swin), found in timm's ``feature_info``: a ResNet's stride-2 stem level is skipped, and a
model without those levels (a plain ViT such as DeiT: every block at stride 16) is refused by name.

Weights are never downloaded (``pretrained=False``); ``load_pretrained_file`` reads a timm state dict, mapping
keys onto the renamed modules of a ``features_only`` model. Layer-wise lr decay uses the model's own
``group_matcher``, as ``timm.optim.param_groups_layer_decay`` does.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from timm.models import adapt_input_conv, group_parameters
from torch import nn

from swinlab.models.pretrained import LoadResult, read_state_dict, strip_prefixes

logger = logging.getLogger(__name__)

LEVEL_STRIDES = (4, 8, 16, 32)


class TimmBackbone(nn.Module):
    """A timm model behind swinlab's backbone contract.

    ``forward(x)``: (B, C_in, H, W) -> (B, num_classes) logits, or the feature maps when ``out_indices`` is given.
    ``forward_features(x)``: list of NCHW maps, ``feature_channels`` / ``feature_strides`` from timm's
    ``feature_info``: the levels of ``out_indices``, or for a classifier the four stride-4..32 levels when the
    model has them (otherwise every level timm lists).

    Args:
        name: timm model name (``resnet50``, ``convnext_tiny``, ``deit_small_patch16_224`` ...).
        num_classes: classifier size (0: pooled features); unused with ``out_indices``.
        out_indices: feature levels 0..3 (strides 4, 8, 16, 32) for a dense-prediction backbone.
        in_chans: input channels (1 for Fashion-MNIST).
        img_size: passed to models whose constructor takes it (ViTs); dropped for the others (convnets).
        grad_checkpointing: recompute activations in the backward pass (timm's ``set_grad_checkpointing``).
        timm_kwargs: any other ``timm.create_model`` argument (``drop_path_rate`` ...).
    """

    def __init__(
        self,
        name: str,
        num_classes: int = 1000,
        out_indices: Sequence[int] | None = None,
        in_chans: int = 3,
        img_size: int | Sequence[int] | None = None,
        grad_checkpointing: bool = False,
        **timm_kwargs,
    ) -> None:
        super().__init__()
        self.name = name
        self.out_indices = tuple(out_indices) if out_indices is not None else None
        kwargs = {"in_chans": in_chans, **timm_kwargs}
        # The full classifier on the meta device (no memory, no init cost) tells the levels, the names a features
        # model renames, and the layer groups (timm's default classifier included, so it tops them in either mode).
        with torch.device("meta"):
            full = _create(name, **kwargs)
        # ViTs take img_size, convnets not: drop it for those, so one config serves both.
        if img_size is not None and "img_size" in inspect.signature(type(full).__init__).parameters:
            kwargs["img_size"] = img_size
        self.pretrained_cfg = dict(full.pretrained_cfg)
        self._full_keys = set(full.state_dict())
        classifiers = self.pretrained_cfg.get("classifier") or ()
        self._classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
        self._layer_of = (
            group_parameters(full, full.group_matcher(coarse=False), reverse=True)
            if hasattr(full, "group_matcher")
            else None
        )
        levels = _stride_levels(full.feature_info)
        if self.out_indices is None:
            self.model = _create(name, num_classes=num_classes, **kwargs)
            self._level_indices = levels or list(range(len(full.feature_info)))
            info = [full.feature_info[i] for i in self._level_indices]
            self.feature_channels = [f["num_chs"] for f in info]
            self.feature_strides = [f["reduction"] for f in info]
            self.num_features = self.model.num_features
        else:
            if levels is None:
                found = sorted({f["reduction"] for f in full.feature_info})
                raise ValueError(
                    f"timm model {name!r} has no feature levels at strides {LEVEL_STRIDES} (its feature_info "
                    f"strides: {found}), so it cannot feed the detection or segmentation heads; pick a model with a "
                    "four-level pyramid (timm/resnet50, timm/convnext_tiny, timm/regnety_040, ...)"
                )
            if not self.out_indices or any(not 0 <= i < len(LEVEL_STRIDES) for i in self.out_indices):
                raise ValueError(
                    f"out_indices={self.out_indices} must name levels in 0..3 (strides {LEVEL_STRIDES}) for {name!r}"
                )
            self.model = _create(name, features_only=True, out_indices=[levels[i] for i in self.out_indices], **kwargs)
            self.feature_channels = list(self.model.feature_info.channels())
            self.feature_strides = list(self.model.feature_info.reduction())
            self.num_features = self.feature_channels[-1]
        if grad_checkpointing:
            self.set_grad_checkpointing(True)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C_in, H, W) -> [(B, feature_channels[i], H / feature_strides[i], W / feature_strides[i])]."""
        if self.out_indices is not None:
            return list(self.model(x))
        if not hasattr(self.model, "forward_intermediates"):
            raise NotImplementedError(
                f"timm model {self.name!r} has no forward_intermediates, so its classifier gives no feature maps; "
                "create it with out_indices for the maps"
            )
        return self.model.forward_intermediates(x, indices=self._level_indices, intermediates_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.forward_features(x) if self.out_indices is not None else self.model(x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # timm's getter-style feature wrapper keeps the whole model as `.model` without forwarding this switch.
        target = self.model if hasattr(self.model, "set_grad_checkpointing") else getattr(self.model, "model", None)
        if not hasattr(target, "set_grad_checkpointing"):
            raise ValueError(f"timm model {self.name!r} does not support gradient checkpointing")
        target.set_grad_checkpointing(enable)

    def full_key(self, key: str) -> str | None:
        """Name in the full timm model (``state_dict`` of ``timm.create_model(name)``) of a key of ``self.model``.

        ``features_only`` wrappers rename: nn.Sequential children are flattened (``stages.0`` -> ``stages_0``)
        and getter-style wrappers hold the model as ``model.``; None where the key has no counterpart.
        """
        if key in self._full_keys:
            return key
        head, _, rest = key.partition(".")
        if head == "model" and rest in self._full_keys:
            return rest
        for i, char in enumerate(head):
            if char == "_" and (candidate := f"{head[:i]}.{head[i + 1 :]}.{rest}".rstrip(".")) in self._full_keys:
                return candidate
        return None

    @property
    def num_lr_layers(self) -> int:
        """Top layer id for layer-wise lr decay (full lr): timm's last group (classifier), and the task's heads."""
        return max(self._layer_groups().values())

    def lr_layer_id(self, name: str) -> int:
        """Layer of a parameter name (as in ``named_parameters``): timm's ``group_matcher`` group, stem = 0."""
        layers = self._layer_groups()
        inner = name.removeprefix("model.")
        return layers.get(self.full_key(inner) or inner, self.num_lr_layers)

    def _layer_groups(self) -> dict[str, int]:
        if self._layer_of is None:
            raise ValueError(
                f"layer-wise lr decay needs timm's group_matcher, which {self.name!r} does not define; "
                "set model.init_args.layer_decay to null"
            )
        return self._layer_of

    def load_pretrained_file(self, path: str | Path) -> LoadResult:
        """Load a timm state dict (keys of ``timm.create_model(name).state_dict()``) or a swinlab checkpoint of
        this wrapper. The first conv is adapted to ``in_chans`` (timm's ``adapt_input_conv``); a classifier of
        another size, and the head, final norm and later stages a ``features_only`` model has no use for, are
        skipped. Missing and unexpected keys are logged by name; other shape mismatches raise a ValueError."""
        state = strip_prefixes(read_state_dict(path))
        first_convs = self.pretrained_cfg.get("first_conv") or ()
        first_convs = (first_convs,) if isinstance(first_convs, str) else tuple(first_convs)
        target = self.model.state_dict()
        converted, used, skipped = {}, set(), []
        for key, want in target.items():
            source = next((k for k in (key, f"model.{key}", self.full_key(key)) if k in state), None)
            if source is None:
                continue
            used.add(source)
            value = state[source]
            full = self.full_key(key) or key
            if (
                full in (f"{conv}.weight" for conv in first_convs)
                and value.ndim == 4
                and value.shape[1] != want.shape[1]
            ):
                value = adapt_input_conv(want.shape[1], value, base_chans=value.shape[1])
            if value.shape != want.shape:
                if full.rpartition(".")[0] in self._classifiers:
                    logger.warning(
                        "%s: classifier %s has shape %s but the model's is %s (num_classes differs): it is left "
                        "newly initialised",
                        path,
                        source,
                        tuple(value.shape),
                        tuple(want.shape),
                    )
                    skipped.append(source)
                    continue
                raise ValueError(
                    f"{path}: tensor {source!r} has shape {tuple(value.shape)} but timm model {self.name!r} expects "
                    f"{tuple(want.shape)}; check that the checkpoint is for the same model"
                )
            converted[key] = value
        if not converted:
            raise ValueError(
                f"{path}: none of its tensors fits timm model {self.name!r} "
                f"(first keys: {', '.join(list(state)[:5])}); expected a state dict of timm.create_model({self.name!r})"
            )
        rest = [k for k in state if k not in used]
        # Parts of the full model that a features model dropped (head, final norm, later stages) are expected.
        skipped += [k for k in rest if self.out_indices is not None and k in self._full_keys]
        unexpected = [k for k in rest if k not in skipped]
        result = self.model.load_state_dict(converted, strict=False)
        missing = list(result.missing_keys)
        if missing:
            logger.warning("%s: %d keys stay as initialised: %s", path, len(missing), ", ".join(missing))
        if unexpected:
            logger.warning("%s: %d keys have no place in the model: %s", path, len(unexpected), ", ".join(unexpected))
        return LoadResult(missing, unexpected, skipped)


def _create(name: str, **kwargs) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as err:
        if not timm.is_model(name):
            raise ValueError(
                f"unknown timm model {name!r}; list candidates with timm.list_models('*{name.split('_')[0]}*')"
            ) from err
        raise


def _stride_levels(feature_info: Sequence[dict]) -> list[int] | None:
    """Indices into timm's ``feature_info`` of the first level at each stride 4, 8, 16, 32; None if one lacks."""
    first: dict[int, int] = {}
    for index, info in enumerate(feature_info):
        first.setdefault(info["reduction"], index)
    if not all(stride in first for stride in LEVEL_STRIDES):
        return None
    return [first[stride] for stride in LEVEL_STRIDES]
