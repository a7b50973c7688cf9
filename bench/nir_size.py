"""NIR file size and simulation speed per paper net at its input size (initial weights).

For the file `mpis export --nir` writes by default (the universal file, or the nirtorch file where the
universal one cannot hold the net) and for the nirtorch file (`--target nirtorch`: polyphase layout, or
ghost where the maps are odd): parameters of its Conv2d/Affine nodes against the folded model's, spiking
units (elements of its LIF / IF / Threshold / CubaLIF nodes, helper neurons included) against the model's
neurons, the build time, and `mpis simulate`'s speed on it in both layouts, side by side (every node as
written, and `--layout native`; one thread, a few random inputs at T = 30; skipped above --max-simulated
parameters).

    python bench/nir_size.py [--max-growth 64] [--max-simulated 40e6]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from mpis.arch.notation import PAPER_EXAMPLES
from mpis.errors import MpisError
from mpis.export.nir import build_nir
from mpis.export.toolchains import build_toolchain_nir, universal_refusal
from mpis.model.network import MPISNet
from mpis.spike.graph_layout import compile_program
from mpis.spike.simulate import RUNS_AS, compile_graph

INPUTS = {"Fashion-MNIST": (1, 28, 28), "N-MNIST": (2, 34, 34), "CIFAR-10": (3, 32, 32), "CIFAR-100": (3, 32, 32)}
SPIKING = ("LIF", "IF", "Threshold", "CubaLIF")
STEPS, IMAGES = 30, 4


def spiking_units(program) -> int:
    shapes = program.node_shapes()
    return sum(math.prod(shapes[name]) for name, node in program.graph.nodes.items() if type(node).__name__ in SPIKING)


def measure(build, shape, max_simulated: float) -> str:
    start = time.perf_counter()
    try:
        result = build()
    except MpisError as err:
        return f"refused ({str(err).split(';')[0][:60]})"
    built = time.perf_counter() - start
    graph = result.graph
    layout = graph.metadata.get("layout", "polyphase" if "flavour" in graph.metadata else "ghost")
    target = graph.metadata.get("target", "nirtorch")
    program = compile_program(graph, norse_dt=RUNS_AS[target])
    line = f"{target} {layout}: {result.nir_params:,} params ({result.growth:.2f}x), {spiking_units(program):,} units"
    line += f", built in {built:.1f} s"
    if result.nir_params > max_simulated:
        return line + ", not simulated"
    x = torch.rand(IMAGES, *shape, generator=torch.Generator().manual_seed(0)).mul(256).floor().div(256)
    speed = {}
    for layout, compiled in (("graph", program), ("native", compile_graph(graph, layout="native"))):
        start = time.perf_counter()
        compiled.run(x, STEPS)
        speed[layout] = IMAGES / (time.perf_counter() - start)
    return line + (
        f", images/s at T = {STEPS}: graph layout {speed['graph']:.1f}, native {speed['native']:.1f} "
        f"({speed['native'] / speed['graph']:.1f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-growth", type=float, default=64.0, help="polyphase builds refuse above this")
    parser.add_argument("--max-simulated", type=float, default=40e6, help="simulate files up to this many params")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for arch, (dataset, _) in PAPER_EXAMPLES.items():
        shape = INPUTS.get(dataset.split(" ")[0], (1, 28, 28))
        net = MPISNet(arch, shape).eval()
        model = sum(p.numel() for p in net.folded_copy().ops.parameters())
        neurons = sum(math.prod(n.shape) for n in net.neurons)
        print(f"{arch} ({'x'.join(map(str, shape))}): model {model:,} params, {neurons:,} neurons", flush=True)
        reason = universal_refusal(net, 0.5)
        if reason is None:
            default = measure(lambda net=net: build_toolchain_nir(net, "universal", 0.5), shape, args.max_simulated)
            print(f"  default (--nir):      {default}", flush=True)
        else:
            print(f"  default (--nir):      the nirtorch file below (universal: {reason[:70]})", flush=True)
        build = lambda net=net: build_nir(net, "exact", 0.5, max_param_growth=args.max_growth)  # noqa: E731
        print(f"  --target nirtorch:    {measure(build, shape, args.max_simulated)}", flush=True)


if __name__ == "__main__":
    main()
