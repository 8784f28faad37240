"""The shipped configs compose, print and fit; the ``__base__`` composition rules; config duplication stays low."""

import contextlib
import io
import re
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from swinlab.cli import main
from swinlab.config_compose import ConfigCompositionError, compose, expand_config_args, merge
from swinlab.models.hub import PUBLISHED
from swinlab.search import KINDS as SEARCH_KINDS
from swinlab.sweep import GRID_KEYS
from tests.helpers import REPO, TINY_SWIN

CONFIGS = REPO / "configs"
QUICKSTART = CONFIGS / "classification" / "quickstart_fashion_mnist.yaml"
ABLATION_BASE = CONFIGS / "ablations" / "fashion_mnist_base.yaml"
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true"]
SHAPE_KEYS = {"embed_dim", "depths", "num_heads"}


def is_sweep_file(path: Path) -> bool:
    """A sweep grid (``seeds``/``grid``/``points``) or a search space (dotted keys to ranges), not a LightningCLI
    config."""
    content = yaml.safe_load(path.read_text()) or {}
    ranges = all(isinstance(spec, dict) and any(kind in spec for kind in SEARCH_KINDS) for spec in content.values())
    return set(content) <= set(GRID_KEYS) or ranges


ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))
# What a user runs: every config outside the ``_base_`` folders, except sweep grids and search spaces.
SHIPPED = [p for p in ALL_YAML if "_base_" not in p.parts and not is_sweep_file(p)]
IDS = [str(p.relative_to(CONFIGS)) for p in SHIPPED]


def print_config(*args: str) -> dict:
    """``fit --print_config`` in this process -> the printed config."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(["fit", *args, "--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


# --- the shipped configs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", SHIPPED, ids=IDS)
def test_every_shipped_config_composes_and_prints(config: Path) -> None:
    printed = print_config("--config", str(config))
    composed = compose(config)
    assert "__base__" not in printed
    assert printed["trainer"]["default_root_dir"] == composed["trainer"]["default_root_dir"]
    assert printed["model"]["class_path"] == composed["model"]["class_path"]
    assert printed["model"]["init_args"]["backbone"] == composed["model"]["init_args"]["backbone"]


def test_every_shipped_config_writes_to_its_own_folder() -> None:
    roots = Counter(compose(config)["trainer"]["default_root_dir"] for config in SHIPPED)
    assert [root for root, count in roots.items() if count > 1] == []


# Paper recipes: not the quickstarts nor the ablation bases built on them (small models from scratch).
PAPER = [c for c in SHIPPED if "quickstart" not in c.name and c.parent.name != "ablations"]


@pytest.mark.parametrize("config", PAPER, ids=[str(p.relative_to(CONFIGS)) for p in PAPER])
def test_paper_configs_take_the_shape_from_the_registry_name(config: Path) -> None:
    backbone_kwargs = compose(config)["model"]["init_args"].get("backbone_kwargs", {})
    assert not SHAPE_KEYS & set(backbone_kwargs)


@pytest.mark.parametrize("config", PAPER, ids=[str(p.relative_to(CONFIGS)) for p in PAPER])
def test_recipes_start_from_published_weights_of_their_own_model(config: Path) -> None:
    """Detection, segmentation and fine-tuning recipes name official release weights (docs/weights.md) of the same
    model size; ImageNet and SimMIM pre-training recipes start from scratch, SimMIM fine-tuning from the last
    checkpoint of the SimMIM recipe of its model."""
    init_args = compose(config)["model"]["init_args"]
    pretrained = init_args.get("pretrained")
    if config.parent.name == "pretraining" or (
        config.parent.name == "classification" and "finetune" not in config.name
    ):
        assert pretrained is None
        return
    if "simmim" in config.name:
        run = Path(pretrained).parts[1]
        assert (
            compose(CONFIGS / "pretraining" / f"{run}.yaml")["model"]["init_args"]["backbone"] == init_args["backbone"]
        )
        return
    assert pretrained in PUBLISHED
    size = {"t": "tiny", "s": "small", "b": "base", "l": "large"}[init_args["backbone"].split("_")[-1]]
    family = init_args["backbone"].split("_")[0]  # swin or swinv2
    assert pretrained.startswith(f"{family}_{size}_")


def test_changing_the_backbone_of_a_upernet_config_changes_the_shape() -> None:
    """Issue 14: the Swin-T UperNet config with ``backbone=swin_b`` used to build a Swin-T shape called swin_b."""
    config = CONFIGS / "segmentation" / "upernet_swin_t_512x512_160k_ade20k.yaml"
    model = print_config("--config", str(config), "--model.init_args.backbone=swin_b")["model"]["init_args"]
    from swinlab.models import create_model

    with mock.patch("swinlab.models.swin.SwinTransformer") as built:
        create_model(model["backbone"], **model["backbone_kwargs"])
    built_with = built.call_args.kwargs
    shape = (built_with["embed_dim"], tuple(built_with["depths"]), tuple(built_with["num_heads"]))
    # Swin-B in the paper (section 3.3): C = 128, layer numbers {2, 2, 18, 2}, heads 4-8-16-32 (head dim 32).
    assert shape == (128, (2, 2, 18, 2), (4, 8, 16, 32))
    assert built_with["drop_path_rate"] == 0.3  # the UperNet recipe's, not the registry's


def fashion_mnist_args(data_dir: Path, run_dir: Path) -> list[str]:
    tiny = {**TINY_SWIN, "in_chans": 1}
    return [
        *CPU,
        "--trainer.fast_dev_run=true",
        f"--trainer.default_root_dir={run_dir}",
        f"--data.init_args.data_dir={data_dir}",
        "--data.init_args.val_size=8",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--data.init_args.persistent_workers=false",
        f"--model.init_args.backbone_kwargs={yaml.safe_dump(tiny, default_flow_style=True).strip()}",
    ]


# The quickstarts, like every other config of their folder, are fitted on tiny data by tests/test_cli.py
# (classification) and tests/tasks/test_{detection,segmentation}.py; the ablation base is composed across folders.
def test_ablation_base_fits(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    cli = main(["fit", "--config", str(ABLATION_BASE), *fashion_mnist_args(fashion_mnist_dir, tmp_path)])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1


def test_ablation_base_is_the_quickstart_shortened_with_shifted_windows_in_every_stage() -> None:
    quickstart, ablation = print_config("--config", str(QUICKSTART)), print_config("--config", str(ABLATION_BASE))
    # Both keep window 4 and the shift in stages 2 and 3 (4x4 and 2x2 maps), where the default would clip them.
    assert ablation["model"]["init_args"]["backbone_kwargs"]["clip_window_to_feature"] is False
    assert ablation["model"] == quickstart["model"] and ablation["data"] == quickstart["data"]
    assert (ablation["trainer"]["max_epochs"], ablation["trainer"]["limit_train_batches"]) == (2, 0.25)
    assert not ablation["test_after_fit"] and quickstart["test_after_fit"]


V1_TO_V2 = CONFIGS / "ablations" / "v1_to_v2.yaml"


def test_v1_to_v2_grid_adds_one_change_at_a_time_and_ends_at_swin_v2() -> None:
    from swinlab.models.swin import SWIN_V2
    from swinlab.sweep import load_grid

    points, seeds = load_grid(V1_TO_V2)
    prefix = "model.init_args.backbone_kwargs."
    assert all(key.startswith(prefix) for point in points for key in point) and seeds == [0, 1, 2]
    changed = [{key.removeprefix(prefix): value for key, value in point.items()} for point in points]
    v1 = {"norm": "pre", "similarity": "dot", "position_bias": "relative", "merge_norm": "before", "qkv_bias": True}
    switched_on = [{key for key, value in point.items() if value != v1[key]} for point in changed]
    assert switched_on[:4] == [set(), {"norm"}, {"norm", "similarity"}, {"norm", "similarity", "position_bias"}]
    assert changed[-1] == SWIN_V2  # the last point is swinv2_t's set of switches


@pytest.mark.parametrize("point", range(5), ids=["v1", "res_post", "cosine", "cpb", "v2"])
def test_v1_to_v2_points_train_on_the_ablation_base(point: int, fashion_mnist_dir: Path, tmp_path: Path) -> None:
    """Cosine attention and the continuous position bias train at the quickstart's window 4, on 2x2 maps too."""
    from swinlab.sweep import load_grid, point_config

    points, _ = load_grid(V1_TO_V2)
    config = point_config([ABLATION_BASE], points[point], 0, tmp_path)
    shrink = [a for a in fashion_mnist_args(fashion_mnist_dir, tmp_path) if "backbone_kwargs" not in a]
    cli = main(["fit", "--config", str(config), *shrink])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
    backbone = cli.model.backbone
    built = vars(backbone.options)
    prefix = "model.init_args.backbone_kwargs."
    assert {key.removeprefix(prefix): value for key, value in points[point].items()}.items() <= built.items()
    assert not backbone.options.clip_window_to_feature


def test_sweep_accepts_a_composed_base(tmp_path: Path) -> None:
    from swinlab.sweep import point_config

    written = point_config([ABLATION_BASE], {"model.init_args.backbone_kwargs.shift": False}, 3, tmp_path)
    printed = print_config("--config", str(written))
    assert printed["seed_everything"] == 3 and printed["trainer"]["max_epochs"] == 2
    assert printed["model"]["init_args"]["backbone_kwargs"]["shift"] is False


# --- the composition rules ----------------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_bases_resolve_relative_to_the_file_that_names_them_recursively(tmp_path: Path) -> None:
    write(tmp_path / "a" / "_base_" / "root.yaml", "x: {depth: root, keep: 1}\n")
    write(tmp_path / "a" / "middle.yaml", "__base__: [_base_/root.yaml]\nx: {depth: middle}\n")
    variant = write(tmp_path / "b" / "variant.yaml", "__base__: ../a/middle.yaml\ny: 2\n")
    assert compose(variant) == {"x": {"depth": "middle", "keep": 1}, "y": 2}


def test_later_bases_and_then_the_file_itself_win(tmp_path: Path) -> None:
    write(tmp_path / "one.yaml", "a: 1\nb: 1\nlist: [1, 2, 3]\nnested: {p: 1, q: 1}\n")
    write(tmp_path / "two.yaml", "b: 2\nc: 2\nlist: [9]\nnested: {q: 2}\n")
    variant = write(tmp_path / "variant.yaml", "__base__: [one.yaml, two.yaml]\nc: 3\nnested: {r: 3}\n")
    # Mappings merge key by key; lists and scalars are replaced whole.
    assert compose(variant) == {"a": 1, "b": 2, "c": 3, "list": [9], "nested": {"p": 1, "q": 2, "r": 3}}


def test_merge_replaces_a_mapping_with_a_scalar_and_leaves_its_inputs_alone() -> None:
    base = {"model": {"init_args": {"lr": 1}}, "data": {"size": 1}}
    assert merge(base, {"model": None, "data": {"size": 2}}) == {"model": None, "data": {"size": 2}}
    assert base == {"model": {"init_args": {"lr": 1}}, "data": {"size": 1}}


def test_a_class_path_of_another_class_replaces_the_base_mapping(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "opt: {class_path: torch.optim.AdamW, init_args: {lr: 1, betas: [0.9, 0.99]}}\n")
    same = write(tmp_path / "same.yaml", "__base__: base.yaml\nopt: {class_path: AdamW, init_args: {lr: 2}}\n")
    assert compose(same)["opt"]["init_args"] == {"lr": 2, "betas": [0.9, 0.99]}  # the same class: merged
    swapped = write(
        tmp_path / "sgd.yaml", "__base__: base.yaml\nopt: {class_path: torch.optim.SGD, init_args: {lr: 3}}\n"
    )
    assert compose(swapped)["opt"] == {"class_path": "torch.optim.SGD", "init_args": {"lr": 3}}


def test_delete_replaces_the_base_mapping_at_any_depth(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "a: {b: {keep: 1, drop: 2}, c: 3}\n")
    variant = write(tmp_path / "variant.yaml", "__base__: base.yaml\na: {b: {__delete__: true, keep: 5}}\n")
    assert compose(variant) == {"a": {"b": {"keep": 5}, "c": 3}}
    new_key = write(tmp_path / "new.yaml", "__base__: base.yaml\nz: {__delete__: true, y: 1}\n")
    assert compose(new_key)["z"] == {"y": 1}  # no base mapping: the key is dropped all the same
    bad = write(tmp_path / "bad.yaml", "__base__: base.yaml\na: {__delete__: maybe}\n")
    with pytest.raises(ConfigCompositionError, match=r"bad\.yaml: __delete__ must be true or false, got 'maybe'"):
        compose(bad)


def test_an_sgd_variant_of_a_paper_recipe_composes_and_parses_without_betas(tmp_path: Path) -> None:
    recipe = CONFIGS / "classification" / "swin_t_imagenet1k.yaml"
    optimizer = "{class_path: torch.optim.SGD, init_args: {lr: 0.1, momentum: 0.9, weight_decay: 1.0e-4}}"
    variant = write(tmp_path / "sgd.yaml", f"__base__: {recipe}\nmodel:\n  init_args:\n    optimizer: {optimizer}\n")
    printed = print_config("--config", str(variant))["model"]["init_args"]
    assert printed["optimizer"]["class_path"] == "torch.optim.SGD"
    assert printed["optimizer"]["init_args"]["momentum"] == 0.9 and "betas" not in printed["optimizer"]["init_args"]
    assert printed["backbone_kwargs"]["drop_path_rate"] == 0.2  # the rest of the recipe is kept


def test_a_missing_base_names_the_file_and_the_entry(tmp_path: Path) -> None:
    variant = write(tmp_path / "variant.yaml", "__base__: [_base_/nothing.yaml]\n")
    with pytest.raises(ConfigCompositionError, match=r"variant\.yaml: __base__ entry '_base_/nothing\.yaml' not found"):
        compose(variant)


def test_a_cycle_is_an_error_that_shows_it(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "__base__: [b.yaml]\n")
    write(tmp_path / "b.yaml", "__base__: [a.yaml]\n")
    with pytest.raises(ConfigCompositionError, match=r"b\.yaml: __base__ cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        compose(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", "__base__: self.yaml\n")
    with pytest.raises(ConfigCompositionError, match="cycle"):
        compose(tmp_path / "self.yaml")


def test_a_base_may_be_shared_by_two_branches(tmp_path: Path) -> None:
    """A diamond (two bases with a common base) is not a cycle."""
    write(tmp_path / "root.yaml", "a: 0\n")
    write(tmp_path / "left.yaml", "__base__: root.yaml\nb: 1\n")
    write(tmp_path / "right.yaml", "__base__: root.yaml\nc: 2\n")
    assert compose(write(tmp_path / "both.yaml", "__base__: [left.yaml, right.yaml]\n")) == {"a": 0, "b": 1, "c": 2}


@pytest.mark.parametrize("bases", ["{a: 1}", "[1, 2]"])
def test_a_malformed_base_list_is_an_error(bases: str, tmp_path: Path) -> None:
    variant = write(tmp_path / "variant.yaml", f"__base__: {bases}\n")
    with pytest.raises(ConfigCompositionError, match=r"variant\.yaml: __base__ must be a path or a list of paths"):
        compose(variant)


def test_only_config_files_with_bases_are_expanded(tmp_path: Path) -> None:
    plain = write(tmp_path / "plain.yaml", "a: 1\n")
    variant = write(tmp_path / "variant.yaml", "__base__: plain.yaml\nb: 2\n")
    args = ["fit", "--config", str(plain), "-c", str(variant), f"--config={variant}", "--data.x", str(variant)]
    expanded = expand_config_args(args)
    assert expanded[:4] == args[:4]  # a file without __base__ goes to jsonargparse as it is
    assert yaml.safe_load(expanded[4]) == {"a": 1, "b": 2}
    flag, value = expanded[5].split("=", 1)
    assert flag == "--config" and yaml.safe_load(value) == {"a": 1, "b": 2}
    assert expanded[6:] == args[6:]  # only --config/-c values are config files


def test_a_variant_of_a_shipped_config_is_overridden_by_the_command_line(tmp_path: Path) -> None:
    """Composition happens before parsing: interpolations see the variant's value, then the command line's."""
    variant = write(tmp_path / "variant.yaml", f"__base__: [{QUICKSTART}]\ndata:\n  init_args: {{image_size: 48}}\n")
    printed = print_config("--config", str(variant))
    assert printed["model"]["init_args"]["backbone_kwargs"]["img_size"] == 48
    printed = print_config("--config", str(variant), "--data.init_args.image_size=40")
    assert printed["model"]["init_args"]["backbone_kwargs"]["img_size"] == 40


def test_the_cli_reports_a_missing_base(tmp_path: Path) -> None:
    variant = write(tmp_path / "variant.yaml", "__base__: [gone.yaml]\n")
    with pytest.raises(ConfigCompositionError, match="gone.yaml' not found"):
        main(["fit", "--config", str(variant), "--print_config"])


# --- duplication across config files ------------------------------------------------------------------------------

# A stripped line that sets a value: ``key: value`` or a list item ``- key: value`` / ``- {key: value}``.
VALUE_LINE = re.compile(r"^(- )?[^:\s][^:]*:\s*\S")


def value_lines(path: Path) -> list[str]:
    """The non-comment lines of a YAML file that set a value, stripped (as issue 14 counts them)."""
    stripped = (line.strip() for line in path.read_text().splitlines())
    return [line for line in stripped if not line.startswith("#") and VALUE_LINE.match(line)]


def repeated_share(paths: list[Path], min_files: int = 3) -> float:
    """Share of value-setting lines that appear word for word in at least ``min_files`` of the files."""
    per_file = [value_lines(path) for path in paths]
    files_with = Counter(line for lines in per_file for line in set(lines))
    total = sum(len(lines) for lines in per_file)
    return sum(files_with[line] >= min_files for lines in per_file for line in lines) / total


def test_repeated_share_counts_value_lines_found_in_three_files(tmp_path: Path) -> None:
    text = "# a: 1\nshared: 1\nmodel:\n  own: {i}\n  pair: {half}\n"
    files = [write(tmp_path / f"{i}.yaml", text.format(i=i, half=i // 2)) for i in range(3)]
    # 9 value lines (``model:`` sets none, the comment is skipped); ``shared: 1`` x3 is in all three files,
    # ``pair: 0`` only in two.
    assert repeated_share(files) == pytest.approx(3 / 9)


def test_at_most_a_quarter_of_config_lines_are_repeated_in_three_or_more_files() -> None:
    assert repeated_share(ALL_YAML) <= 0.25
