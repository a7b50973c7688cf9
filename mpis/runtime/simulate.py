"""A batched spiking simulator for NIR graphs (CPU or CUDA), with the time semantics of docs/nir-mapping.md §1.

Time is discrete, dt = 1. Every node runs once per step, in the order nirtorch 2.6's interpreter uses
(`schedule`): nodes in the graph's order (`nir.read` sorts them by name), Input first, Output last; a
node runs once each input is either computed this step, or is a *back-edge* (the node reaches that
input's source through the graph) into a node with two or more inputs: that input is the source's
output of the previous step (zeros at t = 0). A node's inputs are summed, in the order nirtorch sums
them, so the two agree bit for bit within one process (for three or more inputs that order follows
Python's string hashing, as nirtorch's does). The schedule is built once per graph; then each step
runs one vectorised op per node over the whole batch.

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
fused op; nodes whose value cannot change over time (linear maps of a constant input) run once.
"""

from __future__ import annotations

import keyword
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mpis.errors import MpisError

RESETS = ("subtract", "zero")
LAYOUTS = ("graph", "native")
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


# ---- schedule ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One node's work in a time step: its inputs in summation order, each `(source, previous)`; a
    previous-step input is a back-edge (the source's output one step earlier, zeros at t = 0)."""

    node: str
    inputs: tuple[tuple[str, bool], ...]


def _sanitize(name: str) -> str:  # nirtorch's module names
    name = name.replace(".", "_")
    return "nir_node_" + name if keyword.iskeyword(name) else name


def _reachable(start: str, successors: dict[str, list[str]]) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in successors[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _edges(graph) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(sources, targets) of every node, duplicate edges dropped."""
    sources: dict[str, list[str]] = {n: [] for n in graph.nodes}
    targets: dict[str, list[str]] = {n: [] for n in graph.nodes}
    for a, b in dict.fromkeys((str(a), str(b)) for a, b in graph.edges):
        if a not in targets or b not in sources:
            raise MpisError(f"edge {a} -> {b} names a node the graph does not have")
        targets[a].append(b)
        sources[b].append(a)
    return sources, targets


def schedule(graph) -> tuple[str, tuple[Step, ...], str]:
    """(Input node, the steps of every other node in execution order, Output node), as nirtorch 2.6's
    `_construct_fx_graph` orders them (module docstring); a cycle without a node that sums two or more
    inputs cannot be ordered and is an error."""
    import nir

    names = list(graph.nodes)
    inputs = [n for n in names if isinstance(graph.nodes[n], nir.Input)]
    outputs = [n for n in names if isinstance(graph.nodes[n], nir.Output)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise MpisError(
            f"the graph needs exactly one Input and one Output node; it has {len(inputs)} and {len(outputs)}"
        )
    sources, successors = _edges(graph)
    original = {_sanitize(n): n for n in names}
    sanitized = [(_sanitize(str(a)), _sanitize(str(b))) for a, b in graph.edges]  # nirtorch's edge list, in order

    def summation_order(name: str) -> list[str]:
        # nirtorch iterates a set of (source, target) edges: replay it for the same order of the sum
        target = _sanitize(name)
        return [original[a] for a, _ in set(filter(lambda edge: edge[1] == target, sanitized))]

    if not sources[outputs[0]]:
        raise MpisError(f"the Output node {outputs[0]!r} has no inputs")
    queue = deque(names[names.index(inputs[0]) :] + names[: names.index(inputs[0])])  # Input first
    queue.popleft()
    queue.remove(outputs[0])  # always last
    done, steps, stalled = {inputs[0]}, [], 0
    reach: dict[str, set[str]] = {}
    while queue:
        name = queue.popleft()
        if not sources[name]:
            raise MpisError(f"node {name!r} has no inputs")
        if name not in reach:
            reach[name] = _reachable(name, successors)
        terms, ready = [], True
        for source in summation_order(name):
            if source in done:
                terms.append((source, False))
            elif source in reach[name] and len(sources[name]) > 1:
                terms.append((source, True))
            else:
                ready = False
        if not ready:
            queue.append(name)
            stalled += 1
            if stalled >= len(queue):  # every waiting node deferred since the last progress
                raise MpisError(
                    f"cannot order nodes {', '.join(sorted(queue))}: they form a cycle in which no node sums two "
                    f"or more inputs (a back-edge is read one step late only into such a node)"
                )
            continue
        steps.append(Step(name, tuple(terms)))
        done.add(name)
        stalled = 0
    return inputs[0], tuple(steps), outputs[0]


# ---- ops ----------------------------------------------------------------------------------------
# An op runs one node (or one fused neuron) for one step: op(cur, prev, state, counts) reads its inputs
# from `cur` (this step) and `prev` (last step), writes its output(s) into `cur`, keeps its membrane in
# `state` and adds its spikes to `counts` (all lists indexed by slot; slot 0 is the Input).
Op = Callable[[list, list, list, list], None]
Terms = tuple[tuple[int, bool], ...]


def _array(value, like: Tensor) -> Tensor:
    """A node parameter as a tensor on `like`'s device, in its dtype."""
    return torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=like.dtype, device=like.device)


def _uniform(value) -> float | None:
    array = np.asarray(value, dtype=np.float32)
    return float(array.flat[0]) if array.size and np.all(array == array.flat[0]) else None


def _ones(value) -> bool:
    return _uniform(value) == 1.0


def _pair(value) -> tuple[int, int]:
    flat = [int(v) for v in np.atleast_1d(np.asarray(value))]
    return (flat[0], flat[0]) if len(flat) == 1 else (flat[0], flat[1])


def _shape(node) -> tuple[int, ...] | None:
    shape = getattr(node, "input_type", {}).get("input")
    return None if shape is None else tuple(int(s) for s in np.atleast_1d(shape))


def _total(terms: Terms, cur: list, prev: list, shape: tuple[int, ...] | None, name: str) -> Tensor:
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


def _stateless(slot: int, terms: Terms, fn: Callable[[Tensor], Tensor], shape, name: str, kind: str) -> Op:
    spiking = kind in SPIKING

    def op(cur, prev, state, counts):
        out = cur[slot] = fn(_total(terms, cur, prev, shape, name))
        if spiking:
            counts[slot] = out.clone() if counts[slot] is None else counts[slot].add_(out)

    return op


def _stateful(slot: int, terms: Terms, fn, shape, name: str, kind: str) -> Op:
    """fn(x, v) -> (output, v); v is None at t = 0 and private to the node (updated in place)."""
    spiking = kind in SPIKING

    def op(cur, prev, state, counts):
        out, state[slot] = fn(_total(terms, cur, prev, shape, name), state[slot])
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
    weight, bias = _array(node.weight, like), _array(node.bias, like)
    if bias.dim() == 0:
        bias = bias.expand(weight.shape[0]).contiguous()
    geometry = _conv_geometry(node)
    return lambda x: F.conv2d(x, weight, bias, *geometry)


def _affine(node, like) -> Callable[[Tensor], Tensor]:
    weight, bias = _array(node.weight, like), _array(node.bias, like)
    return lambda x: F.linear(x, weight, bias)


def _linear(node, like) -> Callable[[Tensor], Tensor]:
    weight = _array(node.weight, like)
    return lambda x: F.linear(x, weight)


def _flatten(node, like) -> Callable[[Tensor], Tensor]:
    start = int(node.start_dim) + 1 if int(node.start_dim) >= 0 else int(node.start_dim)
    end = int(node.end_dim) + 1 if int(node.end_dim) >= 0 else int(node.end_dim)
    return lambda x: x.flatten(start, end)


def _scale(node, like) -> Callable[[Tensor], Tensor]:
    scale = _array(node.scale, like)
    return lambda x: x * scale


def _threshold(node, like) -> Callable[[Tensor], Tensor]:
    threshold = _array(node.threshold, like)
    return lambda x: torch.gt(x, threshold, out=torch.empty_like(x))


def _pool(divisor: int | None):
    def build(node, like) -> Callable[[Tensor], Tensor]:
        kernel, stride, padding = _pair(node.kernel_size), _pair(node.stride), _pair(node.padding)
        return lambda x: F.avg_pool2d(x, kernel, stride, padding, divisor_override=divisor)

    return build


_STATELESS = {
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
    r = None if _ones(node.r) else _array(node.r, like)

    def step(x: Tensor, v: Tensor | None):
        x = x if r is None else r * x
        v = x if v is None else v + x  # published as the output: never updated in place
        return v, v

    return step


def _leaky(node, like, reset: str | None, v_init):
    """LIF (reset given) or LI (reset None): v += (1/τ)·((r·x + v_leak) − v), as Norse's LIF box cell."""
    r = None if _ones(node.r) else _array(node.r, like)
    k, v_leak = 1.0 / _array(node.tau, like), _array(node.v_leak, like)
    threshold = None if reset is None else _array(node.v_threshold, like)
    v_reset = None if reset is None else _array(node.v_reset, like)
    v0 = v_leak if v_init is None else _array(v_init, like)

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
    r = None if _ones(node.r) else _array(node.r, like)
    threshold, v_reset = _array(node.v_threshold, like), _array(node.v_reset, like)
    v0 = v_reset if v_init is None else _array(v_init, like)

    def step(x: Tensor, v: Tensor | None):
        x = x if r is None else r * x
        v = x + v0 if v is None else v.add_(x)
        spikes = v > threshold
        v = v.sub_(spikes * threshold) if reset == "subtract" else torch.where(spikes, v_reset, v)
        return spikes.to(x.dtype), v

    return step


_STATEFUL = {"I": _integrator, "IF": _if, "LIF": _leaky, "LI": _leaky}


@dataclass(frozen=True)
class _Neuron:
    """The mpis `exact` neuron: integrator `i` (I), its `threshold` (Threshold reading only `i`) and the
    Scale nodes that feed `threshold`'s spikes (reset by subtraction) or `i`'s value (leak) back into `i`."""

    i: str
    threshold: str
    feedback: dict[str, str]  # Scale node -> the node it scales (i or threshold)


def _find_neurons(graph, sources: dict[str, list[str]], targets: dict[str, list[str]]) -> dict[str, _Neuron]:
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
            found[name] = _Neuron(name, threshold, feedback)
    return found


def _neuron_op(neuron: _Neuron, graph, slots: dict[str, int], step: Step, like) -> Op:
    """One step of I ⇄ Threshold (+ Scale feedback) with exactly nirtorch's arithmetic: the inputs summed
    in its order, feedback read from the previous step. spikes·scale is exact, so that term is one addcmul."""
    i_slot, s_slot = slots[neuron.i], slots[neuron.threshold]
    i_node, t_node = graph.nodes[neuron.i], graph.nodes[neuron.threshold]
    r = None if _ones(i_node.r) else _array(i_node.r, like)
    threshold = _array(t_node.threshold, like)
    shape = tuple(t_node.threshold.shape)
    terms = []  # (slot, previous, scale): scale None for an input, else a feedback of v (slot 0) or spikes
    for source, previous in step.inputs:
        if source in neuron.feedback:
            slot = 0 if neuron.feedback[source] == neuron.i else s_slot
            terms.append((slot, True, _array(graph.nodes[source].scale, like)))
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


def _reset_mode(node, forced: str | None) -> str:
    if forced is not None:
        return forced
    return "subtract" if str(node.metadata.get("reset", "")) == "subtract" else "zero"


# ---- program ----------------------------------------------------------------------------------
@dataclass
class SimResult:
    """`output`: the Output node's value after the last step (accumulated logits for mpis graphs);
    `output_total`: its sum over all steps; `spike_counts`: spikes per neuron of every spiking node,
    (batch, *node shape), float32 (exact up to 2²⁴ steps); `scores`: what to take the argmax of, the
    final output (what it gained over the counted steps, after a burn-in), or the output's spike counts
    when the Output reads spiking nodes."""

    output: Tensor
    output_total: Tensor
    spike_counts: dict[str, Tensor]
    steps: int
    scores: Tensor


@dataclass
class Program:
    """A NIR graph compiled for `device` and `dtype`: the nirtorch schedule as a list of vectorised ops."""

    graph: object = field(repr=False)
    device: torch.device
    dtype: torch.dtype
    input_node: str
    output_node: str
    steps: tuple[Step, ...]
    resets: dict[str, str]  # IF / LIF node -> reset mode used
    spiking: tuple[str, ...]  # nodes whose spikes are counted
    _slots: dict[str, int] = field(repr=False)
    _static: list[Op] = field(repr=False)  # run once for a constant input (every step for frames)
    _dynamic: list[Op] = field(repr=False)
    _op_names: dict[Op, str] = field(repr=False)
    _output_terms: Terms = field(repr=False)
    _output_spikes: bool = field(repr=False)  # the Output reads spiking nodes
    _shapes: dict[str, tuple[int, ...]] | None = field(default=None, repr=False)
    _fan_out: dict[str, Tensor] | None = field(default=None, repr=False)
    native: object | None = field(default=None, repr=False)  # runtime.native.NativeProgram, for layout "native"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return _shape(self.graph.nodes[self.input_node])

    @torch.inference_mode()
    def run(self, x: Tensor, steps: int, burn_in: int = 0) -> SimResult:
        """Simulate `burn_in` + `steps` steps and count over the last `steps` (a burn-in lets the loop settle
        from the zero state before spikes are counted). `x` (B, *input shape) is fed to the Input at every
        step (direct coding); (B, frames, *input shape) plays frame t·frames//(burn_in + steps) at step t."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise MpisError(f"the number of time steps must be a positive integer, got {steps}")
        if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
            raise MpisError(f"the burn-in must be a non-negative number of steps, got {burn_in}")
        expected = self.input_shape
        if tuple(x.shape[1:]) == expected:
            frames = 0
        elif x.dim() == len(expected) + 2 and tuple(x.shape[2:]) == expected:
            frames = x.shape[1]
        else:
            raise MpisError(
                f"input of shape {tuple(x.shape[1:])} does not fit the graph's Input "
                f"{'x'.join(map(str, expected))} (expected (batch, *shape) or (batch, frames, *shape))"
            )
        x = x.to(self.device, self.dtype)
        if self.native is not None and not frames:
            return self.native.run(x, steps, burn_in)
        n = len(self._slots)
        base, state, counts, prev = [None] * n, [None] * n, [None] * n, [None] * n
        static_counts = counts
        op, total = None, None
        try:
            if not frames:  # constant input: the static nodes run once
                base[0] = x
                for op in self._static:
                    op(base, prev, state, counts)
                counts = [None] * n
            before = out = None  # the Output's value when counting starts
            for t in range(burn_in + steps):
                if burn_in and t == burn_in:
                    counts, total, before = [None] * n, None, out
                cur = base.copy()
                if frames:
                    cur[0] = x[:, t * frames // (burn_in + steps)]
                    for op in self._static:
                        op(cur, prev, state, counts)
                for op in self._dynamic:
                    op(cur, prev, state, counts)
                op = None
                out = _total(self._output_terms, cur, prev, None, self.output_node)
                total = out.clone() if total is None else total.add_(out)
                prev = cur
        except RuntimeError as err:
            name = self._op_names.get(op, self.output_node)
            raise MpisError(f"simulating node {name!r} failed: {str(err).splitlines()[0]}") from None
        if self._shapes is None:
            self._shapes = {s: tuple(cur[i].shape[1:]) for s, i in self._slots.items() if cur[i] is not None}
        spikes = {}
        for node in self.spiking:
            slot = self._slots[node]
            spikes[node] = counts[slot] if counts[slot] is not None else static_counts[slot] * steps
        counted = out if before is None else out - before  # the accumulated logits gained while counting
        return SimResult(out, total, spikes, steps, total if self._output_spikes else counted)

    def node_shapes(self) -> dict[str, tuple[int, ...]]:
        """Unbatched output shape of every node that produces a value (one dry step on zeros)."""
        if self._shapes is None:
            self.run(torch.zeros(1, *self.input_shape, device=self.device, dtype=self.dtype), 1)
        return self._shapes


def compile_graph(
    graph,
    device: str | torch.device = "cpu",
    reset: str | None = None,
    dtype: torch.dtype = torch.float32,
    layout: str = "graph",
) -> Program:
    """Compile a NIR graph (or a .nir file) for `device` and `dtype`; `reset` overrides every IF/LIF node's
    reset mode (`subtract` or `zero`, default: each node's metadata, else the NIR spec's reset to v_reset).
    `layout`: `graph` runs every node as written (nirtorch's spikes, bit for bit); `native` runs an mpis
    `exact` export per layer in native layout (`runtime.native`: the model's FLOPs, static inputs)."""

    if isinstance(graph, str | Path):
        from mpis.export.nir_nodes import read_nir

        graph = read_nir(graph)
    target = getattr(graph, "metadata", {}).get("target", "nirtorch")
    if target != "nirtorch":
        raise MpisError(
            f"this file is written for {target}'s own importer (mpis export --target {target}), whose neurons read "
            f"differently; run it there: mpis check CHECKPOINT --toolchain {target}"
        )
    if reset is not None and reset not in RESETS:
        raise MpisError(f"unknown reset {reset!r}; choose one of {', '.join(RESETS)}")
    if layout not in LAYOUTS:
        raise MpisError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "native" and getattr(graph, "metadata", {}).get("layout") == "ghost":
        raise MpisError(
            "this file is in the ghost layout (odd map sizes: its convs are the model's own); use --layout graph"
        )
    device = _device(device)
    like = torch.empty(0, device=device, dtype=dtype)
    unsupported = sorted({type(n).__name__ for n in graph.nodes.values()} - set(SUPPORTED))
    if unsupported:
        where = {
            kind: next(name for name, n in graph.nodes.items() if type(n).__name__ == kind) for kind in unsupported
        }
        listed = ", ".join(f"{kind} (node {where[kind]!r})" for kind in unsupported)
        raise MpisError(f"unsupported NIR node type(s): {listed}; this runtime simulates {', '.join(SUPPORTED)}")

    input_node, steps, output_node = schedule(graph)
    sources, targets = _edges(graph)
    neurons = _find_neurons(graph, sources, targets)
    fused = {n.threshold for n in neurons.values()} | {s for n in neurons.values() for s in n.feedback}
    slots = {input_node: 0}
    for step in steps:
        slots[step.node] = len(slots)
    slots[output_node] = len(slots)
    output_terms = tuple((slots[s], False) for s in sources[output_node])

    static, static_ops, dynamic, names, resets, spiking = {input_node}, [], [], {}, {}, []
    for step in steps:
        name, node = step.node, graph.nodes[step.node]
        kind = type(node).__name__
        if name in fused:
            continue
        terms = tuple((slots[s], p) for s, p in step.inputs)
        if name in neurons:
            op = _neuron_op(neurons[name], graph, slots, step, like)
            spiking.append(neurons[name].threshold)
        elif kind in _STATEFUL:
            v_init = None
            if kind in ("IF", "LIF"):
                resets[name] = _reset_mode(node, reset)
                v_init = node.metadata.get("v_init") if resets[name] == "subtract" else None
            fn = _STATEFUL[kind](node, like, resets.get(name), v_init)
            op = _stateful(slots[name], terms, fn, _shape(node), name, kind)
        else:
            fn = _STATELESS[kind](node, like)
            op = _stateless(slots[name], terms, fn, _shape(node), name, kind)
        if kind in SPIKING:
            spiking.append(name)
        names[op] = name
        if kind in _STATELESS and all(not p and s in static for s, p in step.inputs):
            static.add(name)
            static_ops.append(op)
        else:
            dynamic.append(op)
    program = Program(
        graph,
        device,
        dtype,
        input_node,
        output_node,
        steps,
        resets,
        tuple(spiking),
        slots,
        static_ops,
        dynamic,
        names,
        output_terms,
        all(type(graph.nodes[s]).__name__ in SPIKING for s in sources[output_node]),
    )
    if layout == "native":
        from mpis.runtime.native import compile_native

        try:
            program.native = compile_native(program)
        except MpisError as err:
            raise MpisError(f"cannot run this graph in native layout ({err}); use --layout graph") from None
    return program


def _device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise MpisError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MpisError("CUDA is not available on this machine; use --device cpu")
    return device


# ---- what a simulation measured -----------------------------------------------------------------
def layer_counts(graph, spike_counts: dict[str, Tensor]) -> dict[str, Tensor]:
    """Spike counts per MPIS neuron layer in native layout (batch, C, H, W), from the per-node counts and
    the spiking nodes' metadata ({"layer", "layout", "factor", "phase"}; the phase node (a, b) of a layer at
    factor f holds pixels (f·i + a, f·j + b)). Nodes without layer metadata keep their node name."""
    from mpis.export.nir import native_layer

    phases: dict[str, dict[tuple[int, int], Tensor]] = {}
    factors: dict[str, int] = {}
    out: dict[str, Tensor] = {}
    for name, count in spike_counts.items():
        meta = graph.nodes[name].metadata
        if "layer" not in meta:
            out[name] = count
            continue
        layer, factor = str(meta["layer"]), int(meta.get("factor", 1))
        phase = tuple(int(p) for p in np.atleast_1d(meta.get("phase", (0, 0))))
        factors[layer] = factor
        phases.setdefault(layer, {})[phase] = count
    layers = graph.metadata.get("layers", {})
    for layer, info in layers.items():  # ghost layout (export.toolchains): one node, pixels at dilation D
        if isinstance(info, dict) and "dilation" in info and str(info["spikes"]) in spike_counts:
            step, size = max(int(info["dilation"]), 1), int(info["size"])
            out.pop(str(info["spikes"]), None)
            out[layer] = spike_counts[str(info["spikes"])][..., : step * size : step, : step * size : step]
    for layer, parts in phases.items():
        factor = factors[layer]
        if sorted(parts) != [(a, b) for a in range(factor) for b in range(factor)]:
            raise MpisError(
                f"layer {layer!r} at factor {factor} needs {factor**2} phase nodes, the graph has {len(parts)}"
            )
        out[layer] = parts[(0, 0)] if factor == 1 else native_layer(parts, factor)
        expected = layers.get(layer, {}).get("shape")
        if expected is not None and tuple(out[layer].shape[1:]) != tuple(int(s) for s in expected):
            raise MpisError(
                f"layer {layer!r} reassembles to {tuple(out[layer].shape[1:])}, its metadata says {tuple(expected)}"
            )
    return out


def firing_rate(count: Tensor, steps: int) -> float:
    """Supplement Eq. 1, r_l = s_l / (T · n_l), averaged over the batch of `count` (batch, *layer shape)."""
    return float(count.double().mean()) / steps


def _synapses(node, like) -> Callable[[Tensor], Tensor] | None:
    """A weight node's map with each nonzero weight set to 1 (a pooling window as it is): applied to ones,
    it counts synapses. None for nodes without synapses."""
    kind = type(node).__name__
    if kind == "Conv2d":
        mask, geometry = _array(np.asarray(node.weight) != 0, like), _conv_geometry(node)
        return lambda x: F.conv2d(x, mask, None, *geometry)
    if kind in ("Affine", "Linear"):
        mask = _array(np.asarray(node.weight) != 0, like)
        return lambda x: F.linear(x, mask)
    if kind in SYNAPTIC:  # pooling
        return _pool(1)(node, like)
    return None


def fan_out(program: Program) -> dict[str, Tensor]:
    """Synapses leaving each neuron of every spiking node (unbatched node shape): the nonzero weights of the
    Conv2d / Affine / Linear nodes (and the pooling windows) it feeds, directly or through Flatten."""
    graph, shapes, targets = program.graph, program.node_shapes(), _edges(program.graph)[1]

    def synapses(name: str, x: Tensor) -> Tensor:
        total = x.new_zeros(())
        for target in targets[name]:
            node = graph.nodes[target]
            op = _synapses(node, x)
            if op is not None:
                total = total + op(x).sum()
            elif type(node).__name__ == "Flatten":
                total = total + synapses(target, _flatten(node, None)(x))
        return total

    result = {}
    with torch.enable_grad():
        for name in program.spiking:
            x = torch.ones(1, *shapes[name], device=program.device, dtype=program.dtype, requires_grad=True)
            total = synapses(name, x)
            result[name] = torch.autograd.grad(total, x)[0][0] if total.requires_grad else torch.zeros_like(x[0])
    return result


def synaptic_ops(program: Program, spike_counts: dict[str, Tensor]) -> Tensor:
    """Synaptic operations per input (batch,): every spike times its neuron's fan-out, over all steps."""
    if program._fan_out is None:
        program._fan_out = fan_out(program)
    fan = program._fan_out
    return sum(
        (c.flatten(1).double() @ fan[name].flatten().double() for name, c in spike_counts.items()),
        torch.zeros((), dtype=torch.float64),
    )


def dense_macs(program: Program) -> int:
    """Multiply-accumulates per input of one dense rate step: every synapse of every weight node once (zero
    weights and padding, e.g. of a polyphase layout, are no synapses)."""
    shapes, sources = program.node_shapes(), _edges(program.graph)[0]
    total = 0
    with torch.inference_mode():
        for name, node in program.graph.nodes.items():
            if type(node).__name__ in SYNAPTIC:
                ones = torch.ones(1, *shapes[sources[name][0]], device=program.device, dtype=program.dtype)
                total += int(_synapses(node, ones)(ones).sum())
    return total


# ---- a dataset through the spiking network ----------------------------------------------------------
@dataclass
class Evaluation:
    """Accuracy, per-layer firing rates r_l = s_l / (T·n_l) (layer -> (shape, rate)) and the energy proxy:
    synaptic operations per input over all steps against `dense_macs` per input of one rate step."""

    inputs: int
    steps: int
    accuracy: float
    rates: dict[str, tuple[tuple[int, ...], float]]
    synaptic_ops: float
    dense_macs: int
    seconds: float

    def lines(self) -> list[str]:
        dense = self.steps * self.dense_macs
        out = [
            f"accuracy {self.accuracy:.4f} on {self.inputs} inputs (spiking, T = {self.steps}; {self.seconds:.1f} s)",
            "firing rate r_l = s_l / (T·n_l):",
        ]
        width = max((len(name) for name in self.rates), default=0)
        out += [f"  {n:<{width}}  {'x'.join(map(str, s)):<12} {r:.4f}" for n, (s, r) in self.rates.items()]
        share = f"{self.synaptic_ops / dense:.2%}" if dense else "n/a"
        out.append(
            f"synaptic ops {self.synaptic_ops:.3g} per input (spikes x fan-out) vs {dense:.3g} MACs of T dense "
            f"rate steps (T x {self.dense_macs:.3g} synapses): {share}"
        )
        return out


def evaluate(
    program: Program,
    dataset,
    steps: int,
    batch: int = 256,
    classes: int | None = None,
    burn_in: int = 0,
    progress: bool = False,
) -> Evaluation:
    """Run every (input, label) of `dataset` through the spiking network for `steps` counted steps."""
    import time

    from torch.utils.data import DataLoader
    from tqdm import tqdm

    correct, seen, spikes, shapes, synops = 0, 0, {}, {}, 0.0
    start = time.perf_counter()
    loader = DataLoader(dataset, batch_size=batch)
    for x, y in tqdm(loader, desc="simulating", unit="batch", disable=not progress, leave=False, mininterval=1):
        result = program.run(x, steps, burn_in)
        if classes is not None and result.scores.shape[1:] != (classes,):
            raise MpisError(
                f"the graph outputs {tuple(result.scores.shape[1:])} per input, the dataset has {classes} classes"
            )
        correct += int((result.scores.argmax(1).cpu() == y).sum())
        seen += len(y)
        for layer, count in layer_counts(program.graph, result.spike_counts).items():
            spikes[layer] = spikes.get(layer, 0.0) + float(count.double().sum())
            shapes[layer] = tuple(count.shape[1:])
        synops += float(synaptic_ops(program, result.spike_counts).sum())
    if not seen:
        raise MpisError("the dataset is empty")
    seconds = time.perf_counter() - start
    rates = {n: (shapes[n], spikes[n] / (seen * steps * int(np.prod(shapes[n])))) for n in spikes}
    return Evaluation(seen, steps, correct / seen, rates, synops / seen, dense_macs(program), seconds)
