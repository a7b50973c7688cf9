"""The CUDA path: training, `--device auto`, the spike runtime and `mpis check` on a GPU. Marked `cuda`:
they skip without a CUDA device and run with `pytest -m cuda` (bench/gpu_run.sh does)."""

import json

import pytest
import torch
from conftest import TINY_ARCH, spiky_net

from mpis.cli import main
from mpis.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    """One epoch on digits with --device auto (which must pick the GPU)."""
    out = tmp_path_factory.mktemp("cuda-run")
    args = ["train", "--arch", TINY_ARCH, "--T", "5", "--epochs", "1", "--quiet", "--out", str(out)]
    assert main(args + ["--device", "auto", "--deployed-limit", "64"]) == 0
    return out


def test_auto_device_trains_on_the_gpu_and_the_checkpoint_loads_on_the_cpu(cuda_run):
    metrics = [json.loads(line) for line in (cuda_run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["device"].startswith("cuda")
    assert metrics[-1]["peak_memory_mb"] > 0
    net = load_checkpoint(cuda_run / "model.pt").net
    assert all(p.device.type == "cpu" for p in net.parameters())


def test_cuda_spike_forward_matches_the_cpu_one():
    net = spiky_net(TINY_ARCH, (1, 8, 8))
    x = torch.rand(16, 1, 8, 8)
    want = net.simulate(x, 20).state_rates
    got = net.cuda().simulate(x.cuda(), 20).state_rates
    for name, rate in want.items():
        differ = (got[name].cpu() != rate).float().mean()
        assert differ < 0.01, f"{name}: {differ:.2%} of rates differ (TF32/rounding flips only a few spikes)"


def test_spike_runtime_on_cuda_gives_the_cpu_counts_in_float64():
    from mpis.export.nir import build_nir
    from mpis.spike.simulate import compile_graph

    graph = build_nir(spiky_net(TINY_ARCH, (1, 8, 8)), steps=10).graph
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64)
    cpu = compile_graph(graph, "cpu", dtype=torch.float64).run(x, 10)
    gpu = compile_graph(graph, "cuda", dtype=torch.float64).run(x, 10)
    for name, count in cpu.spike_counts.items():
        assert torch.equal(gpu.spike_counts[name].cpu(), count), name


def test_check_runs_its_spike_runtime_on_cuda(cuda_run, tmp_path):
    args = ["check", str(cuda_run / "model.pt"), "--T", "5", "--iters", "5", "--limit", "32", "--quiet"]
    assert main(args + ["--device", "cuda", "--report", str(tmp_path / "r"), "--min-agreement", "0"]) == 0
    rows = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
    assert rows and all(0.0 <= r["agreement"] <= 1.0 for r in rows)
