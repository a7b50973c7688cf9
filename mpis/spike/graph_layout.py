"""The spike simulation of a NIR graph in its own layout (CPU or CUDA): every node as written, with the
time semantics of docs/nir-mapping.md §1; what each node does is `nodes`.

Time is discrete, dt = 1. Every node runs once per step, in the order nirtorch 2.6's interpreter uses
(`schedule`): nodes in the graph's order (`nir.read` sorts them by name), Input first, Output last; a
node runs once each input is either computed this step, or is a *back-edge* (the node reaches that
input's source through the graph) into a node with two or more inputs: that input is the source's
output of the previous step (zeros at t = 0). A node's inputs are summed in the order of their names, so
that the same file gives the same spikes in every process. nirtorch sums three or more inputs in the order
of a Python set of edges, which follows the process's string hashing (PYTHONHASHSEED); `sum_order=
"nirtorch"` replays that order, for a bit-for-bit cross-check against nirtorch in the same process. The
schedule is built once per graph; then each step runs one vectorised op per node over the whole batch;
nodes whose value cannot change over time (linear maps of a constant input) run once.
"""

from __future__ import annotations

import keyword
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from mpis.errors import MpisError
from mpis.spike.nodes import (
    RESETS,
    SPIKING,
    STATEFUL,
    STATELESS,
    SUPPORTED,
    SYNAPTIC,
    Op,
    Step,
    Terms,
    edges,
    find_neurons,
    input_shape_of,
    neuron_op,
    reset_mode,
    stateful_op,
    stateless_op,
    summed_input,
    synapse_map,
)


# ---- schedule ---------------------------------------------------------------------------------
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


SUM_ORDERS = ("sorted", "nirtorch")


def schedule(graph, sum_order: str = "sorted") -> tuple[str, tuple[Step, ...], str]:
    """(Input node, the steps of every other node in execution order, Output node), as nirtorch 2.6's
    `_construct_fx_graph` orders them (module docstring); a cycle without a node that sums two or more
    inputs cannot be ordered and is an error. Each step's inputs are in `sum_order`: by name, or as this
    process's nirtorch sums them."""
    import nir

    if sum_order not in SUM_ORDERS:
        raise MpisError(f"unknown summation order {sum_order!r}; choose one of {', '.join(SUM_ORDERS)}")

    names = list(graph.nodes)
    inputs = [n for n in names if isinstance(graph.nodes[n], nir.Input)]
    outputs = [n for n in names if isinstance(graph.nodes[n], nir.Output)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise MpisError(
            f"the graph needs exactly one Input and one Output node; it has {len(inputs)} and {len(outputs)}"
        )
    sources, successors = edges(graph)
    original = {_sanitize(n): n for n in names}
    sanitized = [(_sanitize(str(a)), _sanitize(str(b))) for a, b in graph.edges]  # nirtorch's edge list, in order

    def summation_order(name: str) -> list[str]:
        if sum_order == "sorted":
            return sorted(sources[name])
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


class SpikeRun(Protocol):
    """What both spike layouts implement (`Program` here, `native_layout.NativeProgram`)."""

    def run(self, x: Tensor, steps: int, burn_in: int = 0) -> SimResult: ...


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
    output_spikes: bool = field(repr=False)  # score the Output's sum over steps (it reads spikes, or per-step logits)
    _shapes: dict[str, tuple[int, ...]] | None = field(default=None, repr=False)
    _fan_out: dict[str, Tensor] | None = field(default=None, repr=False)
    native: SpikeRun | None = field(default=None, repr=False)  # the native layout's program, when compiled
    _tallied: tuple[int, ...] = field(default=(), repr=False)  # slots of declared spike maps that are not neurons

    @property
    def input_shape(self) -> tuple[int, ...]:
        return input_shape_of(self.graph.nodes[self.input_node])

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
        if self.native is not None and (not frames or getattr(self.native, "plays_frames", False)):
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
                for slot in self._tallied:
                    counts[slot] = cur[slot].clone() if counts[slot] is None else counts[slot].add_(cur[slot])
                out = summed_input(self._output_terms, cur, prev, None, self.output_node)
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
        return SimResult(out, total, spikes, steps, total if self.output_spikes else counted)

    def node_shapes(self) -> dict[str, tuple[int, ...]]:
        """Unbatched output shape of every node that produces a value (one dry step on zeros)."""
        if self._shapes is None:
            self.run(torch.zeros(1, *self.input_shape, device=self.device, dtype=self.dtype), 1)
        return self._shapes


def compile_program(
    graph,
    device: str | torch.device = "cpu",
    reset: str | None = None,
    dtype: torch.dtype = torch.float32,
    sum_order: str = "sorted",
    norse_dt: float | None = None,
) -> Program:
    """Compile a NIR graph for `device` and `dtype`; `reset` overrides every IF/LIF node's reset mode
    (`subtract` or `zero`, default: each node's metadata, else the NIR spec's reset to v_reset);
    `sum_order` as `schedule`'s; `norse_dt`: run LIF nodes as norse.torch.from_nir does at that dt (files
    written for Norse's importer, and the universal file, whose spikes in Norse are mpis's)."""
    if reset is not None and reset not in RESETS:
        raise MpisError(f"unknown reset {reset!r}; choose one of {', '.join(RESETS)}")
    device = _device(device)
    like = torch.empty(0, device=device, dtype=dtype)
    unsupported = sorted({type(n).__name__ for n in graph.nodes.values()} - set(SUPPORTED))
    if unsupported:
        where = {
            kind: next(name for name, n in graph.nodes.items() if type(n).__name__ == kind) for kind in unsupported
        }
        listed = ", ".join(f"{kind} (node {where[kind]!r})" for kind in unsupported)
        raise MpisError(f"unsupported NIR node type(s): {listed}; this runtime simulates {', '.join(SUPPORTED)}")

    input_node, steps, output_node = schedule(graph, sum_order)
    sources, targets = edges(graph)
    neurons = find_neurons(graph, sources, targets)
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
            op = neuron_op(neurons[name], graph, slots, step, like)
            spiking.append(neurons[name].threshold)
        elif kind in STATEFUL:
            v_init = None
            if kind in ("IF", "LIF"):
                resets[name] = reset_mode(node, reset)
                v_init = node.metadata.get("v_init") if resets[name] == "subtract" else None
            extra = {"norse_dt": norse_dt} if kind in ("LIF", "LI") and norse_dt is not None else {}
            fn = STATEFUL[kind](node, like, resets.get(name), v_init, **extra)
            op = stateful_op(slots[name], terms, fn, input_shape_of(node), name, kind)
        else:
            fn = STATELESS[kind](node, like)
            op = stateless_op(slots[name], terms, fn, input_shape_of(node), name, kind)
        if kind in SPIKING:
            spiking.append(name)
        names[op] = name
        if kind in STATELESS and all(not p and s in static for s, p in step.inputs):
            static.add(name)
            static_ops.append(op)
        else:
            dynamic.append(op)
    declared = declared_spike_maps(graph)
    if declared:  # a file that says where its layers' spikes are: count those, not its helper neurons
        spiking = list(declared)
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
        # Toolchain files output the head's value of each step (no integrator): their score is its sum.
        bool(declared) or all(type(graph.nodes[s]).__name__ in SPIKING for s in sources[output_node]),
        _tallied=tuple(slots[n] for n in declared if type(graph.nodes[n]).__name__ not in SPIKING),
    )
    return program


def counts_model_synapses(program: Program) -> bool:
    """Whether the graph's weight nodes are the model's synapses: not in a toolchain file, whose ghost layout
    (strided convs as dilated ones over every position) and helper nodes (painted planes, relays, resets as
    convs) would inflate `synaptic_ops` and `dense_macs` many times."""
    return not declared_spike_maps(program.graph)


def declared_spike_maps(graph) -> tuple[str, ...]:
    """The nodes a toolchain file's metadata names as its neuron layers' spikes (`layers.*.spikes`; the
    ghost layout, mpis.export.toolchains), in layer order; () for other files."""
    layers = getattr(graph, "metadata", {}).get("layers", {})
    names = [str(info["spikes"]) for info in layers.values() if isinstance(info, dict) and "spikes" in info]
    return tuple(n for n in names if n in graph.nodes)


def _device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise MpisError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MpisError("CUDA is not available on this machine; use --device cpu")
    return device


# ---- synapses ------------------------------------------------------------------------------------
def fan_out(program: Program) -> dict[str, Tensor]:
    """Synapses leaving each neuron of every spiking node (unbatched node shape): the nonzero weights of the
    Conv2d / Affine / Linear nodes (and the pooling windows) it feeds, directly or through Flatten."""
    graph, shapes, targets = program.graph, program.node_shapes(), edges(program.graph)[1]

    def synapses(name: str, x: Tensor) -> Tensor:
        total = x.new_zeros(())
        for target in targets[name]:
            node = graph.nodes[target]
            op = synapse_map(node, x)
            if op is not None:
                total = total + op(x).sum()
            elif type(node).__name__ == "Flatten":
                total = total + synapses(target, STATELESS["Flatten"](node, None)(x))
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
    shapes, sources = program.node_shapes(), edges(program.graph)[0]
    total = 0
    with torch.inference_mode():
        for name, node in program.graph.nodes.items():
            if type(node).__name__ in SYNAPTIC:
                ones = torch.ones(1, *shapes[sources[name][0]], device=program.device, dtype=program.dtype)
                total += int(synapse_map(node, ones)(ones).sum())
    return total
