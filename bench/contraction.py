"""Which training option makes the equilibrium loop settle, measured side by side in one run.

Each option trains the same net with the same seed through `mpis train` (a fresh process, one thread), then
its checkpoint is scored as it ships: the ONNX rate graph (K = T iterations from zero) and the spiking
network from the exported v_init (Vth/2) at T = 30 and 100, on the first --deployed test inputs. Printed per
option: test accuracy as training reports it, s/step, the last epoch's training residual, ‖J‖²/dim at the
fixed point (Hutchinson, one batch) and the gain along its dominant direction (power method, batch
mean), mean |r_K − r_K−1| of the rate graph, ONNX and spike accuracy, and the
spike/ONNX argmax agreement at T = 30 and 100.

    python bench/contraction.py                                  # digits, 15 epochs
    python bench/contraction.py --dataset fashion-mnist --data-dir DATA/fashion-mnist \\
        --epochs 2 --train-limit 12800 --test-limit 2000 --batch-size 128
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

OPTIONS = {  # name -> mpis train flags
    "none": ["--jac-reg", "0"],
    "jac 0.5, warm-up 1": ["--jac-reg", "0.5", "--jac-reg-warmup", "1", "--jac-radius", "0"],
    "jac 1, warm-up 1": ["--jac-reg", "1", "--jac-reg-warmup", "1", "--jac-radius", "0"],
    "jac 2, no warm-up": ["--jac-reg", "2", "--jac-reg-warmup", "0", "--jac-radius", "0"],
    "jac 1, warm-up 1, every 4": ["--jac-reg", "1", "--jac-reg-warmup", "1", "--jac-reg-every", "4"]
    + ["--jac-radius", "0"],
    "jac 1, warm-up 1, radius 0.5": ["--jac-reg", "1", "--jac-reg-warmup", "1", "--jac-radius", "0.5"],
}


def score(run: Path, deployed: int, batch: int) -> dict:
    """The checkpoint as it ships, and its loop's Jacobian estimate."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from mpis.model.deployed import score_deployed
    from mpis.model.equilibrium import EquilibriumModel
    from mpis.train.checkpoint import load_checkpoint
    from mpis.train.data import load_dataset

    ckpt = load_checkpoint(run / "model.pt")
    cfg = ckpt.train_cfg
    data = load_dataset(cfg.dataset, cfg.data_dir, frames=ckpt.solver_cfg.T)
    train_count = len(data.train) if cfg.train_limit <= 0 else min(cfg.train_limit, len(data.train))
    test = data.test
    test = Subset(test, range(min(deployed, len(test))))
    loader = DataLoader(test, batch_size=256)
    out = {"steps_per_epoch": train_count // cfg.batch_size}
    for steps in (30, 100):
        s = score_deployed(ckpt.net, loader, ckpt.solver_cfg.T, steps, horizon=ckpt.solver_cfg.T)
        out |= {"onnx_acc": s.rate_acc, "settle": s.settle_mean, f"spike_acc_{steps}": s.spike_acc}
        out[f"agree_{steps}"] = s.agreement
    probe_cfg = replace(ckpt.solver_cfg, jac_reg=1.0, jac_radius=1e-6, jac_reg_every=1)  # radius > 0: gain measured
    probe = EquilibriumModel(copy.deepcopy(ckpt.net), probe_cfg).train()
    x = torch.stack([test[i][0] for i in range(min(batch, len(test)))])
    torch.manual_seed(0)
    info = probe(x)[1]
    out["jacobian"] = float(info.jacobian.detach())
    out["gain"] = float(info.gain.detach().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-limit", type=int, default=0)
    parser.add_argument("--test-limit", type=int, default=0)
    parser.add_argument("--deployed", type=int, default=2000, help="test inputs scored as shipped")
    parser.add_argument("--options", nargs="*", default=list(OPTIONS), help=f"of: {', '.join(OPTIONS)}")
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the table as JSON")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out or scratch)
        for name in args.options:
            run = root / name.replace(" ", "").replace(",", "_")
            command = [sys.executable, "-m", "mpis", "train", "--dataset", args.dataset, "--out", str(run)]
            command += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--threads", "1"]
            command += ["--overwrite", "--quiet"]
            command += ["--train-limit", str(args.train_limit), "--test-limit", str(args.test_limit)]
            command += ["--data-dir", args.data_dir] if args.data_dir else []
            subprocess.run(command + OPTIONS[name], check=True, env=env)
            history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            last = history[-1]
            seconds = sum(h["seconds"] for h in history)
            row = {"option": name, "flags": " ".join(OPTIONS[name]), "test_acc": last["test_acc"]}
            row |= {"seconds_per_epoch": seconds / len(history), "residual": last["residual"]}
            row |= score(run, args.deployed, args.batch_size)
            row["seconds_per_step"] = row["seconds_per_epoch"] / row["steps_per_epoch"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"{args.dataset}, {args.epochs} epochs, batch {args.batch_size}; deployed scores on {args.deployed} inputs")
    head = "option                        test    s/step  residual  ‖J‖²/dim  gain   settle    ONNX    spike30  "
    head += "agree30  agree100"
    print(head)
    for r in rows:
        print(
            f"{r['option']:<29} {r['test_acc']:.4f}  {r['seconds_per_step']:6.3f}  {r['residual']:.3f}     "
            f"{r['jacobian']:.3f}     {r['gain']:.2f}   {r['settle']:.1e}  {r['onnx_acc']:.4f}  "
            f"{r['spike_acc_30']:.4f}   {r['agree_30']:.4f}   {r['agree_100']:.4f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
