"""Load test of `mpis serve` on loopback: C concurrent `tritonclient` HTTP clients × R requests each, once
with dynamic batching off and once on; prints p50/p99 latency, throughput, the mean executed batch and the
throughput gain of batching. Every response is checked against ONNX Runtime; any failure counts.

    python bench/serve_load.py runs/digits/model.pt     # exports a Triton repository to a temp folder first
    python bench/serve_load.py REPO [--model NAME] [--clients 8] [--requests 200] [--rows 1]

The server runs as its own process (`python -m mpis serve`), so the clients do not share its interpreter.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.http as triton


def start_server(repo: Path, batching: bool) -> tuple[subprocess.Popen, str]:
    """`mpis serve` on a free port; returns the process and its host:port once it is ready."""
    command = [sys.executable, "-m", "mpis", "serve", str(repo), "--port", "0"]
    process = subprocess.Popen(command + ([] if batching else ["--no-batching"]), stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    match = re.search(r"http://(\S+):", line)
    try:
        if match is None:
            raise SystemExit(f"the server did not start: {line!r}")
        client = triton.InferenceServerClient(match.group(1))
        for _ in range(200):
            try:
                if client.is_server_ready():
                    return process, match.group(1)
            except ConnectionError:
                pass
            time.sleep(0.05)
        raise SystemExit("the server did not become ready in 10 s")
    except BaseException:
        process.kill()
        process.wait()
        raise


def load(url: str, model: str, inputs: list[np.ndarray], references: list[np.ndarray], requests: int) -> dict:
    """Each client thread (its own connection, as tritonclient asks) sends `requests` requests after a
    common start; returns latencies, failures, wall time and the server's execution statistics."""
    latencies: list[list[float]] = [[] for _ in inputs]
    failures = [0] * len(inputs)
    start = threading.Barrier(len(inputs) + 1)

    def client(i: int) -> None:
        connection = triton.InferenceServerClient(url)
        tensor = triton.InferInput("input", list(inputs[i].shape), "FP32")
        tensor.set_data_from_numpy(inputs[i])
        start.wait()
        for _ in range(requests):
            began = time.perf_counter()
            try:
                logits = connection.infer(model, [tensor]).as_numpy("logits")
                ok = logits is not None and np.allclose(logits, references[i], rtol=0, atol=1e-5)
            except Exception:  # any failed request is counted, never fatal to the run
                ok = False
            latencies[i].append(time.perf_counter() - began)
            failures[i] += not ok

    stats = triton.InferenceServerClient(url)
    before = stats.get_inference_statistics(model)["model_stats"][0]
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    after = stats.get_inference_statistics(model)["model_stats"][0]
    return {
        "latencies": np.array([t for client in latencies for t in client]),
        "failures": sum(failures),
        "wall": wall,
        "executions": after["execution_count"] - before["execution_count"],
        "rows": after["inference_count"] - before["inference_count"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a checkpoint DIR/model.pt (exported first) or a Triton model repository")
    parser.add_argument("--model", help="model to load (default: the repository's first onnxruntime_onnx model)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="requests per client")
    parser.add_argument("--rows", type=int, default=1, help="batch rows per request")
    args = parser.parse_args()

    from mpis.cli import main as mpis
    from mpis.serve.server import read_model

    with tempfile.TemporaryDirectory() as scratch:
        repo = Path(args.source)
        if repo.is_file():
            repo = Path(scratch) / "repo"
            if mpis(["export", args.source, "--triton-repo", str(repo), "--batch", "16"]) != 0:
                raise SystemExit("export failed")
        specs = [read_model(p) for p in sorted(repo.iterdir()) if (p / "config.pbtxt").is_file()]
        spec = next(s for s in specs if s.platform == "onnxruntime_onnx" and args.model in (None, s.name))
        session = ort.InferenceSession(str(spec.path), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        inputs = [rng.random((args.rows, *spec.inputs[0].dims), dtype=np.float32) for _ in range(args.clients)]
        references = [session.run(["logits"], {"input": x})[0] for x in inputs]

        print(
            f"model {spec.name} (input {list(spec.inputs[0].dims)}, max_batch_size {spec.max_batch_size}, queue delay "
            f"{spec.queue_delay_s * 1e6:.0f} µs); {args.clients} clients × {args.requests} requests × {args.rows} "
            f"row(s); {os.cpu_count()} CPUs {platform.machine()}, load average {os.getloadavg()[0]:.1f} at the "
            f"start, onnxruntime {ort.__version__}"
        )
        print("| dynamic batching | requests | failed | p50 ms | p99 ms | requests/s | mean batch |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        throughput = {}
        for batching in (False, True):
            process, url = start_server(repo, batching)
            try:
                load(url, spec.name, inputs, references, 10)  # warm-up: connections, first runs
                result = load(url, spec.name, inputs, references, args.requests)
            finally:
                process.terminate()
                process.wait()
            done = len(result["latencies"])
            p50, p99 = np.percentile(result["latencies"] * 1e3, [50, 99])
            throughput[batching] = done / result["wall"]
            mean_batch = result["rows"] / max(result["executions"], 1)
            print(
                f"| {'on' if batching else 'off'} | {done} | {result['failures']} | {p50:.2f} | {p99:.2f} | "
                f"{throughput[batching]:.0f} | {mean_batch:.2f} |"
            )
        print(f"throughput gain of dynamic batching: {throughput[True] / throughput[False]:.2f}x")


if __name__ == "__main__":
    main()
