"""Our NIR spike runtime vs nirtorch's interpreter (with our node map) on the same file, T and batch, with
identical spike counts asserted; and vs T x one dense step of the same graph (every Conv2d/Affine once on
dense inputs, each neuron a clamp: the compute floor of a per-step simulator). With a model at hand (the
default, or --checkpoint) also vs T x the model's own rate step, which shows what the NIR layout costs.
For an mpis `exact` export, also the native layout (`--layout native`): its spike counts are asserted
identical to the per-node runtime's in float64 (16 inputs), and the share of identical counts in float32
is printed.

    python bench/runtime.py                                  # untrained 16C3S1-2F1*(32C3S2-48C3S1)-FC10, digits
    python bench/runtime.py --checkpoint runs/digits/model.pt --T 30 --batches 1 16 64 256
    python bench/runtime.py --nir OUT.nir --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

ARCH = "16C3S1-2F1*(32C3S2-48C3S1)-FC10"


def load_graph(args):
    """(graph as read back from a file, the model it came from or None, a description)."""
    import nir

    from mpis.export.nir import build_nir
    from mpis.export.nir_nodes import read_nir

    if args.nir:
        return read_nir(args.nir), None, args.nir
    if args.checkpoint:
        from mpis.train.checkpoint import load_checkpoint

        net, what = load_checkpoint(args.checkpoint).net, args.checkpoint
    else:
        from mpis.model.network import MPISNet

        torch.manual_seed(0)
        net, what = MPISNet(ARCH, (1, 16, 16), v_init=0.5).eval(), f"untrained {ARCH}"
    with tempfile.TemporaryDirectory() as folder:  # through a file: node order as nir.read gives it
        path = Path(folder) / "bench.nir"
        nir.write(path, build_nir(net, "exact", steps=args.T).graph)
        return read_nir(path), net, f"{what}, exported (exact)"


def inputs(shape: tuple[int, ...], batch: int) -> torch.Tensor:
    """Digits test images when the graph takes them, else uniform noise."""
    from mpis.train.data import load_dataset

    test = load_dataset("digits").test
    if tuple(shape) == tuple(test[0][0].shape):
        return torch.stack([test[i % len(test)][0] for i in range(batch)])
    return torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0))


def dense_step(program):
    """One evaluation of every node in the runtime's order, on dense values: linear nodes as nirtorch's node
    map builds them, each integrator an identity and each Threshold a clamp to [0, 1] (a rate neuron)."""
    import nir

    from mpis.spike.nirtorch_map import node_map

    mapping, graph, ops = node_map(), program.graph, []
    for step in program.steps:
        node = graph.nodes[step.node]
        if isinstance(node, nir.I):
            op = None
        elif isinstance(node, nir.Threshold):
            op = lambda x: x.clamp(0.0, 1.0)  # noqa: E731
        else:
            op = mapping[type(node)](node).to(program.device)
        ops.append((step.node, step.inputs, op))
    previous: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def run(x: torch.Tensor) -> None:
        nonlocal previous
        if not previous:  # back-edges read zeros at the first step
            previous = {n: x.new_zeros(x.shape[0], *shape) for n, shape in program.node_shapes().items()}
        values = {program.input_node: x}
        for name, terms, op in ops:
            total = None
            for source, late in terms:
                value = (previous if late else values).get(source)
                if value is not None:
                    total = value if total is None else total + value
            values[name] = total if op is None else op(total)
        previous = values

    return run


def model_rate_step(net, x: torch.Tensor):
    """The model's own rate map (what ONNX unrolls), stem once outside the loop as there."""
    folded = net.folded_copy()
    with torch.inference_mode():
        explicit = folded.explicit_rates(x)
    state = folded.zero_state(x.shape[0], x.device)

    @torch.inference_mode()
    def run(_x: torch.Tensor) -> None:
        nonlocal state
        state = folded.loop_step(state, explicit)

    return run


def measure(graph, program, native, net, x: torch.Tensor, steps: int, repeats: int):
    """Best time of each method over `repeats` interleaved rounds (a busy machine slows all alike), after
    checking that our spike counts and logits equal nirtorch's; also returns our result."""
    from mpis.spike.nirtorch_map import run_nirtorch

    result = program.run(x, steps)
    logits, counts = run_nirtorch(graph, x, steps)
    same = set(counts) == set(result.spike_counts) and torch.equal(logits, result.output)
    if not (same and all(torch.equal(c, result.spike_counts[n]) for n, c in counts.items())):
        raise SystemExit(f"batch {x.shape[0]}: our spike counts or logits differ from nirtorch's")
    dense = dense_step(program)
    methods = {
        "ours": lambda: program.run(x, steps),
        **({"native": lambda: native.run(x, steps)} if native is not None else {}),
        "nirtorch": lambda: run_nirtorch(graph, x, steps),
        "dense": lambda: [dense(x) for _ in range(steps)],
    }
    if net is not None:
        model = model_rate_step(net, x)
        methods["model"] = lambda: [model(x) for _ in range(steps)]
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, result


def native_program(graph, steps: int):
    """The native-layout program, after checking its spikes equal the per-node program's in float64."""
    from mpis.errors import MpisError
    from mpis.spike.simulate import compile_graph

    try:
        exact = compile_graph(graph, dtype=torch.float64, layout="native")
    except MpisError as err:
        print(f"native layout not available: {err}")
        return None
    x = inputs(exact.input_shape, 16).double()
    want, got = compile_graph(graph, dtype=torch.float64).run(x, steps), exact.run(x, steps)
    if not all(torch.equal(c, got.spike_counts[n]) for n, c in want.spike_counts.items()):
        raise SystemExit("native layout: float64 spike counts differ from the per-node runtime's")
    return compile_graph(graph, layout="native")


def main() -> None:
    from mpis.spike.simulate import compile_graph

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nir", help="a .nir file to run (default: export a model)")
    parser.add_argument("--checkpoint", help="export this trained model instead of an untrained one")
    parser.add_argument("--T", type=int, default=30, help="time steps (default 30)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; the fastest counts")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    graph, net, what = load_graph(args)
    program = compile_graph(graph, sum_order="nirtorch")  # its counts are asserted equal to nirtorch's
    native = native_program(graph, args.T)
    kinds: dict[str, int] = {}
    for node in graph.nodes.values():
        kinds[type(node).__name__] = kinds.get(type(node).__name__, 0) + 1
    print(f"{what}: {len(graph.nodes)} nodes ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})")
    print(f"T = {args.T}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), cpu; best of {args.repeats}")
    header = f"{'batch':>5} {'ours s':>8} {'nirtorch s':>10} {'speed-up':>8} {'T x dense s':>11} {'ours/dense':>10}"
    header += f" {'T x model s':>11} {'ours/model':>10}" if net is not None else ""
    header += f" {'native s':>9} {'vs nirtorch':>11} {'native/model':>12} {'same counts':>11}" if native else ""
    print(header + "  mean rate")
    for batch in args.batches:
        x = inputs(program.input_shape, batch)
        best, result = measure(graph, program, native, net, x, args.T, args.repeats)
        spikes = sum(float(c.sum()) for c in result.spike_counts.values())
        neurons = sum(c[0].numel() for c in result.spike_counts.values())
        row = (
            f"{batch:>5} {best['ours']:>8.3f} {best['nirtorch']:>10.3f} {best['nirtorch'] / best['ours']:>7.2f}x "
            f"{best['dense']:>11.3f} {best['ours'] / best['dense']:>9.2f}x"
        )
        if "model" in best:
            row += f" {best['model']:>11.3f} {best['ours'] / best['model']:>9.2f}x"
        if native is not None:
            counts = native.run(x, args.T).spike_counts
            same = sum(int((c == counts[n]).sum()) for n, c in result.spike_counts.items()) / (batch * neurons)
            row += f" {best['native']:>9.3f} {best['nirtorch'] / best['native']:>10.2f}x"
            row += f" {best['native'] / best['model']:>11.2f}x" if "model" in best else f" {'':>12}"
            row += f" {same:>10.4%}"
        print(f"{row}  {spikes / (batch * args.T * neurons):.4f}")
    print("per-node runtime: identical spike counts and logits to nirtorch at every batch")
    if native is not None:
        print("native layout: identical spike counts to the per-node runtime in float64 (16 inputs)")


if __name__ == "__main__":
    main()
