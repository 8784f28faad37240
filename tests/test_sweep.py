import csv
import json
import subprocess
import sys

import pytest
import yaml

from swinlab import sweep
from tests.helpers import ROOT

QUICKSTART = ROOT / "configs" / "classification" / "quickstart_fashion_mnist.yaml"
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true"]


def test_sweep_runs_resumes_and_writes_its_table(tmp_path, fashion_mnist_dir, tiny_swin, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "seeds": [3],
                "points": [
                    {"model.init_args.backbone_kwargs.shift": True},
                    {"model.init_args.backbone_kwargs.shift": False},
                ],
            }
        )
    )
    out = tmp_path / "sweep"
    args = [
        "--config",
        str(QUICKSTART),
        "--grid",
        str(grid),
        "--out",
        str(out),
        *CPU,
        f"--data.init_args.data_dir={fashion_mnist_dir}",
        "--data.init_args.val_size=8",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--data.init_args.persistent_workers=false",
        "--trainer.max_epochs=1",
        "--test_after_fit=false",
        f"--model.init_args.backbone_kwargs={json.dumps({**tiny_swin, 'in_chans': 1})}",
    ]
    assert sweep.main(args) == 0

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["point"], r["seed"]) for r in rows] == [("shift=false", "3"), ("shift=true", "3")]
    for row in rows:
        assert row["metric"] == "val/top1" and 0.0 <= float(row["best"]) <= 1.0
        assert float(row["params_m"]) > 0 and float(row["gmacs"]) > 0 and float(row["images_per_s"]) > 0
    config = yaml.safe_load((out / "shift=false" / "seed3" / "sweep_config.yaml").read_text())
    assert config["seed_everything"] == 3 and config["model"]["init_args"]["backbone_kwargs"]["shift"] is False
    table = (out / "results.md").read_text()
    assert "| shift=false | 3 |" in table and "Mean +- std" in table
    assert (out / "results.png").stat().st_size > 0

    # A restart finds both runs finished and reruns neither (their results stay untouched).
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed3/result.json")}
    capsys.readouterr()
    assert sweep.main(args) == 0
    assert "0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed3/result.json")} == stamps


def test_grid_is_crossed_with_points(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("seeds: [0, 1]\npoints: [{a.shift: true}, {a.shift: false}]\ngrid: {a.window_size: [3, 5]}\n")
    points, seeds = sweep.load_grid(grid)
    assert seeds == [0, 1] and len(points) == 4
    assert {"a.shift": False, "a.window_size": 5} in points
    assert sweep.point_name(points[0]) == "shift=true__window_size=3"


def test_bad_grid_names_the_file_and_key(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("seed: [0]\n")
    with pytest.raises(ValueError, match=r"grid.yaml: unknown key\(s\) \['seed'\]"):
        sweep.load_grid(grid)


def test_python_m_swinlab_sweep_dispatches_and_reports_bad_input(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("seeds: [0, 1]\npoints: [{model.init_args.backbone_kwargs.shift: false}]\n")
    command = [
        sys.executable,
        "-m",
        "swinlab",
        "sweep",
        "--config",
        str(QUICKSTART),
        "--grid",
        str(grid),
        "--out",
        str(tmp_path / "out"),
        "--seeds",
        "1",
        "--dry-run",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert (
        done.returncode == 0 and "1 points x 1 seeds, 1 to run" in done.stdout and "shift=false seed 1" in done.stdout
    )
    with pytest.raises(SystemExit, match=r"sweep: --seeds \[7\] are not in the grid's seeds \[0, 1\]"):
        sweep.main([*command[4:-3], "--seeds", "7"])
