"""Config composition: a YAML config may name the configs it builds on in a top-level ``__base__`` key.

A variant states only what differs from its base recipe (model size, schedule, drop path, output folder)::

    # configs/detection/mask_rcnn_swin_s_fpn_3x_coco.yaml
    __base__: [mask_rcnn_swin_s_fpn_1x_coco.yaml, _base_/schedule_3x.yaml]
    trainer:
      default_root_dir: runs/detection/mask_rcnn_swin_s_fpn_3x_coco

Rules: ``__base__`` is a path or a list of paths, relative to the file that names them. Bases are composed
recursively and merged in the order listed, then the file itself on top. Merging is key by key for mappings;
any other value (scalar, list, null) from a later file replaces the earlier one. Two exceptions replace a mapping
instead of merging into it: a ``class_path`` naming another class than the base's (its ``init_args`` would not fit
the new class: an ``SGD`` variant of an ``AdamW`` recipe must not inherit ``betas``), and ``__delete__: true``
inside the mapping (as mmdetection's ``_delete_``)::

    model:
      init_args:
        optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.1, momentum: 0.9}}
        backbone_kwargs: {__delete__: true, drop_path_rate: 0.1}   # the base's other backbone_kwargs are dropped
 ``${...}`` interpolations are
left as written, so jsonargparse resolves them after the command-line overrides. A missing base or a cycle is an
error naming the file. The CLI expands every ``--config FILE`` that has a ``__base__`` key into the composed
config before jsonargparse parses (:func:`expand_config_args`), less the keys of ``fit``-only arguments for other
commands; files without either are passed through untouched.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import get_loader

BASE_KEY = "__base__"
DELETE_KEY = "__delete__"  # ``__delete__: true`` in a mapping: it replaces the base's mapping instead of merging
CONFIG_FLAGS = ("--config", "-c")  # LightningCLI's config-file option


class ConfigCompositionError(ValueError):
    """A ``__base__`` entry that is missing, malformed or part of a cycle."""


def _replaces(base: Mapping[str, Any], override: Mapping[str, Any]) -> bool:
    """Whether ``override`` replaces ``base`` rather than merging into it: ``__delete__: true``, or a ``class_path``
    of another class (compared by class name, so ``AdamW`` and ``torch.optim.AdamW`` still merge)."""
    if override.get(DELETE_KEY) is True:
        return True
    base_class, new_class = base.get("class_path"), override.get("class_path")
    if not (isinstance(base_class, str) and isinstance(new_class, str)):
        return False
    return base_class.rsplit(".", 1)[-1] != new_class.rsplit(".", 1)[-1]


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``: mappings merge key by key (recursively) unless the override swaps the class
    or says ``__delete__: true`` (it then replaces the base's mapping); other values replace."""
    if DELETE_KEY in override and not isinstance(override[DELETE_KEY], bool):
        raise ConfigCompositionError(f"{DELETE_KEY} must be true or false, got {override[DELETE_KEY]!r}")
    merged = {} if _replaces(base, override) else dict(base)
    for key, value in override.items():
        if key == DELETE_KEY:
            continue
        if isinstance(value, Mapping):
            # Merged into an empty mapping where the base has none, so that nested ``__delete__`` keys are dropped.
            merged[key] = merge(merged[key] if isinstance(merged.get(key), Mapping) else {}, value)
        else:
            merged[key] = value
    return merged


def _read(path: Path) -> dict[str, Any]:
    # jsonargparse's own YAML loader, so values read exactly as the CLI would read them (``1e-4`` is a float).
    try:
        content = get_loader("yaml")(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigCompositionError(f"{path}: not valid YAML: {err}") from err
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigCompositionError(f"{path}: a config must be a mapping of keys to values, got {type(content)}")
    return content


def _base_paths(path: Path, config: dict[str, Any]) -> list[Path]:
    bases = config.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigCompositionError(
            f"{path}: {BASE_KEY} must be a path or a list of paths (relative to this file), got {bases!r}"
        )
    return [path.parent / base for base in bases]


def _compose(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(path) :], path))
        raise ConfigCompositionError(f"{chain[-1]}: {BASE_KEY} cycle: {cycle}")
    config = _read(path)
    composed: dict[str, Any] = {}
    for base in _base_paths(path, config):
        if not base.is_file():
            raise ConfigCompositionError(
                f"{path}: {BASE_KEY} entry {os.path.relpath(base, path.parent)!r} not found (looked for {base}); "
                "base paths are relative to the file that names them"
            )
        composed = merge(composed, _compose(base.resolve(), (*chain, path)))
    try:
        return merge(composed, config)
    except ConfigCompositionError as err:
        raise ConfigCompositionError(f"{path}: {err}") from None


def compose(path: str | os.PathLike) -> dict[str, Any]:
    """The config at ``path`` with its ``__base__`` configs merged underneath (recursively, in listed order)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigCompositionError(f"config file {path} not found")
    return _compose(path, chain=())


def has_keys(path: str | os.PathLike, keys: Sequence[str] = (BASE_KEY,)) -> bool:
    """Whether ``path`` is a YAML file with any of ``keys`` (default ``__base__``) at its top level."""
    path = Path(path)
    if not path.is_file():
        return False  # a config given as a string, or a missing file jsonargparse reports
    try:
        content = get_loader("yaml")(path.read_text())
    except yaml.YAMLError:
        return False  # not ours to report: jsonargparse names the file and the error
    return isinstance(content, dict) and any(key in content for key in keys)


def expand_config_args(args: Sequence[str], drop_keys: Sequence[str] = ()) -> list[str]:
    """Replace each ``--config FILE`` (or ``--config=FILE``, ``-c FILE``) whose file has a ``__base__`` key (or one
    of ``drop_keys``) by ``--config`` and the composed config, less its top-level ``drop_keys``, as a YAML string;
    every other argument is kept as it is."""
    keys = (BASE_KEY, *drop_keys)

    def composed(path: str) -> str:
        return _dump({key: value for key, value in compose(path).items() if key not in drop_keys})

    expanded = list(args)
    for index, arg in enumerate(expanded):
        flag, equals, value = arg.partition("=")
        if equals and flag in CONFIG_FLAGS and has_keys(value, keys):
            expanded[index] = f"{flag}={composed(value)}"
        elif not equals and index > 0 and expanded[index - 1] in CONFIG_FLAGS and has_keys(arg, keys):
            expanded[index] = composed(arg)
    return expanded


def expand_command_line(args: Sequence[str] | None, drop_keys: Sequence[str] = ()) -> list[str] | None:
    """:func:`expand_config_args` of ``args``; with ``None``, of ``sys.argv`` in place, and ``None`` is returned.

    In place because LightningCLI reads ``sys.argv`` when given no ``args`` and warns when given both.
    """
    if args is not None:
        return expand_config_args(args, drop_keys)
    sys.argv[1:] = expand_config_args(sys.argv[1:], drop_keys)
    return None


def _dump(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)
