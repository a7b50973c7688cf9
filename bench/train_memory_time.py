"""Peak memory and time of one training step, MPIS vs BPTT, for several T (same arch, same batch).

Memory is the growth of one training step (forward solve + backward + optimizer step) above the idle
process, after one warm-up step (optimizer state, library workspaces): on CUDA
`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`; on CPU the growth of peak RSS
(`getrusage`) in a fresh process per configuration, with the kernel's peak-RSS mark reset after the
warm-up (`/proc/self/clear_refs`) and glibc told to return every buffer over 64 KiB to the system, so
that the idle RSS is what is really in use.

Time is the mean of two steps after the warm-up, in a separate fresh process with the normal allocator;
seconds per epoch = seconds per step × steps in an epoch of --epoch-samples (Fashion-MNIST's 60,000).

    python bench/train_memory_time.py                                 # MPIS and BPTT at T = 10, 30, 100
    python bench/train_memory_time.py --methods mpis --T 30 100 300   # MPIS flat in T
    python bench/train_memory_time.py --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure(args: argparse.Namespace) -> dict:
    """One configuration, in this (fresh) process: memory growth of a step, or the time of a step."""
    import torch

    from mpis.config import ModelConfig, SolverConfig, TrainConfig
    from mpis.train.losses import spiking_loss
    from mpis.train.models import build_model, step_outputs

    torch.manual_seed(0)
    device = torch.device(args.device)
    shape = (args.channels, args.size, args.size)
    solver = SolverConfig(forward=args.forward, grad=args.grad, T=args.T[0])
    train = TrainConfig(method=args.methods[0])
    model = build_model(ModelConfig(arch=args.arch), solver, train, shape).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(args.batch, *shape, device=device)
    y = torch.randint(0, model.net.arch.classes, (args.batch,), device=device)

    def step() -> None:
        outputs, _ = step_outputs(model, x)
        optimizer.zero_grad(set_to_none=True)
        spiking_loss(train.loss, outputs, y).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: optimizer state, library workspaces
    if args.what == "time":
        start = time.perf_counter()
        step()
        step()
        return {"seconds_per_step": (time.perf_counter() - start) / 2}
    if device.type == "cuda":
        idle = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")
        idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"growth_mb": (peak - idle) / 2**20}


def run_worker(args: argparse.Namespace, method: str, steps: int, what: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", what, "--methods", method, "--T", str(steps), "--arch", args.arch,
           "--channels", str(args.channels), "--size", str(args.size), "--batch", str(args.batch),
           "--forward", args.forward, "--grad", args.grad, "--device", args.device]  # fmt: skip
    env = dict(os.environ)
    if what == "memory":  # return every buffer over 64 KiB to the system, so idle RSS is what is in use
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"{method} T={steps} ({what}) failed:\n{result.stderr}")
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="16C3S1-2F1*(32C3S2-48C3S1)-FC10")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--T", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--methods", nargs="+", default=["mpis", "bptt"], choices=["mpis", "bptt"])
    parser.add_argument("--forward", default="spike", choices=["spike", "rate"], help="MPIS forward")
    parser.add_argument("--grad", default="phantom", choices=["ift", "phantom"], help="MPIS gradient")
    parser.add_argument("--epoch-samples", type=int, default=60_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the rows and ratios to this JSON file")
    parser.add_argument("--worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.what = args.worker
        print(json.dumps(measure(args)))
        return
    steps_per_epoch = -(-args.epoch_samples // args.batch)
    rows = {}
    for method in args.methods:
        for steps in args.T:
            row = run_worker(args, method, steps, "memory") | run_worker(args, method, steps, "time")
            rows[method, steps] = row
            print(f"measured {method} T={steps}: {row}", file=sys.stderr)
    print(
        f"arch {args.arch}, input {args.channels}x{args.size}x{args.size}, batch {args.batch}, "
        f"MPIS forward={args.forward} grad={args.grad}, device={args.device}, "
        f"epoch = {steps_per_epoch} steps ({args.epoch_samples} samples)"
    )
    print(f"{'method':>6} {'T':>5} {'step memory MB':>15} {'s/step':>8} {'s/epoch':>9}")
    for (method, steps), r in rows.items():
        sec = r["seconds_per_step"]
        print(f"{method:>6} {steps:>5} {r['growth_mb']:>15.1f} {sec:>8.3f} {sec * steps_per_epoch:>9.0f}")
    for method in args.methods:
        growth = [rows[method, t]["growth_mb"] for t in args.T]
        print(f"{method}: memory max/min over T = {max(growth) / min(growth):.3f}")
    ratios = {}
    if set(args.methods) == {"mpis", "bptt"}:
        for steps in args.T:
            m, b = rows["mpis", steps], rows["bptt", steps]
            ratios[steps] = {
                "memory": m["growth_mb"] / b["growth_mb"],
                "time": m["seconds_per_step"] / b["seconds_per_step"],
            }
            print(f"T={steps}: MPIS/BPTT memory {ratios[steps]['memory']:.3f}, time {ratios[steps]['time']:.3f}")
    if args.json:
        table = [{"method": m, "T": t, **r, "seconds_per_epoch": r["seconds_per_step"] * steps_per_epoch}
                 for (m, t), r in rows.items()]  # fmt: skip
        Path(args.json).write_text(json.dumps({"device": args.device, "batch": args.batch, "rows": table,
                                               "mpis_over_bptt": ratios}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
