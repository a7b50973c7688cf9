"""`--layout native` for ghost-layout files: the universal default file, `--target norse`, and the nirtorch
file of nets with odd maps (mpis.export.toolchains).

Such a file keeps every map of the loop on its finest grid (a layer at dilation D holds pixel i at D·i; the
other positions are ghosts that never fire) and writes each neuron layer as its target's pattern of helper
nodes. Run as written, every conv covers the whole grid and each layer costs four helper LIF nodes (README:
2–7× slower than the nirtorch file). Here each linear node runs only at the grid positions its readers use
(its lattice: multiples of a power of two), where a dilated conv is a plain conv, a read by a coarser map a
strided conv and a read of a coarser spike map an up-sampling (a transposed conv), and each declared layer
is one IF update on its own pixels: the model's resolution per map. Helper nodes that carry no layer's
input (each importer's threshold, the importer switch, ghost inhibition, sequencing convs of zeros) are not
run; constants are computed once. A relay (a strided fusion's phase split) is its layer's spikes on one
phase.

Same time semantics as `graph_layout.Program`. Before use, the compiled program runs beside the graph layout
on random inputs and must give every spike count of it (files with dyadic weights: exactly), so a file
that breaks an assumption here is refused rather than simulated wrongly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mpis.errors import MpisError
from mpis.spike.graph_layout import Program, SimResult, declared_spike_maps
from mpis.spike.nodes import STATELESS, diagonal_scale, tensor_of

CHECK_STEPS = 6  # steps of the compile-time comparison with the graph layout
CHECK_INPUTS = 2
LINEAR = ("Conv2d", "Affine", "Flatten")
Read = tuple[str, bool, Callable[[Tensor], Tensor]]  # (source, previous step, conversion to the reader's lattice)


def _bare(name: str) -> str:
    """A toolchain node's name without its execution-index prefix (`043_s1_l1.spikes` -> `s1_l1.spikes`)."""
    match = re.fullmatch(r"\d+_(.*)", name)
    return match.group(1) if match else name


@dataclass
class _Linear:
    """A linear node computed at its lattice: `apply(sum of its reads)`."""

    name: str
    reads: tuple[Read, ...]
    apply: Callable[[Tensor], Tensor] = field(repr=False)


@dataclass
class _Layer:
    """A declared neuron layer as one IF update with reset by subtraction on its own pixels."""

    name: str  # the declared spike node
    reads: tuple[Read, ...]
    threshold: Tensor  # (C, n, n): fires where the membrane is above it
    vth: float
    dilation: int
    ghost_shape: tuple[int, ...]  # the spike node's shape in the file


@dataclass
class LatticeProgram:
    """A ghost-layout graph at the model's resolution; `run` returns the graph layout's `SimResult`."""

    program: Program = field(repr=False)
    constants: dict[str, Tensor] = field(repr=False)
    per_input: tuple[str, ...]  # linear nodes that read only the input and constants
    order: tuple[str, ...]  # linear nodes and layers run every step, in the file's schedule
    items: dict[str, _Linear | _Layer] = field(repr=False)
    output: tuple[Read, ...]
    plays_frames: ClassVar[bool] = True  # `Program.run` hands it frame inputs too

    @torch.inference_mode()
    def run(self, x: Tensor, steps: int, burn_in: int = 0) -> SimResult:
        program = self.program
        x = x.to(program.device, program.dtype)
        frames = x.shape[1] if x.dim() == len(program.input_shape) + 2 else 0
        base = dict(self.constants)
        if not frames:
            self._per_input(base, x)
        v: dict[str, Tensor] = {}
        counts: dict[str, Tensor] = {}
        prev: dict[str, Tensor] = {}
        total = out = None
        for t in range(burn_in + steps):
            if burn_in and t == burn_in:
                counts, total = {}, None
            cur = dict(base)
            if frames:
                self._per_input(cur, x[:, t * frames // (burn_in + steps)])
            for name in self.order:
                item = self.items[name]
                charge = _summed(item.reads, cur, prev)
                if isinstance(item, _Linear):  # nothing to read yet (back-edges at t = 0): nothing to pass on
                    cur[name] = None if charge is None else item.apply(charge)
                    continue
                membrane = v.get(name)
                if membrane is None:
                    membrane = v[name] = torch.zeros(x.shape[0], *item.threshold.shape, device=x.device, dtype=x.dtype)
                if charge is not None:
                    membrane.add_(charge)
                if name in prev:
                    membrane.sub_(prev[name], alpha=item.vth)
                spikes = cur[name] = torch.gt(membrane, item.threshold).to(x.dtype)
                counts[name] = spikes.clone() if name not in counts else counts[name].add_(spikes)
            out = _summed(self.output, cur, prev)
            total = out.clone() if total is None else total.add_(out)
            prev = cur
        spike_counts = {}
        for name in program.spiking:
            layer = self.items[name]
            count = counts[name]
            full = count.new_zeros(count.shape[0], *layer.ghost_shape)
            d = layer.dilation
            size = count.shape[-1]
            full[..., : d * size : d, : d * size : d] = count
            spike_counts[name] = full
        return SimResult(out, total, spike_counts, steps, total)

    def _per_input(self, values: dict, x: Tensor) -> None:
        values[self.program.input_node] = x
        for name in self.per_input:
            node = self.items[name]
            values[name] = node.apply(_summed(node.reads, values, {}))


def _summed(reads: tuple[Read, ...], cur: dict, prev: dict) -> Tensor | None:
    total = None
    for source, previous, convert in reads:
        value = prev.get(source) if previous else cur[source]
        if value is None:
            continue
        value = convert(value)
        total = value if total is None else total + value
    return total


# ---- lattices -------------------------------------------------------------------------------------
def _convert(have: int, want: int, size: int) -> Callable[[Tensor], Tensor]:
    """A map of `size` grid positions held at lattice `have` (positions have·i), read at lattice `want`:
    a finer map is subsampled; a coarser one (a spike map, zero off its lattice) gets zeros inserted."""
    if have == want:
        return _identity
    if want % have == 0:
        r = want // have
        return lambda x: x[..., ::r, ::r]
    u, side = have // want, -(-size // want)

    def insert(x: Tensor) -> Tensor:
        out = x.new_zeros(*x.shape[:-2], side, side)
        out[..., ::u, ::u] = x
        return out

    return insert


def _identity(x: Tensor) -> Tensor:
    return x


def _pair(value) -> tuple[int, int]:
    a, b = (int(v) for v in np.broadcast_to(np.atleast_1d(value), 2))
    if a != b:
        raise MpisError("the lattice layout needs square strides, paddings and dilations")
    return a, b


def _conv_at(node, like: Tensor, out_lattice: int) -> tuple[int, Callable[[Tensor], Tensor]]:
    """A NIR Conv2d computed only at output positions that are multiples of `out_lattice`: the lattice it
    reads its input at, and the op on that lattice."""
    weight, bias = tensor_of(node.weight, like), tensor_of(node.bias, like)
    if int(node.groups) != 1 or isinstance(node.padding, str):
        raise MpisError("the lattice layout reads convs with groups 1 and numeric padding")
    (stride, _), (padding, _), (dilation, _) = _pair(node.stride), _pair(node.padding), _pair(node.dilation)
    kernel = weight.shape[-1]
    reads = math.gcd(stride * out_lattice, dilation if kernel > 1 else 0, padding)
    scale = diagonal_scale(weight, ((1, 1), (0, 0), (1, 1), 1)) if stride == 1 and not padding else None
    if scale is not None:
        shift = bias.view(1, -1, 1, 1)
        return reads, lambda x: x * scale + shift
    geometry = (stride * out_lattice // reads, padding // reads, dilation // reads if kernel > 1 else 1)
    return reads, lambda x: F.conv2d(x, weight, bias, geometry[0], geometry[1], geometry[2])


def _up_conv(node, like: Tensor, factor: int, out_size: int) -> Callable[[Tensor], Tensor]:
    """The conv on a map read with `factor`× zeros inserted (an up-sampling in the ghost layout) as one
    transposed conv of stride `factor`, cropped to the `out_size` positions of the conv's own lattice."""
    weight, bias = tensor_of(node.weight, like), tensor_of(node.bias, like).view(1, -1, 1, 1)
    flipped = weight.flip(-1, -2).transpose(0, 1).contiguous()
    start = weight.shape[-1] - 1 - _pair(node.padding)[0] // _pair(node.dilation)[0]
    end = start + out_size

    def up(x: Tensor) -> Tensor:
        full = F.conv_transpose2d(x, flipped, None, stride=factor)
        short = end - full.shape[-1]
        if short > 0:  # positions past the kernel's reach read only zeros
            full = F.pad(full, (0, short, 0, short))
        return full[..., start:end, start:end] + bias

    return up


# ---- compiling ------------------------------------------------------------------------------------
def is_ghost_file(graph) -> bool:
    """A file whose metadata places its layers on one grid (`layers.*.dilation`): what this layout reads."""
    layers = getattr(graph, "metadata", {}).get("layers", {})
    return bool(layers) and all(isinstance(i, dict) and "dilation" in i for i in layers.values())


def compile_lattice(program: Program) -> LatticeProgram:
    """Compile `program`'s ghost-layout graph at the model's resolution and check it against the graph layout
    (MpisError where the file is not one mpis writes, or the two disagree)."""
    try:
        return _compile(program)
    except (KeyError, IndexError, TypeError, ValueError) as err:  # metadata naming what the graph lacks
        raise MpisError(f"the file's metadata does not describe its graph ({type(err).__name__}: {err})") from None


def _compile(program: Program) -> LatticeProgram:
    graph = program.graph
    meta = graph.metadata
    like = torch.empty(0, device=program.device, dtype=program.dtype)
    shapes = program.node_shapes()
    steps = {s.node: s for s in program.steps}
    schedule = [s.node for s in program.steps]
    by_bare = {_bare(n): n for n in graph.nodes}
    declared = declared_spike_maps(graph)
    if not declared:
        raise MpisError("the file declares no neuron layers (metadata `layers`)")
    layer_of = {str(info["spikes"]): (layer, info) for layer, info in meta["layers"].items()}

    # terminals, with their lattice: the input, each declared layer's spikes, relays (a layer on one phase)
    lattice: dict[str, int] = {program.input_node: 1}
    for spikes, (_, info) in layer_of.items():
        lattice[spikes] = max(int(info["dilation"]), 1)
    relays: dict[str, tuple[str, int, int]] = {}
    for bare, name in by_bare.items():
        match = re.fullmatch(r"(.+)\.relay(\d)(\d)\.spikes", bare)
        if match and match.group(1) in meta["layers"]:
            relays[name] = (str(meta["layers"][match.group(1)]["spikes"]), int(match.group(2)), int(match.group(3)))
            lattice[name] = lattice[relays[name][0]]

    def layer_inputs(spikes: str) -> tuple[tuple[str, bool], ...]:
        layer = layer_of[spikes][0]
        inlet = by_bare.get(f"{layer}.i")
        if inlet is None:
            raise MpisError(f"layer {layer!r} has no integrator node {layer}.i")
        internal = {inlet, by_bare.get(f"{layer}.reset")}
        return tuple((s, p) for s, p in steps[inlet].inputs if s not in internal)

    wanted = {s: layer_inputs(s) for s in declared}
    wanted[program.output_node] = tuple((s, False) for s in _sources(graph, program.output_node))

    # the nodes that carry a layer's input or the output: linear, some of them constant
    seen: set[str] = set()
    stack = [s for reads in wanted.values() for s, _ in reads]
    while stack:
        name = stack.pop()
        if name in seen or name in lattice:
            continue
        seen.add(name)
        kind = type(graph.nodes[name]).__name__
        if kind not in LINEAR:
            raise MpisError(f"node {name!r} ({kind}) carries a layer's input but is not linear")
        if not _zero_weight(graph.nodes[name]):
            stack += [s for s, _ in steps[name].inputs]
    constant: dict[str, Tensor] = {}
    for name in schedule:  # zero-weight nodes (their bias) and what reads only constants, at full size
        if name not in seen:
            continue
        node, reads = graph.nodes[name], steps[name].inputs
        if _zero_weight(node):
            constant[name] = tensor_of(node.bias, like).reshape(1, -1, *[1] * (len(shapes[name]) - 1))
            constant[name] = constant[name].expand(1, *shapes[name]).contiguous()
        elif reads and all(s in constant and not p for s, p in reads):
            constant[name] = STATELESS[type(node).__name__](node, like)(sum(constant[s] for s, _ in reads))
    linear = [n for n in schedule if n in seen and n not in constant]

    # each linear node at the coarsest lattice its readers take (readers first)
    need: dict[str, int] = {}

    def take(source: str, at: int) -> None:
        if source not in lattice and source not in constant:
            need[source] = min(need.get(source, at), at)

    for spikes in declared:
        for source, _ in wanted[spikes]:
            take(source, lattice[spikes])
    for source, _ in wanted[program.output_node]:
        take(source, 1)
    reads_at: dict[str, int] = {}
    apply: dict[str, Callable[[Tensor], Tensor]] = {}
    for name in reversed(linear):
        node = graph.nodes[name]
        kind = type(node).__name__
        if kind == "Conv2d":
            reads_at[name], apply[name] = _conv_at(node, like, need.get(name, 1))
        elif need.get(name, 1) != 1:
            raise MpisError(f"node {name!r} ({kind}) is read on a lattice")
        else:
            reads_at[name], apply[name] = 1, STATELESS[kind](node, like)
        for source, _ in steps[name].inputs:
            take(source, reads_at[name])
        lattice[name] = need.get(name, 1)

    constants: dict[str, Tensor] = {}

    def reads_of(pairs, at: int, reader: str) -> tuple[Read, ...]:
        """`reader`'s reads at lattice `at`; a constant becomes its own value at that lattice (none if zero)."""
        out: list[Read] = []
        for source, previous in pairs:
            if source in constant:
                value = constant[source]
                if torch.any(value):
                    key = f"{source}@{at}"
                    constants[key] = value[..., ::at, ::at] if value.dim() == 4 else value
                    out.append((key, previous, _identity))
                continue
            have = lattice[source]
            if len(shapes[source]) != 3:
                out.append((source, previous, _identity))
            elif max(have, at) % min(have, at):
                raise MpisError(f"node {reader!r} reads {source!r} off its lattice")
            else:
                out.append((source, previous, _convert(have, at, shapes[source][-1])))
        return tuple(out)

    items: dict[str, _Linear | _Layer] = {}
    for name in linear:
        node, pairs, at = graph.nodes[name], steps[name].inputs, reads_at[name]
        source = pairs[0][0] if len(pairs) == 1 else None
        if source in lattice and lattice[source] > at == lattice[name] and type(node).__name__ == "Conv2d":
            # an up-sampling of a spike map: one transposed conv instead of a conv on inserted zeros
            up = _up_conv(node, like, lattice[source] // at, -(-shapes[name][-1] // at))
            items[name] = _Linear(name, reads_of(pairs, lattice[source], name), up)
        else:
            items[name] = _Linear(name, reads_of(pairs, at, name), apply[name])
    for spikes in declared:
        layer, info = layer_of[spikes]
        d, size = lattice[spikes], int(info["size"])
        threshold = _threshold(graph, by_bare, layer, shapes[spikes], d, size, like)
        reads = reads_of(wanted[spikes], d, spikes)
        items[spikes] = _Layer(spikes, reads, threshold, float(meta["vth"]), d, tuple(shapes[spikes]))
    for relay, (spikes, a, b) in relays.items():
        stride = math.isqrt(sum(1 for s, _, _ in relays.values() if s == spikes))
        side = items[spikes].threshold.shape[-1]
        mask = torch.zeros(side, side, dtype=like.dtype, device=like.device)
        mask[a::stride, b::stride] = 1
        items[relay] = _Linear(relay, ((spikes, False, _identity),), lambda x, m=mask: x * m)
    output = reads_of(wanted[program.output_node], 1, program.output_node)

    static = {program.input_node, *constants}
    per_input = []
    for name in linear:
        if all(source in static and not previous for source, previous, _ in items[name].reads):
            static.add(name)
            per_input.append(name)
    order = tuple(n for n in schedule if n in items and n not in static)
    compiled = LatticeProgram(program, constants, tuple(per_input), order, items, output)
    _check(program, compiled)
    return compiled


def _zero_weight(node) -> bool:
    return type(node).__name__ in ("Conv2d", "Affine") and not np.any(np.asarray(node.weight))


def _sources(graph, node: str) -> list[str]:
    return [a for a, b in graph.edges if b == node]


def _threshold(graph, by_bare: dict, layer: str, ghost_shape, dilation: int, size: int, like: Tensor) -> Tensor:
    """The layer's threshold on its own pixels: the universal file's Norse/Sinabs threshold (`.tn`), else the
    spiking node's (`.spikes`: Norse's LIF, or the standard Threshold)."""
    name = by_bare.get(f"{layer}.tn") or by_bare.get(f"{layer}.spikes")
    if name is None:
        raise MpisError(f"layer {layer!r} has no threshold node ({layer}.tn or {layer}.spikes)")
    node = graph.nodes[name]
    kind = type(node).__name__
    if kind == "LIF":
        value = node.v_threshold
    elif kind == "Threshold":
        value = node.threshold
    else:
        raise MpisError(f"layer {layer!r}: no threshold node (found {kind})")
    full = tensor_of(np.broadcast_to(np.asarray(value, dtype=np.float32), ghost_shape), like)
    return full[:, : dilation * size : dilation, : dilation * size : dilation].contiguous()


def _check(program: Program, compiled: LatticeProgram) -> None:
    """Run both layouts on random inputs (multiples of 2^-8, as pixels are) and require the same spikes."""
    generator = torch.Generator().manual_seed(0)
    x = torch.floor(torch.rand(CHECK_INPUTS, *program.input_shape, generator=generator) * 256) / 256
    x = x.to(program.device, program.dtype)
    native, program.native = program.native, None
    try:
        expected = program.run(x, CHECK_STEPS)
    finally:
        program.native = native
    try:
        got = compiled.run(x, CHECK_STEPS)
    except RuntimeError as err:  # shapes that do not fit: the file is not laid out as its metadata says
        raise MpisError(f"the file's maps do not fit its declared layers ({str(err).splitlines()[0]})") from None
    exact = bool(program.graph.metadata.get("weight_bits", 0))
    for name, count in expected.spike_counts.items():
        same = float((got.spike_counts[name] == count).double().mean())
        if same < (1.0 if exact else 0.999):
            raise MpisError(f"the native layout's spikes of {name!r} differ from the graph layout's ({same:.6f} equal)")
