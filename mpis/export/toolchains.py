"""NIR files for the toolchains' own importers (docs/toolchain-importers.md): `mpis export --target T`.

Those importers map only a few node types (Conv2d, Affine, Flatten, IF / LIF) and, except nirtorch 2.6,
run the graph in depth-first order from the input. So this file differs from the exact flavour in three
ways, each exact for mpis's spikes:

- **Ghost layout.** Every map of the equilibrium loop lives on the loop's finest grid (N×N): a map of
  size n at dilation D holds its pixel i at D·i, and the other positions are ghosts. A strided conv is
  then a dilated stride-1 conv, and an up-sampling (transposed conv, nearest) is a stride-1 conv on the
  zero-inserted map that the ghosts of a spike map are, as long as ghost neurons never fire (their
  threshold is out of reach, or, for targets with one threshold per node, an inhibition that is exactly
  0 on real pixels). Kernels stay the model's own: no polyphase blocks, odd sizes allowed.
- **A schedule every importer walks alike.** Nodes are named by execution index (nirtorch 2.6 and mpis
  run them in name order); for depth-first importers each node's first edge leads to the next node of
  the schedule, through an all-zero "sequencing" conv where the network has no edge of its own.
- **Fused sums read as spikes are.** Where a net fuses after the last FEB layer (the CIFAR nets), a Trans
  map up-samples a sum, not spikes; the sum is kept exactly 0 off its grid: fusion biases are painted on
  the grid, and a strided fusion reads its layer's spikes split by phase (`relays`).
- **No first-step deficit.** A back-edge reads nothing at t = 0, where the model has the Trans map's
  response to the zero state (its bias). The bias is moved out of the back-edge into a forward constant,
  so thresholds stay the model's own.

Neurons are written per target as the pattern that target's importer turns into a non-leaky
integrate-and-fire neuron with reset by subtraction (`NEURON_RECIPES`), and weights are dyadic
(`fixed_point`), so that every importer's sums are exact whatever their order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mpis.errors import MpisError
from mpis.export import DEFAULT_WEIGHT_BITS, TOOLCHAIN_TARGETS
from mpis.export.fixed_point import Grid, dyadic_copy
from mpis.model.layers import NearestUp
from mpis.model.network import MPISNet

SINABS_MEMORYLESS_TAU = 1e-3  # Sinabs: alpha = exp(−1/tau) = 0 in float32: the LIF forgets every step
GHOST_INHIBITION = 2.0**30  # per step on a ghost's input: no real input brings it back to a threshold
GHOST_THRESHOLD = 1e30  # out of reach: a ghost neuron's membrane grows by at most T·|input|
NORSE_DT = 0.001  # norse.torch.from_nir's default dt: LIF(tau = dt) is then memoryless
SNNTORCH_DT = 1e-4  # snntorch.import_nir's fixed dt
SNNTORCH_TAU_SYN = 1e20  # snnTorch: alpha = 1 − dt/tau_syn = 1.0 in float: the synaptic current integrates
# What a universal file assumes of its readers, written into its metadata for a user who only has the file.
UNIVERSAL_READING = (
    "nir.read(path, type_check=False); then norse.torch.from_nir(graph) at its default dt = 1e-3 (another dt "
    "gives wrong spikes), snntorch.import_nir.import_from_nir(graph), or sinabs.from_nir(graph, batch_size=B). "
    "It relies on Norse and Sinabs ignoring an LIF's r and on snnTorch dividing its threshold by r*dt/tau "
    "(mpis docs/one-nir-file.md); the reference recordings beside it check an import"
)
RELAY_THRESHOLD = 0.5  # a relay's membrane is a whole number of spikes: it fires on 1, not on 0
SWITCH_INHIBITION = 2.0**20  # silences the threshold branch of the importers that do not run it
Shape = tuple[int, ...]


def _np(t: Tensor | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(t.detach().cpu() if isinstance(t, Tensor) else t, dtype=np.float32))


@dataclass(frozen=True)
class Geometry:
    """Where a map lives: `size` pixels per side at `dilation` on a `grid`-wide plane (dilation 0: a
    native map outside the loop, stored as is)."""

    channels: int
    size: int
    dilation: int
    grid: int

    @property
    def shape(self) -> Shape:
        side = self.grid if self.dilation else self.size
        return (self.channels, side, side)

    def real(self) -> np.ndarray:
        """Mask of the positions that hold pixels (all of them for a native map)."""
        mask = np.zeros(self.shape[1:], dtype=bool)
        step = self.dilation or 1
        mask[: step * self.size : step, : step * self.size : step] = True
        return mask

    def to_native(self, x: Tensor) -> Tensor:
        """(…, C, grid, grid) -> (…, C, size, size)."""
        step = self.dilation or 1
        return x[..., : step * self.size : step, : step * self.size : step]


@dataclass
class NeuronNodes:
    """One neuron layer as a target writes it: nodes in order, forward and back edges, the integrator
    that sums the layer's input, the node whose output is its spikes, and (targets without per-pixel
    thresholds) the node that takes the ghost inhibition."""

    nodes: dict[str, object]
    edges: list[tuple[str, str]]
    back: list[tuple[str, str]]
    inlet: str
    spikes: str
    gates: tuple[str, ...] = ()  # nodes that take the ghost inhibition
    switched: tuple[tuple[str, str], ...] = ()  # (node, "on" | "off"): −2^20 while the importer switch is so


@dataclass
class Recipe:
    """How one target writes a neuron layer: `build(nir, name, shape, threshold, vth, step)`."""

    build: Callable[..., NeuronNodes]
    about: str
    type_checked: bool = True  # the target's nir version type-checks the file (False: parameters broadcast)
    nir_104: bool = False  # written for nir <= 1.0.4 (Sinabs): no `v_reset` dataset
    switch: bool = False  # the file carries the importer switch (`_universal_neuron`)


def _diagonal(nir, shape: Shape, value: float, stride: int = 1):
    """A 1×1 conv multiplying each channel by `value`: dense, because the importers build
    `Conv2d(in_channels=weight.shape[1], groups=g)`, which is wrong for any g > 1."""
    channels = shape[0]
    weight = (value * np.eye(channels, dtype=np.float32))[:, :, None, None]
    return nir.Conv2d(
        input_shape=shape[1:],
        weight=weight,
        stride=stride,
        padding=0,
        dilation=1,
        groups=1,
        bias=np.zeros(channels, dtype=np.float32),
    )


def _norse_neuron(nir, name: str, shape: Shape, threshold: np.ndarray, vth: float, step: float):
    """Norse maps IF to reset-to-zero; subtract reset is: a depthwise identity conv with a self-loop as
    the integrator, LIF(tau = dt) as a memoryless threshold on it, a depthwise −Vth conv as the reset."""
    ones = np.ones(shape, dtype=np.float32)
    inlet, spikes, reset = f"{name}.i", f"{name}.spikes", f"{name}.reset"
    nodes = {
        inlet: _diagonal(nir, shape, 1.0),
        spikes: nir.LIF(tau=NORSE_DT * ones, r=ones, v_leak=0 * ones, v_threshold=threshold, v_reset=0 * ones),
        reset: _diagonal(nir, shape, -vth),
    }
    return NeuronNodes(nodes, [(inlet, spikes), (spikes, reset)], [(inlet, inlet), (reset, inlet)], inlet, spikes)


def _sinabs_neuron(nir, name: str, shape: Shape, threshold: np.ndarray, vth: float, step: float):
    """Sinabs maps LI (tau = inf) to an integrator, but its spiking neurons fire trunc(v/θ) spikes (v ≥ θ),
    and its LIF and LI take only parameters that are scalars per row or column (`any(v_leak)` on an
    array). One spike per step from the integrator u: k = MS_θ₁(a) with a memoryless LIF, θ₁ = θ + one
    membrane step (u > θ ⟺ u ≥ θ₁ on the membrane's grid) and a = u + the ghost inhibition (0 on real
    pixels, `gate`); then s = k − MS_1(k − 1), exact because k is an integer; reset −Vth·s."""
    channels = shape[0]
    one = np.ones(1, dtype=np.float32)
    level = float(np.min(threshold)) + step  # θ₁ of the real neurons (ghosts are gated instead)
    inlet, gate, count, shifted, capped, negated = (
        f"{name}.{part}" for part in ("i", "gate", "count", "shifted", "capped", "neg")
    )
    spikes, reset = f"{name}.spikes", f"{name}.reset"

    def memoryless(level: float):
        return nir.LIF(tau=SINABS_MEMORYLESS_TAU * one, r=one, v_leak=0 * one, v_threshold=level * one, v_reset=0 * one)

    shift = _diagonal(nir, shape, 1.0)
    shift.bias = np.full(channels, -1.0, dtype=np.float32)
    nodes = {
        inlet: nir.LI(tau=np.full(1, np.inf, dtype=np.float32), r=one, v_leak=0 * one),
        gate: _diagonal(nir, shape, 1.0),
        count: memoryless(level),
        shifted: shift,
        capped: memoryless(1.0),
        negated: _diagonal(nir, shape, -1.0),
        spikes: _diagonal(nir, shape, 1.0),
        reset: _diagonal(nir, shape, -vth),
    }
    edges = [
        (inlet, gate),
        (gate, count),
        (count, shifted),
        (shifted, capped),
        (capped, negated),
        (count, spikes),
        (negated, spikes),
        (spikes, reset),
    ]
    return NeuronNodes(nodes, edges, [(reset, inlet)], inlet, spikes, (gate,))


def _snntorch_neuron(nir, name: str, shape: Shape, threshold: np.ndarray, vth: float, step: float):
    """snnTorch maps IF to Leaky(beta = 0.9) and takes one threshold per node. CubaLIF with tau_syn → ∞
    (alpha = 1: the synaptic current is the integrator), tau_mem = dt (beta = 0: the membrane is that
    current) and w_in = tau_syn / dt (input scale 1) becomes `snn.Synaptic`, which fires while the
    integral is > θ; the reset is a −Vth conv back into it. Ghosts are inhibited (`gate`)."""
    ones = np.ones(shape, dtype=np.float32)
    spikes, reset = f"{name}.spikes", f"{name}.reset"
    nodes = {
        spikes: nir.CubaLIF(
            tau_syn=SNNTORCH_TAU_SYN * ones,
            tau_mem=SNNTORCH_DT * ones,
            r=ones,
            v_leak=0 * ones,
            v_threshold=float(np.min(threshold)) * ones,  # the real neurons' θ (ghosts are gated instead)
            w_in=(SNNTORCH_TAU_SYN / SNNTORCH_DT) * ones,
        ),
        reset: _diagonal(nir, shape, -vth),
    }
    return NeuronNodes(nodes, [(spikes, reset)], [(reset, spikes)], spikes, spikes, gates=(spikes,))


def _nirtorch_neuron(nir, name: str, shape: Shape, threshold: np.ndarray, vth: float, step: float):
    """Standard NIR (docs/nir-mapping.md §2): I integrator, Threshold, Scale(−Vth) reset feedback; what
    nirtorch 2.6 with mpis's node map and `mpis simulate` run exactly."""
    from mpis.export.nir_nodes import subtract_reset_if

    nodes, edges = subtract_reset_if(name, shape, vth)
    nodes[f"{name}.spikes"].threshold = threshold.astype(np.float32)
    back = [e for e in edges if e[1] == f"{name}.i"]
    return NeuronNodes(nodes, [e for e in edges if e not in back], back, f"{name}.i", f"{name}.spikes")


NORSE_TAU, SNNTORCH_TAU = NORSE_DT, SNNTORCH_DT  # memoryless LIF time constants at each importer's dt


def _lif(nir, tau: float, r: float, threshold: float):
    """An LIF with parameters of shape (1,): Sinabs (`any(node.v_leak)`) cannot read any other shape."""
    one = np.ones(1, dtype=np.float32)
    return nir.LIF(tau=tau * one, r=r * one, v_leak=0 * one, v_threshold=threshold * one, v_reset=0 * one)


def _universal_neuron(nir, name: str, shape: Shape, threshold: np.ndarray, vth: float, step: float):
    """One pattern that Norse, snnTorch and Sinabs each run, with their defaults, as IF with reset by
    subtraction (docs/one-nir-file.md). The integrator is a 1×1 identity conv with a self-loop. No LIF is
    memoryless in both Norse (dt 1e-3) and snnTorch (dt 1e-4), so the file carries one threshold for each,
    and the importer switch (`on`: 1 in Norse and Sinabs, 0 in snnTorch) silences the other: `tn`
    (tau 1e-3) for Norse and Sinabs, with Sinabs' multi-spike count k capped to one spike (k − MS_1(k − 1),
    0 elsewhere); `ts` (tau 1e-4) for snnTorch, whose spikes pass a gate `gs` that discards what the
    unstable `ts` emits in Norse. Thresholds sit half a membrane step above θ, so that `>` (Norse,
    snnTorch) and `≥` (Sinabs) agree."""
    channels = shape[0]
    level = float(np.min(threshold)) + step / 2  # the real neurons' θ (ghosts are gated instead)
    inlet, tn, km1, cap, negcap, ts, gs, spikes, reset = (
        f"{name}.{part}" for part in ("i", "tn", "km1", "cap", "negcap", "ts", "gs", "spikes", "reset")
    )
    minus_one = _diagonal(nir, shape, 1.0)
    minus_one.bias = np.full(channels, -1.0, dtype=np.float32)
    nodes = {
        inlet: _diagonal(nir, shape, 1.0),
        tn: _lif(nir, NORSE_TAU, 10.0, level),
        km1: minus_one,
        cap: _lif(nir, NORSE_TAU, 10.0, 1.0),
        negcap: _diagonal(nir, shape, -1.0),
        ts: _lif(nir, SNNTORCH_TAU, 1.0, level),
        gs: _lif(nir, NORSE_TAU, 10.0, 0.5),
        spikes: _diagonal(nir, shape, 1.0),
        reset: _diagonal(nir, shape, -vth),
    }
    edges = [
        (inlet, tn),
        (tn, km1),
        (km1, cap),
        (cap, negcap),
        (inlet, ts),
        (ts, gs),
        (tn, spikes),
        (negcap, spikes),
        (gs, spikes),
        (spikes, reset),
    ]
    switched = ((tn, "off"), (ts, "on"), (gs, "on"))
    return NeuronNodes(nodes, edges, [(inlet, inlet), (reset, inlet)], inlet, spikes, (tn, ts), switched)


NEURON_RECIPES = {
    "nirtorch": Recipe(_nirtorch_neuron, "standard I / Threshold / Scale nodes (nirtorch 2.6, mpis simulate)"),
    "norse": Recipe(_norse_neuron, "norse.torch.from_nir (Norse 1.1): LIF(tau = dt) threshold on an integrator"),
    "sinabs": Recipe(
        _sinabs_neuron,
        "sinabs.from_nir (Sinabs 3.1, nir <= 1.0.4): LI integrator, two multi-spike LIF for one spike",
        type_checked=False,
        nir_104=True,
    ),
    "snntorch": Recipe(_snntorch_neuron, "snntorch.import_nir (snnTorch 1.0): CubaLIF integrator (alpha 1, beta 0)"),
    "universal": Recipe(
        _universal_neuron,
        "one file for Norse, snnTorch and Sinabs: both thresholds and an importer switch (read it with "
        "nir.read(f, type_check=False))",
        type_checked=False,
        nir_104=True,
        switch=True,
    ),
}
TARGETS = TOOLCHAIN_TARGETS
assert set(TARGETS) < set(NEURON_RECIPES)


@dataclass
class ToolchainExport:
    """The graph plus what a runner needs to read spikes back in the model's own layout."""

    graph: object
    target: str
    spike_nodes: dict[str, str]  # model neuron layer -> NIR node emitting its spikes
    geometries: dict[str, Geometry]  # model neuron layer -> where its pixels are
    sequencing: int  # all-zero convs added for depth-first importers
    nir_params: int
    source_params: int
    net: MPISNet  # the folded, dyadic net the file was written from: its spikes are the reference
    fewest_bits: int = 0  # the fewest significant bits an op kept (0: float weights)

    @property
    def growth(self) -> float:
        return self.nir_params / self.source_params


@dataclass
class _Builder:
    """Walks `net.graph` once, in its order, emitting NIR nodes in execution order."""

    net: MPISNet
    recipe: Recipe
    v_init: float | None
    grids: dict[str, Grid] | None  # None: float weights
    order: list[str] = field(default_factory=list)
    nodes: dict[str, object] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)
    back: set[tuple[str, str]] = field(default_factory=set)
    out_shape: dict[str, Shape] = field(default_factory=dict)
    in_shape: dict[str, Shape] = field(default_factory=dict)
    late: set[str] = field(default_factory=set)
    geometry: dict[str, Geometry] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)  # model map -> NIR nodes summing to it
    inlets: dict[str, str] = field(default_factory=dict)  # model neuron layer -> its integrator
    planes: dict[str, str] = field(default_factory=dict)  # painted constant planes by name (see `paint`)
    relay_nodes: dict[tuple[str, int], dict[tuple[int, int], str]] = field(default_factory=dict)
    spike_nodes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import nir

        self.nir = nir
        self.loop = {n.name for n in self.net.loop_nodes}
        if any(n.shape[1] != n.shape[2] for n in self.net.graph.nodes if len(n.shape) == 3):
            raise MpisError("toolchain export needs square maps")
        self.grid = max(n.shape[-1] for n in self.net.loop_nodes)

    # ---- geometry --------------------------------------------------------------------------
    def place_maps(self) -> None:
        """Dilation of every map: strides multiply it, up-sampling divides it; a Trans map (read from the
        previous step's state) is placed once its state is."""
        pending = [n for n in self.net.graph.nodes if n.kind != "head"]
        while pending:
            placed = [node for node in pending if self.place(node)]
            if not placed:
                raise MpisError("toolchain export: cannot place the loop's maps on one grid")
            pending = [node for node in pending if node not in placed]

    def place(self, node) -> bool:
        channels, size = node.shape[0], node.shape[-1]
        if node.name not in self.loop:
            self.geometry[node.name] = Geometry(channels, size, 0, self.grid)
            return True
        placed = [s for s in (*node.inputs, *node.delayed) if s in self.geometry]
        if placed:
            dilation = self.geometry[placed[0]].dilation or 1
            if node.kind in ("conv", "linear"):
                for op in _chain(self.net.ops[node.name]):
                    dilation = _out_dilation(op, dilation)
        elif node.delayed:  # a Trans map: the input of its stream's first layer, placed by its size
            dilation = next(d for d in (2**k for k in range(self.grid.bit_length() + 1)) if d * size >= self.grid)
        else:
            return False
        geo = Geometry(channels, size, dilation, self.grid)
        if not geo.dilation * (geo.size - 1) < self.grid <= geo.dilation * geo.size:
            raise MpisError(
                f"toolchain export: {node.name} ({size}x{size}) does not fit a {self.grid}x{self.grid} grid"
            )
        self.geometry[node.name] = geo
        return True

    # ---- nodes and edges ---------------------------------------------------------------------
    def add(self, name: str, node: object, in_shape: Shape, out_shape: Shape, late: bool = False) -> str:
        if name in self.nodes:
            raise MpisError(f"toolchain export: node {name} emitted twice")
        self.nodes[name] = node
        self.order.append(name)
        self.in_shape[name], self.out_shape[name] = tuple(in_shape), tuple(out_shape)
        if late:
            self.late.add(name)
        return name

    def connect(self, source: str, target: str, back: bool = False) -> None:
        self.edges.append((source, target))
        if back or (source in self.late and target not in self.late):
            self.back.add((source, target))

    def conv(self, name: str, op: nn.Module, source: str, geo_in: Geometry, geo_out: Geometry, bias: bool, late: bool):
        """Add `op` applied to the NIR node `source` as one Conv2d on the ghost grid (ops outside the loop
        are copied as they are); returns the new node's name."""
        nir = self.nir
        weight, bias_values = _weight_bias(op, geo_in.channels)
        if not bias:
            bias_values = torch.zeros_like(bias_values)
        if not geo_out.dilation:
            stride, padding, dilation = op.stride[0], op.padding[0], 1
        else:
            d_in = geo_in.dilation or 1
            if isinstance(op, nn.ConvTranspose2d):
                if op.padding[0] * 2 != op.kernel_size[0] - 1 or op.dilation[0] != 1:
                    raise MpisError("toolchain export needs transposed convs with padding (kernel − 1) / 2")
                dilation = d_in // op.stride[0]
                weight, padding = weight.flip(-1, -2).transpose(0, 1), dilation * op.padding[0]
            elif isinstance(op, NearestUp):
                dilation, kernel = d_in // op.factor, 2 * op.factor - 1
                weight = torch.zeros(geo_in.channels, geo_in.channels, kernel, kernel)
                channel = torch.arange(geo_in.channels)
                weight[channel, channel, : op.factor, : op.factor] = 1.0  # a pixel's block: offsets 0 … −(f−1)·d
                padding = dilation * (op.factor - 1)
            else:
                dilation, padding = d_in, d_in * op.padding[0]
            stride = 1
        node = nir.Conv2d(
            input_shape=geo_in.shape[1:],
            weight=_np(weight),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=1,
            bias=_np(bias_values),
        )
        self.add(name, node, geo_in.shape, geo_out.shape, late)
        self.connect(source, name)
        return name

    def chain(self, model_node, term: int, source_map: str, source: str, bias: bool, late: bool) -> str:
        """`model_node`'s op chain applied to one term of its input; returns the last node."""
        ops = _chain(self.net.ops[model_node.name])
        geo = self.geometry[source_map]
        current = source
        for i, op in enumerate(ops):
            last = i == len(ops) - 1
            if last:
                geo_next = self.geometry[model_node.name]
            else:
                d = _out_dilation(op, geo.dilation or 1)
                geo_next = Geometry(_weight_bias(op, geo.channels)[1].numel(), -(-self.grid // d), d, self.grid)
            name = f"{model_node.name}.{'late' if late else 'in'}{term}" + ("" if last else f".{i}")
            current = self.conv(name, op, current, geo, geo_next, bias, late)
            geo = geo_next
        return current

    def emit_linear(self, node) -> None:
        """`node`'s op applied to each forward term of its input (op(a + b) = op(a) + op(b)); the bias is
        added once, on a forward term, so the first step has it too. A node read only through a back-edge
        (a Trans map) gets its bias as a forward constant now and its state term when the state exists."""
        self.sources[node.name] = []
        terms = [(s, n) for s in node.inputs for n in self.sources[s]]
        for k, (source_map, source) in enumerate(terms):
            self.sources[node.name].append(self.chain(node, k, source_map, source, bias=k == 0, late=False))
        if not terms:
            self.sources[node.name].append(self.bias_constant(node))

    def bias_constant(self, node) -> str:
        """The op's response to a zero input: an all-zero conv (with the op's bias) from the node emitted
        just before, so that its edge is also the schedule's next step."""
        ops = _chain(self.net.ops[node.name])
        if len(ops) != 1:
            raise MpisError("toolchain export: a back-edge map made of more than one op")
        previous = self.order[-1]
        bias = _weight_bias(ops[0], self.geometry[node.name].channels)[1]
        shape = self.geometry[node.name].shape
        name = self.add(
            f"{node.name}.bias",
            _zero_conv(self.nir, self.out_shape[previous], shape, bias),
            self.out_shape[previous],
            shape,
        )
        self.connect(previous, name)
        return name

    def emit_late(self, node) -> None:
        """A back-edge map's state term: its op (no bias) on the previous step's state, then on through
        every op that reads it, into the integrators that were emitted before (back-edges)."""
        for k, source in enumerate(self.sources[node.delayed[0]]):
            late = self.chain(node, k, node.delayed[0], source, bias=False, late=True)
            self.propagate(node.name, late, k)

    def propagate(self, map_name: str, late: str, k: int) -> None:
        for reader in self.net.graph.nodes:
            if map_name not in reader.inputs:
                continue
            if reader.kind == "neuron":
                self.connect(late, self.inlets[reader.name])
            elif reader.kind == "sum":
                self.propagate(reader.name, late, k)
            elif reader.kind in ("conv", "linear"):
                out = self.chain(reader, k, map_name, late, bias=False, late=True)
                self.propagate(reader.name, out, k)
            else:
                raise MpisError("toolchain export: the classifier reads a back-edge map")

    def emit_neuron(self, node) -> None:
        geo = self.geometry[node.name]
        threshold = np.full(geo.shape, GHOST_THRESHOLD, dtype=np.float32)
        v0 = self.initial_potential(node.name, node.shape)
        step = 2.0 ** -self.grids[node.inputs[0]].fraction if self.grids else 0.0  # the membrane's resolution
        shifted = self.net.neuron.vth - v0
        if step and not np.array_equal(np.round(shifted / step) * step, shifted):
            raise MpisError(f"{node.name}: Vth − v_init = {shifted.flat[0]:g} is not on the membrane's 2^-k grid")
        threshold[:, geo.real()] = shifted.reshape(geo.channels, -1)
        ghosts = (lambda: self.ghost_map(geo.dilation)) if geo.dilation > 1 else None
        built = self.emit_pattern(node.name, geo, threshold, self.net.neuron.vth, step, ghosts)
        for source in self.sources[node.inputs[0]]:
            self.connect(source, built.inlet)
        self.inlets[node.name] = built.inlet
        self.sources[node.name] = [built.spikes]
        self.spike_nodes[node.name] = built.spikes

    def emit_pattern(
        self,
        name: str,
        geo: Geometry,
        threshold: np.ndarray,
        vth: float,
        step: float,
        plane: Callable[[], str] | None,
    ) -> NeuronNodes:
        """One neuron layer in the target's pattern; `plane()` (0 where the layer's neurons are, −2^30
        elsewhere; built only if needed) inhibits the others in targets with one threshold per node. Its
        inputs are the caller's to connect."""
        built = self.recipe.build(self.nir, name, geo.shape, threshold, vth, step)
        inhibition = self.ghost_inhibition(name, geo, plane()) if built.gates and plane is not None else []
        kinds = sorted({kind for _, kind in built.switched})  # a fixed order: the same file in every process
        silences = {kind: self.switch_silence(name, kind, geo.shape) for kind in kinds}
        for part, nir_node in built.nodes.items():
            self.add(part, nir_node, geo.shape, geo.shape)
        for source in inhibition:
            for gate in built.gates:
                self.connect(source, gate)
        for target, kind in built.switched:
            self.connect(silences[kind], target)
        for edge in built.edges:
            self.connect(*edge)
        for edge in built.back:
            self.connect(*edge, back=True)
        return built

    def ghost_inhibition(self, name: str, geo: Geometry, plane: str) -> list[str]:
        """A conv that is 0 on a layer's real pixels and −2^30 on its ghosts, for targets whose neurons take
        one threshold per node (or per row or column) only: `plane` (`ghost_map`) spread to its channels."""
        weight = np.ones((geo.channels, 1, 1, 1), dtype=np.float32)
        conv = self.nir.Conv2d(
            input_shape=(self.grid, self.grid),
            weight=weight,
            stride=1,
            padding=0,
            dilation=1,
            groups=1,
            bias=np.zeros(geo.channels, dtype=np.float32),
        )
        self.add(f"{name}.ghosts", conv, self.out_shape[plane], geo.shape)
        self.connect(plane, f"{name}.ghosts")
        return [f"{name}.ghosts"]

    def ghost_map(self, dilation: int) -> str:
        """One plane per dilation, 0 where row and column are multiples of it, else −2^30: a 1×1 constant
        (an all-zero conv with bias 1 from the node emitted before) through one grid×grid conv with padding
        grid − 1, which paints its kernel, flipped, onto the plane — a constant pattern made of nodes that
        every importer maps, with no per-pixel parameter."""
        real = Geometry(1, -(-self.grid // dilation), dilation, self.grid).real()
        return self.paint(f"mask{dilation}.ghosts", np.where(real, 0.0, -GHOST_INHIBITION))

    def paint(self, name: str, pattern: np.ndarray) -> str:
        """A constant (1, grid, grid) plane holding `pattern`: a 1×1 constant (an all-zero conv with bias 1
        from the node emitted before) through one grid×grid conv with padding grid − 1, which paints its
        kernel, flipped, onto the plane. Built once per name."""
        if name in self.planes:
            return self.planes[name]
        nir, grid = self.nir, self.grid
        previous, unit, plane = self.order[-1], (1, 1, 1), (1, grid, grid)
        constant = _zero_conv(nir, self.out_shape[previous], unit, torch.ones(1))
        one = self.add(f"{name.rsplit('.', 1)[0]}.one", constant, self.out_shape[previous], unit)
        self.connect(previous, one)
        paint = nir.Conv2d(
            input_shape=unit[1:],
            weight=np.ascontiguousarray(pattern.astype(np.float32)[::-1, ::-1][None, None]),
            stride=1,
            padding=grid - 1,
            dilation=1,
            groups=1,
            bias=np.zeros(1, dtype=np.float32),
        )
        self.planes[name] = self.add(name, paint, unit, plane)
        self.connect(one, name)
        return name

    # ---- fusion after the last FEB layer --------------------------------------------------------
    def emit_fusion(self, node) -> None:
        """A fusion op whose output joins a sum that a Trans map reads through a back-edge. Up-sampling reads
        that sum, so the sum must be exactly 0 off its grid (as spike maps are): the op's bias is painted on
        its grid only, and a strided op reads its layer's spikes split by phase (`relays`), each phase
        through the taps that reach the output grid from it, so that off-grid outputs read nothing."""
        ops = _chain(self.net.ops[node.name])
        source_map = node.inputs[0] if len(node.inputs) == 1 else ""
        if len(ops) != 1 or self.net.graph.node(source_map).kind != "neuron":
            raise MpisError(
                f"toolchain export: {node.name}, a fusion after the last FEB layer, must be one op on one layer's "
                "spikes (two-stream nets)"
            )
        op, geo_in, geo_out = ops[0], self.geometry[source_map], self.geometry[node.name]
        terms = []
        stride = op.stride[0] if isinstance(op, nn.Conv2d) else 1
        if stride > 1:
            for (a, b), relay in self.relays(source_map, stride).items():
                phase = nn.Conv2d(op.in_channels, op.out_channels, op.kernel_size, op.stride, op.padding, bias=False)
                with torch.no_grad():
                    phase.weight.copy_(op.weight * _taps_from_phase(op, a, b))
                terms.append(self.conv(f"{node.name}.phase{a}{b}", phase, relay, geo_in, geo_out, False, False))
        else:
            terms.append(self.conv(f"{node.name}.in0", op, self.sources[source_map][0], geo_in, geo_out, False, False))
        bias = _weight_bias(op, geo_out.channels)[1]
        if bool(bias.ne(0).any()):
            terms.append(self.bias_on_grid(node.name, bias, geo_out))
        self.sources[node.name] = terms

    def bias_on_grid(self, name: str, bias: Tensor, geo: Geometry) -> str:
        """`bias` on the real pixels of `geo` and 0 elsewhere: a painted plane of ones, spread by a 1×1 conv."""
        plane = self.paint(f"grid{geo.dilation}.real", geo.real().astype(np.float32))
        spread = self.nir.Conv2d(
            input_shape=(self.grid, self.grid),
            weight=_np(bias).reshape(-1, 1, 1, 1),
            stride=1,
            padding=0,
            dilation=1,
            groups=1,
            bias=np.zeros(geo.channels, dtype=np.float32),
        )
        self.connect(plane, self.add(f"{name}.bias", spread, self.out_shape[plane], geo.shape))
        return f"{name}.bias"

    def relays(self, layer: str, stride: int) -> dict[tuple[int, int], str]:
        """`layer`'s spikes split into stride² maps by phase against the grid `stride` times coarser: the
        relay of phase (a, b) holds the spikes at rows ≡ a and columns ≡ b (in pixels, mod stride). A relay
        is a neuron layer of the target's pattern with threshold 1/2 and reset 1 fed by the spikes, so it
        fires exactly when its pixel does, in the same step, and its other pixels are ghosts."""
        key = (layer, stride)
        if key in self.relay_nodes:
            return self.relay_nodes[key]
        geo, source = self.geometry[layer], self.spike_nodes[layer]
        relays = {}
        for a in range(stride):
            for b in range(stride):
                mask = np.zeros(geo.shape[1:], dtype=bool)
                d, end, step = geo.dilation, geo.dilation * geo.size, geo.dilation * stride
                mask[d * a : end : step, d * b : end : step] = True
                threshold = np.full(geo.shape, GHOST_THRESHOLD, dtype=np.float32)
                threshold[:, mask] = RELAY_THRESHOLD
                pattern = np.where(mask, 0.0, -GHOST_INHIBITION)
                plane = partial(self.paint, f"phase{d}x{stride}_{a}{b}.ghosts", pattern)
                built = self.emit_pattern(f"{layer}.relay{a}{b}", geo, threshold, 1.0, 0.0, plane)
                self.connect(source, built.inlet)
                relays[(a, b)] = built.spikes
        self.relay_nodes[key] = relays
        return relays

    def emit_sum(self, node) -> None:
        """A fused sum as one node (a 1×1 identity conv reading every term): what the Trans map and the head read."""
        geo = self.geometry[node.name]
        name = self.add(node.name, _diagonal(self.nir, geo.shape, 1.0), geo.shape, geo.shape)
        for term in node.inputs:
            for source in self.sources[term]:
                self.connect(source, name)
        self.sources[node.name] = [name]

    def emit_switch(self) -> None:
        """The importer switch, once per file after the input: a (1,1,1) constant 1, `on` = LIF(tau 1e-3,
        r 2^-10, θ 0.75) on it, and `off` = 1 − on. Norse and Sinabs ignore r and fire `on` every step;
        snnTorch divides θ by r·dt/tau and never fires it (docs/one-nir-file.md)."""
        nir, unit = self.nir, (1, 1, 1)
        constant = _zero_conv(nir, self.out_shape["input"], unit, torch.ones(1))
        self.connect("input", self.add("switch.one", constant, self.out_shape["input"], unit))
        self.connect("switch.one", self.add("switch.on", _lif(nir, NORSE_TAU, 2.0**-10, 0.75), unit, unit))
        off = _diagonal(nir, unit, -1.0)
        off.bias = np.ones(1, dtype=np.float32)
        self.connect("switch.on", self.add("switch.off", off, unit, unit))

    def switch_silence(self, name: str, kind: str, shape: Shape) -> str:
        """−2^20 on every neuron of a layer while the switch is `kind`: one plane per switch state and map
        size (painted by a side×side conv from the (1,1,1) switch), then a 1×1 conv to the layer's channels."""
        side = shape[-1]
        plane = f"switch.{kind}{side}"
        if plane not in self.nodes:
            paint = self.nir.Conv2d(
                input_shape=(1, 1),
                weight=np.full((1, 1, side, side), -SWITCH_INHIBITION, dtype=np.float32),
                stride=1,
                padding=side - 1,
                dilation=1,
                groups=1,
                bias=np.zeros(1, dtype=np.float32),
            )
            self.connect(f"switch.{kind}", self.add(plane, paint, (1, 1, 1), (1, side, side)))
        spread = self.nir.Conv2d(
            input_shape=(side, side),
            weight=np.ones((shape[0], 1, 1, 1), dtype=np.float32),
            stride=1,
            padding=0,
            dilation=1,
            groups=1,
            bias=np.zeros(shape[0], dtype=np.float32),
        )
        self.connect(plane, self.add(f"{name}.{kind}", spread, (1, side, side), shape))
        return f"{name}.{kind}"

    def initial_potential(self, name: str, shape: Shape) -> np.ndarray:
        if self.v_init is not None:
            return np.full(shape, self.v_init, dtype=np.float32)
        if name in self.net.imp:
            return _np(self.net.imp[name].expand(shape))
        return np.full(shape, self.net.v_init, dtype=np.float32)

    def emit_head(self, node) -> None:
        """Real pixels of the last stream (a depthwise identity conv with stride D picks them), then
        Flatten(−3) and Affine: logits per step, for batched or single inputs alike."""
        nir = self.nir
        state = node.inputs[0]
        if len(self.sources[state]) != 1:
            raise MpisError("toolchain export: the classifier must read one spike map")
        geo, current = self.geometry[state], self.sources[state][0]
        features = (geo.channels, geo.size, geo.size)
        if geo.dilation > 1:
            select = _diagonal(nir, geo.shape, 1.0, stride=geo.dilation)
            current = self.add("head.select", select, geo.shape, features)
            self.connect(self.sources[state][0], current)
        flat = nir.Flatten(input_type={"input": np.array(features)}, start_dim=-3, end_dim=-1)
        self.add("head.flatten", flat, features, (int(np.prod(features)),))
        self.connect(current, "head.flatten")
        fc = self.net.ops["head"].fc
        affine = nir.Affine(weight=_np(fc.weight), bias=_np(fc.bias))
        self.add("head.affine", affine, (fc.in_features,), (fc.out_features,))
        self.connect("head.flatten", "head.affine")

    def run(self) -> None:
        self.place_maps()
        waiting: dict[str, list] = {}  # state map -> back-edge maps that read it
        for node in self.net.graph.nodes:
            if node.kind == "input":
                self.add("input", self.nir.Input(input_type={"input": np.array(node.shape)}), node.shape, node.shape)
                self.sources["input"] = ["input"]
                if self.recipe.switch:
                    self.emit_switch()
            elif node.kind in ("conv", "linear"):
                if any(self.net.graph.node(s).kind not in ("neuron", "sum") for s in node.delayed):
                    raise MpisError(f"toolchain export: the Trans map {node.name} reads neither spikes nor a fused sum")
                if any(r.kind == "sum" and node.name in r.inputs for r in self.net.graph.nodes):
                    self.emit_fusion(node)
                else:
                    self.emit_linear(node)
                for source in node.delayed:
                    waiting.setdefault(source, []).append(node)
            elif node.kind == "neuron":
                self.emit_neuron(node)
            elif node.kind == "sum":
                self.emit_sum(node)
            else:
                self.emit_head(node)
            for reader in waiting.pop(node.name, []):
                self.emit_late(reader)
        if waiting:
            raise MpisError("toolchain export: a back-edge whose source never appears")


def schedule(builder: _Builder) -> tuple[list[str], list[tuple[str, str]], int]:
    """Final node order and edge order for both kinds of importer, plus the count of sequencing convs.

    Name-order importers (nirtorch 2.6: snnTorch; mpis) run the nodes in the order emitted. Depth-first
    importers (nirtorch.load: Norse, Sinabs) start at the input and take each node's edges in file order,
    reading a node that has not run yet from the previous step: so each node's first edge leads to the
    next node of the order, directly or through an all-zero conv, and the whole order is one path. It ends
    with the head, so that the tensor those importers return (the last node's) is the logits."""
    b = builder
    forward = [e for e in b.edges if e not in b.back]
    first: list[tuple[str, str]] = []
    inserted: dict[str, str] = {}  # node -> sequencing conv after it
    for a, c in zip(b.order, b.order[1:], strict=False):
        if (a, c) in forward:
            first.append((a, c))
            continue
        z = f"seq.{a}"
        b.nodes[z] = _zero_conv(b.nir, b.out_shape[a], b.in_shape[c])
        inserted[a] = z
        first += [(a, z), (z, c)]
    order = [n for name in b.order for n in (name, inserted.get(name)) if n is not None]
    edges = first + [e for e in b.edges if e not in first]
    _check_schedule(order, edges, b.back, "name order")
    _check_schedule(_depth_first(order[0], edges), edges, b.back, "depth-first order")
    return order, edges, len(inserted)


def _depth_first(start: str, edges: list[tuple[str, str]]) -> list[str]:
    """The order nirtorch.load's GraphExecutor runs a graph in (`trace_execution`: preorder, file order)."""
    out: dict[str, list[str]] = {}
    for source, target in edges:
        out.setdefault(source, []).append(target)
    visited: list[str] = []
    seen: set[str] = set()
    stack = [start]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        visited.append(node)
        stack.extend(reversed([c for c in out.get(node, []) if c not in seen]))
    return visited


def _check_schedule(order: list[str], edges, back: set, what: str) -> None:
    position = {n: i for i, n in enumerate(order)}
    for source, target in edges:
        if source not in position or target not in position:
            raise MpisError(f"toolchain export: {what} does not reach {source if source not in position else target}")
        late = position[source] >= position[target]
        if late != ((source, target) in back):
            raise MpisError(f"toolchain export: {what} would read {source} -> {target} in the wrong step")


def build_toolchain_nir(
    net: MPISNet,
    target: str,
    v_init: float | None = None,
    steps: int | None = None,
    weight_bits: int | None = DEFAULT_WEIGHT_BITS,
    dataset: str | None = None,
) -> ToolchainExport:
    """The NIR graph of `net` (BN folded, weights dyadic with `weight_bits` significant bits: see
    `fixed_point`; None keeps them float) written for `target`'s importer; `dataset` (the training set's
    name) goes into the metadata, for `mpis simulate` to default to."""
    import nir

    if target not in NEURON_RECIPES:
        raise MpisError(f"unknown toolchain target {target!r}; choose one of {', '.join(TARGETS)}")
    if net.neuron.reset != "soft" or net.neuron.leak != 1.0:
        raise MpisError("toolchain export writes IF neurons with reset by subtraction (--reset soft, no leak)")
    if v_init is None and len(net.imp):
        raise MpisError("toolchain export writes one initial potential per layer; pass --v-init (learned IMP)")
    folded, grids, fewest = dyadic_copy(net, weight_bits) if weight_bits is not None else (net.folded_copy(), None, 0)
    builder = _Builder(folded, NEURON_RECIPES[target], v_init, grids)
    with torch.no_grad():
        builder.run()
    order, edges, sequencing = schedule(builder)
    width = len(str(len(order)))
    names = {n: n if n == "input" else f"{i:0{width}d}_{n}" for i, n in enumerate(order)}
    nodes = {names[n]: builder.nodes[n] for n in order}
    nodes["output"] = nir.Output(output_type={"output": np.array([net.arch.classes])})
    nir_edges = [(names[a], names[c]) for a, c in edges] + [(names["head.affine"], "output")]
    metadata = {
        "source": "mpis",
        "arch": str(net.arch),
        "target": target,
        "vth": net.neuron.vth,
        "T": int(steps or 0),
        **({"dataset": dataset} if dataset else {}),
        "input_shape": list(net.input_shape),
        "classes": net.arch.classes,
        "weight_bits": weight_bits or 0,  # 0: float weights
        "fewest_weight_bits": fewest,
        "v_init": float(v_init if v_init is not None else net.v_init),
        **({"read_with": UNIVERSAL_READING} if target == "universal" else {}),
        "layers": {  # where each neuron layer's spikes are, for a reader that wants the model's layout
            layer: {
                "spikes": names[node],
                "channels": builder.geometry[layer].channels,
                "size": builder.geometry[layer].size,
                "dilation": builder.geometry[layer].dilation,
            }
            for layer, node in builder.spike_nodes.items()
        },
    }
    graph = nir.NIRGraph(nodes=nodes, edges=nir_edges, metadata=metadata, type_check=builder.recipe.type_checked)
    params = sum(n.weight.size + n.bias.size for n in nodes.values() if isinstance(n, (nir.Conv2d, nir.Affine)))
    source = sum(p.numel() for name in folded.ops for p in folded.ops[name].parameters())
    spike_nodes = {layer: names[node] for layer, node in builder.spike_nodes.items()}
    geometries = {layer: builder.geometry[layer] for layer in builder.spike_nodes}
    return ToolchainExport(graph, target, spike_nodes, geometries, sequencing, params, source, folded, fewest)


def _taps_from_phase(op: nn.Conv2d, a: int, b: int) -> Tensor:
    """1 at the kernel taps of a strided conv that, from an output pixel, read input pixels at row phase a and
    column phase b (mod the stride), else 0: output i reads input stride·i + k − padding."""
    stride, padding = op.stride[0], op.padding[0]
    rows = (torch.arange(op.kernel_size[0]) - padding) % stride == a
    cols = (torch.arange(op.kernel_size[1]) - padding) % stride == b
    return (rows[:, None] & cols[None, :]).to(op.weight.dtype)


def _chain(module: nn.Module) -> list[nn.Module]:
    return [op for child in module for op in _chain(child)] if isinstance(module, nn.Sequential) else [module]


def _out_dilation(op: nn.Module, dilation: int) -> int:
    if isinstance(op, nn.ConvTranspose2d):
        factor = op.stride[0]
    elif isinstance(op, NearestUp):
        factor = op.factor
    elif isinstance(op, nn.Conv2d):
        return dilation * op.stride[0]
    else:
        raise MpisError(f"toolchain export does not support the layer {type(op).__name__}")
    if dilation % factor:
        raise MpisError("toolchain export: up-sampling below the loop's finest grid")
    return dilation // factor


def _weight_bias(op: nn.Module, channels: int) -> tuple[Tensor, Tensor]:
    if isinstance(op, NearestUp):
        return torch.zeros(0), torch.zeros(channels)
    out_channels = op.weight.shape[1 if isinstance(op, nn.ConvTranspose2d) else 0]
    bias = op.bias.detach() if op.bias is not None else torch.zeros(out_channels)
    return op.weight.detach(), bias


def _zero_conv(nir, in_shape: Shape, out_shape: Shape, bias: Tensor | None = None):
    """An all-zero 1×1 conv from `in_shape` to `out_shape`, adding `bias`."""
    c_in, c_out = in_shape[0], out_shape[0]
    size_in, size_out = in_shape[-1], out_shape[-1]
    stride = next((s for s in range(1, size_in + 1) if (size_in - 1) // s + 1 == size_out), None)
    padding, kernel = 0, 1
    if stride is None and size_in == 1:  # from a (C, 1, 1) switch: a side×side kernel, padding side − 1
        stride, padding, kernel = 1, size_out - 1, size_out
    elif stride is None:  # grow: stride 1, kernel 1, symmetric padding
        if (size_out - size_in) % 2:
            raise MpisError(f"cannot sequence a {size_in}x{size_in} map into a {size_out}x{size_out} one")
        stride, padding = 1, (size_out - size_in) // 2
    return nir.Conv2d(
        input_shape=in_shape[1:],
        weight=np.zeros((c_out, c_in, kernel, kernel), dtype=np.float32),
        stride=stride,
        padding=padding,
        dilation=1,
        groups=1,
        bias=_np(bias) if bias is not None else np.zeros(c_out, dtype=np.float32),
    )


def universal_refusal(net: MPISNet, v_init: float | None, weight_bits: int = DEFAULT_WEIGHT_BITS) -> str | None:
    """Why the universal file cannot hold `net` (one line), or None when it can: what `mpis export --nir`
    asks before choosing its default file."""
    try:
        build_toolchain_nir(net, "universal", v_init, None, weight_bits)
    except MpisError as err:
        return str(err)
    return None


def export_toolchain_nir(
    net: MPISNet,
    path: Path,
    target: str,
    v_init: float,
    steps: int | None = None,
    weight_bits: int = DEFAULT_WEIGHT_BITS,
    overwrite: bool = False,
    dataset: str | None = None,
) -> ToolchainExport:
    """Build for `target`, write atomically and read back with the reader's type checking."""
    from mpis.export.nir_nodes import writable_nir_path, write_nir

    path = writable_nir_path(path, overwrite)
    result = build_toolchain_nir(net, target, v_init, steps, weight_bits, dataset)
    finish = _without_v_reset if NEURON_RECIPES[target].nir_104 else None
    write_nir(path, result.graph, NEURON_RECIPES[target].type_checked, finish)
    return result


def _without_v_reset(file) -> None:
    """nir 1.0.8 writes `v_reset` for every LIF; nir <= 1.0.4 (which Sinabs pins) refuses the argument.
    The recipes reset by their own feedback, so the dataset carries nothing: drop it."""
    import h5py

    with h5py.File(file, "r+") as f:
        nodes = f["node"]["nodes"]
        for name in nodes:
            if "v_reset" in nodes[name]:
                del nodes[name]["v_reset"]
