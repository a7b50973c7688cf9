"""bench/gpu_run.sh is run only where a GPU is lent; its `--smoke` rehearsal runs every stage here on the
CPU, so that the script is known to work before the few minutes of GPU time it gets."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile's CPU backend needs a C compiler")
def test_gpu_run_smoke_runs_every_stage_on_the_cpu_and_writes_one_json_and_one_log(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh"), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "gpu_run.json").read_text())
    stages = report["stages"]
    assert set(stages) == {"cuda_tests", "mpis_vs_bptt", "train", "spike_runtime", "compiled"}
    assert all(stage["ok"] for stage in stages.values())
    assert set(stages["mpis_vs_bptt"]["mpis_over_bptt"]) == {"4", "8"}
    assert stages["train"]["epochs"] and stages["train"]["epochs"][0]["test_acc"] is not None
    assert {(r["layout"], r["batch"]) for r in stages["spike_runtime"]["rows"]} == {
        ("graph", 1), ("graph", 8), ("native", 1), ("native", 8)}  # fmt: skip
    assert stages["compiled"]["same_rates"]
    assert len((tmp_path / "gpu_run.log").read_text().splitlines()) == len(stages)


def test_gpu_run_without_a_gpu_and_without_smoke_says_so_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip() == "no CUDA device: run with --smoke for the CPU rehearsal"
