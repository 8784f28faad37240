"""Model registry: ``create_model(name, **overrides)`` builds a backbone by name.

Three kinds of names:

* ``swin_t`` ...: a constructor registered with ``@register_model`` (swinlab's own models);
* ``timm/<timm name>``: any timm model behind swinlab's backbone contract (``swinlab.models.timm_backbone``);
* ``<module>:<function>``: a user's own backbone. ``create_model`` imports ``<module>`` (which registers
  ``<function>`` with ``@swinlab.models.register_model``), so a config names it without editing swinlab.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import partial

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
TIMM_PREFIX = "timm/"


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a constructor under its function name (``swin_t`` ...); importing its module again is fine."""
    existing = _MODELS.get(fn.__name__)
    if existing is not None and (existing.__module__, existing.__qualname__) != (fn.__module__, fn.__qualname__):
        raise ValueError(
            f"model name {fn.__name__!r} of {fn.__module__} is already registered by {existing.__module__}; "
            "rename the function"
        )
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Registered names (``timm/<name>`` and ``<module>:<function>`` names are resolved on use)."""
    return sorted(_MODELS)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a model by name; every constructor argument can be overridden by keyword.

    >>> create_model("swin_t", num_classes=10, window_size=4, img_size=32)
    >>> create_model("timm/resnet18", num_classes=0, out_indices=(0, 1, 2, 3))
    >>> create_model("my_models:tiny_cnn", num_classes=10)  # my_models.py registers tiny_cnn
    """
    try:
        return _constructor(name)(**overrides)
    except TypeError as err:  # an unknown keyword: name it together with the model
        raise TypeError(f"create_model({name!r}, ...): {err}") from err


def _constructor(name: str) -> Callable[..., nn.Module]:
    if name.startswith(TIMM_PREFIX):
        from swinlab.models.timm_backbone import TimmBackbone  # imports timm's model zoo only when asked for

        return partial(TimmBackbone, name[len(TIMM_PREFIX) :])
    if ":" in name:
        return _user_constructor(name)
    if name not in _MODELS:
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(list_models())}, any timm model as "
            "'timm/<name>', or your own as '<module>:<function>' (registered with @swinlab.models.register_model)"
        )
    return _MODELS[name]


def _user_constructor(name: str) -> Callable[..., nn.Module]:
    """``"my_models:tiny_cnn"`` -> the ``tiny_cnn`` that importing ``my_models`` registered."""
    module_name, _, function = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name and not module_name.startswith(f"{err.name}."):
            raise  # the module exists but one of its own imports is missing: show that error as is
        raise ValueError(
            f"model {name!r}: cannot import module {module_name!r} ({err}); run from the folder that holds "
            f"{module_name.replace('.', '/')}.py or add that folder to PYTHONPATH"
        ) from err
    fn = getattr(module, function, None)
    if fn is None or _MODELS.get(function) is not fn:
        # Only registered constructors: a config cannot name an arbitrary callable.
        registered = sorted(k for k, v in _MODELS.items() if getattr(module, k, None) is v)
        raise ValueError(
            f"model {name!r}: module {module_name!r} has no function {function!r} registered with "
            f"@swinlab.models.register_model; it registers: {', '.join(registered) or 'nothing'}"
        )
    return fn
