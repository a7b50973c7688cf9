"""The ONNX export's parity rule on trained and untrained nets: ONNX Runtime and PyTorch fp32, each against
a float64 evaluation of the same graph, on the test set. Trains the digits net (the default arch, T = 30)
for each epoch count, exports it as `mpis export --onnx --with-rates` does, and prints one row per model;
with --paper also every paper architecture at its input size with initial weights.

    python bench/onnx_parity.py --epochs 1 3 15 [--paper] [--out runs/parity]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

HEADER = (
    f"{'model':<58} {'acc':>7} {'|logit| max':>11} {'ONNX err':>9} {'fp32 err':>9} {'tolerance':>9} "
    f"{'ONNX rates':>10} {'argmax':>7} {'pass':>5} {'s':>5}"
)


def row(name: str, accuracy: float | None, report, seconds: float) -> str:
    acc = "—" if accuracy is None else f"{accuracy:.4f}"
    rates = "—" if report.onnx_rates is None else f"{report.onnx_rates:.1e}"
    return (
        f"{name:<58} {acc:>7} {report.logits_scale:>11.3g} {report.onnx_logits:>9.1e} {report.torch_logits:>9.1e} "
        f"{report.tolerance:>9.1e} {rates:>10} {report.argmax_agreement:>7.4f} {str(report.passed):>5} "
        f"{seconds:>5.0f}"
    )


def main() -> None:
    from mpis.arch.notation import PAPER_EXAMPLES
    from mpis.config import ModelConfig, SolverConfig, TrainConfig
    from mpis.export.onnx import export_onnx
    from mpis.model.network import MPISNet
    from mpis.train.checkpoint import load_checkpoint
    from mpis.train.data import load_dataset
    from mpis.train.loop import train

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, nargs="*", default=[1, 3, 15])
    parser.add_argument("--paper", action="store_true", help="also every paper architecture, initial weights")
    parser.add_argument("--paper-iters", type=int, default=10, help="K for the paper architectures (default 10)")
    parser.add_argument("--out", default=None, help="keep the trained runs here (default: a temporary folder)")
    args = parser.parse_args()

    test = load_dataset("digits").test
    images = torch.stack([x for x, _ in test])
    scratch = tempfile.TemporaryDirectory()
    root = Path(args.out or scratch.name)
    print(HEADER)
    for epochs in args.epochs:
        run = root / f"digits-e{epochs}"
        metrics = train(ModelConfig(), SolverConfig(T=30), TrainConfig(epochs=epochs, device="cpu"), run, True, False)
        net = load_checkpoint(run / "model.pt").net
        start = time.perf_counter()
        report = export_onnx(net, run / "model.onnx", 30, True, images, overwrite=True, horizon=30)
        label = f"digits {ModelConfig().arch}, {epochs} epochs, K 30"
        print(row(label, metrics["test_acc"], report, time.perf_counter() - start), flush=True)
    if args.paper:
        shapes = {"N-MNIST": (2, 34, 34), "Fashion-MNIST": (1, 28, 28)}
        for index, (arch, (dataset, _)) in enumerate(PAPER_EXAMPLES.items()):
            shape = shapes.get(dataset.split(" ")[0], (3, 32, 32))
            torch.manual_seed(0)
            net = MPISNet(arch, shape).eval()
            start = time.perf_counter()
            path = root / f"paper-{index}.onnx"
            report = export_onnx(net, path, args.paper_iters, False, torch.rand(8, *shape), overwrite=True)
            label = f"{arch} {','.join(map(str, shape))}, K {args.paper_iters}"
            print(row(label[:58], None, report, time.perf_counter() - start), flush=True)


if __name__ == "__main__":
    main()
