import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models import get_pretrained_cfg

from swinlab.models import create_model, load_pretrained
from swinlab.models.hub import PUBLISHED, resolve_weights
from tests.helpers import REPO, TINY_SWIN, write_hub_cache

REPO_ID = "timm/swin_tiny_patch4_window7_224.ms_in1k"


@pytest.fixture
def tiny_timm_swin():
    torch.manual_seed(0)
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in TINY_SWIN.items()}
    return timm.create_model("swin_tiny_patch4_window7_224", num_classes=5, **settings).eval()


@pytest.mark.parametrize(
    "name", [f"hf-hub:{REPO_ID}", "swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224.pth"]
)
def test_hub_name_loads_the_cached_weights(offline_hub, tiny_timm_swin, name):
    snapshot = write_hub_cache(offline_hub, REPO_ID, tiny_timm_swin.state_dict())
    assert resolve_weights(name) == snapshot

    model = create_model("swin_t", num_classes=5, **TINY_SWIN).eval()
    result = load_pretrained(model, name)
    assert not result.missing_keys and not result.unexpected_keys
    ours = model.state_dict()
    for key, value in tiny_timm_swin.named_parameters():
        torch.testing.assert_close(ours[key.replace("head.fc.", "head.")], value, rtol=0, atol=0, msg=key)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), tiny_timm_swin(x), rtol=1e-4, atol=1e-5)


def test_missing_offline_weights_name_model_cache_and_fetch_command(offline_hub):
    with pytest.raises(FileNotFoundError) as err:
        resolve_weights("swinv2_tiny_patch4_window8_256")
    message = str(err.value)
    assert "'swinv2_tiny_patch4_window8_256' (timm/swinv2_tiny_window8_256.ms_in1k/model.safetensors)" in message
    assert f"not in the Hugging Face cache {offline_hub} and HF_HUB_OFFLINE=1 forbids downloading" in message
    assert "hf download timm/swinv2_tiny_window8_256.ms_in1k model.safetensors" in message
    assert "hf_hub_download('timm/swinv2_tiny_window8_256.ms_in1k', 'model.safetensors')" in message


def test_paths_are_not_names(tmp_path, offline_hub):
    # A local file wins over the Hub name it spells; an unknown name stays a path for the caller to report.
    local = tmp_path / "swin_tiny_patch4_window7_224.pth"
    local.write_bytes(b"")
    assert resolve_weights(local) == local
    assert resolve_weights("weights/swin_t.pth") == Path("weights/swin_t.pth")


def test_environment_variables_are_honoured_in_a_fresh_process(tmp_path, tiny_timm_swin):
    """HF_HUB_CACHE and HF_HUB_OFFLINE as a user sets them: before the process starts."""
    snapshot = write_hub_cache(tmp_path / "hub", REPO_ID, tiny_timm_swin.state_dict())
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = "from swinlab.models.hub import resolve_weights; print(resolve_weights('swin_tiny_patch4_window7_224'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(snapshot)


def test_published_names_match_timms_record_of_the_official_files():
    """timm's pretrained configs name the official release URL each Hub copy was converted from."""
    official_file = {}
    for name in timm.list_pretrained("swin*"):
        cfg = get_pretrained_cfg(name)
        if cfg.hf_hub_id and cfg.url and "SwinTransformer/storage" in cfg.url:
            official_file[cfg.hf_hub_id] = Path(cfg.url).stem
    assert {published.hub_id: name for name, published in PUBLISHED.items()} == official_file
