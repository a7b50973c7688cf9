"""Run an mpis `exact` NIR graph in each layer's native layout: the same network with the model's FLOPs.

The exporter writes every map of the loop on the loop's coarsest grid (a layer at factor f as f² phase
nodes) and each linear op as one Conv2d per (input phase, output phase) block, 3–8× the model's own
multiply-accumulates (README, NIR export). Each block's metadata names its op, so this module rebuilds
every op in native layout: it runs the op's blocks on one-hot inputs and fits the response as one
strided or transposed convolution (plus the op's bias map), and checks the fit on random spikes before
using it. Where the graph split one of the model's convs by source (`s1_l2_conv.from_s1_l1`,
`.from_fuse2to1`), the ops have the same weights and run as one conv on the summed input, as the model
does. Neurons become one I ⇄ Threshold update per layer. Nodes without op metadata (the stem conv, the
head) run as they are.

Same time semantics as `graph_layout.Program`: within a step, ops and layers run in dependency order; what
the graph reads one step late (the Trans chain) is the previous step's value, nothing at t = 0. Sums run
in another order than the per-node program, so float64 runs give its spikes, and float32 runs agree up
to rounding at the threshold (measured in the README).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mpis.errors import MpisError
from mpis.export.nir import native_layer
from mpis.spike.graph_layout import Program, SimResult
from mpis.spike.nodes import STATELESS, edges, find_neurons, is_ones, tensor_of

INPUT = "<input>"
PROBE_CHUNK = 512
Phase = tuple[int, int]


@dataclass
class _Layer:
    """A neuron layer: its phase neurons and native-layout parameters (threshold, reset and leak feedback)."""

    name: str
    factor: int
    phases: dict[Phase, object]
    shape: tuple[int, ...] = ()
    reads: tuple[tuple[str, bool], ...] = ()  # (item, read one step late)
    merged: tuple[_Merged, ...] = ()
    threshold: Tensor | None = None
    spike_scale: Tensor | None = None
    leak_scale: Tensor | None = None
    rate: Tensor | None = None


@dataclass
class _Op:
    """A linear op in native layout: `apply(sum of the sources' values) -> value`."""

    name: str
    source: tuple[str, ...]
    shape: tuple[int, ...]
    apply: Callable[[Tensor], Tensor] = field(repr=False)
    constant: bool = False
    conv: _Conv | None = field(default=None, repr=False)  # the op as a convolution, when it is one


@dataclass
class _Merged:
    """Ops with the same convolution read by one layer, run as one: conv(sum of their inputs) + their biases.
    A member read one step late contributes nothing (input or bias) at t = 0, as in the graph."""

    conv: _Conv = field(repr=False)
    inputs: tuple[tuple[str, bool], ...]  # (the members' sources, read one step late)
    bias_first: Tensor | None  # the biases present at t = 0 (members read in the same step), (C, H, W)
    bias_later: Tensor | None  # every member's bias, from t = 1 on

    def __call__(self, cur: dict, prev: dict) -> Tensor | None:
        total = None
        for item, delayed in self.inputs:
            value = prev.get(item) if delayed else cur[item]
            if value is not None:
                total = value if total is None else total + value
        if total is None:
            return None
        bias = self.bias_later if prev else self.bias_first
        out = self.conv(total, with_bias=False)
        return out if bias is None else out.add_(bias)


@dataclass
class NativeProgram:
    """`program`'s graph rebuilt per layer and op in native layout; `run` returns the same `SimResult`
    (spike counts split back into the graph's phase nodes)."""

    program: Program = field(repr=False)
    layers: dict[str, _Layer]
    ops: dict[str, _Op]
    order: tuple[str, ...]  # items computed every step, in dependency order
    output_reads: tuple[tuple[str, bool], ...]
    output_rate: Tensor | None  # r of the integrator accumulating the logits (None: the Output reads items)
    output_shape: tuple[int, ...]

    @torch.inference_mode()
    def run(self, x: Tensor, steps: int, burn_in: int = 0) -> SimResult:
        """Called by `Program.run` (which checks the arguments) for a static input `x` (B, *input shape)."""
        program = self.program
        constant = {INPUT: x.to(program.device, program.dtype)}
        for op in self.ops.values():
            if op.constant:
                constant[op.name] = op.apply(_sum(((s, False) for s in op.source), constant, {}, ()))
        v: dict[str, Tensor] = {}
        prev: dict[str, Tensor] = {}
        counts: dict[str, Tensor] = {}
        total = before = out = logits = None
        for t in range(burn_in + steps):
            if burn_in and t == burn_in:
                counts, total, before = {}, None, out
            cur = dict(constant)
            for item in self.order:
                if item in self.ops:
                    op = self.ops[item]
                    value = (
                        cur[op.source[0]]
                        if len(op.source) == 1
                        else _sum(((s, False) for s in op.source), cur, prev, ())
                    )
                    cur[item] = op.apply(value)
                    continue
                layer = self.layers[item]
                membrane = v.get(item)
                if membrane is None:  # the integrator starts at 0
                    membrane = v[item] = cur[INPUT].new_zeros(x.shape[0], *layer.shape)
                # v += r·(inputs + feedback): summed straight into v when r = 1
                charge = membrane if layer.rate is None else torch.zeros_like(membrane)
                if layer.leak_scale is not None:
                    charge = (
                        charge.mul_(layer.leak_scale + 1)
                        if charge is membrane
                        else charge.addcmul_(membrane, layer.leak_scale)
                    )
                for source, delayed in layer.reads:
                    value = prev.get(source) if delayed else cur[source]
                    if value is not None:
                        charge = charge.add_(value)
                for group in layer.merged:
                    value = group(cur, prev)
                    if value is not None:
                        charge = charge.add_(value)
                if layer.spike_scale is not None and item in prev:  # the reset of the last step's spikes
                    charge = charge.addcmul_(prev[item], layer.spike_scale)
                if layer.rate is not None:
                    membrane.addcmul_(layer.rate, charge)
                spikes = cur[item] = torch.gt(membrane, layer.threshold, out=torch.empty_like(membrane))
                counts[item] = spikes.clone() if item not in counts else counts[item].add_(spikes)
            out = _sum(self.output_reads, cur, prev, (x.shape[0], *self.output_shape))
            if self.output_rate is not None:
                logits = out * self.output_rate if logits is None else logits.add_(out * self.output_rate)
                out = logits.clone()
            total = out.clone() if total is None else total.add_(out)
            prev = cur
        per_node = {}
        for layer in self.layers.values():
            f = layer.factor
            for (a, b), neuron in layer.phases.items():
                per_node[neuron.threshold] = counts[layer.name][:, :, a::f, b::f].contiguous()
        counted = out if before is None else out - before
        return SimResult(out, total, per_node, steps, total if program.output_spikes else counted)


def _sum(reads, cur: dict, prev: dict, shape: tuple[int, ...]) -> Tensor:
    """The summed input (a fresh tensor): back-edges read nothing at t = 0; zeros when nothing is there."""
    values = [value for item, delayed in reads if (value := prev.get(item) if delayed else cur[item]) is not None]
    if not values:
        return cur[INPUT].new_zeros(shape)
    total = values[0].clone()
    for value in values[1:]:
        total = total.add_(value)
    return total


# ---- fitting an op's blocks as one native convolution ---------------------------------------------
@dataclass(eq=False)
class _Conv:
    """A fitted native convolution: `conv(x) = F.conv2d / F.conv_transpose2d(pad(x), weight, bias) + extra`,
    with `bias` the per-channel part of the op's bias map and `extra` the rest (None when there is none)."""

    transposed: bool
    weight: Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]
    output_padding: tuple[int, int] = (0, 0)
    pad: tuple[int, int, int, int] | None = None  # explicit zero padding (negative: crop) around the result
    bias: Tensor | None = None
    extra: Tensor | None = None

    def __call__(self, s: Tensor, with_bias: bool = True) -> Tensor:
        bias = self.bias if with_bias else None
        if self.transposed:
            out = F.conv_transpose2d(s, self.weight, bias, self.stride, self.padding, self.output_padding)
        else:
            out = F.conv2d(s if self.pad is None else F.pad(s, self.pad), self.weight, bias, self.stride, self.padding)
        if self.transposed and self.pad is not None:
            out = F.pad(out, self.pad)
        return out if self.extra is None or not with_bias else out + self.extra

    def same_map(self, other: _Conv) -> bool:
        """Same weights and geometry: conv(a) + conv(b) = conv(a + b), up to the biases."""
        geometry = (self.transposed, self.stride, self.padding, self.output_padding, self.pad)
        return geometry == (other.transposed, other.stride, other.padding, other.output_padding, other.pad) and (
            self.weight.shape == other.weight.shape and torch.allclose(self.weight, other.weight, rtol=1e-5, atol=1e-6)
        )


def _fit(matrix: Tensor, src: tuple[int, ...], dst: tuple[int, ...], bias: Tensor) -> _Conv | None:
    """A strided or transposed convolution (B, *src) -> (B, *dst) equal to `matrix` (dst size x src size)
    plus the `bias` map (1, *dst)."""
    (ci, hi, wi), (co, ho, wo) = src, dst
    m = matrix.reshape(co, ho, wo, ci, hi, wi)
    per_channel = bias[0, :, :1, :1].expand_as(bias[0])
    fused, extra = (bias[0, :, 0, 0], None) if torch.equal(per_channel, bias[0]) else (None, bias)
    nz = m.abs().sum(dim=(0, 3)).nonzero()  # (y out, x out, y in, x in) with any weight
    if nz.numel() == 0:
        nz = torch.zeros(1, 4, dtype=torch.long)
    yo, xo, yi, xi = nz.unbind(1)
    if hi % ho == 0 and wi % wo == 0:  # convolution, stride hi/ho (1 when the sizes match)
        sy, sx = hi // ho, wi // wo
        dy, dx = yi - sy * yo, xi - sx * xo
        y0, x0 = int(dy.min()), int(dx.min())
        weight = m.new_zeros(co, ci, int(dy.max()) - y0 + 1, int(dx.max()) - x0 + 1)
        weight[:, :, dy - y0, dx - x0] = m[:, yo, xo, :, yi, xi].permute(1, 2, 0)
        kh, kw = weight.shape[2:]
        if y0 <= 0 and x0 <= 0 and (hi - 2 * y0 - kh) // sy + 1 == ho and (wi - 2 * x0 - kw) // sx + 1 == wo:
            return _Conv(False, weight, (sy, sx), (-y0, -x0), bias=fused, extra=extra)
        pad = (-x0, (wo - 1) * sx + kw - wi + x0, -y0, (ho - 1) * sy + kh - hi + y0)
        return _Conv(False, weight, (sy, sx), (0, 0), pad=pad, bias=fused, extra=extra)
    if ho % hi == 0 and wo % wi == 0:  # transposed convolution, stride ho/hi
        uy, ux = ho // hi, wo // wi
        dy, dx = yo - uy * yi, xo - ux * xi
        y0, x0 = int(dy.min()), int(dx.min())
        weight = m.new_zeros(ci, co, int(dy.max()) - y0 + 1, int(dx.max()) - x0 + 1)
        weight[:, :, dy - y0, dx - x0] = m[:, yo, xo, :, yi, xi].permute(2, 1, 0)
        kh, kw = weight.shape[2:]
        out_pad = (ho - ((hi - 1) * uy + 2 * y0 + kh), wo - ((wi - 1) * ux + 2 * x0 + kw))
        if y0 <= 0 and x0 <= 0 and 0 <= out_pad[0] < uy and 0 <= out_pad[1] < ux:
            return _Conv(True, weight, (uy, ux), (-y0, -x0), out_pad, bias=fused, extra=extra)
        pad = (x0, wo - x0 - (wi - 1) * ux - kw, y0, ho - y0 - (hi - 1) * uy - kh)
        return _Conv(True, weight, (uy, ux), (0, 0), pad=pad, bias=fused, extra=extra)
    return None


def _native_op(name: str, blocks, fns: dict, in_shape, factors: tuple[int, int], out_shape, like) -> _Conv:
    """The op as one convolution plus its bias map, fitted to its blocks run on one-hot inputs."""
    fi, fo = factors

    def blockwise(native: Tensor) -> Tensor:
        outs: dict[Phase, Tensor] = {}
        for node, (a, b), phase_out in blocks:
            value = fns[node](native[:, :, a::fi, b::fi])
            outs[phase_out] = value if phase_out not in outs else outs[phase_out] + value
        return native_layer(outs, fo)

    bias = blockwise(like.new_zeros(1, *in_shape))
    size = math.prod(in_shape)
    rows = []
    for start in range(0, size, PROBE_CHUNK):
        n = min(PROBE_CHUNK, size - start)
        eye = like.new_zeros(n, size)
        eye[torch.arange(n), torch.arange(start, start + n)] = 1
        rows.append((blockwise(eye.reshape(n, *in_shape)) - bias).flatten(1))
    conv = _fit(torch.cat(rows).T, tuple(in_shape), tuple(out_shape), bias)
    if conv is None:
        raise MpisError(f"op {name!r} maps {in_shape} to {out_shape}: not a strided or transposed convolution")
    spikes = (torch.rand(3, *in_shape, generator=torch.Generator().manual_seed(0)) < 0.3).to(like)
    if not torch.allclose(conv(spikes), blockwise(spikes), rtol=1e-4, atol=1e-4):
        raise MpisError(f"op {name!r}: its blocks do not form one native convolution")
    return conv


# ---- compiling ------------------------------------------------------------------------------------
def compile_native(program: Program) -> NativeProgram:
    """Rebuild `program`'s graph per layer and op in native layout. MpisError when the graph is not an mpis
    `exact` export (neurons I ⇄ Threshold with layer metadata, linear nodes with op metadata)."""
    graph = program.graph
    sources, targets = edges(graph)
    neurons = find_neurons(graph, sources, targets)
    like = torch.empty(0, device=program.device, dtype=program.dtype)
    shapes = program.node_shapes()
    steps = {s.node: s for s in program.steps}

    layers: dict[str, _Layer] = {}
    for neuron in neurons.values():
        meta = graph.nodes[neuron.threshold].metadata
        if "layer" not in meta:
            raise MpisError(f"neuron {neuron.threshold!r} has no layer metadata: not an mpis export")
        name, factor = str(meta["layer"]), int(meta.get("factor", 1))
        layers.setdefault(name, _Layer(name, factor, {})).phases[_phase(meta.get("phase", (0, 0)))] = neuron
    if not layers:
        raise MpisError("the graph has no mpis neurons to run in native layout")

    # every graph node that carries a value: (item, phase); the nodes whose sum is an item's phase
    where: dict[str, tuple[str, Phase]] = {program.input_node: (INPUT, (0, 0))}
    provides: dict[tuple[str, Phase], set[str]] = {(INPUT, (0, 0)): {program.input_node}}
    factors: dict[str, tuple[int, int]] = {}
    op_blocks: dict[str, list] = {}
    fused = {s for n in neurons.values() for s in n.feedback} | set(neurons)
    output_i = None
    output_inputs = sources[program.output_node]
    if len(output_inputs) == 1 and type(graph.nodes[output_inputs[0]]).__name__ == "I":
        output_i = output_inputs[0]
    for layer in layers.values():
        for phase, neuron in layer.phases.items():
            where[neuron.threshold] = (layer.name, phase)
            provides[(layer.name, phase)] = {neuron.threshold}
    for step in program.steps:
        node = graph.nodes[step.node]
        if step.node in fused or step.node in where or step.node == output_i:
            continue
        kind = type(node).__name__
        if kind not in STATELESS or kind == "Threshold":
            raise MpisError(f"node {step.node!r} ({kind}) is neither linear nor part of an mpis neuron")
        meta = node.metadata
        op = str(meta["op"]) if "op" in meta else step.node
        phase_in, phase_out = _phase(meta.get("in_phase", (0, 0))), _phase(meta.get("out_phase", (0, 0)))
        factors[op] = (int(meta.get("in_factor", 1)), int(meta.get("out_factor", 1)))
        op_blocks.setdefault(op, []).append((step.node, phase_in, phase_out))
        where[step.node] = (op, phase_out)
        provides.setdefault((op, phase_out), set()).add(step.node)

    def items_read(nodes: set[str], phase: Phase | None, reader: str) -> tuple[str, ...]:
        """The layers / ops whose phase `phase` the nodes sum to, each read whole (phase None: the nodes'
        own phase, for readers outside the polyphase layout)."""
        if any(n not in where for n in nodes):
            raise MpisError(f"node {reader!r} reads values that are not a layer or an op")
        by_item: dict[str, set[str]] = {}
        for n in nodes:
            by_item.setdefault(where[n][0], set()).add(n)
        for item, group in by_item.items():
            want = phase if phase is not None else where[next(iter(group))][1]
            if provides.get((item, want)) != group:
                raise MpisError(f"node {reader!r} reads part of {item!r} phase {want}")
        return tuple(sorted(by_item))

    def reads_of(step, skip=(), phase: Phase | None = None) -> tuple[tuple[str, bool], ...]:
        groups: dict[bool, set[str]] = {}
        for source, previous in step.inputs:
            if source not in skip:
                groups.setdefault(previous, set()).add(source)
        reads = [(item, previous) for previous, nodes in groups.items() for item in items_read(nodes, phase, step.node)]
        return tuple(sorted(reads))

    # ops: their source item and native shapes
    ops: dict[str, _Op] = {}
    fns = {n: STATELESS[type(graph.nodes[n]).__name__](graph.nodes[n], like) for b in op_blocks.values() for n, *_ in b}
    item_shape: dict[str, tuple[int, ...]] = {INPUT: tuple(program.input_shape)}
    for layer in layers.values():
        c, h, w = shapes[next(iter(layer.phases.values())).threshold]
        layer.shape = item_shape[layer.name] = (c, h * layer.factor, w * layer.factor)
    for op, blocks in op_blocks.items():  # in schedule order: a source op comes first
        fi, fo = factors[op]
        srcs = {items_read(set(sources[n]), p_in, n) for n, p_in, _ in blocks}
        if len(srcs) != 1 or any(prev for n, *_ in blocks for _, prev in steps[n].inputs):
            raise MpisError(f"op {op!r} must read the same layers or ops in every block, in the same step")
        source = srcs.pop()
        out_phase_shape = shapes[blocks[0][0]]
        out_shape = (
            (out_phase_shape[0], *(s * fo for s in out_phase_shape[1:]))
            if len(out_phase_shape) == 3
            else out_phase_shape
        )
        item_shape[op] = tuple(out_shape)
        if len(blocks) == 1 and fi == fo == 1:
            conv = _node_conv(graph.nodes[blocks[0][0]], like)
            apply = fns[blocks[0][0]]
        else:
            conv = apply = _native_op(op, blocks, fns, item_shape[source[0]], (fi, fo), out_shape, like)
        constant = all(s == INPUT or (s in ops and ops[s].constant) for s in source)
        ops[op] = _Op(op, source, tuple(out_shape), apply, constant, conv)

    for layer in layers.values():
        per_phase = {reads_of(steps[n.i], n.feedback, phase) for phase, n in layer.phases.items()}
        if len(per_phase) != 1:
            raise MpisError(f"the phases of layer {layer.name!r} read different maps")
        layer.reads, layer.merged = _merge(per_phase.pop(), ops, layer.shape, like)
        _neuron_parameters(layer, graph, like)
    if output_i is not None:
        output_reads = reads_of(steps[output_i])
        r = graph.nodes[output_i].r
        output_rate = tensor_of(np.broadcast_to(r, shapes[output_i]), like)
    else:
        output_reads = tuple((item, False) for item in items_read(set(output_inputs), None, program.output_node))
        output_rate = None
    output_shape = item_shape[output_reads[0][0]]
    needed = {item for layer in layers.values() for item, _ in layer.reads}
    needed |= {item for layer in layers.values() for m in layer.merged for item, _ in m.inputs}
    needed |= {item for item, _ in output_reads}
    for name in reversed(list(ops)):  # an op feeds only later ops: one backward pass finds every one needed
        if name in needed:
            needed |= set(ops[name].source)
    ops = {name: op for name, op in ops.items() if name in needed}
    return NativeProgram(program, layers, ops, _order(layers, ops), output_reads, output_rate, output_shape)


def _node_conv(node, like: Tensor) -> _Conv | None:
    """A plain NIR Conv2d node as a `_Conv` (so that it can merge with fitted ops of the same weights)."""
    if type(node).__name__ != "Conv2d" or isinstance(node.padding, str) or int(node.groups) != 1:
        return None
    if tuple(np.atleast_1d(node.dilation)) not in ((1,), (1, 1)):
        return None
    weight, bias = tensor_of(node.weight, like), tensor_of(node.bias, like)
    stride, padding = (tuple(int(v) for v in np.broadcast_to(np.atleast_1d(x), 2)) for x in (node.stride, node.padding))
    return _Conv(False, weight, stride, padding, bias=bias.expand(weight.shape[0]).contiguous())


def _merge(reads, ops: dict[str, _Op], shape, like: Tensor) -> tuple[tuple, tuple[_Merged, ...]]:
    """Split a layer's reads into plain ones and groups of ops with one convolution (conv(a) + conv(b) =
    conv(a + b): the model's single conv on a summed input, where the graph split it by source)."""
    groups: list[list[tuple[_Op, bool]]] = []
    plain = []
    for item, delayed in reads:
        op = ops.get(item)
        if op is None or op.conv is None:
            plain.append((item, delayed))
            continue
        for group in groups:
            if group[0][0].conv.same_map(op.conv):
                group.append((op, delayed))
                break
        else:
            groups.append([(op, delayed)])
    merged = []
    for group in groups:
        if len(group) == 1:
            plain.append((group[0][0].name, group[0][1]))
            continue

        def bias_sum(members) -> Tensor | None:
            total = None
            for op, _ in members:
                for part in (op.conv.bias, op.conv.extra):
                    if part is not None:
                        part = part.reshape(-1, 1, 1) if part.dim() == 1 else part[0]
                        total = part.expand(shape).clone() if total is None else total + part
            return total

        inputs = tuple((source, delayed) for op, delayed in group for source in op.source)
        first = bias_sum([m for m in group if not m[1]])
        merged.append(_Merged(group[0][0].conv, inputs, first, bias_sum(group)))
    return tuple(sorted(plain)), tuple(merged)


def _phase(value) -> Phase:
    a, b = (int(p) for p in np.atleast_1d(value))
    return a, b


def _neuron_parameters(layer: _Layer, graph, like: Tensor) -> None:
    """Threshold, integrator rate and feedback scales of every phase, assembled in native layout."""
    c, h, w = layer.shape[0], layer.shape[1] // layer.factor, layer.shape[2] // layer.factor

    def native(get) -> Tensor:
        phases = {phase: tensor_of(np.broadcast_to(get(n), (c, h, w)), like)[None] for phase, n in layer.phases.items()}
        return native_layer(phases, layer.factor)[0]

    def feedback(neuron, of_spikes: bool):
        for node, of in neuron.feedback.items():
            if (of == neuron.threshold) == of_spikes:
                return graph.nodes[node].scale
        return 0.0

    layer.threshold = native(lambda n: graph.nodes[n.threshold].threshold)
    if not all(is_ones(graph.nodes[n.i].r) for n in layer.phases.values()):
        layer.rate = native(lambda n: graph.nodes[n.i].r)
    for of_spikes, attribute in ((True, "spike_scale"), (False, "leak_scale")):
        if any((of == n.threshold) == of_spikes for n in layer.phases.values() for of in n.feedback.values()):
            setattr(layer, attribute, native(lambda n, s=of_spikes: feedback(n, s)))


def _order(layers: dict[str, _Layer], ops: dict[str, _Op]) -> tuple[str, ...]:
    """Non-constant ops and all layers, every same-step input before its reader."""
    needs = {name: set(op.source) for name, op in ops.items() if not op.constant}
    for name, layer in layers.items():
        reads = [*layer.reads, *(read for group in layer.merged for read in group.inputs)]
        needs[name] = {item for item, delayed in reads if not delayed}
    done = {INPUT} | {name for name, op in ops.items() if op.constant}
    order: list[str] = []
    while needs:
        ready = [name for name, items in needs.items() if items <= done]
        if not ready:
            raise MpisError(f"cannot order {', '.join(sorted(needs))}: their same-step inputs form a cycle")
        for name in ready:
            order.append(name)
            done.add(name)
            del needs[name]
    return tuple(order)
