"""Inference throughput of the exported rate graph: PyTorch eager vs ONNX Runtime (CPU; CUDA/TensorRT
execution providers too when installed), at batch 1 and 256, measured side by side in one run.

    python bench/export_speed.py runs/digits/model.pt
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def images_per_second(run, batch: int, seconds: float) -> float:
    run()  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        done += batch
    return done / (time.perf_counter() - start)


def main() -> None:
    import onnxruntime as ort

    from mpis.export.onnx import RateGraph, export_onnx
    from mpis.train.checkpoint import load_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    args = parser.parse_args()

    ckpt = load_checkpoint(args.checkpoint)
    iterations = ckpt.solver_cfg.T
    module = RateGraph(ckpt.net, iterations, with_rates=False).eval()
    providers = [
        p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in ort.get_available_providers()
    ]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(ckpt.net, path, iterations, False, torch.rand(4, *ckpt.input_shape))
        sessions = {"onnxruntime-cpu": ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])}
        for provider in providers:
            sessions[f"onnxruntime-{provider.removesuffix('ExecutionProvider').lower()}"] = ort.InferenceSession(
                str(path), providers=[provider]
            )
        versions = f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__}"
        print(f"{ckpt.model_cfg.arch}, input {ckpt.input_shape}, {iterations} iterations, {versions}")
        print(f"{'batch':>6} {'backend':>22} {'images/s':>12} {'vs eager':>9}")
        for batch in args.batches:
            x = torch.rand(batch, *ckpt.input_shape)
            with torch.inference_mode():
                eager = images_per_second(lambda x=x: module(x), batch, args.seconds)
            print(f"{batch:>6} {'pytorch-eager':>22} {eager:>12.0f} {1.0:>8.2f}x")
            for name, session in sessions.items():
                feed = {"input": x.numpy()}
                rate = images_per_second(lambda s=session, f=feed: s.run(None, f), batch, args.seconds)
                print(f"{batch:>6} {name:>22} {rate:>12.0f} {rate / eager:>8.2f}x")


if __name__ == "__main__":
    main()
