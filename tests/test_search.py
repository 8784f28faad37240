"""``python -m swinlab sweep --search``: space checks, pruning, kill and restart, workers, storages, best.yaml."""

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from swinlab import search, sweep
from swinlab.validation import ConfigError
from tests.helpers import REPO, TINY_SWIN

QUICKSTART = REPO / "configs" / "classification" / "quickstart_fashion_mnist.yaml"
LR = "model.init_args.optimizer.init_args.lr"
WINDOW = "model.init_args.backbone_kwargs.window_size"
SPACE = {LR: {"float": [1.0e-5, 0.5], "log": True}, WINDOW: {"choice": [2, 4]}}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread here, in the worker processes and in the sweep that is killed: on a loaded CPU, threads
    waiting for each other made the tiny fits several times slower."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_fit_args(fashion_mnist_dir: Path, epochs: int = 2) -> list[str]:
    """A few seconds per trial: a tiny Swin, 3 steps per epoch on the tiny Fashion-MNIST fixture, no logger."""
    return [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--data.init_args.data_dir={fashion_mnist_dir}",
        "--data.init_args.val_size=8",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--data.init_args.persistent_workers=false",
        f"--trainer.max_epochs={epochs}",
        "--trainer.limit_train_batches=3",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--test_after_fit=false",
        f"--model.init_args.backbone_kwargs={json.dumps({**TINY_SWIN, 'in_chans': 1})}",
    ]


def write_space(path: Path, space: dict) -> Path:
    path.write_text(yaml.safe_dump(space))
    return path


def search_args(tmp_path: Path, fashion_mnist_dir: Path, trials: int, *options: str) -> list[str]:
    space = write_space(tmp_path / "space.yaml", SPACE)
    out = ["--config", str(QUICKSTART), "--search", str(space), "--trials", str(trials), "--out", str(tmp_path / "out")]
    return [*out, *options, *tiny_fit_args(fashion_mnist_dir)]


def load(storage: str) -> optuna.Study:
    return optuna.load_study(study_name=search.STUDY_NAME, storage=search.open_storage(storage))


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials counted toward --trials: complete, pruned, failed with an error; not interrupted ones."""
    return [t for t in study.get_trials() if t.state.is_finished() and not t.user_attrs.get(search.INTERRUPTED)]


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({LR: {"float": [0.1, 0.01]}}, r"lr: float range \[0.1, 0.01\] needs lo < hi"),
        ({LR: {"float": [0.0, 0.1], "log": True}}, r"log: true needs lo > 0"),
        ({LR: {"float": 0.1}}, r"float needs \[lo, hi\] of floats"),
        ({WINDOW: {"int": [2, 4], "choice": [1]}}, r"needs exactly one of \('float', 'int', 'choice'\)"),
        ({WINDOW: {"int": [2.5, 4]}}, r"int needs \[lo, hi\] of ints"),
        ({WINDOW: {"choice": []}}, r"choice needs a non-empty list"),
        ({WINDOW: [2, 4]}, r"\[2, 4\] is not a range"),
    ],
)
def test_malformed_ranges_name_the_file_and_key(tmp_path, space, message):
    with pytest.raises(ConfigError, match=message):
        search.load_space(write_space(tmp_path / "space.yaml", space))


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            {"model.init_args.optimizer.init_args.lrr": {"float": [0.1, 0.2]}},
            r"unknown config key `model.init_args.optimizer.init_args.lrr` .* did you mean "
            r"`model.init_args.optimizer.init_args.lr`",
        ),
        (
            {WINDOW: {"float": [2.0, 4.0]}},
            r"window_size is the int 4 in the base config: \{float: \[lo, hi\]\} does not fit",
        ),
        ({"test_after_fit": {"int": [0, 1]}}, r"test_after_fit is False \(bool\) in the base config"),
        (
            {"model.init_args.backbone": {"choice": ["swin_t", "swin_nope"]}},
            r"backbone='swin_nope' is not a registered",
        ),
    ],
)
def test_space_outside_the_config_fails_in_one_line_before_any_trial(
    tmp_path, fashion_mnist_dir, capsys, space, message
):
    write_space(tmp_path / "space.yaml", space)
    args = search_args(tmp_path, fashion_mnist_dir, 2)
    args[args.index("--search") + 1] = str(write_space(tmp_path / "bad.yaml", space))
    assert sweep.main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("sweep: error: ") and len(error.splitlines()) == 1
    assert re.search(message, error), error
    assert not (tmp_path / "out").exists()  # nothing ran, no study was made


def read_rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_six_trials_with_pruning_write_reports_and_a_best_yaml_that_refits_to_its_value(tmp_path, fashion_mnist_dir):
    """The objective defaults to the monitored metric (here val/loss, min, set on the command line); the median
    pruner stops some trials after an epoch; best.yaml refits (same seed) to the best trial's value."""
    from swinlab.cli import main as cli

    monitor = ["--checkpoint.monitor=val/loss", "--checkpoint.mode=min"]
    args = search_args(tmp_path, fashion_mnist_dir, 6, "--sampler", "random", *monitor)
    assert sweep.main([*args, "--trainer.max_epochs=3"]) == 0
    out = tmp_path / "out"
    study = load(f"sqlite:///{out / 'study.db'}")
    states = [t.state.name for t in finished(study)]
    assert len(study.trials) == 6 and states.count("PRUNED") >= 1 and states.count("COMPLETE") >= 2, states

    rows = read_rows(out)
    assert sorted(int(r["number"]) for r in rows) == list(range(6))
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert rows[: len(complete)] == complete  # best first
    assert [float(r["value"]) for r in complete] == sorted(float(r["value"]) for r in complete)
    assert all(r["epochs"] == "3" for r in complete)
    assert all(int(r["epochs"]) < 3 for r in rows if r["state"] == "PRUNED")
    assert all(float(r["wall_s"]) > 0 and r["lr"] for r in rows)
    assert (
        "| trial | state | val/loss | epochs | wall (s) | window_size | lr | error |"
        in (out / "results.md").read_text()
    )
    for name in ("history", "parallel_coordinates", "param_importances"):
        assert (out / f"{name}.png").stat().st_size > 0

    best = study.best_trial
    config = yaml.safe_load((out / "best.yaml").read_text())
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == best.params["lr"]
    assert config["trainer"]["callbacks"] is None and config["trainer"]["default_root_dir"] == str(out / "best")
    refit = cli(["fit", "--config", str(out / "best.yaml")])
    assert refit.trainer.checkpoint_callback.best_model_score.item() == pytest.approx(best.value, rel=1e-5)


def wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def test_sigkilled_search_restarts_to_exactly_n_trials_on_a_journal_file(tmp_path, fashion_mnist_dir):
    """SIGKILL while trial 1 runs; the same command again marks it interrupted, re-runs its parameters, does not
    re-run trial 0, and stops at 3 finished trials. The study is in a journal file (--storage PATH)."""
    journal = tmp_path / "study.journal"
    args = search_args(tmp_path, fashion_mnist_dir, 3, "--storage", str(journal), "--pruner", "none")
    out = tmp_path / "out"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "swinlab", "sweep", *args], cwd=REPO, stdout=log, stderr=log)
        try:
            wait_for(out / "trial_0001" / "seed0" / "sweep_config.yaml", first)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
    killed = load(str(journal))
    assert [t.state.name for t in killed.trials] == ["COMPLETE", "RUNNING"]
    kept = out / "trial_0000" / "seed0" / "result.json"
    stamp = kept.stat().st_mtime_ns

    assert sweep.main(args) == 0
    study = load(str(journal))
    interrupted = [t for t in study.trials if t.user_attrs.get(search.INTERRUPTED)]
    assert [t.number for t in interrupted] == [1] and interrupted[0].state.name == "FAIL"
    done = finished(study)
    assert [t.state.name for t in done] == ["COMPLETE"] * 3 and len({t.number for t in done}) == 3
    rerun = next(t for t in done if t.user_attrs.get("rerun_of") == 1)
    assert rerun.params == interrupted[0].params
    assert kept.stat().st_mtime_ns == stamp  # the finished trial did not run again
    states = [r["state"] for r in read_rows(out)]
    assert sorted(states) == ["COMPLETE"] * 3 + ["INTERRUPTED"]


def test_two_local_workers_share_one_sqlite_study(tmp_path, fashion_mnist_dir):
    args = search_args(tmp_path, fashion_mnist_dir, 4, "--workers", "2", "--pruner", "none")
    assert sweep.main(args) == 0
    study = load(f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert len({t.user_attrs[search.WORKER] for t in study.trials}) == 2  # both processes ran trials
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 4  # workers drew different trials


def test_parameters_are_named_by_their_shortest_unique_key_suffix(tmp_path):
    space = {
        LR: {"float": [0.1, 0.2]},
        "model.init_args.lr_scheduler.init_args.lr": {"float": [0.1, 0.2]},
        WINDOW: {"int": [2, 4]},
    }
    names = {d.name for d in search.load_space(write_space(tmp_path / "space.yaml", space))}
    assert names == {"lr_scheduler.init_args.lr", "optimizer.init_args.lr", "window_size"}


def test_pruning_callback_prunes_a_worse_trial_but_not_after_its_last_epoch(tmp_path):
    from types import SimpleNamespace

    storage = str(tmp_path / "study.journal")
    study = optuna.create_study(storage=search.open_storage(storage), study_name="s", direction="maximize")
    for _ in range(2):  # the median pruner's start-up trials: 0.9 after epoch 1
        trial = study.ask()
        trial.report(0.9, step=1)
        study.tell(trial, 0.9)
    trial = study.ask()
    callback = search.TrialPruning(storage, "s", trial._trial_id, "val/top1", "median")
    module = SimpleNamespace(current_epoch=1)

    def validate(max_epochs: int) -> None:
        metrics = {"val/top1": torch.tensor(0.1)}
        callback.on_validation_end(
            SimpleNamespace(sanity_checking=False, callback_metrics=metrics, max_epochs=max_epochs), module
        )

    validate(max_epochs=2)  # epoch 1 is the last: reported, not pruned
    assert study.trials[-1].intermediate_values == {1: pytest.approx(0.1)}
    with pytest.raises(optuna.TrialPruned):
        validate(max_epochs=3)
