"""Peak training memory of one MPIS training step for several T (same arch, same batch).

Memory is the growth of one training step (forward solve + backward + optimizer step) above the idle
process, after one warm-up step (optimizer state, library workspaces): on CUDA
`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`; on CPU the growth of peak RSS
(`getrusage`) in a fresh process per configuration, with the kernel's peak-RSS mark reset after the
warm-up (`/proc/self/clear_refs`) and glibc told to return every buffer over 64 KiB to the system, so
that the idle RSS is what is really in use.

    python bench/train_memory.py                    # T = 30, 100, 300 on the Fashion-MNIST net
    python bench/train_memory.py --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path


def measure(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from mpis.config import SolverConfig
    from mpis.model.equilibrium import EquilibriumModel
    from mpis.model.network import MPISNet

    torch.manual_seed(0)
    device = torch.device(args.device)
    net = MPISNet(args.arch, (args.channels, args.size, args.size), dropout=0.05)
    model = EquilibriumModel(net, SolverConfig(forward=args.forward, grad=args.grad, T=args.T[0])).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(args.batch, args.channels, args.size, args.size, device=device)
    y = torch.randint(0, net.arch.classes, (args.batch,), device=device)

    def step() -> None:
        logits, _ = model(x)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(logits, y).backward()
        optimizer.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        idle = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")
        idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "T": args.T[0],
        "growth_mb": (peak - idle) / 2**20,
        "peak_mb": peak / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="16C3S1-2F1*(32C3S2-48C3S1)-FC10")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--T", type=int, nargs="+", default=[30, 100, 300])
    parser.add_argument("--forward", default="spike", choices=["spike", "rate"])
    parser.add_argument("--grad", default="phantom", choices=["ift", "phantom"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args)))
        return
    rows = []
    for steps in args.T:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--arch",
            args.arch,
            "--channels",
            str(args.channels),
            "--size",
            str(args.size),
            "--batch",
            str(args.batch),
            "--T",
            str(steps),
            "--forward",
            args.forward,
            "--grad",
            args.grad,
            "--device",
            args.device,
        ]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode:
            sys.exit(f"worker for T={steps} failed:\n{result.stderr}")
        rows.append(json.loads(result.stdout))
    print(
        f"arch {args.arch}, input {args.channels}x{args.size}x{args.size}, batch {args.batch}, "
        f"forward={args.forward}, grad={args.grad}, device={args.device}"
    )
    print(f"{'T':>5} {'step growth MB':>15} {'process peak MB':>16}")
    for r in rows:
        print(f"{r['T']:>5} {r['growth_mb']:>15.1f} {r['peak_mb']:>16.1f}")
    growth = [r["growth_mb"] for r in rows]
    print(f"max/min step growth: {max(growth) / min(growth):.3f}")


if __name__ == "__main__":
    main()
