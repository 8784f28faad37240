"""Checks of a parsed run configuration, so that a bad value fails before any data is read or any step runs.

Each problem is reported with its config key and the fix, all problems of a config in one ``ConfigError``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import torch

from swinlab.models import SwinTransformer, create_model, list_models
from swinlab.models.checkpoint_file import (
    CheckpointFileError,
    read_checkpoint_file,
    read_lightning_checkpoint,
    unwrap_weights,
)
from swinlab.models.pretrained import to_swinlab_layout

# Data-module arguments that name a folder the data must already be in.
DATA_PATH_KEYS: tuple[str, ...] = ("data_dir", "root", "data_root")
# Suffixes that make a ``pretrained`` value a local file (not a Hub name), checked before anything is built.
CKPT_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin", ".safetensors")


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
    pretrained_file_problems(model_args)


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


def pretrained_file_problems(model_args: Any) -> None:
    """Raise a ``CheckpointFileError`` when ``pretrained`` names a local file that is not a usable checkpoint, or
    one that holds none of the backbone's weights (a checkpoint of another model); Hub names are left to the
    loader."""
    pretrained = _get(model_args, "pretrained")
    if not isinstance(pretrained, str) or not (Path(pretrained).exists() or Path(pretrained).suffix in CKPT_SUFFIXES):
        return
    what = "model.init_args.pretrained"
    contents = unwrap_weights(read_checkpoint_file(pretrained, what))
    backbone, kwargs = _get(model_args, "backbone"), dict(_get(model_args, "backbone_kwargs") or {})
    if not isinstance(backbone, str) or backbone not in list_models():
        return
    try:
        with torch.device("meta"):  # only the weights' names are needed: none are allocated
            wanted = set(create_model(backbone, **kwargs).state_dict())
    except (ValueError, TypeError):
        return  # reported by backbone_problems
    tensors = {k: v for k, v in contents.items() if isinstance(v, torch.Tensor)} if isinstance(contents, dict) else {}
    found = wanted & set(to_swinlab_layout(tensors))
    if len(found) < len(wanted) // 2:
        raise CheckpointFileError(
            f"{what} {pretrained}: holds {len(found)} of the {len(wanted)} weights of backbone {backbone} "
            f"(it is not a checkpoint of this model; its keys start {', '.join(list(tensors)[:3]) or 'with nothing'})"
        )


def check_checkpoint_matches(ckpt_path: str | Path, model: Any, datamodule: Any) -> None:
    """A checkpoint to resume or evaluate must be one of this task and model (same weights by name and shape) and
    must have been trained on as many classes as the data has."""
    saved, hparams = read_lightning_checkpoint(ckpt_path)
    saved_class = _get(hparams, "_class_path")
    task = f"{type(model).__module__}.{type(model).__name__}"
    of = f"a checkpoint of {saved_class} (backbone {_get(hparams, 'backbone')})" if saved_class else "a checkpoint"
    running = f"{task} (backbone {getattr(model, 'hparams', {}).get('backbone')})"
    if isinstance(saved_class, str) and saved_class.rsplit(".", 1)[-1] != type(model).__name__:
        raise CheckpointFileError(f"--ckpt_path {ckpt_path}: {of}, but this run is {running}")
    data_classes = getattr(datamodule, "num_classes", None)
    saved_classes = _get(hparams, "num_classes")
    if isinstance(data_classes, int) and isinstance(saved_classes, int) and saved_classes != data_classes:
        raise ConfigError(
            f"--ckpt_path {ckpt_path} was trained with num_classes={saved_classes} but the data has {data_classes} "
            "classes; resume only with the data it was trained on, or fine-tune from it with "
            "model.init_args.pretrained (the head is then re-initialised)"
        )
    wanted = model.state_dict()
    missing, unexpected = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    if missing or unexpected:
        raise CheckpointFileError(
            f"--ckpt_path {ckpt_path}: {of} whose weights do not fit {running}: {len(missing)} of the model's "
            f"weights are missing (first: {', '.join(missing[:2]) or '-'}), {len(unexpected)} have no place in it "
            f"(first: {', '.join(unexpected[:2]) or '-'})"
        )
    for key, value in saved.items():
        if isinstance(value, torch.Tensor) and value.shape != wanted[key].shape:
            raise CheckpointFileError(
                f"--ckpt_path {ckpt_path}: {of} whose weight {key} is {tuple(value.shape)} but {running} has "
                f"{tuple(wanted[key].shape)}; check backbone and backbone_kwargs"
            )


def check_checkpoint_task(ckpt_path: str | Path, model_config: Any) -> None:
    """Before LightningCLI applies a ``--ckpt_path`` file's hyper-parameters to the config: the file must be a
    readable checkpoint, and one of the task the config names (else LightningCLI would switch the task to the
    checkpoint's)."""
    _, hparams = read_lightning_checkpoint(ckpt_path)
    saved, wanted = _get(hparams, "_class_path"), _get(model_config, "class_path")
    if isinstance(saved, str) and isinstance(wanted, str) and saved.rsplit(".", 1)[-1] != wanted.rsplit(".", 1)[-1]:
        raise CheckpointFileError(
            f"--ckpt_path {ckpt_path}: a checkpoint of {saved} (backbone {_get(hparams, 'backbone')}), but this run's "
            f"model is {wanted}; pass a checkpoint of that task, or a config of {saved.rsplit('.', 1)[-1]}"
        )


def _parser_keys(parser: Any) -> list[str]:
    skip = ("help", "config", "print_config")
    return [action.dest for action in parser._actions if action.dest not in skip and not action.dest.endswith(".help")]


def _class_keys(class_path: str) -> list[str]:
    """The init argument names jsonargparse accepts for ``class_path``."""
    from jsonargparse import ArgumentParser

    module_name, _, class_name = class_path.rpartition(".")
    try:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(getattr(importlib.import_module(module_name), class_name))
    except (ImportError, AttributeError, ValueError):
        return []
    return _parser_keys(parser)


_PARSE_TOKENS = re.compile(
    r"Parser key \"(?P<key>[^\"]+)\"|class_path '(?P<class_path>[^']+)'|Option '(?P<option>[^']+)' is not accepted"
)


def explain_parse_error(message: str, parser: Any) -> str:
    """jsonargparse's error ``message`` for ``parser`` (the subcommand's), rewritten where it is an unknown key:
    ``unknown key model.init_args.backbon; did you mean model.init_args.backbone?``; other messages unchanged."""
    unknown = re.search(r"unrecognized arguments: (.+)", message)
    # The flags, not their values: ``--overwrite true`` is one unknown key.
    flags = [f for f in unknown.group(1).split() if f.startswith("-")] if unknown else []
    flags = flags or re.findall(r"does not accept option '([^']+)'", message)
    if flags:
        keys = [flag.lstrip("-").split("=", 1)[0] for flag in flags]
        return "; ".join(_unknown_key(key, _closest(key, _parser_keys(parser))) for key in keys)
    path, class_path = [], None
    for token in _PARSE_TOKENS.finditer(message):
        if token["key"]:
            path.append(token["key"])
        elif token["class_path"]:
            class_path = token["class_path"]
            path.append("init_args")
        else:
            # A callable's class (an optimizer) is named after the option: "... Got value: Namespace(class_path=...".
            line_end = message.find("\n", token.end())
            inner = re.search(r"class_path='([^']+)'", message[token.end() : None if line_end < 0 else line_end])
            if inner:
                class_path = inner.group(1)
                path.append("init_args")
            prefix = ".".join(path)
            known = [f"{prefix}.{name}" for name in _class_keys(class_path or "")]
            key = f"{prefix}.{token['option']}"
            # A dict value under a misspelt key arrives as its inner keys (``backbone_kwarg.window``): name the
            # longest part of the key that has a close valid one.
            parts = key.split(".")
            for end in range(len(parts), len(path), -1):
                close = _closest(".".join(parts[:end]), known)
                if close:
                    return _unknown_key(".".join(parts[:end]), close, class_path)
            return _unknown_key(key, [], class_path)
    return message


def _closest(key: str, known: list[str]) -> list[str]:
    """Up to three of ``known`` whose last part is close to ``key``'s (on whole keys, the shared ``model.init_args.``
    would make any two keys of a class look alike), the closest whole keys first."""
    leaf = key.rsplit(".", 1)[-1]
    close = set(difflib.get_close_matches(leaf, {name.rsplit(".", 1)[-1] for name in known}, n=3, cutoff=0.75))
    candidates = [name for name in known if name.rsplit(".", 1)[-1] in close]
    return sorted(candidates, key=lambda name: -difflib.SequenceMatcher(None, key, name).ratio())[:3]


def _unknown_key(key: str, close: list[str], class_path: str | None = None) -> str:
    where = f" of {class_path}" if class_path else ""
    if close:
        hint = f"did you mean {' or '.join(f'`{name}`' for name in close)}?"
    elif class_path:
        hint = f"--{key.rsplit('.init_args.', 1)[0]}.help {class_path} lists its keys"
    else:
        hint = "--help lists the valid keys"
    return f"unknown config key `{key}`{where} (command line or --config file); {hint}"
