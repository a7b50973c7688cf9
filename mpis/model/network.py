"""MPISNet: the graph's weights plus the two ways of walking it, rate form and spiking form."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from mpis.arch import Arch, parse_arch
from mpis.model.graph import Graph, Node, build_graph
from mpis.model.layers import FoldedConv
from mpis.model.neurons import NeuronParams, SpikeFn, dbrelu, heaviside, neuron_step, neuron_step_

Fire = Callable[[str, Tensor], Tensor]
Values = dict[str, Tensor]
BNMode = Literal["running", "batch", "track", "calibrate"]
SETTLE_CHECK_EVERY = 5  # steps between two checks of an early-stopping simulation (a check costs about one step)


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
    """Result of a T-step simulation: rate estimate of every stream output (time mean, λ-weighted for LIF)
    and spike counts per neuron layer."""

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
        leak: float = 1.0,
        reset: str = "soft",
        v_init: float = 0.0,
        imp: bool = False,
        bn_eps: float = 1e-5,
    ):
        super().__init__()
        self.arch = parse_arch(arch) if isinstance(arch, str) else arch
        self.input_shape = tuple(input_shape)
        self.neuron = NeuronParams(float(vth), float(leak), reset)
        self.dropout = float(dropout)
        self.v_init = float(v_init)
        self.graph: Graph
        self.graph, ops = build_graph(self.arch, self.input_shape, upsample, bn_eps)
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
        # Learnable initial membrane potential (IMP), one value per neuron, starting at v_init.
        self.imp = nn.ParameterDict(
            {n.name: nn.Parameter(torch.full(n.shape, self.v_init)) for n in self.neurons} if imp else {}
        )

    @classmethod
    def from_config(cls, cfg, input_shape: tuple[int, int, int]) -> MPISNet:
        """Build from a `ModelConfig` (kept untyped here so the model does not import the CLI's config)."""
        leak = cfg.effective_leak
        return cls(
            cfg.arch,
            input_shape,
            cfg.vth,
            cfg.dropout,
            cfg.upsample,
            leak,
            cfg.reset,
            cfg.v_init,
            cfg.imp,
            cfg.effective_bn_eps,
        )

    def initial_potential(self, name: str, like: Tensor) -> Tensor:
        v0 = self.imp[name] if name in self.imp else None
        return torch.full_like(like, self.v_init) if v0 is None else v0.expand_as(like)

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
                values[node.name] = self.ops[node.name](total, bn)
            else:
                values[node.name] = self.ops[node.name](total)
        return values

    def rate_fire(self, masks: Values, horizon: int | None = None) -> Fire:
        """DBReLU neurons, with the variational-dropout mask of each layer applied to its input.

        With learnable IMP and a horizon T, each neuron also receives v0/T: the initial potential's share
        of the charge over T steps (paper Eq. 13), which is how the IMP gets a gradient in the rate step."""

        def fire(name: str, current: Tensor) -> Tensor:
            mask = masks.get(name)
            if mask is not None:
                current = current * mask
            if horizon and name in self.imp:
                current = current + self.imp[name] / horizon
            return dbrelu(current, self.neuron.vth)

        return fire

    def explicit_rates(
        self, x: Tensor, masks: Values | None = None, bn: BNMode = "running", horizon: int | None = None
    ) -> Values:
        """Rates of the stem (run once; its output is the input injection of stream 1).

        A frame sequence (B, frames, C, H, W) drives the rate form with its mean current."""
        if x.dim() == 5:
            x = x.mean(dim=1)
        return self._walk(self.explicit_nodes, {"input": x}, {}, self.rate_fire(masks or {}, horizon), bn)

    def loop_step(
        self,
        state: Values,
        explicit: Values,
        masks: Values | None = None,
        bn: BNMode = "running",
        horizon: int | None = None,
    ) -> Values:
        """One application of the equilibrium map f: stream outputs s^t -> s^{t+1} (paper Eq. 6)."""
        values = self._walk(self.loop_nodes, dict(explicit), state, self.rate_fire(masks or {}, horizon), bn)
        return {name: values[name] for name in self.graph.state}

    def rate_iterations(
        self, x: Tensor, iterations: int, horizon: int | None = None, start: Values | None = None
    ) -> Values:
        """Every node's rate after `iterations` plain iterations from the zero state (eval-mode map):
        the graph that ONNX export unrolls and the spike runtime is checked against. `horizon`: the T
        over which a learned initial potential is spread (as in training), if the net has one. `start`:
        the stream outputs to iterate from instead of zeros (one more step from iterate K−1 measures how
        far iterate K is from settling)."""
        values = self.explicit_rates(x, horizon=horizon)
        state = self.zero_state(x.shape[0], x.device, x.dtype) if start is None else start
        explicit = dict(values)
        for _ in range(iterations):
            values = self._walk(self.loop_nodes, dict(explicit), state, self.rate_fire({}, horizon), "running")
            state = {name: values[name] for name in self.graph.state}
        return values

    def folded_copy(self) -> MPISNet:
        """A copy for inference with every BN folded into its conv."""
        folded = copy.deepcopy(self).eval()
        for node in self.graph.nodes:
            if node.kind == "conv" and not isinstance(self.ops[node.name], FoldedConv):
                folded.ops[node.name] = FoldedConv.from_conv_bn(self.ops[node.name])
        return folded

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

    def spike_steps(
        self,
        x: Tensor,
        steps: int,
        masks: Values | None = None,
        spike: SpikeFn = heaviside,
        bn: BNMode = "running",
    ) -> Iterator[Values]:
        """Yield every node's output at each of `steps` time steps of the spiking network.

        The image is a constant input current (direct coding); a frame sequence (B, frames, C, H, W) is
        played instead, frame t·frames//T at step t. Back-edges read the previous step (zeros at t = 0).
        Used without autograd by the spike forward, and with a surrogate `spike` for BPTT."""
        masks = masks or {}
        frames = x.shape[1] if x.dim() == 5 else 0
        no_fire = self.rate_fire({})
        if not frames:
            constant = self._walk(self.constant_nodes, {"input": x}, {}, no_fire, bn)
        membranes: Values = {}

        in_place = spike is heaviside and not torch.is_grad_enabled()

        def fire(name: str, current: Tensor) -> Tensor:
            mask = masks.get(name)
            if mask is not None:
                current = current * mask
            v = membranes.get(name)
            if v is None:
                v = self.initial_potential(name, current)
                if in_place:  # a membrane of its own, in the current's memory layout, never below float32
                    v = torch.empty_like(current, dtype=torch.promote_types(current.dtype, torch.float32)).copy_(v)
            if in_place:
                spikes, membranes[name] = neuron_step_(current, v, self.neuron)
            else:
                spikes, membranes[name] = neuron_step(current, v, self.neuron, spike)
            return spikes

        previous = self.zero_state(x.shape[0], x.device, x.dtype)
        for t in range(steps):
            if frames:
                constant = self._walk(self.constant_nodes, {"input": x[:, t * frames // steps]}, {}, no_fire, bn)
            values = self._walk(self.step_nodes, dict(constant), previous, fire, bn)
            previous = {name: values[name] for name in self.graph.state}
            yield values

    @torch.no_grad()
    def simulate(
        self,
        x: Tensor,
        steps: int,
        masks: Values | None = None,
        count_spikes: bool = True,
        settled: Callable[[Values], bool] | None = None,
    ) -> SpikeRecord:
        """T-step simulation; stream-output rates are weighted by λ^(T−t) (plain means for IF). Sums are
        accumulated in place (a fresh tensor per step and layer cost as much as the adds); the training
        solve needs only the stream rates (`count_spikes=False`). `settled(rates)`, asked every
        SETTLE_CHECK_EVERY steps, ends the simulation early when it answers True."""
        leak = self.neuron.leak
        sums: Values = {}
        counts: Values = {}
        norm = 0.0
        counted = [n.name for n in self.neurons] if count_spikes else []
        done = 0
        for values in self.spike_steps(x, steps, masks):
            norm = leak * norm + 1.0
            for name in self.graph.state:
                if name not in sums:
                    sums[name] = values[name].clone()
                else:
                    sums[name] = (
                        sums[name].add_(values[name]) if leak == 1.0 else sums[name].mul_(leak).add_(values[name])
                    )
            for name in counted:
                counts[name] = values[name].clone() if name not in counts else counts[name].add_(values[name])
            done += 1
            if settled is not None and done % SETTLE_CHECK_EVERY == 0 and done < steps:
                if settled({k: v / norm for k, v in sums.items()}):
                    break
        return SpikeRecord({k: v / norm for k, v in sums.items()}, counts, done)
