"""Pure-PyTorch models (no Lightning): the Swin backbones, their registry and checkpoint loading.

Each model module registers its variants where they are defined (``@register_model``); importing it is enough.
"""

from swinlab.models import swin, swin_mlp  # noqa: F401  (registers swin_t/s/b/l and swin_mlp_t)
from swinlab.models.pretrained import load_pretrained
from swinlab.models.registry import create_model, list_models, register_model
from swinlab.models.simmim import MaskGenerator, SimMIM
from swinlab.models.swin import SwinTransformer

__all__ = [
    "MaskGenerator",
    "SimMIM",
    "SwinTransformer",
    "create_model",
    "list_models",
    "load_pretrained",
    "register_model",
]
