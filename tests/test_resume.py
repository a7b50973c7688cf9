"""Training survives kills and full disks: every epoch is committed in one step, `--resume` finishes the run
as if it had never stopped, and `--overwrite` never mixes two runs."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import faulty_mpis

from mpis.train.checkpoint import load_checkpoint, read_payload

TINY = ["--arch", "4C3-2F1*(6C3S2-8C3)-FC10", "--T", "4", "--batch-size", "128", "--quiet", "--threads", "1"]


def train(out: Path, *extra: str, **faults) -> subprocess.CompletedProcess:
    return faulty_mpis("train", *TINY, "--epochs", "2", "--out", str(out), *extra, **faults)


def history(out: Path) -> list[dict]:
    """metrics.jsonl without the fields that differ between two runs of the same computation."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "peak_memory_mb")} for line in lines]


def assert_consistent(out: Path) -> None:
    """What a kill may leave: a loadable model.pt whose own history metrics.jsonl equals or trails by one
    epoch (the kill fell between the two writes), and no half-written file."""
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left"
    if not (out / "model.pt").exists():
        assert not (out / "metrics.jsonl").exists()
        return
    run = read_payload(out / "model.pt")["run"]
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    assert lines == run["history"][: len(lines)] and len(lines) >= run["epoch"] - 1


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    assert train(out).returncode == 0
    return out


@pytest.mark.parametrize("kill_at", [2, 3, 4])  # renames: 1 epoch-1 model.pt, 2 its metrics, 3 epoch-2 model.pt, …
def test_a_run_killed_at_any_commit_resumes_to_the_same_model_and_metrics(tmp_path, uninterrupted, kill_at):
    out = tmp_path / "run"
    killed = train(out, kill_at=kill_at)
    assert killed.returncode == -9
    # the kill -9 left a temporary file; the resumed run removes it
    assert_consistent_but_for_leftovers(out)
    refused = train(out)
    assert refused.returncode == 2 and "pass --resume to continue it" in refused.stderr
    assert ("epoch 2 of 2 complete" if kill_at == 4 else "epoch 1 of 2 done") in refused.stderr
    resumed = train(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_consistent(out)
    assert history(out) == history(uninterrupted)
    ours, theirs = (load_checkpoint(run / "model.pt").net.state_dict() for run in (out, uninterrupted))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def assert_consistent_but_for_leftovers(out: Path) -> None:
    leftovers = [p for p in out.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert len(leftovers) == 1
    leftovers[0].unlink()
    assert_consistent(out)
    leftovers[0].touch()


def test_resume_needs_a_finished_epoch_and_keeps_the_runs_settings(tmp_path):
    out = tmp_path / "run"
    nothing = train(out, "--resume")
    assert nothing.returncode == 2 and "start the run without --resume" in nothing.stderr
    assert train(out, kill_at=3).returncode == -9
    changed = faulty_mpis("train", "--out", str(out), "--resume", "--lr", "0.5")
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines() == [
        "mpis: error: --resume continues the run as it was started: --lr 0.5 differs from its 0.01 "
        "(drop the flag, or start a new run with --overwrite or another --out)"
    ]
    both = faulty_mpis("train", "--out", str(out), "--resume", "--overwrite")
    assert both.returncode == 2 and "pass one of them" in both.stderr
    # the run's own settings come from model.pt: the flags need not be repeated; the device may change
    finished = faulty_mpis("train", "--out", str(out), "--resume", "--device", "cpu", "--quiet")
    assert finished.returncode == 0, finished.stderr
    assert [m["epoch"] for m in history(out)] == [1, 2]


def test_overwrite_killed_mid_run_never_leaves_two_runs_mixed(tmp_path, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    assert train(out, "--overwrite", "--seed", "1", kill_at=2).returncode == -9
    (leftover,) = out.glob(".metrics.jsonl.*.tmp")
    leftover.unlink()
    assert_consistent(out)
    assert load_checkpoint(out / "model.pt").train_cfg.seed == 1  # the new run's epoch 1, old metrics gone
    assert not (out / "metrics.jsonl").exists()


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(bytes(shutil.disk_usage(disk).free))
    return filler


def test_a_full_disk_is_refused_before_training_with_one_line(small_disk):
    fill(small_disk)
    result = train(small_disk / "run")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("mpis: error: --out") and "MB free" in line and "a checkpoint of this run needs" in line


def test_a_disk_that_fills_mid_run_keeps_the_last_checkpoint_and_resume_finishes(small_disk):
    out = small_disk / "run"
    assert train(out, kill_at=3).returncode == -9  # epoch 1 committed
    next(out.glob(".model.pt.*.tmp")).unlink()
    full = train(out, "--resume", fill=small_disk, leaving=64 << 10)  # epoch 2 trains, then the disk is full
    assert full.returncode == 2
    (line,) = full.stderr.strip().splitlines()
    assert line.startswith("mpis: error: no space left on the device for") and "is intact" in line, line
    assert_consistent(out)
    assert read_payload(out / "model.pt")["run"]["epoch"] == 1
    (small_disk / "filler").unlink()
    assert train(out, "--resume").returncode == 0
    assert [m["epoch"] for m in history(out)] == [1, 2]


def test_a_write_that_meets_a_full_disk_is_one_error_and_leaves_the_old_file(small_disk):
    from mpis.errors import MpisError
    from mpis.train.checkpoint import atomic_write

    target = small_disk / "metrics.jsonl"
    target.write_text("old\n")
    fill(small_disk)
    with pytest.raises(MpisError, match="no space left on the device for .*metrics.jsonl"):
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(bytes(1 << 20)))
    assert target.read_text() == "old\n" and [p.name for p in small_disk.iterdir()] == sorted(
        ["filler", "metrics.jsonl"]
    )
