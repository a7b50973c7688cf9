"""What each NIR node does in one time step, as batched tensor ops: shared by both spike layouts
(`graph_layout`, every node as written; `native_layout`, mpis layers in native layout).

Node semantics (dt = 1, Euler steps of the NIR equations; `x` is the summed input):
  I          v += r·x, output v (v starts at 0)
  Threshold  s = (x > θ)        Scale  x·s        Affine  W·x + b        Linear  W·x
  IF         v += r·x; s = (v > v_threshold); reset (below), output s
  LIF        v += (1/τ)·((r·x + v_leak) − v); s = (v > v_threshold); reset, output s (v starts at v_leak)
  LI         v += (1/τ)·((r·x + v_leak) − v), output v (v starts at v_leak)
  Conv2d, SumPool2d, AvgPool2d, Flatten as NIR defines them; Flatten's dims count from the unbatched shape.
Reset of IF/LIF: `zero` (the NIR spec: v = v_reset where it spiked; IF starts at v_reset) or `subtract`
(v −= v_threshold where it spiked; v starts at the node's metadata `v_init`, else as above: the mpis
`compact` flavour).
By default each node follows its metadata (`"reset": "subtract"`), else the spec.

The mpis `exact` neuron, I ⇄ Threshold with Scale feedback (reset by subtraction, §2; leak), runs as one
fused op (`neuron_op`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mpis.errors import MpisError

RESETS = ("subtract", "zero")
SUPPORTED = (
    "Input",
    "Output",
    "Conv2d",
    "Affine",
    "Linear",
    "Flatten",
    "Scale",
    "Threshold",
    "I",
    "IF",
    "LIF",
    "LI",
    "SumPool2d",
    "AvgPool2d",
)
SPIKING = ("Threshold", "IF", "LIF")
SYNAPTIC = ("Conv2d", "Affine", "Linear", "SumPool2d", "AvgPool2d")


@dataclass(frozen=True)
class Step:
    """One node's work in a time step: its inputs in summation order, each `(source, previous)`; a
    previous-step input is a back-edge (the source's output one step earlier, zeros at t = 0)."""

    node: str
    inputs: tuple[tuple[str, bool], ...]


def edges(graph) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(sources, targets) of every node, duplicate edges dropped."""
    sources: dict[str, list[str]] = {n: [] for n in graph.nodes}
    targets: dict[str, list[str]] = {n: [] for n in graph.nodes}
    for a, b in dict.fromkeys((str(a), str(b)) for a, b in graph.edges):
        if a not in targets or b not in sources:
            raise MpisError(f"edge {a} -> {b} names a node the graph does not have")
        targets[a].append(b)
        sources[b].append(a)
    return sources, targets


# ---- ops ----------------------------------------------------------------------------------------
# An op runs one node (or one fused neuron) for one step: op(cur, prev, state, counts) reads its inputs
# from `cur` (this step) and `prev` (last step), writes its output(s) into `cur`, keeps its membrane in
# `state` and adds its spikes to `counts` (all lists indexed by slot; slot 0 is the Input).
Op = Callable[[list, list, list, list], None]
Terms = tuple[tuple[int, bool], ...]


def tensor_of(value, like: Tensor) -> Tensor:
    """A node parameter as a tensor on `like`'s device, in its dtype."""
    return torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=like.dtype, device=like.device)


def _uniform(value) -> float | None:
    array = np.asarray(value, dtype=np.float32)
    return float(array.flat[0]) if array.size and np.all(array == array.flat[0]) else None


def is_ones(value) -> bool:
    return _uniform(value) == 1.0


def _pair(value) -> tuple[int, int]:
    flat = [int(v) for v in np.atleast_1d(np.asarray(value))]
    return (flat[0], flat[0]) if len(flat) == 1 else (flat[0], flat[1])


def input_shape_of(node) -> tuple[int, ...] | None:
    shape = getattr(node, "input_type", {}).get("input")
    return None if shape is None else tuple(int(s) for s in np.atleast_1d(shape))


def summed_input(terms: Terms, cur: list, prev: list, shape: tuple[int, ...] | None, name: str) -> Tensor:
    """The summed input: back-edges read nothing at t = 0 (zeros); a fresh tensor unless one term."""
    total = None
    for slot, previous in terms:
        value = prev[slot] if previous else cur[slot]
        if value is not None:
            total = value if total is None else total + value
    if total is None:  # every input is a back-edge, at t = 0
        if shape is None:
            raise MpisError(f"node {name!r} reads only back-edges and its input shape is unknown")
        total = cur[0].new_zeros(cur[0].shape[0], *shape)
    return total


def stateless_op(slot: int, terms: Terms, fn: Callable[[Tensor], Tensor], shape, name: str, kind: str) -> Op:
    spiking = kind in SPIKING

    def op(cur, prev, state, counts):
        out = cur[slot] = fn(summed_input(terms, cur, prev, shape, name))
        if spiking:
            counts[slot] = out.clone() if counts[slot] is None else counts[slot].add_(out)

    return op


def stateful_op(slot: int, terms: Terms, fn, shape, name: str, kind: str) -> Op:
    """fn(x, v) -> (output, v); v is None at t = 0 and private to the node (updated in place)."""
    spiking = kind in SPIKING

    def op(cur, prev, state, counts):
        out, state[slot] = fn(summed_input(terms, cur, prev, shape, name), state[slot])
        cur[slot] = out
        if spiking:
            counts[slot] = out.clone() if counts[slot] is None else counts[slot].add_(out)

    return op


# Stateless nodes: node -> fn(x). nirtorch_map.py builds the same arithmetic as torch modules.
def _conv_geometry(node) -> tuple:
    """(stride, padding, dilation, groups) of a NIR Conv2d as F.conv2d takes them."""
    padding = node.padding if isinstance(node.padding, str) else _pair(node.padding)
    stride = _pair(node.stride)
    if padding == "same" and stride != (1, 1):
        raise MpisError("Conv2d with padding='same' needs stride 1")
    return stride, padding, _pair(node.dilation), int(node.groups)


def _conv2d(node, like) -> Callable[[Tensor], Tensor]:
    weight, bias = tensor_of(node.weight, like), tensor_of(node.bias, like)
    if bias.dim() == 0:
        bias = bias.expand(weight.shape[0]).contiguous()
    geometry = _conv_geometry(node)
    scale = diagonal_scale(weight, geometry)
    if scale is not None:  # a per-channel scale written as a dense 1×1 conv: the same values, C times fewer MACs
        shift = bias.view(1, -1, 1, 1)
        return lambda x: x * scale + shift
    return lambda x: F.conv2d(x, weight, bias, *geometry)


def diagonal_scale(weight: Tensor, geometry: tuple) -> Tensor | None:
    """The per-channel factors (1, C, 1, 1) of a 1×1 conv whose weight is diagonal (the importers cannot
    read depthwise convs, so toolchain files write identities and resets this way), else None."""
    stride, padding, _, groups = geometry
    out_c, in_c, kh, kw = weight.shape
    if (kh, kw) != (1, 1) or out_c != in_c or stride != (1, 1) or padding not in ((0, 0), "valid") or groups != 1:
        return None
    matrix = weight[:, :, 0, 0]
    diagonal = torch.diagonal(matrix)
    if not torch.equal(matrix, torch.diag(diagonal)):
        return None
    return diagonal.view(1, -1, 1, 1).clone()


def _affine(node, like) -> Callable[[Tensor], Tensor]:
    weight, bias = tensor_of(node.weight, like), tensor_of(node.bias, like)
    return lambda x: F.linear(x, weight, bias)


def _linear(node, like) -> Callable[[Tensor], Tensor]:
    weight = tensor_of(node.weight, like)
    return lambda x: F.linear(x, weight)


def _flatten(node, like) -> Callable[[Tensor], Tensor]:
    start = int(node.start_dim) + 1 if int(node.start_dim) >= 0 else int(node.start_dim)
    end = int(node.end_dim) + 1 if int(node.end_dim) >= 0 else int(node.end_dim)
    return lambda x: x.flatten(start, end)


def _scale(node, like) -> Callable[[Tensor], Tensor]:
    scale = tensor_of(node.scale, like)
    return lambda x: x * scale


def _threshold(node, like) -> Callable[[Tensor], Tensor]:
    threshold = tensor_of(node.threshold, like)
    return lambda x: torch.gt(x, threshold, out=torch.empty_like(x))


def _pool(divisor: int | None):
    def build(node, like) -> Callable[[Tensor], Tensor]:
        kernel, stride, padding = _pair(node.kernel_size), _pair(node.stride), _pair(node.padding)
        return lambda x: F.avg_pool2d(x, kernel, stride, padding, divisor_override=divisor)

    return build


STATELESS = {
    "Conv2d": _conv2d,
    "Affine": _affine,
    "Linear": _linear,
    "Flatten": _flatten,
    "Scale": _scale,
    "Threshold": _threshold,
    "SumPool2d": _pool(1),
    "AvgPool2d": _pool(None),
}


# Stateful nodes: (node, like, reset, v_init) -> fn(x, v) -> (output, v).
def _integrator(node, like, reset: str | None, v_init):
    r = None if is_ones(node.r) else tensor_of(node.r, like)

    def step(x: Tensor, v: Tensor | None):
        x = x if r is None else r * x
        v = x if v is None else v + x  # published as the output: never updated in place
        return v, v

    return step


def _leaky(node, like, reset: str | None, v_init, norse_dt: float | None = None):
    """LIF (reset given) or LI (reset None): v += (1/τ)·((r·x + v_leak) − v), as Norse's LIF box cell.

    `norse_dt`: run the node exactly as norse.torch.from_nir does at that dt (the files mpis writes for
    Norse's importer rely on it): v += (dt·(1/τ))·((x + v_leak) − v) with the factor rounded to float32 as
    Norse rounds it, r ignored, reset to 0."""
    norse = norse_dt is not None
    r = None if is_ones(node.r) or norse else tensor_of(node.r, like)
    tau = tensor_of(node.tau, like)
    k = (norse_dt * (1.0 / tau.float())).to(like.dtype) if norse else 1.0 / tau
    v_leak = tensor_of(node.v_leak, like)
    threshold = None if reset is None else tensor_of(node.v_threshold, like)
    v_reset = None if reset is None else torch.zeros_like(threshold) if norse else tensor_of(node.v_reset, like)
    v0 = v_leak if v_init is None else tensor_of(v_init, like)

    def step(x: Tensor, v: Tensor | None):
        x = x if r is None else r * x
        v = v0.expand_as(x).clone() if v is None else v
        v = v.add_(k * ((x + v_leak) - v))
        if threshold is None:
            return v.clone(), v
        spikes = v > threshold
        v = v.sub_(spikes * threshold) if reset == "subtract" else torch.where(spikes, v_reset, v)
        return spikes.to(x.dtype), v

    return step


def _if(node, like, reset: str, v_init):
    r = None if is_ones(node.r) else tensor_of(node.r, like)
    threshold, v_reset = tensor_of(node.v_threshold, like), tensor_of(node.v_reset, like)
    v0 = v_reset if v_init is None else tensor_of(v_init, like)

    def step(x: Tensor, v: Tensor | None):
        x = x if r is None else r * x
        v = x + v0 if v is None else v.add_(x)
        spikes = v > threshold
        v = v.sub_(spikes * threshold) if reset == "subtract" else torch.where(spikes, v_reset, v)
        return spikes.to(x.dtype), v

    return step


STATEFUL = {"I": _integrator, "IF": _if, "LIF": _leaky, "LI": _leaky}


@dataclass(frozen=True)
class Neuron:
    """The mpis `exact` neuron: integrator `i` (I), its `threshold` (Threshold reading only `i`) and the
    Scale nodes that feed `threshold`'s spikes (reset by subtraction) or `i`'s value (leak) back into `i`."""

    i: str
    threshold: str
    feedback: dict[str, str]  # Scale node -> the node it scales (i or threshold)


def find_neurons(graph, sources: dict[str, list[str]], targets: dict[str, list[str]]) -> dict[str, Neuron]:
    import nir

    found = {}
    for name, node in graph.nodes.items():
        if not isinstance(node, nir.I):
            continue
        feedback = {}
        for src in sources[name]:
            if isinstance(graph.nodes[src], nir.Scale) and len(sources[src]) == 1 and targets[src] == [name]:
                feedback[src] = sources[src][0]
        readers = [t for t in targets[name] if t not in feedback]
        if len(readers) != 1 or not isinstance(graph.nodes[readers[0]], nir.Threshold):
            continue
        threshold = readers[0]
        if sources[threshold] != [name] or any(s not in (name, threshold) for s in feedback.values()):
            continue
        if len(sources[name]) > len(feedback):  # the neuron needs an input besides its own feedback
            found[name] = Neuron(name, threshold, feedback)
    return found


def neuron_op(neuron: Neuron, graph, slots: dict[str, int], step: Step, like) -> Op:
    """One step of I ⇄ Threshold (+ Scale feedback) with exactly nirtorch's arithmetic: the inputs summed
    in its order, feedback read from the previous step. spikes·scale is exact, so that term is one addcmul."""
    i_slot, s_slot = slots[neuron.i], slots[neuron.threshold]
    i_node, t_node = graph.nodes[neuron.i], graph.nodes[neuron.threshold]
    r = None if is_ones(i_node.r) else tensor_of(i_node.r, like)
    threshold = tensor_of(t_node.threshold, like)
    shape = tuple(t_node.threshold.shape)
    terms = []  # (slot, previous, scale): scale None for an input, else a feedback of v (slot 0) or spikes
    for source, previous in step.inputs:
        if source in neuron.feedback:
            slot = 0 if neuron.feedback[source] == neuron.i else s_slot
            terms.append((slot, True, tensor_of(graph.nodes[source].scale, like)))
        else:
            terms.append((slots[source], previous, None))
    if len(terms) > 1 and terms[0][2] is not None and terms[0][0] != 0:
        terms[0], terms[1] = terms[1], terms[0]  # a + b == b + a: let the spike feedback be an addcmul

    def op(cur, prev, state, counts):
        v = state[i_slot]
        total, fresh = None, False  # fresh: `total` is our own tensor, safe to update in place
        for slot, previous, scale in terms:
            if scale is None:
                value = prev[slot] if previous else cur[slot]
                if value is None:  # a back-edge at t = 0
                    continue
            elif v is None:  # feedback at t = 0
                continue
            elif slot:  # spikes·scale, exact: fused into the add
                if total is None:
                    total, fresh = prev[slot] * scale, True
                else:
                    total = total.addcmul_(prev[slot], scale) if fresh else torch.addcmul(total, prev[slot], scale)
                    fresh = True
                continue
            else:
                value = v * scale
            if total is None:
                total = value
            else:
                total = total.add_(value) if fresh else total + value
                fresh = True
        if total is None:
            total = cur[0].new_zeros(cur[0].shape[0], *shape)
        if r is not None:
            total = r * total
        v = state[i_slot] = (total if fresh else total.clone()) if v is None else v.add_(total)
        cur[i_slot] = v
        spikes = cur[s_slot] = torch.gt(v, threshold, out=torch.empty_like(v))
        counts[s_slot] = spikes.clone() if counts[s_slot] is None else counts[s_slot].add_(spikes)

    return op


def reset_mode(node, forced: str | None) -> str:
    if forced is not None:
        return forced
    return "subtract" if str(node.metadata.get("reset", "")) == "subtract" else "zero"


def synapse_map(node, like) -> Callable[[Tensor], Tensor] | None:
    """A weight node's map with each nonzero weight set to 1 (a pooling window as it is): applied to ones,
    it counts synapses. None for nodes without synapses."""
    kind = type(node).__name__
    if kind == "Conv2d":
        mask, geometry = tensor_of(np.asarray(node.weight) != 0, like), _conv_geometry(node)
        return lambda x: F.conv2d(x, mask, None, *geometry)
    if kind in ("Affine", "Linear"):
        mask = tensor_of(np.asarray(node.weight) != 0, like)
        return lambda x: F.linear(x, mask)
    if kind in SYNAPTIC:  # pooling
        return _pool(1)(node, like)
    return None
