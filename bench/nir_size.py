"""NIR file size per paper net at its input size (initial weights): parameters of the nirtorch file
(`mpis export --nir`: polyphase layout, or ghost where the maps are odd) and of the toolchain file
(ghost layout, `mpis export --target norse`), each against the model's own, and each build's time.

    python bench/nir_size.py [--max-growth 64]
"""

from __future__ import annotations

import argparse
import time

from mpis.arch.notation import PAPER_EXAMPLES
from mpis.errors import MpisError
from mpis.export.nir import build_nir
from mpis.export.toolchains import build_toolchain_nir
from mpis.model.network import MPISNet

INPUTS = {"Fashion-MNIST": (1, 28, 28), "N-MNIST": (2, 34, 34), "CIFAR-10": (3, 32, 32), "CIFAR-100": (3, 32, 32)}


def measure(build) -> str:
    start = time.perf_counter()
    try:
        result = build()
    except MpisError as err:
        return f"refused ({str(err).split(';')[0][:60]})"
    layout = result.graph.metadata.get("layout", "polyphase" if "flavour" in result.graph.metadata else "ghost")
    return f"{result.nir_params:>12,} {result.growth:>6.2f}x {layout:<9} {time.perf_counter() - start:>4.0f}s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-growth", type=float, default=64.0, help="polyphase builds refuse above this")
    args = parser.parse_args()
    print(f"{'net':<56} {'input':<9} {'model':>11}  {'mpis export --nir':<36} {'--target norse':<36}")
    for arch, (dataset, _) in PAPER_EXAMPLES.items():
        shape = INPUTS.get(dataset.split(" ")[0], (1, 28, 28))
        net = MPISNet(arch, shape).eval()
        model = sum(p.numel() for p in net.folded_copy().ops.parameters())
        polyphase = measure(lambda net=net: build_nir(net, "exact", 0.5, max_param_growth=args.max_growth))
        ghost = measure(lambda net=net: build_toolchain_nir(net, "norse", 0.5))
        size = "x".join(map(str, shape))
        print(f"{arch:<56} {size:<9} {model:>11,}  {polyphase:<36} {ghost:<36}", flush=True)


if __name__ == "__main__":
    main()
