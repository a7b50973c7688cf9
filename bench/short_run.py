"""Does a short default run pass `mpis check`? Peak learning rates side by side, three seeds each, one run.

`mpis train --T 30 --epochs 3 --seed S --lr LR` on digits (every other flag at its default), then the
checkpoint scored as `mpis check --T 30,100` scores it: the ONNX rate graph (K = 30 iterations from zero)
against the spiking network from v_init 0 and Vth/2 at T = 30 and 100, on all 360 test digits. A run
passes when the argmax agreement is >= 0.99 at T = 30 and >= 0.995 at T = 100 for both v_init (issue 23).
Trainings run two at a time, each a fresh one-thread process.

    python bench/short_run.py                       # lr 2e-3 (the old default) and 1e-2, seeds 0 1 2
    python bench/short_run.py --lr 2e-3 5e-3 1e-2 --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

NEEDED = {30: 0.99, 100: 0.995}  # agreement each T must reach, for both v_init


def train(run: Path, lr: str, seed: int, epochs: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mpis", "train", "--T", "30", "--epochs", str(epochs), "--seed", str(seed)]
    command += ["--lr", lr, "--threads", "1", "--out", str(run), "--overwrite", "--quiet"]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)


def score(run: Path) -> dict:
    """Accuracy training printed, ONNX accuracy and agreement per (v_init, T), as mpis check measures them."""
    import torch

    from mpis.model.deployed import rate_graph, spiking_logits
    from mpis.train.checkpoint import load_checkpoint
    from mpis.train.data import load_dataset

    ckpt = load_checkpoint(run / "model.pt")
    x, y = load_dataset("digits").test.tensors
    folded = ckpt.net.folded_copy()
    T = ckpt.solver_cfg.T
    with torch.no_grad():
        rate = rate_graph(folded, x, T, T)[0].argmax(1)
        row = {"test_acc": ckpt.metrics.get("test_acc"), "onnx_acc": float((rate == y).float().mean())}
        for v0 in (0.0, 0.5):
            for steps in NEEDED:
                spike = spiking_logits(folded, x, steps, v0 * folded.neuron.vth).argmax(1)
                row[f"agree_v{v0:g}_T{steps}"] = float((spike == rate).float().mean())
    row["passes"] = all(row[f"agree_v{v0:g}_T{t}"] >= need for v0 in (0.0, 0.5) for t, need in NEEDED.items())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", nargs="+", default=["2e-3", "1e-2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out or scratch)
        jobs = [(lr, seed, root / f"lr{lr}_seed{seed}") for lr in args.lr for seed in args.seeds]
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda job: train(job[2], job[0], job[1], args.epochs), jobs))
        rows = [{"lr": lr, "seed": seed} | score(run) for lr, seed, run in jobs]
    for row in rows:
        print(json.dumps(row))
    print(f"\ndigits, mpis train --T 30 --epochs {args.epochs}; agreement spike vs ONNX on 360 test digits")
    print("lr      seed  test    ONNX    v0=0 T30  T100    Vth/2 T30  T100    passes")
    for r in rows:
        print(
            f"{r['lr']:<7} {r['seed']:>4}  {r['test_acc']:.4f}  {r['onnx_acc']:.4f}  {r['agree_v0_T30']:.4f}  "
            f"{r['agree_v0_T100']:.4f}  {r['agree_v0.5_T30']:.4f}     {r['agree_v0.5_T100']:.4f}  {r['passes']}"
        )


if __name__ == "__main__":
    main()
