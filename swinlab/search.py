"""Hyperparameter search: ``python -m swinlab sweep --config BASE.yaml --search SPACE.yaml --trials N --out DIR``.

An Optuna study over any config keys (docs/sweeps.md#hyperparameter-search). Each trial is an ordinary ``fit`` of
the base config with the sampled values, run by the grid sweep's own runner (``sweep.prepare_run`` and
``sweep.run_fit``) in ``DIR/trial_<number>/seed<k>``. The study lives in a storage every worker shares:
``DIR/study.db`` (SQLite) by default, any database URL, or a journal file (a path without ``://``) on a shared
disk. The SPACE file::

    model.init_args.optimizer.init_args.lr: {float: [1.0e-4, 1.0e-2], log: true}
    model.init_args.backbone_kwargs.window_size: {int: [2, 8], step: 2}
    model.init_args.backbone: {choice: [swin_t, swinv2_t]}

Failure resistance: trials are claimed under a lock (``DIR/search.lock``) so that K workers never run more than N;
at its start the sweep marks the trials a killed sweep left RUNNING as FAIL (user attribute ``interrupted``) and
queues their parameters again, so a restart with the same command ends with exactly N finished trials (complete,
pruned, or failed with their error), none run twice. A trial that raises (a NaN metric, a config the CLI rejects,
out of memory) is recorded as FAIL with its one-line error and the search goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import io
import json
import logging
import math
import multiprocessing
import os
import socket
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import PyTorchLightningPruningCallback

from swinlab import sweep
from swinlab.validation import ConfigError, validate_run_config

logger = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
KINDS = ("float", "int", "choice")
STUDY_NAME = "search"
INTERRUPTED = "interrupted"  # user attribute of a trial a killed sweep left running (re-queued, not counted)
ERROR = "error"
WORKER = "worker"
COLUMNS = ("number", "state", "value", "epochs", "wall_s")


@dataclass(frozen=True)
class Dimension:
    """One searched config key: a float or int range (``log``, ``step``) or a list of choices. ``name``, the
    Optuna parameter, is the key's shortest unique dotted suffix (``lr``), so that tables and plots stay legible."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    name: str = ""

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def values_to_check(self) -> list[Any]:
        """Every choice, else both ends of the range: what the config check parses before any trial."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def grid(self) -> list[Any]:
        """The values the grid sampler visits: every choice or every int of the range (by ``step``)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int" and not self.log:
            return list(range(self.low, self.high + 1, self.step or 1))
        raise ConfigError(
            f"{self.key}: the grid sampler visits listed values only; write {{choice: [...]}} instead of a "
            f"{'log ' if self.log else ''}{self.kind} range, or use --sampler tpe|random"
        )


def parse_dimension(path: Path, key: Any, spec: Any) -> Dimension:
    """``{float: [lo, hi], log: true}``, ``{int: [lo, hi], step: 2}`` or ``{choice: [...]}``; else a ConfigError."""
    where = f"{path}: {key}"
    usage = "write {float: [lo, hi], log: true}, {int: [lo, hi]} or {choice: [a, b]}"
    if not isinstance(key, str) or not isinstance(spec, dict):
        raise ConfigError(f"{where}: {spec!r} is not a range; {usage}")
    kinds = [kind for kind in KINDS if kind in spec]
    unknown = sorted(set(spec) - {*KINDS, "log", "step"})
    if len(kinds) != 1 or unknown:
        raise ConfigError(f"{where}: {spec!r} needs exactly one of {KINDS} (unknown: {unknown}); {usage}")
    kind, values = kinds[0], spec[kinds[0]]
    if kind == "choice":
        if not isinstance(values, list) or not values or set(spec) != {"choice"}:
            raise ConfigError(f"{where}: choice needs a non-empty list and nothing else, got {spec!r}")
        return Dimension(key, kind, choices=tuple(values))
    number = int if kind == "int" else (int, float)
    bounds_ok = isinstance(values, list) and len(values) == 2
    if not bounds_ok or not all(isinstance(v, number) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: {kind} needs [lo, hi] of {kind}s, got {values!r}")
    low, high = values
    log, step = spec.get("log", False), spec.get("step")
    if not low < high:
        raise ConfigError(f"{where}: {kind} range [{low}, {high}] needs lo < hi")
    if not isinstance(log, bool) or (log and low <= 0):
        raise ConfigError(f"{where}: log: true needs lo > 0 (got [{low}, {high}], log {log!r})")
    if step is not None and (not isinstance(step, number) or step <= 0 or log):
        raise ConfigError(f"{where}: step must be a positive {kind} and cannot go with log: true, got {step!r}")
    if kind == "float":
        low, high = float(low), float(high)
    return Dimension(key, kind, low, high, log, step)


def load_space(path: Path) -> list[Dimension]:
    """A SPACE file -> its dimensions; a missing file or a malformed range is a one-line ConfigError."""
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the search space {path}: {' '.join(str(err).split())}") from err
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{path}: a search space maps dotted config keys to ranges, got {spec!r}")
    space = [parse_dimension(path, key, value) for key, value in spec.items()]
    return [dataclasses.replace(d, name=short_name(d.key, [o.key for o in space if o is not d])) for d in space]


def short_name(key: str, others: Sequence[str]) -> str:
    """The shortest dotted suffix of ``key`` that no other key ends with."""
    parts = key.split(".")
    for start in range(len(parts) - 1, -1, -1):
        suffix = ".".join(parts[start:])
        if not any(other == suffix or other.endswith(f".{suffix}") for other in others):
            return suffix
    return key


def one_line(err: BaseException) -> str:
    """``Type: message`` on one line (jsonargparse and swinlab's config checks write several)."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def parsed_config(base_configs: Sequence[Path], overrides: dict[str, Any], extra_args: Sequence[str]) -> dict:
    """The fit config the CLI would run (base configs, ``overrides``, extra arguments), parsed by the CLI (unknown
    keys and wrong types raise its ConfigError) and checked by ``validate_run_config``; nothing is built."""
    from swinlab.cli import main

    with sweep_config_dir() as folder:
        config = sweep.point_config(base_configs, overrides, 0, folder)
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
                main(["fit", "--config", str(config), *extra_args, "--print_config"])
        except SystemExit as err:
            if err.code not in (0, None):
                raise ConfigError(f"the config does not parse (exit {err.code})") from err
    parsed = yaml.safe_load(printed.getvalue())
    validate_run_config(parsed, "fit")
    return parsed


@contextlib.contextmanager
def sweep_config_dir() -> Iterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="swinlab-search-") as folder:
        yield Path(folder)


def lookup(config: dict, key: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key in a nested dict."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def type_problem(dimension: Dimension, base_value: Any) -> str | None:
    """A numeric range on a key whose base value is a bool, a string or a list, or a float range on an int key."""
    if dimension.kind == "choice" or base_value is None:
        return None
    if isinstance(base_value, bool) or not isinstance(base_value, (int, float)):
        return (
            f"is {base_value!r} ({type(base_value).__name__}) in the base config: {{{dimension.kind}: [lo, hi]}} does "
        )
    if dimension.kind == "float" and isinstance(base_value, int):
        return f"is the int {base_value} in the base config: {{float: [lo, hi]}} does "
    return None


def check_space(space: Sequence[Dimension], base_configs: Sequence[Path], extra_args: Sequence[str]) -> dict:
    """Before any trial: every key must be one the CLI accepts, each range must fit the key's type in the parsed
    base config, and the base config with each end of each range (each choice) must parse and pass swinlab's config
    checks. Returns the parsed base config; raises a one-line ConfigError naming the key."""
    try:
        base = parsed_config(base_configs, {}, extra_args)
    except Exception as err:
        raise ConfigError(f"the base config does not run: {one_line(err)}") from err
    for dimension in space:
        found, value = lookup(base, dimension.key)
        problem = type_problem(dimension, value) if found else None
        if problem:
            raise ConfigError(
                f"search space key {dimension.key} {problem}not fit; use {{choice: [...]}} with values of its type"
            )
    corners = max(len(d.values_to_check()) for d in space)
    for index in range(corners):
        overrides = {d.key: d.values_to_check()[min(index, len(d.values_to_check()) - 1)] for d in space}
        try:
            parsed_config(base_configs, overrides, extra_args)
        except Exception as err:
            raise ConfigError(f"search space value(s) {json.dumps(overrides)} are rejected: {one_line(err)}") from err
    return base


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """A database URL (``sqlite:///...``, ``postgresql://...``) or a journal file path (no ``://``)."""
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    # SQLite shared by several workers: wait for the write lock instead of failing after 5 s.
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine)


class GridWithoutStop(optuna.samplers.GridSampler):
    """Optuna's grid sampler, minus its ``study.stop()`` after the last point (only legal inside ``optimize``; the
    search asks and tells, and caps the trials at the grid's size)."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


def make_sampler(name: str, seed: int, space: Sequence[Dimension]) -> optuna.samplers.BaseSampler:
    if name == "grid":
        return GridWithoutStop({d.name: d.grid() for d in space}, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


class TrialPruning(PyTorchLightningPruningCallback):
    """optuna-integration's pruning callback for a trial named by storage, study and id, so that it can be given
    as a config (``--trainer.callbacks+=...``) to a fit in another process (a submitit job)."""

    def __init__(self, storage: str, study_name: str, trial_id: int, monitor: str, pruner: str) -> None:
        # The pruner is not in the storage: a loaded study would get Optuna's default (median) instead.
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage), pruner=make_pruner(pruner))
        super().__init__(optuna.trial.Trial(study, trial_id), monitor)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if not trainer.sanity_checking and value is not None and not math.isfinite(float(value)):
            # Not reported: a pruner would prune it as the worst value; it is a failed trial with its reason.
            raise ValueError(f"{self.monitor} is {float(value)} after epoch {pl_module.current_epoch}")
        last = trainer.max_epochs is not None and pl_module.current_epoch + 1 >= trainer.max_epochs
        if last and not trainer.sanity_checking and value is not None and not self.is_ddp_backend:
            # The trial has run all its epochs: pruning it now saves nothing and would hide a complete result.
            self._trial.report(float(value), step=pl_module.current_epoch)
            return
        super().on_validation_end(trainer, pl_module)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``, shared by the workers on this machine or a shared disk."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def counts_toward_total(trial: FrozenTrial) -> bool:
    """Running or finished (complete, pruned, failed with its own error); not a trial interrupted by a kill."""
    return trial.state != TrialState.WAITING and not trial.user_attrs.get(INTERRUPTED)


def claim_trial(study: optuna.Study, trials: int, lock: Path) -> optuna.Trial | None:
    """The next trial (a re-queued one first), or None when N trials are finished or running."""
    with locked(lock):
        if sum(counts_toward_total(t) for t in study.get_trials(deepcopy=False)) >= trials:
            return None
        return study.ask()


def requeue_interrupted(study: optuna.Study) -> int:
    """Mark the trials a killed sweep left RUNNING as failed (``interrupted``) and queue their parameters again."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for frozen in stale:
        optuna.trial.Trial(study, frozen._trial_id).set_user_attr(INTERRUPTED, True)
        study.tell(frozen.number, state=TrialState.FAIL)
        if frozen.params:
            study.enqueue_trial(frozen.params, user_attrs={"rerun_of": frozen.number})
        logger.info("search: trial %d was left running by a killed sweep; queued again", frozen.number)
    return len(stale)


@dataclass
class Search:
    """What every worker needs (picklable: sent to local worker processes and submitit jobs)."""

    base_configs: list[Path]
    space: list[Dimension]
    out_dir: Path
    storage: str
    sampler: str
    pruner: str
    seed: int
    trials: int
    objective: str
    direction: str
    extra_args: list[str]

    def study(self, worker: int = 0) -> optuna.Study:
        study = optuna.create_study(
            storage=open_storage(self.storage),
            study_name=STUDY_NAME,
            pruner=make_pruner(self.pruner),
            direction="maximize" if self.direction == "max" else "minimize",
            load_if_exists=True,
        )
        # A seed per worker and per restart: K workers, or a restarted sweep, must not draw the same random trials.
        study.sampler = make_sampler(self.sampler, self.seed + 1000 * worker + len(study.trials), self.space)
        return study

    def run_trial(self, study: optuna.Study, trial: optuna.Trial) -> None:
        """One trial: sample, fit through the sweep's runner, tell the study its value, pruning or error."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        overrides = {d.key: d.suggest(trial) for d in self.space}
        run_dir = self.out_dir / f"trial_{trial.number:04d}" / f"seed{self.seed}"
        pruning = {
            "storage": self.storage,
            "study_name": STUDY_NAME,
            "trial_id": trial._trial_id,
            "pruner": self.pruner,
        }
        callback = {"class_path": "swinlab.search.TrialPruning", "init_args": {**pruning, "monitor": self.objective}}
        trial.set_user_attr(WORKER, f"{socket.gethostname()}:{os.getpid()}")  # which process ran it (logs)
        logger.info("search: trial %d %s", trial.number, json.dumps(overrides))
        try:
            config = sweep.prepare_run(self.base_configs, overrides, self.seed, run_dir)
            extra_args = [*self.extra_args, f"--trainer.callbacks+={json.dumps(callback)}"]
            sweep.run_fit(config, run_dir, overrides, self.seed, extra_args)
            value = best_reported(trial, self.objective, self.direction)
        except optuna.TrialPruned as err:
            logger.info("search: trial %d pruned: %s", trial.number, err)
            study.tell(trial, state=TrialState.PRUNED)
            return
        except SIGTERMException:  # a cluster stopping the job: the restart re-runs this trial
            raise
        except (Exception, SystemExit) as err:
            logger.exception("search: trial %d failed", trial.number)
            trial.set_user_attr(ERROR, one_line(err))
            study.tell(trial, state=TrialState.FAIL)
            return
        study.tell(trial, value)
        logger.info("search: trial %d %s = %s", trial.number, self.objective, value)

    def work(self, worker: int = 0) -> None:
        """Claim and run trials until N are finished or running."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = self.study(worker)
        while (trial := claim_trial(study, self.trials, self.out_dir / "search.lock")) is not None:
            self.run_trial(study, trial)
            write_reports(study, self)


def best_reported(trial: optuna.Trial, objective: str, direction: str) -> float:
    """The best of the values the pruning callback reported after each validation (the checkpoint's best, when the
    objective is the monitored metric); a fit that reported none fails."""
    reported = trial.study._storage.get_trial(trial._trial_id).intermediate_values
    if not reported:
        raise ValueError(f"the fit logged no {objective} at any validation (set --objective to a logged metric)")
    return max(reported.values()) if direction == "max" else min(reported.values())


def state_name(trial: FrozenTrial) -> str:
    return "INTERRUPTED" if trial.user_attrs.get(INTERRUPTED) else trial.state.name


def trial_rows(study: optuna.Study, direction: str) -> list[dict[str, Any]]:
    """One row per trial, best first: complete by value, then pruned (by their last value), failed, interrupted."""
    order = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "INTERRUPTED": 3}
    rows = []
    for trial in study.get_trials(deepcopy=False):
        reported = trial.intermediate_values
        value = trial.value if trial.value is not None else (reported[max(reported)] if reported else None)
        wall = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else None
        rows.append(
            {
                "number": trial.number,
                "state": state_name(trial),
                "value": value,
                "epochs": max(reported) + 1 if reported else 0,
                "wall_s": None if wall is None or trial.datetime_start is None else round(wall, 1),
                "params": trial.params,
                "error": trial.user_attrs.get(ERROR, ""),
            }
        )
    sign = -1 if direction == "max" else 1
    return sorted(
        rows,
        key=lambda r: (order.get(r["state"], 4), math.inf if r["value"] is None else sign * r["value"], r["number"]),
    )


def replace_file(path: Path, text: str) -> None:
    """Written whole, then renamed into place: workers rewriting the reports at once never leave half a file."""
    partial = path.with_name(f".{path.name}.{multiprocessing.current_process().pid}")
    partial.write_text(text)
    partial.replace(path)


def write_tables(study: optuna.Study, search: Search) -> list[dict[str, Any]]:
    """``results.csv`` and ``results.md``: one row per trial, best first."""
    rows = trial_rows(study, search.direction)
    keys = [d.name for d in search.space]
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow([*COLUMNS, *keys, "error"])
    for row in rows:
        writer.writerow(
            [sweep._fmt(row[c], ".6g") for c in COLUMNS] + [row["params"].get(k, "") for k in keys] + [row["error"]]
        )
    replace_file(search.out_dir / "results.csv", table.getvalue())
    states = [row["state"] for row in rows]
    counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL", "INTERRUPTED"))
    lines = [
        f"Search of {search.trials} trials: {search.direction} {search.objective}; sampler {search.sampler}, "
        f"pruner {search.pruner}, seed {search.seed}; {counts} (interrupted trials were run again).",
        "",
        f"| trial | state | {search.objective} | epochs | wall (s) | " + " | ".join(keys) + " | error |",
        "|---" * (len(COLUMNS) + len(keys) + 1) + "|",
    ]
    for row in rows:
        params = [sweep._fmt(row["params"].get(k), ".4g") for k in keys]
        error = row["error"].replace("|", "/")
        lines.append(
            f"| {row['number']} | {row['state']} | {sweep._fmt(row['value'], '.4f')} | {row['epochs']} | "
            f"{sweep._fmt(row['wall_s'], '.0f')} | " + " | ".join(params) + f" | {error} |"
        )
    replace_file(search.out_dir / "results.md", "\n".join(lines) + "\n")
    return rows


def write_best_config(study: optuna.Study, search: Search) -> Path | None:
    """``best.yaml``: the config the best trial's fit ran (as the CLI saved it, every argument resolved), without the
    pruning callback and with its own output folder: ``python -m swinlab fit --config OUT/best.yaml``."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    best = study.best_trial
    saved = sorted((search.out_dir / f"trial_{best.number:04d}").glob("seed*/**/config.yaml"))
    if not saved:
        logger.warning("search: no saved config of the best trial %d; best.yaml not written", best.number)
        return None
    config = yaml.safe_load(saved[-1].read_text())
    trainer = config.setdefault("trainer", {})
    callbacks = [c for c in trainer.get("callbacks") or [] if c.get("class_path") != "swinlab.search.TrialPruning"]
    trainer["callbacks"] = callbacks or None
    trainer["default_root_dir"] = str(search.out_dir / "best")
    config.setdefault("checkpoint", {})["dirpath"] = None  # the fit puts it under default_root_dir
    header = (
        f"# The best trial ({best.number}) of the search in {search.out_dir}: {search.objective} = {best.value:.6g}\n"
        f"# with {json.dumps(best.params)}. Refit: python -m swinlab fit --config {search.out_dir / 'best.yaml'}\n"
    )
    path = search.out_dir / "best.yaml"
    replace_file(path, header + yaml.safe_dump(config, sort_keys=False))
    return path


def write_plots(study: optuna.Study, out_dir: Path) -> None:
    """Optimization history, parallel coordinates and parameter importances (optuna.visualization.matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    figures = {"history": plots.plot_optimization_history, "parallel_coordinates": plots.plot_parallel_coordinate}
    if complete >= 2:
        figures["param_importances"] = plots.plot_param_importances
    else:
        logger.info("search: %d complete trial(s): parameter importances need 2, not plotted", complete)
    for name, plot in figures.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as err:  # e.g. importances of a parameter that never varied
                logger.info("search: %s not plotted: %s", name, err)
                continue
        axes.figure.set_size_inches(9, 5)
        axes.figure.tight_layout()
        axes.figure.savefig(out_dir / f"{name}.png", dpi=110)
        plt.close(axes.figure)


def write_reports(study: optuna.Study, search: Search, plots: bool = False) -> None:
    write_tables(study, search)
    write_best_config(study, search)
    if plots:
        write_plots(study, search.out_dir)


def parse_search_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The search's own options, then the sweep's (``--config``, ``--out``, ``--launcher``, job options); the
    arguments neither knows go to every fit."""
    parser = argparse.ArgumentParser(
        prog="python -m swinlab sweep --search SPACE.yaml",
        description="Optuna search over a fit config (docs/sweeps.md); --help of the sweep lists its other options.",
        allow_abbrev=False,
    )
    parser.add_argument("--trials", type=int, default=20, help="finished trials to reach (complete, pruned, failed)")
    parser.add_argument("--workers", type=int, default=1, help="processes (submitit: jobs) sharing the study")
    parser.add_argument("--storage", default=None, help="database URL or journal file path (default OUT/study.db)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="seeded by --seeds (one seed, default 0)")
    parser.add_argument("--pruner", choices=PRUNERS, default="median", help="prunes after each validation")
    parser.add_argument("--objective", default=None, help="metric to optimise (default: checkpoint.monitor)")
    parser.add_argument("--direction", choices=("max", "min"), default=None, help="default: checkpoint.mode")
    own, rest = parser.parse_known_args(argv)
    args, extra_args = sweep.parse_args(rest)
    return argparse.Namespace(**vars(args), **vars(own)), extra_args


def plan_search(args: argparse.Namespace, extra_args: list[str]) -> Search:
    """Check the arguments and the search space against the base config; no trial runs before this passes."""
    if args.trials < 1 or args.workers < 1:
        raise ConfigError(f"--trials {args.trials} and --workers {args.workers} must be >= 1")
    if args.seeds is not None and len(args.seeds) != 1:
        raise ConfigError(f"--seeds {args.seeds}: a search takes one seed (its sampler's and every trial's fit)")
    if args.max_runs is not None:
        raise ConfigError("--max-runs is a grid option; a search stops after --trials trials")
    if args.launcher == "submitit" and (args.gpus_per_node > 1 or args.nodes > 1):
        raise ConfigError("a search job runs one single-device fit at a time: use --gpus-per-node 0 or 1, --nodes 1")
    for path in args.config:
        if not path.is_file():
            raise ConfigError(f"base config {path} not found (pass --config PATH to an existing fit config)")
    space = load_space(args.search)
    if args.sampler == "grid":
        for dimension in space:
            dimension.grid()  # a float range has no grid: say so before anything runs
    base = check_space(space, args.config, extra_args)
    monitor, mode = lookup(base, "checkpoint.monitor")[1], lookup(base, "checkpoint.mode")[1]
    objective = args.objective or monitor
    if objective is None:
        raise ConfigError("the base config monitors no metric (checkpoint.monitor); pass --objective KEY --direction")
    direction = args.direction or (mode if objective == monitor else None)
    if direction not in ("max", "min"):
        raise ConfigError(f"--objective {objective} is not checkpoint.monitor: pass --direction max|min")
    trials = args.trials
    if args.sampler == "grid":
        size = math.prod(len(d.grid()) for d in space)
        if trials > size:
            logger.info("search: the grid has %d points; --trials %d lowered to %d", size, trials, size)
        trials = min(trials, size)
    out_dir = (args.out or Path("runs") / "sweeps" / args.search.stem).resolve()
    return Search(
        base_configs=list(args.config),
        space=space,
        out_dir=out_dir,
        storage=args.storage or f"sqlite:///{out_dir / 'study.db'}",
        sampler=args.sampler,
        pruner=args.pruner,
        seed=args.seeds[0] if args.seeds else 0,
        trials=trials,
        objective=objective,
        direction=direction,
        extra_args=extra_args,
    )


def work_as_child(search: Search, worker: int) -> None:
    """A local worker process that dies with the sweep (Linux ``PR_SET_PDEATHSIG``): a killed sweep must not leave
    workers running trials that its restart marks interrupted and runs again."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    search.work(worker)


def run_workers(search: Search, args: argparse.Namespace) -> None:
    """The workers: this process (one local worker), K local processes, or K submitit jobs."""
    if args.launcher == "submitit":
        import submitit

        job_options = argparse.Namespace(**{**vars(args), "grid": args.search})  # names the jobs sweep-<space>
        executor = sweep.submitit_executor(job_options, search.out_dir / "submitit" / "%j")
        if args.gpus_per_node:
            search.extra_args = [*search.extra_args, "--trainer.devices=1"]
        with executor.batch():
            jobs = [executor.submit(search.work, worker) for worker in range(args.workers)]
        for job in submitit.helpers.as_completed(jobs, poll_frequency=sweep.POLL_SECONDS):
            try:
                job.result()
            except Exception as err:  # its running trial is re-run by the next start
                logger.error("search: worker job %s failed (log %s): %s", job.job_id, job.paths.stderr, err)
        return
    if args.workers == 1:
        search.work()
        return
    # spawn: a fresh interpreter per worker (no forked Lightning or CUDA state), each with its own sampler seed.
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=work_as_child, args=(search, worker)) for worker in range(args.workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        if process.exitcode:
            logger.error("search: worker process %d exited with %d", process.pid, process.exitcode)


def main(argv: Sequence[str]) -> int:
    """``sweep --search``: check, resume the study, run the workers, report. Returns the number of failed trials;
    2 with a one-line error for bad input."""
    args, extra_args = parse_search_args(argv)
    try:
        search = plan_search(args, extra_args)
    except ConfigError as err:
        print(f"sweep: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    summary = ", ".join(f"{d.name} {d.kind} {d.values_to_check()}" for d in search.space)
    logger.info(
        "search %s: %d trials over %s, %s %s, storage %s",
        args.search,
        search.trials,
        summary,
        search.direction,
        search.objective,
        search.storage,
    )
    if args.dry_run:
        return 0
    search.out_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = search.study()
    with locked(search.out_dir / "search.lock"):
        requeue_interrupted(study)
    run_workers(search, args)
    write_reports(study, search, plots=True)
    rows = trial_rows(study, search.direction)
    if rows and rows[0]["state"] == "COMPLETE":
        logger.info(
            "search: best trial %d: %s = %s, %s",
            rows[0]["number"],
            search.objective,
            rows[0]["value"],
            json.dumps(rows[0]["params"]),
        )
    return sum(row["state"] == "FAIL" for row in rows)
