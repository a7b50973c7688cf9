"""The one description of an MPIS network: a graph of named nodes built from the parsed arch.

Training (rate form), the spiking simulation, ONNX export and NIR export all walk this graph; none of
them writes the network again. Edges follow NIR's time semantics: `inputs` are read in the same step
(summed), `delayed` inputs are back-edges that carry the source's output of the previous step
(zeros at t = 0). In an MPIS net the only back-edges are the Trans feedbacks of the streams
(paper Eq. 6: s_i^{t+1} = F_i(T_i(s_i^t)) + fusion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from mpis.arch import Arch
from mpis.errors import MpisError
from mpis.model.layers import Classifier, ConvBN, NearestUp, down_size, downsampler, upsampler

NodeKind = Literal["input", "conv", "neuron", "linear", "sum", "head"]
UPSAMPLE_MODES = ("transpose", "nearest")


@dataclass(frozen=True)
class Node:
    """One node: `conv` is conv+BN, `neuron` a spiking/DBReLU layer, `linear` a Trans or fusion map,
    `sum` the fused output of a stream (fusion after the last FEB layer), `head` the classifier."""

    name: str
    kind: NodeKind
    shape: tuple[int, ...]
    inputs: tuple[str, ...] = ()
    delayed: tuple[str, ...] = ()


@dataclass(frozen=True)
class Graph:
    nodes: tuple[Node, ...]
    state: tuple[str, ...]  # stream outputs, one per stream: the sources of the back-edges

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)


def build_graph(
    arch: Arch, input_shape: tuple[int, int, int], upsample: str, bn_eps: float = 1e-5
) -> tuple[Graph, dict[str, nn.Module]]:
    """Nodes in topological order (forward edges only) and the module of every node that has weights."""
    if upsample not in UPSAMPLE_MODES:
        raise MpisError(f"upsample must be one of {', '.join(UPSAMPLE_MODES)}, got {upsample!r}")
    channels, height, width = input_shape
    nodes: list[Node] = [Node("input", "input", (channels, height, width))]
    ops: dict[str, nn.Module] = {}

    def conv_layer(name: str, inputs: tuple[str, ...], in_c: int, layer, size: tuple[int, int]) -> tuple[int, int]:
        size = (down_size(size[0], layer.stride), down_size(size[1], layer.stride))
        ops[f"{name}_conv"] = ConvBN(in_c, layer.channels, layer.kernel, layer.stride, bn_eps)
        nodes.append(Node(f"{name}_conv", "conv", (layer.channels, *size), inputs))
        nodes.append(Node(name, "neuron", (layer.channels, *size), (f"{name}_conv",)))
        return size

    previous, size = "input", (height, width)
    for k, layer in enumerate(arch.stem, 1):
        size = conv_layer(f"stem{k}", (previous,), channels, layer, size)
        previous, channels = f"stem{k}", layer.channels
    if min(size) < 1:
        raise MpisError(f"input {input_shape} is too small for {arch}")
    injection, in_channels = previous, channels

    depth, fuse_at, n = len(arch.feb), arch.fusion_layer, arch.streams
    # resolution[i][k]: map size of stream i (0-based) after FEB layer k (k = 0: the layer-1 input)
    resolution: list[list[tuple[int, int]]] = []
    for i in range(n):
        start = size if i == 0 else tuple(down_size(s, 2) for s in resolution[i - 1][0])
        sizes = [start]
        for layer in arch.feb:
            sizes.append(tuple(down_size(s, layer.stride) for s in sizes[-1]))
        resolution.append(sizes)
    total_stride = 1
    for layer in arch.feb:
        total_stride *= layer.stride
    out_channels = arch.feb[-1].channels
    state = tuple(f"s{i + 1}_out" if fuse_at == depth else f"s{i + 1}_l{depth}" for i in range(n))

    def feb_layers(i: int, first: int, last: int, inputs: tuple[str, ...]) -> None:
        in_c = in_channels if first == 1 else arch.feb[first - 2].channels
        for k in range(first, last + 1):
            conv_layer(f"s{i + 1}_l{k}", inputs, in_c, arch.feb[k - 1], resolution[i][k - 1])
            inputs, in_c = (f"s{i + 1}_l{k}",), arch.feb[k - 1].channels

    for i in range(n):
        trans = f"s{i + 1}_trans"
        ops[trans] = upsampler(out_channels, in_channels, total_stride, resolution[i][depth], resolution[i][0])
        nodes.append(Node(trans, "linear", (in_channels, *resolution[i][0]), delayed=(state[i],)))
        feb_layers(i, 1, fuse_at, (trans, injection) if i == 0 else (trans,))

    fused_channels = arch.feb[fuse_at - 1].channels
    fusion_inputs: list[list[str]] = [[f"s{i + 1}_l{fuse_at}"] for i in range(n)]
    for target in range(n):
        for source in range(n):
            if source == target:
                continue
            name = f"fuse{source + 1}to{target + 1}"
            src, dst = resolution[source][fuse_at], resolution[target][fuse_at]
            if source < target:
                ops[name] = downsampler(fused_channels, target - source)
            elif upsample == "transpose":
                ops[name] = upsampler(fused_channels, fused_channels, 2 ** (source - target), src, dst)
            else:
                ops[name] = NearestUp(2 ** (source - target), dst)
            nodes.append(Node(name, "linear", (fused_channels, *dst), (f"s{source + 1}_l{fuse_at}",)))
            fusion_inputs[target].append(name)

    for i in range(n):
        if fuse_at == depth:
            nodes.append(Node(state[i], "sum", (out_channels, *resolution[i][depth]), tuple(fusion_inputs[i])))
        else:
            feb_layers(i, fuse_at + 1, depth, tuple(fusion_inputs[i]))

    last = resolution[n - 1][depth]
    ops["head"] = Classifier(out_channels * last[0] * last[1], arch.classes)
    nodes.append(Node("head", "head", (arch.classes,), (state[-1],)))
    return Graph(tuple(nodes), state), ops
