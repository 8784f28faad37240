"""Grid sweeps: ``python -m swinlab sweep --config BASE.yaml --grid GRID.yaml --out DIR [--launcher submitit]``.

Every point of the grid (overrides x seeds) is an ordinary ``fit`` of the base config, each in its own folder
``DIR/<point>/seed<k>``. ``--launcher local`` (the default) runs them one after the other in this process;
``--launcher submitit`` submits them all as one job array through submitit (SLURM on a cluster, subprocesses with
``--cluster local``) and gathers the results as the jobs finish. A finished run leaves ``result.json`` there, so
a restarted sweep skips it; an unfinished one is started again from scratch. After each finished run the sweep
rewrites ``DIR/results.csv`` and ``DIR/results.md`` (one row per run, then mean +- std over seeds per point) and
``DIR/results.png`` (the best validation metric per point). A run that fails leaves ``failed.json`` (its
error) instead, listed under "Failed runs" in ``results.md``; the sweep goes on with the other runs, retries it
on its next start, and exits with the number of failed runs.

The grid file::

    seeds: [0, 1, 2]                  # seed_everything of each run (default [0])
    grid:                             # cartesian product of these dotted config keys
      model.init_args.backbone_kwargs.window_size: [4, 8]
    points:                           # and/or explicit points; crossed with ``grid``
      - {model.init_args.backbone_kwargs.shift: true}
      - {model.init_args.backbone_kwargs.shift: false}

Params, multiply-adds (``count_macs``, the paper's "FLOPs") and inference images/s are those of the task's
``backbone`` (any: Swin, ``timm/...``, a user's) at the image size the run trained on (detection: its test size;
blank for a task without a backbone).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import re
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from swinlab.config_compose import compose
from swinlab.models.flops import count_macs
from swinlab.validation import ConfigError

logger = logging.getLogger(__name__)

GRID_KEYS = ("seeds", "grid", "points")
RESULT_FILE = "result.json"
FAILED_FILE = "failed.json"
LAUNCHERS = ("local", "submitit")
POLL_SECONDS = 1.0  # how often the submitit launcher asks whether jobs finished (submitit rate-limits sacct)
COLUMNS = ("point", "seed", "metric", "best", "params_m", "gmacs", "images_per_s", "wall_s", "epochs")


def load_grid(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """A grid file -> (points, seeds); each point is a dict of dotted config keys to values."""
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the grid file {path}: {err}") from err
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: the grid file must be a mapping with keys {GRID_KEYS}, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; a grid file has only {GRID_KEYS}")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{path}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    axes = spec.get("grid") or {}
    if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
        raise ConfigError(f"{path}: 'grid' must map dotted config keys to non-empty lists of values, got {axes!r}")
    points = spec.get("points") or [{}]
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError(f"{path}: 'points' must be a list of mappings (dotted config key: value), got {points!r}")
    crossed = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    return [{**point, **cell} for point in points for cell in crossed], seeds


def point_name(overrides: dict[str, Any]) -> str:
    """A folder name from the overrides: ``shift=false__position_bias=none`` (last key component only)."""
    if not overrides:
        return "base"
    parts = [f"{key.rsplit('.', 1)[-1]}={json.dumps(value, separators=(',', ''))}" for key, value in overrides.items()]
    return re.sub(r"[^A-Za-z0-9=,._+-]", "", "__".join(parts))


def point_config(base_configs: Sequence[Path], overrides: dict[str, Any], seed: int, run_dir: Path) -> Path:
    """Merge the base configs, apply the overrides, seed and output folder; write it to ``run_dir/sweep_config.yaml``.

    Interpolations such as ``${data.init_args.image_size}`` stay unresolved: the CLI resolves them.
    """
    config = OmegaConf.merge(*(OmegaConf.create(compose(path)) for path in base_configs))
    for key, value in overrides.items():
        OmegaConf.update(config, key, value, merge=True)
    OmegaConf.update(config, "seed_everything", seed)
    OmegaConf.update(config, "trainer.default_root_dir", str(run_dir))
    path = run_dir / "sweep_config.yaml"
    OmegaConf.save(config, path, resolve=False)
    return path


def backbone_input_size(task: nn.Module) -> tuple[int, ...] | None:
    """(C, H, W) a task's backbone is counted and timed at, whatever the backbone (Swin, timm, a user's): the image
    shape the task trained on, else its ``example_input_array`` (detection, which trains on lists of images of
    their own sizes: one test-size image); None if the task has neither."""
    shape = getattr(task, "train_image_shape", None)
    if shape is not None:
        return tuple(shape)
    example = getattr(task, "example_input_array", None)
    while isinstance(example, (list, tuple)) and example:
        example = example[0]
    return tuple(example.shape[-3:]) if isinstance(example, torch.Tensor) else None


@torch.inference_mode()
def images_per_second(model: nn.Module, input_size: Sequence[int], batch_size: int = 64, iters: int = 5) -> float:
    """Forward (inference) throughput on a ``(batch_size, *input_size)`` batch, after one warm-up pass."""
    parameter = next(model.parameters())
    x = torch.randn(batch_size, *input_size, device=parameter.device)
    was_training = model.training
    model.eval()
    try:
        model(x)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return batch_size * iters / (time.perf_counter() - start)
    finally:
        model.train(was_training)


def prepare_run(base_configs: Sequence[Path], overrides: dict[str, Any], seed: int, run_dir: Path) -> Path:
    """An empty ``run_dir`` (an earlier, unfinished attempt is discarded) holding the run's config; returns its path.

    Done once per run by the sweep itself, never by the run's processes: a multi-node run has several.
    """
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return point_config(base_configs, overrides, seed, run_dir)


def run_fit(
    config: Path, run_dir: Path, overrides: dict[str, Any], seed: int, extra_args: Sequence[str]
) -> dict[str, Any] | None:
    """The ``fit`` of one prepared run, in this process (one of its processes for a multi-node job).

    The global-rank-zero process writes the run's row to ``run_dir/result.json`` and returns it; others return None.
    """
    from swinlab.cli import main  # Lightning is imported only when a run starts

    start = time.perf_counter()
    with warnings.catch_warnings():
        # LightningCLI warns when given args while sys.argv holds others: here those are the sweep's (or the
        # submitit job's) own, and the fit is meant to read only the args given.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = main(["fit", "--config", str(config), *extra_args])
    wall = time.perf_counter() - start
    trainer = cli.trainer
    if trainer.interrupted:  # Lightning returns from fit after a graceful stop: not a finished run
        raise RuntimeError(f"the fit in {run_dir} was interrupted")
    if not trainer.is_global_zero:
        return None
    # The checkpoint that tracks the best score: the one with a monitor (others only refresh last.ckpt).
    checkpoint = next((c for c in trainer.checkpoint_callbacks if c.monitor is not None), None)
    metric = checkpoint.monitor if checkpoint is not None else None
    best = checkpoint.best_model_score if checkpoint is not None else None
    row: dict[str, Any] = {
        "point": run_dir.parent.name,
        "seed": seed,
        "overrides": overrides,
        "metric": metric,
        "best": None if best is None else float(best),
        "params_m": None,
        "gmacs": None,
        "images_per_s": None,
        "wall_s": round(wall, 1),
        "epochs": trainer.current_epoch,
    }
    path = getattr(cli.model, "backbone_path", None)
    backbone = cli.model.get_submodule(path) if path else None
    input_size = backbone_input_size(cli.model) if backbone is not None else None
    if input_size is not None:
        row["params_m"] = sum(p.numel() for p in backbone.parameters()) / 1e6
        row["gmacs"] = count_macs(backbone, input_size) / 1e9
        row["images_per_s"] = images_per_second(backbone, input_size)
        row["input_size"] = list(input_size)
    partial = run_dir / f"{RESULT_FILE}.partial"  # renamed into place: a killed sweep never leaves half a file
    partial.write_text(json.dumps(row, indent=1))
    partial.replace(run_dir / RESULT_FILE)
    return row


def collect(out_dir: Path) -> list[dict[str, Any]]:
    """Every finished run's row under ``out_dir``, ordered by point then seed."""
    rows = [json.loads(path.read_text()) for path in out_dir.glob(f"*/seed*/{RESULT_FILE}")]
    return sorted(rows, key=lambda row: (row["point"], row["seed"]))


def record_failure(run_dir: Path, overrides: dict[str, Any], seed: int, error: str) -> None:
    """``run_dir/failed.json``: the run's point, seed, overrides and error, for the reports."""
    row = {"point": run_dir.parent.name, "seed": seed, "overrides": overrides, "error": error}
    (run_dir / FAILED_FILE).write_text(json.dumps(row, indent=1))


def collect_failures(out_dir: Path) -> list[dict[str, Any]]:
    """Every failed run's row under ``out_dir`` (a retried run's folder is emptied first), by point then seed."""
    rows = [json.loads(path.read_text()) for path in out_dir.glob(f"*/seed*/{FAILED_FILE}")]
    return sorted(rows, key=lambda row: (row["point"], row["seed"]))


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return ""
    return format(value, spec) if isinstance(value, float) else str(value)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per point: number of seeds, mean and sample std of the best metric, mean wall time, first row's model cost."""
    summary = []
    for point, group in itertools.groupby(rows, key=lambda row: row["point"]):
        group = list(group)
        values = [row["best"] for row in group if row["best"] is not None]
        summary.append(
            {
                "point": point,
                "seeds": len(group),
                "metric": group[0]["metric"],
                "values": values,
                "mean": statistics.mean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "params_m": group[0]["params_m"],
                "gmacs": group[0]["gmacs"],
                "images_per_s": statistics.mean(r["images_per_s"] for r in group) if group[0]["images_per_s"] else None,
                "wall_s": statistics.mean(row["wall_s"] for row in group),
            }
        )
    return summary


def failure_lines(failures: Sequence[dict[str, Any]]) -> list[str]:
    """The "Failed runs" table of ``results.md``."""
    lines = ["## Failed runs", "", "| point | seed | error |", "|---" * 3 + "|"]
    # A job's error holds its traceback: the table shows the last line, the exception.
    last = [f["error"].strip().splitlines()[-1].strip().replace("|", "/") for f in failures]
    return lines + [f"| {f['point']} | {f['seed']} | {error} |" for f, error in zip(failures, last)]


def write_reports(out_dir: Path, rows: list[dict[str, Any]], failures: Sequence[dict[str, Any]] = ()) -> None:
    """``results.csv`` (one row per finished run), ``results.md`` (runs, mean +- std per point, failed runs),
    ``results.png``."""
    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*COLUMNS, "overrides"])
        for row in rows:
            writer.writerow([_fmt(row[c], ".6g") for c in COLUMNS] + [json.dumps(row["overrides"])])
    summary = summarize(rows)
    lines = [
        "## Runs",
        "",
        "| point | seed | best " + (rows[0]["metric"] or "metric") + " | params (M) | GMACs | "
        "images/s | wall (s) | epochs | overrides |",
        "|---" * 9 + "|",
    ]
    for row in rows:
        lines.append(
            f"| {row['point']} | {row['seed']} | {_fmt(row['best'], '.4f')} | {_fmt(row['params_m'])} | "
            f"{_fmt(row['gmacs'], '.4g')} | {_fmt(row['images_per_s'], '.0f')} | "
            f"{_fmt(row['wall_s'], '.0f')} | {row['epochs']} | "
            f"`{json.dumps(row['overrides'])}` |"
        )
    lines += [
        "",
        "## Mean +- std over seeds",
        "",
        "| point | seeds | best (mean +- std) | params (M) | GMACs | images/s | wall (s) |",
        "|---" * 7 + "|",
    ]
    for s in summary:
        spread = f"{s['mean']:.4f} +- {s['std']:.4f}" if s["std"] is not None else _fmt(s["mean"], ".4f")
        lines.append(
            f"| {s['point']} | {s['seeds']} | {spread} | {_fmt(s['params_m'])} | {_fmt(s['gmacs'], '.4g')} | "
            f"{_fmt(s['images_per_s'], '.0f')} | {_fmt(s['wall_s'], '.0f')} |"
        )
    if failures:
        lines += ["", *failure_lines(failures)]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    plot_summary(summary, out_dir / "results.png")


def plot_summary(summary: list[dict[str, Any]], path: Path) -> None:
    """Per point: each seed's best metric (grey dots) and their mean +- std (black)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in summary if s["mean"] is not None]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(shown) + 1.2))
    for y, s in enumerate(shown):
        ax.plot(s["values"], [y] * len(s["values"]), "o", color="0.6", markersize=4)
        ax.errorbar(s["mean"], y, xerr=s["std"] or 0.0, fmt="D", color="black", capsize=3, markersize=5)
    ax.set_yticks(range(len(shown)), [s["point"] for s in shown], fontsize=8)
    ax.set_ylim(len(shown) - 0.5, -0.5)
    ax.set_xlabel(f"best {shown[0]['metric'] if shown else 'metric'}: seeds (grey), mean +- std (black)")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m swinlab sweep",
        description="Run a grid of overrides of a fit config, one fit per point and seed; skips finished runs. "
        "Arguments after the known ones (for example --trainer.accelerator=cpu) go to every fit.",
    )
    parser.add_argument("--config", type=Path, action="append", required=True, help="base fit config (repeatable)")
    parser.add_argument("--grid", type=Path, default=None, help="grid file: seeds, grid and/or points")
    parser.add_argument("--search", type=Path, default=None, help="Optuna search space instead (docs/sweeps.md)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/sweeps/<grid name>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="run only these of the grid's seeds")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after starting this many runs")
    parser.add_argument("--dry-run", action="store_true", help="list the runs still to do; run nothing")
    parser.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="local",
        help="local: one run after the other in this process; submitit: one job per run (a SLURM job array)",
    )
    jobs = parser.add_argument_group("submitit launcher (one job per run)")
    jobs.add_argument(
        "--cluster",
        choices=("slurm", "local", "debug"),
        default=None,
        help="submitit executor (default: slurm where sbatch exists, else local subprocesses)",
    )
    jobs.add_argument("--partition", default=None, help="SLURM partition")
    jobs.add_argument(
        "--gpus-per-node",
        type=int,
        default=0,
        help="GPUs per node, one task (DDP process) each; sets every fit's --trainer.devices and --trainer.num_nodes",
    )
    jobs.add_argument("--nodes", type=int, default=1, help="nodes per run (multi-node DDP through Lightning's SLURM)")
    jobs.add_argument("--time", type=int, default=24 * 60, help="time limit of each job in minutes")
    jobs.add_argument("--mem-gb", type=int, default=None, help="memory per node in GB (default: the cluster's)")
    jobs.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task, for data loading workers")
    jobs.add_argument("--array-parallelism", type=int, default=None, help="at most this many runs at once")
    args, extra_args = parser.parse_known_args(argv)
    if (args.grid is None) == (args.search is None):
        parser.error("give one of --grid GRID.yaml or --search SPACE.yaml")
    if args.nodes > 1 and args.gpus_per_node < 1:
        parser.error(f"--nodes {args.nodes} needs --gpus-per-node >= 1 (one DDP process per GPU)")
    return args, extra_args


def plan(args: argparse.Namespace) -> tuple[Path, list[tuple[dict[str, Any], str, int]]]:
    """Check the arguments; (output folder, the (overrides, point name, seed) runs not finished yet)."""
    for path in args.config:
        if not path.is_file():
            raise FileNotFoundError(f"base config {path} not found (pass --config PATH to an existing fit config)")
    points, seeds = load_grid(args.grid)
    if args.seeds is not None:
        missing = sorted(set(args.seeds) - set(seeds))
        if missing:
            raise ConfigError(f"--seeds {missing} are not in the grid's seeds {seeds} ({args.grid})")
        seeds = [s for s in seeds if s in args.seeds]
    names = [point_name(p) for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"{args.grid}: two points have the same overrides: {names}")
    out_dir = args.out or Path("runs") / "sweeps" / args.grid.stem
    todo = [
        (p, n, s)
        for s in seeds
        for p, n in zip(points, names)
        if not (out_dir / n / f"seed{s}" / RESULT_FILE).is_file()
    ]
    logger.info(
        "sweep %s: %d points x %d seeds, %d to run, output %s", args.grid, len(points), len(seeds), len(todo), out_dir
    )
    return out_dir, todo


def report(out_dir: Path) -> None:
    """Rewrite the results tables and plot from every finished run under ``out_dir`` (none: only the failures of
    ``results.md``, if any)."""
    rows, failures = collect(out_dir), collect_failures(out_dir)
    if rows:
        write_reports(out_dir, rows, failures)
    elif failures:
        (out_dir / "results.md").write_text("\n".join(failure_lines(failures)) + "\n")


def run_locally(
    args: argparse.Namespace, out_dir: Path, todo: Sequence[tuple[dict[str, Any], str, int]], extra_args: list[str]
) -> int:
    """The runs one after the other in this process; returns how many failed."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    failed = 0
    for overrides, name, seed in todo:
        logger.info("sweep: running %s seed %d", name, seed)
        run_dir = out_dir / name / f"seed{seed}"
        try:
            row = run_fit(prepare_run(args.config, overrides, seed, run_dir), run_dir, overrides, seed, extra_args)
        except SIGTERMException:  # Lightning's SIGTERM (a cluster stopping the sweep): stop
            raise
        # A failing point must not lose the others (it is retried on the next start), nor must a point whose
        # config the CLI rejects (SystemExit, its message already printed).
        except (Exception, SystemExit) as err:
            logger.exception("sweep point %s seed %d failed", name, seed)
            record_failure(run_dir, overrides, seed, f"{type(err).__name__}: {err}")
            failed += 1
            continue
        logger.info("sweep: %s seed %d: best %s = %s, %s s", name, seed, row["metric"], row["best"], row["wall_s"])
        report(out_dir)
    return failed


def submitit_executor(args: argparse.Namespace, folder: Path) -> Any:
    """The ``submitit.AutoExecutor`` of the job options: one job of nodes x max(GPUs, 1) tasks per run."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster)
    options = {
        "slurm_partition": args.partition,
        "mem_gb": args.mem_gb,
        "cpus_per_task": args.cpus_per_task,
        "slurm_array_parallelism": args.array_parallelism,
    }
    executor.update_parameters(
        name=f"sweep-{args.grid.stem}",
        timeout_min=args.time,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=max(args.gpus_per_node, 1),
        **{key: value for key, value in options.items() if value is not None},
    )
    return executor


def run_with_submitit(
    args: argparse.Namespace, out_dir: Path, todo: Sequence[tuple[dict[str, Any], str, int]], extra_args: list[str]
) -> int:
    """One submitit job per run, submitted as one job array; gathers the results as jobs finish; returns failures.

    A run on ``--gpus-per-node`` G and ``--nodes`` N is one job of N x G tasks, each running the same fit with
    ``trainer.devices=G`` and ``trainer.num_nodes=N``: Lightning's SLURM environment gives each its rank.
    """
    import submitit

    executor = submitit_executor(args, out_dir / "submitit" / "%j")
    if args.gpus_per_node:  # last, so that they match the allocation whatever the config or extra args say
        extra_args = [*extra_args, f"--trainer.devices={args.gpus_per_node}", f"--trainer.num_nodes={args.nodes}"]
    jobs = []
    with executor.batch():
        for overrides, name, seed in todo:
            run_dir = out_dir / name / f"seed{seed}"
            config = prepare_run(args.config, overrides, seed, run_dir)
            jobs.append(executor.submit(run_fit, config, run_dir, overrides, seed, extra_args))
    runs = {job.job_id: run for job, run in zip(jobs, todo)}  # ids exist once the batch is sent
    for job_id, (_, name, seed) in runs.items():
        logger.info("sweep: submitted %s seed %d as job %s", name, seed, job_id)
    failed = 0
    for job in submitit.helpers.as_completed(jobs, poll_frequency=POLL_SECONDS):
        overrides, name, seed = runs[job.job_id]
        try:
            row = next(row for row in job.results() if row is not None)  # the rank-zero task's
        except Exception as err:  # a failed or killed job: retried on the next start of the sweep
            logger.error(
                "sweep point %s seed %d failed (job %s, log %s): %s", name, seed, job.job_id, job.paths.stderr, err
            )
            record_failure(out_dir / name / f"seed{seed}", overrides, seed, f"{type(err).__name__}: {err}")
            failed += 1
            continue
        logger.info("sweep: %s seed %d: best %s = %s, %s s", name, seed, row["metric"], row["best"], row["wall_s"])
        report(out_dir)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; returns the number of runs that failed (the process exit code)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # no-op where logging is set up
    argv = sys.argv[1:] if argv is None else argv
    args, extra_args = parse_args(argv)
    if args.search is not None:
        from swinlab.search import main as search  # Optuna (the ``search`` extra), imported only for a search

        return search(argv)
    out_dir, todo = plan(args)  # a bad grid or config: one line from ``python -m swinlab`` (ConfigError, OSError)
    todo = todo[: args.max_runs]
    if args.dry_run:
        for _, name, seed in todo:
            logger.info("  to run: %s seed %d", name, seed)
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    launch = run_with_submitit if args.launcher == "submitit" else run_locally
    failed = launch(args, out_dir, todo, extra_args)
    report(out_dir)
    return failed
