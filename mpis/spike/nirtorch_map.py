"""A nirtorch node map with the semantics of docs/nir-mapping.md §1: `I` integrates (v[t] = v[t−1] + in[t]),
`Threshold` spikes iff x > θ, `Scale` multiplies. Our own entries for Conv2d and Affine, because the
nirtorch 2.6 defaults drop the Affine bias and swap conv channels."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


def _tensor(array: np.ndarray) -> Tensor:
    return torch.as_tensor(np.asarray(array, dtype=np.float32))


class Integrator(nn.Module):
    def __init__(self, r: np.ndarray):
        super().__init__()
        self.register_buffer("r", _tensor(r))

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        v = self.r * x if state is None else state + self.r * x
        return v, v


class Threshold(nn.Module):
    def __init__(self, threshold: np.ndarray):
        super().__init__()
        self.register_buffer("threshold", _tensor(threshold))

    def forward(self, x: Tensor) -> Tensor:
        return (x > self.threshold).to(x.dtype)


class Scale(nn.Module):
    def __init__(self, scale: np.ndarray):
        super().__init__()
        self.register_buffer("scale", _tensor(scale))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _pair(value) -> tuple[int, int]:
    flat = [int(v) for v in np.atleast_1d(value)]
    return (flat[0], flat[0]) if len(flat) == 1 else (flat[0], flat[1])


def _conv2d(node) -> nn.Conv2d:
    weight = _tensor(node.weight)
    padding = node.padding if isinstance(node.padding, str) else _pair(node.padding)
    conv = nn.Conv2d(
        weight.shape[1] * node.groups,
        weight.shape[0],
        tuple(weight.shape[2:]),
        _pair(node.stride),
        padding,
        _pair(node.dilation),
        node.groups,
    )
    conv.weight.data.copy_(weight)
    conv.bias.data.copy_(_tensor(node.bias))
    return conv


def _affine(node) -> nn.Linear:
    weight = _tensor(node.weight)
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    linear.weight.data.copy_(weight)
    linear.bias.data.copy_(_tensor(node.bias))
    return linear


class Flatten(nn.Module):
    """NIR's start_dim counts from the unbatched shape; the batch axis comes first here."""

    def __init__(self, start_dim: int, end_dim: int):
        super().__init__()
        self.start_dim = start_dim + 1 if start_dim >= 0 else start_dim
        self.end_dim = end_dim + 1 if end_dim >= 0 else end_dim

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(self.start_dim, self.end_dim)


def node_map() -> dict:
    import nir

    return {
        nir.I: lambda n: Integrator(n.r),
        nir.Threshold: lambda n: Threshold(n.threshold),
        nir.Scale: lambda n: Scale(n.scale),
        nir.Conv2d: _conv2d,
        nir.Affine: _affine,
        nir.Flatten: lambda n: Flatten(n.start_dim, n.end_dim),
    }


@torch.no_grad()
def run_nirtorch(graph, x: Tensor, steps: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Interpret `graph` with nirtorch for `steps` steps on a constant input; returns the final output and
    the spike count of every `Threshold` node (by NIR node name). The independent reference for our runtime."""
    import nir
    import nirtorch

    module = nirtorch.nir_to_torch(graph, node_map()).to(x.dtype)  # float64 input: rounding out of the way
    counts: dict[str, Tensor] = {}
    by_module = {name.replace(".", "_"): name for name, node in graph.nodes.items() if isinstance(node, nir.Threshold)}

    def record(name: str):
        def hook(_module, _inputs, output):
            # a node fed only by back-edges sees nirtorch's unbatched zeros at t = 0
            output = output.expand(x.shape[0], *graph.nodes[name].threshold.shape)
            counts[name] = output if name not in counts else counts[name] + output

        return hook

    for module_name, child in module.named_children():
        if module_name in by_module:
            child.register_forward_hook(record(by_module[module_name]))
    state, output = None, None
    for _ in range(steps):
        output, state = module(x, state)
    return output, counts
