"""Checks of a parsed run configuration, so that a bad value fails before any data is read or any step runs.

Each problem is reported with its config key and the fix, all problems of a config in one ``ConfigError``.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import torch

from swinlab.checkpointing import load_checkpoint_safely
from swinlab.models import SwinTransformer, create_model, list_models

# Data-module arguments that name a folder the data must already be in.
DATA_PATH_KEYS: tuple[str, ...] = ("data_dir", "root", "data_root")


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every bad key with its fix."""


def _get(namespace: Any, key: str, default: Any = None) -> Any:
    if namespace is None:
        return default
    if isinstance(namespace, dict):
        return namespace.get(key, default)
    return getattr(namespace, key, default)


def backbone_problems(backbone: Any, backbone_kwargs: dict[str, Any] | None, prefix: str) -> list[str]:
    """Problems of ``create_model(backbone, **backbone_kwargs)``: its own argument checks (name, ``embed_dim`` vs
    ``num_heads``, ...), run on the meta device so that no weights are made, and, for a classifier, a first feature
    map (``img_size / patch_size``) smaller than ``window_size``, where every window would be mostly padding.
    """
    external = isinstance(backbone, str) and (backbone.startswith("timm/") or ":" in backbone)
    if not isinstance(backbone, str) or (backbone not in list_models() and not external):
        return [
            f"{prefix}.backbone={backbone!r} is not a registered model; choose one of {', '.join(list_models())}, "
            "'timm/<name>' or '<module>:<function>'"
        ]
    kwargs = dict(backbone_kwargs or {})
    try:
        with torch.device("meta"):
            create_model(backbone, **kwargs)
    except (ValueError, TypeError) as err:
        return [f"{prefix}.backbone_kwargs: {err}"]
    except (NotImplementedError, RuntimeError):
        pass  # a meta tensor cannot give values (``.tolist()``) later in the constructor: its checks have passed
    if external:
        return []  # a timm or user backbone: the window check below is Swin's
    defaults = {name: p.default for name, p in inspect.signature(SwinTransformer).parameters.items()}
    setting = {**defaults, **kwargs}
    img_size, patch_size, window = setting["img_size"], setting["patch_size"], setting["window_size"]
    img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if setting["out_indices"] is None and not setting["clip_window_to_feature"]:
        grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        if window > min(grid):
            return [
                f"{prefix}.backbone_kwargs.window_size={window} is larger than the first feature map "
                f"{grid[0]}x{grid[1]} "
                f"(img_size {img_size[0]}x{img_size[1]} / patch_size {patch_size}); set window_size <= {min(grid)}, "
                "a larger img_size or a smaller patch_size, or clip_window_to_feature: true"
            ]
    return []


def optimizer_problems(optimizer: Any, prefix: str) -> list[str]:
    """A non-positive lr or a negative weight decay of a ``class_path``/``init_args`` optimizer config."""
    init_args = _get(optimizer, "init_args")
    problems = []
    lr = _get(init_args, "lr")
    if isinstance(lr, (int, float)) and not lr > 0:
        problems.append(f"{prefix}.init_args.lr={lr} must be > 0; set e.g. --{prefix}.init_args.lr=1.0e-3")
    weight_decay = _get(init_args, "weight_decay")
    if isinstance(weight_decay, (int, float)) and weight_decay < 0:
        problems.append(f"{prefix}.init_args.weight_decay={weight_decay} must be >= 0")
    return problems


def data_problems(data: Any, subcommand: str | None) -> list[str]:
    """Data folders that do not exist (``data_dir``, ``root``, ``data_root``; ``predict_dir`` for predict)."""
    init_args = _get(data, "init_args")
    keys = DATA_PATH_KEYS + (("predict_dir",) if subcommand == "predict" else ())
    problems = []
    for key in keys:
        value = _get(init_args, key)
        if value is not None and not Path(value).is_dir():
            problems.append(
                f"data.init_args.{key}={str(value)!r} is not a folder; pass --data.init_args.{key}=/path/to/the/data "
                "(see the data module's --data.help for the layout it expects)"
            )
    return problems


def validate_run_config(config: Any, subcommand: str | None = None) -> None:
    """Raise one ``ConfigError`` listing every problem of a parsed LightningCLI config (``model``, ``data``)."""
    problems: list[str] = []
    model_args = _get(_get(config, "model"), "init_args")
    if _get(model_args, "backbone") is not None:
        problems += backbone_problems(
            _get(model_args, "backbone"), _get(model_args, "backbone_kwargs"), "model.init_args"
        )
    if _get(model_args, "optimizer") is not None:
        problems += optimizer_problems(_get(model_args, "optimizer"), "model.init_args.optimizer")
    problems += data_problems(_get(config, "data"), subcommand)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def requested_num_classes(config: Any) -> int | None:
    """``model.init_args.num_classes`` when the config sets it to something other than the task's default.

    The CLI links ``num_classes`` from the data module, which silently replaces a value given in the config; this
    is the value to compare with the data once it is built.
    """
    model = _get(config, "model")
    class_path, requested = _get(model, "class_path"), _get(_get(model, "init_args"), "num_classes")
    if not isinstance(class_path, str) or not isinstance(requested, int):
        return None
    module_name, _, class_name = class_path.rpartition(".")
    try:
        task = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None
    parameter = inspect.signature(task).parameters.get("num_classes")
    return requested if parameter is None or parameter.default != requested else None


def check_num_classes(model: Any, datamodule: Any, requested: int | None = None) -> None:
    """The task's ``num_classes`` (and the config's, ``requested``) must match the data module's."""
    data_classes = getattr(datamodule, "num_classes", None)
    if not isinstance(data_classes, int):
        return
    model_classes = getattr(model, "num_classes", None)
    for where, value in (("model.init_args.num_classes", requested), ("the model's num_classes", model_classes)):
        if isinstance(value, int) and value != data_classes:
            raise ConfigError(
                f"{where}={value} but the data has {data_classes} classes ({type(datamodule).__name__}.class_names); "
                "drop model.init_args.num_classes (the CLI links it from the data), or point the data module at "
                "the data with the classes you meant"
            )


def check_checkpoint_classes(ckpt_path: str | Path, datamodule: Any) -> None:
    """A checkpoint to resume or evaluate must have been trained on as many classes as the data has."""
    data_classes = getattr(datamodule, "num_classes", None)
    if not isinstance(data_classes, int) or not Path(ckpt_path).is_file():
        return
    checkpoint = load_checkpoint_safely(ckpt_path, map_location="cpu")
    saved = _get(checkpoint.get("hyper_parameters"), "num_classes")
    if isinstance(saved, int) and saved != data_classes:
        raise ConfigError(
            f"--ckpt_path {ckpt_path} was trained with num_classes={saved} but the data has {data_classes} classes; "
            "resume only with the data it was trained on, or fine-tune from it with model.init_args.pretrained "
            "(the head is then re-initialised)"
        )
