"""Model registry: ``create_model(name, **overrides)`` builds any registered model by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a constructor under its function name (``swin_t`` ...)."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; every constructor argument can be overridden by keyword.

    >>> create_model("swin_t", num_classes=10, window_size=4, img_size=32)
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    try:
        return _MODELS[name](**overrides)
    except TypeError as err:  # an unknown keyword: name it together with the model
        raise TypeError(f"create_model({name!r}, ...): {err}") from err
