"""One call on a CUDA machine: every GPU figure the README quotes, as one JSON and one log.

Stages, each in its own process with its own time limit (a stage that fails or runs out of time is
recorded as such and the next one runs):
  1. `cuda_tests`   — `pytest -m cuda` (the tests that need a GPU; they skip without one);
  2. `mpis_vs_bptt` — bench/train_memory_time.py: step time and peak memory, MPIS vs BPTT, T = 30 and 100,
                      the Fashion-MNIST net at batch 128 (the paper's Table 1);
  3. `train`        — the Fashion-MNIST preset on the GPU for as many epochs as fit in its time (accuracy and
                      s/epoch from metrics.jsonl); digits when no Fashion-MNIST files are at --data-dir;
  4. `spike_runtime`— `mpis simulate`'s runtime on the GPU: images/s at T = 100, batch 1 and 256;
  5. `compiled`     — the training spike forward eager vs `torch.compile` (compile time, then speed).
`--smoke` runs the same stages on the CPU, small, in a few minutes, so that this script cannot rot (a test
runs it). bench/gpu_run.sh installs wheels carried beside the checkout first.

    bash bench/gpu_run.sh --out runs/gpu --data-dir DATA        # on the GPU machine
    bash bench/gpu_run.sh --smoke --out /tmp/smoke               # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCH = "16C3S1-2F1*(32C3S2-48C3S1)-FC10"  # the paper's Fashion-MNIST net
SMOKE_ARCH = "4C3S1-2F1*(4C3S2-4C3S1)-FC10"
STAGES = ("cuda_tests", "mpis_vs_bptt", "train", "spike_runtime", "compiled")


def _settings(smoke: bool) -> dict:
    """Sizes and time limits (seconds) per stage; the full run fits in 9 minutes on an H200."""
    if smoke:
        limits = {"cuda_tests": 120, "mpis_vs_bptt": 120, "train": 150, "spike_runtime": 60, "compiled": 150}
        return {"device": "cpu", "arch": SMOKE_ARCH, "T": [4, 8], "batch": 8, "sim_T": 10, "sim_batches": [1, 8],
                "limits": limits}  # fmt: skip
    limits = {"cuda_tests": 90, "mpis_vs_bptt": 150, "train": 200, "spike_runtime": 60, "compiled": 90}
    return {"device": "cuda", "arch": ARCH, "T": [30, 100], "batch": 128, "sim_T": 100, "sim_batches": [1, 256],
            "limits": limits}  # fmt: skip


def _environment() -> dict:
    import torch

    found = {}
    for name in ("torchdeq", "nir", "nirtorch", "onnx", "onnxruntime", "tensorrt"):
        try:
            found[name] = __import__(name).__version__
        except Exception:  # a package missing on the GPU machine is recorded, not fatal
            found[name] = None
    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if cuda else None, "packages": found}  # fmt: skip


# ---- the stages, each run in a child process ------------------------------------------------------------
def stage_cuda_tests(cfg: dict, out: Path, args) -> dict:
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                         cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    summary = (run.stdout.strip().splitlines() or [""])[-1]
    return {"returncode": run.returncode, "summary": summary, "ok": run.returncode in (0, 5)}


def stage_mpis_vs_bptt(cfg: dict, out: Path, args) -> dict:
    table = out / "mpis_vs_bptt.json"
    cmd = [sys.executable, str(ROOT / "bench" / "train_memory_time.py"), "--device", cfg["device"], "--arch",
           cfg["arch"], "--batch", str(cfg["batch"]), "--T", *map(str, cfg["T"]), "--json", str(table)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        return {"ok": False, "error": run.stderr.strip().splitlines()[-1:]}
    return {"ok": True, **json.loads(table.read_text())}


def stage_train(cfg: dict, out: Path, args) -> dict:
    """Train until the stage's time is nearly up, then read the finished epochs from metrics.jsonl."""
    run_dir = out / "train"
    fashion = args.data_dir and Path(args.data_dir, "fashion-mnist").is_dir()
    if fashion and not args.smoke:
        flags = ["--preset", "fashion-mnist", "--data-dir", str(Path(args.data_dir, "fashion-mnist")), "--epochs", "20"]
    else:
        flags = ["--dataset", "digits", "--epochs", "20" if not args.smoke else "1", "--arch", cfg["arch"]]
        flags += ["--train-limit", "256", "--deployed-limit", "64"] if args.smoke else []
    cmd = [sys.executable, "-m", "mpis", "train", "--out", str(run_dir), "--overwrite", "--quiet",
           "--device", cfg["device"], *flags]  # fmt: skip
    budget = cfg["limits"]["train"] - 20
    start = time.perf_counter()
    try:
        subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        pass  # expected: as many epochs as fit
    metrics = run_dir / "metrics.jsonl"
    epochs = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    keep = ("epoch", "test_acc", "onnx_acc", "spike_acc", "spike_onnx_agreement", "rate_settle", "seconds")
    return {"ok": bool(epochs), "dataset": "fashion-mnist" if fashion and not args.smoke else "digits",
            "wall_seconds": time.perf_counter() - start,
            "epochs": [{k: e.get(k) for k in keep} for e in epochs]}  # fmt: skip


def _random_net(cfg: dict):
    import torch

    from mpis.model.network import MPISNet

    torch.manual_seed(0)
    return MPISNet(cfg["arch"], (1, 28, 28)).eval()


def stage_spike_runtime(cfg: dict, out: Path, args) -> dict:
    import torch

    from mpis.export.nir import build_nir
    from mpis.spike.simulate import compile_graph

    graph = build_nir(_random_net(cfg), steps=cfg["sim_T"]).graph
    rows = []
    for layout in ("graph", "native"):
        program = compile_graph(graph, cfg["device"], layout=layout)
        for batch in cfg["sim_batches"]:
            x = torch.rand(batch, 1, 28, 28)
            program.run(x, 2)  # warm-up: kernels, allocator
            _sync(cfg)
            start = time.perf_counter()
            program.run(x, cfg["sim_T"])
            _sync(cfg)
            seconds = time.perf_counter() - start
            rows.append({"layout": layout, "batch": batch, "T": cfg["sim_T"], "images_per_second": batch / seconds})
    return {"ok": True, "rows": rows}


def stage_compiled(cfg: dict, out: Path, args) -> dict:
    """The training spike forward (MPISNet.simulate) eager against torch.compile of the same call."""
    import torch

    net = _random_net(cfg).to(cfg["device"])
    steps = cfg["T"][0]
    x = torch.rand(cfg["batch"], 1, 28, 28, device=cfg["device"])

    def forward():
        return net.simulate(x, steps, count_spikes=False).state_rates

    compiled = torch.compile(forward)
    start = time.perf_counter()
    with torch.no_grad():
        want, got = forward(), compiled()
    _sync(cfg)
    compile_seconds = time.perf_counter() - start
    same = all(torch.allclose(want[k], got[k], atol=1e-5) for k in want)
    timing = {}
    for name, fn in (("eager", forward), ("compiled", compiled)):
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(3):
                fn()
        _sync(cfg)
        timing[name] = (time.perf_counter() - start) / 3
    return {"ok": same, "same_rates": same, "compile_seconds": compile_seconds, "T": steps,
            "batch": cfg["batch"], "seconds_eager": timing["eager"], "seconds_compiled": timing["compiled"],
            "speedup": timing["eager"] / timing["compiled"]}  # fmt: skip


def _sync(cfg: dict) -> None:
    import torch

    if cfg["device"] == "cuda":
        torch.cuda.synchronize()


# ---- the orchestrator ------------------------------------------------------------------------------------
def run_stage(name: str, args, out: Path, limit: int) -> dict:
    cmd = [sys.executable, __file__, "--stage", name, "--out", str(out)] + ["--smoke"] * args.smoke
    cmd += ["--data-dir", args.data_dir] if args.data_dir else []
    start = time.perf_counter()
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"ran past its {limit} s", "seconds": limit}
    seconds = time.perf_counter() - start
    if run.returncode:
        return {"ok": False, "error": (run.stderr.strip().splitlines() or ["no output"])[-1], "seconds": seconds}
    return json.loads(run.stdout.strip().splitlines()[-1]) | {"seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the same stages on the CPU, small")
    parser.add_argument("--out", default="runs/gpu", help="folder for gpu_run.json and gpu_run.log")
    parser.add_argument("--data-dir", help="folder holding fashion-mnist/ (else the train stage uses digits)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = _settings(args.smoke)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage:
        import torch

        torch.set_num_threads(min(torch.get_num_threads(), len(os.sched_getaffinity(0))))
        print(json.dumps(globals()[f"stage_{args.stage}"](cfg, out, args)))
        return 0
    env = _environment()
    if not args.smoke and env["gpu"] is None:
        print("no CUDA device: run with --smoke for the CPU rehearsal", file=sys.stderr)
        return 2
    report = {"date": time.strftime("%Y-%m-%d"), "smoke": args.smoke, "environment": env, "stages": {}}
    log = (out / "gpu_run.log").open("w")
    for name in args.stages:
        result = run_stage(name, args, out, cfg["limits"][name])
        report["stages"][name] = result
        line = f"{name}: {'ok' if result.get('ok') else 'FAILED'} in {result['seconds']:.0f} s: {json.dumps(result)}"
        print(line, flush=True)
        log.write(line + "\n")
    log.close()
    (out / "gpu_run.json").write_text(json.dumps(report, indent=1))
    failed = [n for n, r in report["stages"].items() if not r.get("ok")]
    print(f"wrote {out / 'gpu_run.json'}; " + (f"failed: {', '.join(failed)}" if failed else "every stage ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
