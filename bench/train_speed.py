"""Seconds per training step of MPIS, with each speed lever, against BPTT — ours and the same net rebuilt in
snnTorch (bench/peer_snntorch.py, checked equal to ours in float64) — measured side by side in one run.

Each configuration runs in a fresh process (`--threads` intra-op threads); the rounds alternate between
configurations so that a machine that slows down slows them all. A step = forward + backward + optimizer
step on one batch of the Fashion-MNIST net, with the default flags of `mpis train` (the Jacobian penalty
and its radius term included) unless a lever changes them. Levers that depend on how settled the loop is
(`--spike-tol`) need a trained model: `--checkpoint` loads one (its net and input shape: any dataset),
`--data-dir` feeds that dataset's real test inputs; without them the weights are random and the inputs
uniform noise. Prints s/step, the spike or
solver steps the forward took, the estimated Fashion-MNIST epoch (60,000 images) and MPIS ÷ the faster
peer BPTT per T.

    python bench/train_speed.py --checkpoint runs/fashion/model.pt --data-dir DATA/fashion-mnist
    python bench/train_speed.py --T 30 --rounds 1 --steps 2          # quick, random weights
    python bench/train_speed.py --checkpoint runs/nmnist2/model.pt --data-dir DATA/n-mnist --T 30 --batch 64 \
        --configs mpis "mpis jac-radius 0"                              # what the radius term costs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ARCH = "16C3S1-2F1*(32C3S2-48C3S1)-FC10"
EPOCH_IMAGES = 60_000
LEVERS = {  # name -> SolverConfig overrides (MPIS) or the baseline it is
    "mpis": {},
    "mpis spike-tol 0.15": {"spike_tol": 0.15},
    "mpis spike-tol 0.15 bf16": {"spike_tol": 0.15, "solve_dtype": "bfloat16"},
    "mpis spike-tol 0.15 phantom 3": {"spike_tol": 0.15, "phantom_steps": 3},
    "mpis jac-radius 0": {"jac_radius": 0.0},
    "mpis jac-every 4": {"jac_reg_every": 4},
    "mpis all four": {"spike_tol": 0.15, "solve_dtype": "bfloat16", "phantom_steps": 3, "jac_reg_every": 4},
    "bptt (mpis)": "bptt",
    "bptt (snntorch)": "snntorch",
}


def measure(args: argparse.Namespace) -> dict:
    """One configuration in this process: mean s/step over `--steps` steps after one warm-up step."""
    import torch

    from mpis.config import ModelConfig, SolverConfig, TrainConfig
    from mpis.train.losses import spiking_loss
    from mpis.train.models import build_model, step_outputs

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lever = LEVERS[args.config]
    solver = SolverConfig(T=args.T[0], **(lever if isinstance(lever, dict) else {}))
    train = TrainConfig(method="bptt" if isinstance(lever, str) else "mpis")
    model_cfg, shape, dataset = ModelConfig(arch=args.arch), (1, 28, 28), "fashion-mnist"
    if args.checkpoint:  # its net, input shape and dataset (any dataset: --arch is ignored)
        from mpis.train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.checkpoint)
        model_cfg, shape, dataset = ckpt.model_cfg, ckpt.input_shape, ckpt.train_cfg.dataset
    model = build_model(model_cfg, solver, train, shape)
    if args.checkpoint:
        model.net.load_state_dict(ckpt.net.state_dict())
    if lever == "snntorch":
        sys.path.insert(0, str(Path(__file__).parent))
        from peer_snntorch import SnnTorchMPIS

        model = SnnTorchMPIS(model.net, args.T[0])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = batch(args, shape, dataset)

    def step() -> float:
        outputs, info = step_outputs(model, x)
        loss = spiking_loss("sdt", outputs, y)
        if info is not None and info.penalty is not None:
            loss = loss + solver.jac_reg * solver.jac_reg_every * info.penalty
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(info.steps) if info is not None else float(args.T[0])

    step()
    start = time.perf_counter()
    forward_steps = [step() for _ in range(args.steps)]
    seconds = (time.perf_counter() - start) / args.steps
    return {"seconds_per_step": seconds, "forward_steps": sum(forward_steps) / len(forward_steps)}


def batch(args: argparse.Namespace, shape: tuple[int, ...], dataset: str):
    import torch

    if args.data_dir:
        from mpis.train.data import load_dataset

        test = load_dataset(dataset, args.data_dir).test
        items = [test[i] for i in range(args.batch)]
        return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])
    return torch.rand(args.batch, *shape), torch.randint(0, 10, (args.batch,))


def run_config(args: argparse.Namespace, config: str, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", config, "--T", str(steps), "--arch", args.arch, "--batch",
           str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
    cmd += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    cmd += ["--data-dir", args.data_dir] if args.data_dir else []
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{config} T={steps} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=ARCH)
    parser.add_argument("--T", type=int, nargs="+", default=[30, 100])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the fastest round counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", help="a trained model (for --spike-tol): its net, shape and dataset")
    parser.add_argument("--data-dir", help="the dataset's folder: real test inputs instead of noise")
    parser.add_argument("--configs", nargs="+", choices=list(LEVERS), default=list(LEVERS))
    parser.add_argument("--worker", choices=list(LEVERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.config = args.worker
        print(json.dumps(measure(args)))
        return
    best: dict[tuple[str, int], dict] = {}
    for _ in range(args.rounds):
        for steps in args.T:
            for config in args.configs:
                row = run_config(args, config, steps)
                print(f"measured {config} T={steps}: {row}", file=sys.stderr)
                key = (config, steps)
                if key not in best or row["seconds_per_step"] < best[key]["seconds_per_step"]:
                    best[key] = row
    per_epoch = -(-EPOCH_IMAGES // args.batch)
    net = f"the net of {args.checkpoint}" if args.checkpoint else args.arch
    inputs = ("the checkpoint's test set" if args.checkpoint else "Fashion-MNIST") if args.data_dir else "noise"
    print(f"{net}, batch {args.batch}, {args.threads} threads, best of {args.rounds} rounds × {args.steps} "
          f"steps; weights: {args.checkpoint or 'random'}; inputs: {inputs}")  # fmt: skip
    print(f"{'configuration':<32} {'T':>4} {'s/step':>8} {'fwd steps':>9} {'epoch min':>9} {'÷ peer':>7}")
    for steps in args.T:
        peers = [best[c, steps]["seconds_per_step"] for c in ("bptt (mpis)", "bptt (snntorch)") if (c, steps) in best]
        peer = min(peers) if peers else None
        for config in args.configs:
            row = best[config, steps]
            sec = row["seconds_per_step"]
            ratio = f"{sec / peer:7.2f}" if peer else "      -"
            print(
                f"{config:<32} {steps:>4} {sec:>8.3f} {row['forward_steps']:>9.1f} {sec * per_epoch / 60:>9.1f} {ratio}"
            )


if __name__ == "__main__":
    main()
