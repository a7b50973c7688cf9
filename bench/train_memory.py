"""Peak training memory of one MPIS training step for several T (same arch, same batch).

Memory is the growth of one training step (forward solve + backward + optimizer step) above the idle
process: on CUDA `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`; on CPU the growth
of peak RSS, measured in a fresh process per configuration so that no run inherits another's peak.

    python bench/train_memory.py                    # T = 30, 100, 300 on the Fashion-MNIST net
    python bench/train_memory.py --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from mpis.config import SolverConfig
    from mpis.model.equilibrium import EquilibriumModel
    from mpis.model.network import MPISNet

    torch.manual_seed(0)
    device = torch.device(args.device)
    net = MPISNet(args.arch, (args.channels, args.size, args.size), dropout=0.05)
    model = EquilibriumModel(net, SolverConfig(forward=args.forward, grad=args.grad, T=args.T)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(args.batch, args.channels, args.size, args.size, device=device)
    y = torch.randint(0, net.arch.classes, (args.batch,), device=device)

    def step() -> None:
        logits, _ = model(x)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(logits, y).backward()
        optimizer.step()

    step()  # optimizer state and allocator warm-up are not part of the per-step growth
    if device.type == "cuda":
        torch.cuda.synchronize()
        idle = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "T": args.T,
        "growth_mb": (peak - idle) / 2**20,
        "peak_mb": peak / 2**20,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="16C3S1-2F1*(32C3S2-48C3S1)-FC10")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--T", type=int, nargs="+", default=[30, 100, 300])
    parser.add_argument("--forward", default="spike", choices=["spike", "rate"])
    parser.add_argument("--grad", default="ift", choices=["ift", "phantom"])
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
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    print(
        f"arch {args.arch}, input {args.channels}x{args.size}x{args.size}, batch {args.batch}, "
        f"forward={args.forward}, grad={args.grad}, device={args.device}"
    )
    print(f"{'T':>5} {'step growth MB':>15} {'process peak MB':>16} {'s/step':>8}")
    for r in rows:
        print(f"{r['T']:>5} {r['growth_mb']:>15.1f} {r['peak_mb']:>16.1f} {r['seconds']:>8.3f}")
    growth = [r["growth_mb"] for r in rows]
    print(f"max/min step growth: {max(growth) / min(growth):.3f}")


if __name__ == "__main__":
    main()
