"""The model as it ships, scored beside the model as trained.

Training solves with the spike forward from the trained v_init and reads out one rate step after it. What
ships differs in two ways: the ONNX / TensorRT graph is K plain DBReLU iterations from zero with BN folded
(K = the export's default, the training T), and the NIR file is the spiking network run for T steps from the
exported initial potential (Vth/2 for IF neurons). A loop that has not contracted gives three different
answers. So training (every epoch) and `mpis export` (before it writes) score both shipped forms here, and
a mismatch shows up before anyone deploys the model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from mpis.model.network import MPISNet

SETTLE_TOL = 1e-3  # mean |r_K − r_{K−1}| over every neuron at or below which the rate graph counts as settled
MIN_SPIKE_AGREEMENT = 0.9  # quick estimate (a few dozen inputs) below which a spiking export is refused


def default_nir_v_init(net: MPISNet) -> float | None:
    """The initial potential `mpis export --nir` writes by default: Vth/2 for IF neurons, which rounds the
    rate instead of flooring it (mpis check on the digits net: mean |Δrate|·T 0.85 vs 1.40 at T = 100, all
    layers; 0.09 vs 0.18 in the feed-forward stem); the model's own (None) for a learned IMP, which is part
    of the rate map, and for LIF neurons, where an initial potential is no threshold shift."""
    if len(net.imp) or net.neuron.leak != 1.0:
        return None
    return net.neuron.vth / 2


@torch.no_grad()
def rate_graph(folded: MPISNet, x: Tensor, iterations: int, horizon: int | None) -> tuple[Tensor, Tensor]:
    """Logits of the exported rate graph (K iterations from zero) and, per input, the mean |r_K − r_{K−1}|
    over every neuron: how far the graph is from its fixed point when it stops."""
    before = folded.rate_iterations(x, iterations - 1, horizon)  # K = 1: the zero state, loop rates 0
    zero = folded.zero_state(x.shape[0], x.device, x.dtype)
    last = folded.rate_iterations(x, 1, horizon, start={n: before.get(n, zero[n]) for n in folded.graph.state})
    deltas = [(last[n.name] - before.get(n.name, 0.0)).abs().flatten(1) for n in folded.neurons]
    return folded.classify(last), torch.cat(deltas, dim=1).mean(dim=1)


@torch.no_grad()
def spiking_logits(folded: MPISNet, x: Tensor, steps: int, v_init: float | None) -> Tensor:
    """The spiking network's readout after `steps` steps from `v_init` (None: the model's own)."""
    net = folded
    if v_init is not None and v_init != folded.v_init:
        net = copy.copy(folded)  # shares the weights; only the initial potential differs
        net.v_init = v_init
    return net.classify(net.simulate(x, steps, count_spikes=False).state_rates)


@dataclass
class DeployedScores:
    """Accuracy of each shipped form on `count` labelled inputs and how far they agree."""

    count: int
    iterations: int  # K of the rate graph
    steps: int  # T of the spiking network
    v_init: float | None
    rate_acc: float  # the ONNX rate graph
    spike_acc: float  # the NIR spiking network
    agreement: float  # argmax agreement spike vs rate graph
    settle_mean: float  # mean over inputs of mean |r_K − r_{K−1}|
    settle_max: float  # the worst input's

    @property
    def settled(self) -> bool:
        return self.settle_mean <= SETTLE_TOL

    def metrics(self) -> dict[str, float | int | None]:
        """The keys training writes to metrics.jsonl."""
        return {
            "deployed_inputs": self.count,
            "onnx_acc": round(self.rate_acc, 6),
            "spike_acc": round(self.spike_acc, 6),
            "spike_onnx_agreement": round(self.agreement, 6),
            "rate_settle": float(f"{self.settle_mean:.3g}"),
            "deployed_T": self.steps,
            "deployed_v_init": self.v_init,
        }

    def summary(self) -> str:
        flag = "" if self.settled else f" (NOT SETTLED: mean |r_K - r_K-1| above {SETTLE_TOL:g})"
        return (
            f"deployed on {self.count}: onnx {self.rate_acc:.4f}  spike(T={self.steps}) {self.spike_acc:.4f}  "
            f"agree {self.agreement:.4f}  settle {self.settle_mean:.1e}{flag}"
        )


@torch.no_grad()
def score_deployed(
    net: MPISNet,
    batches: Iterable[tuple[Tensor, Tensor]],
    iterations: int,
    steps: int,
    horizon: int | None,
    v_init: float | None = None,
    with_spikes: bool = True,
) -> DeployedScores:
    """Score the folded rate graph and (unless `with_spikes` is off) the spiking network on labelled
    batches. `v_init` defaults to what `mpis export --nir` writes."""
    folded = net.folded_copy()
    v0 = default_nir_v_init(net) if v_init is None else v_init
    count = rate_right = spike_right = agree = 0
    settle_sum, settle_max = 0.0, 0.0
    for x, y in batches:
        logits, settle = rate_graph(folded, x, iterations, horizon)
        rate_pred = logits.argmax(1).cpu()
        rate_right += int((rate_pred == y).sum())
        if with_spikes:
            spike_pred = spiking_logits(folded, x, steps, v0).argmax(1).cpu()
            spike_right += int((spike_pred == y).sum())
            agree += int((spike_pred == rate_pred).sum())
        settle_sum += float(settle.sum())
        settle_max = max(settle_max, float(settle.max()))
        count += len(y)
    n = max(count, 1)
    nan = float("nan")
    return DeployedScores(
        count,
        iterations,
        steps,
        v0,
        rate_right / n,
        spike_right / n if with_spikes else nan,
        agree / n if with_spikes else nan,
        settle_sum / n,
        settle_max,
    )
