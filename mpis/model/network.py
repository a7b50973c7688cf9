"""MPISNet: the graph's weights plus the two ways of walking it, rate form and spiking form."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from mpis.arch import Arch, parse_arch
from mpis.model.graph import Graph, Node, build_graph
from mpis.model.neurons import IFState, dbrelu, if_initial_state, if_step

Fire = Callable[[str, Tensor], Tensor]
Values = dict[str, Tensor]
BNMode = Literal["running", "batch", "calibrate"]


def _depends_on(nodes: Iterable[Node], seeds: set[str], through_delayed: bool) -> set[str]:
    """Names of nodes that (transitively, forward edges) read any node in `seeds`."""
    reached = set(seeds)
    for node in nodes:
        sources = node.inputs + (node.delayed if through_delayed else ())
        if any(s in reached for s in sources) or (through_delayed and node.delayed):
            reached.add(node.name)
    return reached


@dataclass
class SpikeRecord:
    """Result of a T-step simulation: time-mean of every stream output and spike counts per neuron."""

    state_rates: Values
    spike_counts: Values
    steps: int


class MPISNet(nn.Module):
    """An MPIS network built from the paper's notation for inputs of shape (C, H, W)."""

    def __init__(
        self,
        arch: str | Arch,
        input_shape: tuple[int, int, int],
        vth: float = 1.0,
        dropout: float = 0.0,
        upsample: str = "transpose",
    ):
        super().__init__()
        self.arch = parse_arch(arch) if isinstance(arch, str) else arch
        self.input_shape = tuple(input_shape)
        self.vth = float(vth)
        self.dropout = float(dropout)
        self.graph: Graph
        self.graph, ops = build_graph(self.arch, self.input_shape, upsample)
        self.ops = nn.ModuleDict(ops)
        nodes = [n for n in self.graph.nodes if n.kind not in ("input", "head")]
        in_loop = _depends_on(nodes, set(), through_delayed=True)
        self.explicit_nodes = tuple(n for n in nodes if n.name not in in_loop)
        self.loop_nodes = tuple(n for n in nodes if n.name in in_loop)
        # Nodes whose value is the same at every time step of a simulation (linear maps of the input).
        constant = {"input"}
        for n in nodes:
            if n.kind in ("conv", "linear", "sum") and not n.delayed and all(s in constant for s in n.inputs):
                constant.add(n.name)
        self.constant_nodes = tuple(n for n in nodes if n.name in constant)
        self.step_nodes = tuple(n for n in nodes if n.name not in constant)
        self.neurons = tuple(n for n in nodes if n.kind == "neuron")

    # ---- walking the graph -------------------------------------------------------------------
    def _walk(self, nodes: Iterable[Node], values: Values, delayed: Values, fire: Fire, bn: BNMode) -> Values:
        """Evaluate `nodes` in order; BN uses running statistics, batch statistics, or calibrates."""
        for node in nodes:
            total = None
            for source in node.inputs:
                total = values[source] if total is None else total + values[source]
            for source in node.delayed:
                total = delayed[source] if total is None else total + delayed[source]
            if node.kind == "neuron":
                values[node.name] = fire(node.name, total)
            elif node.kind == "sum":
                values[node.name] = total
            elif node.kind == "conv" and bn == "calibrate":
                values[node.name] = self.ops[node.name].calibrate(total)
            elif node.kind == "conv":
                values[node.name] = self.ops[node.name](total, bn == "batch")
            else:
                values[node.name] = self.ops[node.name](total)
        return values

    def rate_fire(self, masks: Values) -> Fire:
        """DBReLU neurons, with the variational-dropout mask of each layer applied to its input."""

        def fire(name: str, current: Tensor) -> Tensor:
            mask = masks.get(name)
            return dbrelu(current if mask is None else current * mask, self.vth)

        return fire

    def explicit_rates(self, x: Tensor, masks: Values | None = None, bn: BNMode = "running") -> Values:
        """Rates of the stem (run once; its output is the input injection of stream 1).

        A frame sequence (B, frames, C, H, W) drives the rate form with its mean current."""
        if x.dim() == 5:
            x = x.mean(dim=1)
        return self._walk(self.explicit_nodes, {"input": x}, {}, self.rate_fire(masks or {}), bn)

    def loop_step(self, state: Values, explicit: Values, masks: Values | None = None, bn: BNMode = "running") -> Values:
        """One application of the equilibrium map f: stream outputs s^t -> s^{t+1} (paper Eq. 6)."""
        values = self._walk(self.loop_nodes, dict(explicit), state, self.rate_fire(masks or {}), bn)
        return {name: values[name] for name in self.graph.state}

    def classify(self, state: Values) -> Tensor:
        """Logits from the smallest (last) stream's equilibrium rates."""
        return self.ops["head"](state[self.graph.state[-1]])

    def zero_state(self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Values:
        return {
            name: torch.zeros(batch, *self.graph.node(name).shape, device=device, dtype=dtype)
            for name in self.graph.state
        }

    def sample_dropout_masks(self, batch: int, device: torch.device) -> Values:
        """Variational dropout: one channel mask per sample and layer, fixed for the whole solve."""
        if not self.training or self.dropout == 0.0:
            return {}
        keep = 1.0 - self.dropout
        return {
            n.name: torch.empty(batch, n.shape[0], 1, 1, device=device).bernoulli_(keep) / keep for n in self.neurons
        }

    @torch.no_grad()
    def simulate(self, x: Tensor, steps: int, v_init: float = 0.0, masks: Values | None = None) -> SpikeRecord:
        """T-step integrate-and-fire simulation (reset by subtraction) with the image as constant current.

        A frame sequence (B, frames, C, H, W) is played over the T steps instead (frame t·frames//T)."""
        masks = masks or {}
        frames = x.shape[1] if x.dim() == 5 else 0
        batch = x.shape[0]
        no_fire = self.rate_fire({})
        if not frames:
            constant = self._walk(self.constant_nodes, {"input": x}, {}, no_fire, "running")
        membranes: dict[str, IFState] = {}

        def fire(name: str, current: Tensor) -> Tensor:
            mask = masks.get(name)
            if mask is not None:
                current = current * mask
            state = membranes.get(name)
            if state is None:
                state = if_initial_state(current, v_init)
            spikes, membranes[name] = if_step(current, state, self.vth)
            return spikes

        previous = self.zero_state(batch, x.device, x.dtype)
        sums = {name: torch.zeros_like(v) for name, v in previous.items()}
        counts = {n.name: torch.zeros(batch, *n.shape, device=x.device, dtype=x.dtype) for n in self.neurons}
        for t in range(steps):
            if frames:
                frame = x[:, t * frames // steps]
                constant = self._walk(self.constant_nodes, {"input": frame}, {}, no_fire, "running")
            values = self._walk(self.step_nodes, dict(constant), previous, fire, "running")
            previous = {name: values[name] for name in self.graph.state}
            for name in sums:
                sums[name] += previous[name]
            for name in counts:
                counts[name] += values[name]
        return SpikeRecord({k: v / steps for k, v in sums.items()}, counts, steps)
