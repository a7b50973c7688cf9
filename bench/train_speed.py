"""Seconds per training step and per Fashion-MNIST epoch, this checkout against an earlier commit, MPIS
against BPTT, measured side by side in one run (same machine, same moment, alternating).

Each configuration runs in a fresh process with the code of its revision on `PYTHONPATH` (an earlier
commit is checked out into a temporary git worktree): the paper's Fashion-MNIST net, 1×28×28 random
inputs (the dense convolutions cost the same whatever the spikes), a warm-up step, then the mean of
`--steps` steps of forward solve + backward + optimizer step. s/epoch = s/step × steps per epoch.
MPIS after is measured twice: float32 throughout, and with the spike forward's convolutions in bfloat16
(`--solve-dtype bfloat16`; the revision before has no such option).

    python bench/train_speed.py                          # before = the commit before the speed work
    python bench/train_speed.py --before HEAD~3 --T 30 100 --batch 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "bc0144f"  # the last commit before channels-last, folded running BN and in-place spike sums


def measure(args: argparse.Namespace) -> dict:
    """One configuration in this process, with whatever `mpis` is first on the path."""
    import torch

    import mpis.train.models as models
    from mpis.config import ModelConfig, SolverConfig, TrainConfig
    from mpis.train.losses import spiking_loss

    torch.manual_seed(0)
    train = TrainConfig(method=args.method)
    solver = SolverConfig(T=args.T[0], **({"solve_dtype": args.solve_dtype} if args.solve_dtype else {}))
    model = models.build_model(ModelConfig(arch=args.arch), solver, train, (1, 28, 28)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(args.batch, 1, 28, 28)
    x = models.on_device(x, torch.device("cpu")) if hasattr(models, "on_device") else x  # as its train loop does
    y = torch.randint(0, 10, (args.batch,))

    def step() -> None:
        outputs, _ = models.step_outputs(model, x)
        optimizer.zero_grad(set_to_none=True)
        spiking_loss(train.loss, outputs, y).backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    return {"seconds_per_step": (time.perf_counter() - start) / args.steps}


def worker(args: argparse.Namespace, source: Path, method: str, steps: int, solve_dtype: str = "") -> float:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--T", str(steps), "--batch", str(args.batch),
           "--steps", str(args.steps), "--arch", args.arch, "--solve-dtype", solve_dtype]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=source)
    if done.returncode:
        sys.exit(f"{method} T={steps} at {source} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BEFORE, help=f"git revision to compare with (default {BEFORE})")
    parser.add_argument("--arch", default="16C3S1-2F1*(32C3S2-48C3S1)-FC10")
    parser.add_argument("--T", type=int, nargs="+", default=[30])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epoch-samples", type=int, default=60_000)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="mpis", help=argparse.SUPPRESS)
    parser.add_argument("--solve-dtype", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args)))
        return
    per_epoch = -(-args.epoch_samples // args.batch)
    with tempfile.TemporaryDirectory(prefix="mpis-before-") as tmp:
        before = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before], check=True,
                       capture_output=True)  # fmt: skip
        try:
            print(f"batch {args.batch}, {args.threads} threads, {per_epoch} steps per epoch; before = {args.before}")
            print("method       T  before s/step  after s/step  after s/epoch  after/before")
            after: dict[tuple[str, int], float] = {}
            for steps in args.T:
                for method, dtype in (("mpis", ""), ("mpis", "bfloat16"), ("bptt", "")):
                    label = method + ("+bf16" if dtype else "")
                    old = worker(args, before, method, steps)  # alternating, so drift hits both alike
                    after[label, steps] = new = worker(args, ROOT, method, steps, dtype)
                    epoch = new * per_epoch / 60
                    print(f"{label:<9} {steps:>4} {old:>14.3f} {new:>13.3f} {epoch:>12.1f} m {new / old:>13.2f}")
            for steps in args.T:
                for label in ("mpis", "mpis+bf16"):
                    ratio = after[label, steps] / after["bptt", steps]
                    print(f"{label}/bptt time per step (after), T = {steps}: {ratio:.2f}")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], capture_output=True)


if __name__ == "__main__":
    main()
