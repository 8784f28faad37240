"""Pure-PyTorch models (no Lightning): the Swin backbone, its registry and checkpoint loading."""

from swinlab.models import swin, swin_mlp
from swinlab.models.pretrained import load_pretrained
from swinlab.models.registry import create_model, list_models, register_model
from swinlab.models.swin import SwinTransformer

for _name in ("swin_t", "swin_s", "swin_b", "swin_l"):
    register_model(getattr(swin, _name))
register_model(swin_mlp.swin_mlp_t)

__all__ = ["SwinTransformer", "create_model", "list_models", "load_pretrained", "register_model"]
