"""Neuron models as pure functions: the rate form (DBReLU) and the spiking form (IF / LIF).

An IF neuron that subtracts Vth after each spike fires, over T steps, at rate
clamp(mean input / Vth, 0, 1) up to an O(1/T) boundary term (paper Eq. 11-16): that is why the
DBReLU map below is the equilibrium rate of the spiking network. For a leaky neuron (leak λ < 1) the
same relation holds between the λ-weighted input and output flows of the SSF paper
(FO = clamp(FI / Vth, 0, 1), SSF supplement Eq. S5), so the rate map stays DBReLU and the spike
forward estimates rates with weights λ^(T−t); the match is approximate for λ < 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

RESETS = ("soft", "hard")
SURROGATES = ("atan", "sigmoid", "triangle")

SpikeFn = Callable[[Tensor], Tensor]


def dbrelu(current: Tensor, vth: float) -> Tensor:
    """Double-bounded ReLU (paper Eq. 10): the firing rate of an IF neuron driven by `current`."""
    return torch.clamp(current / vth, 0.0, 1.0)


@dataclass(frozen=True)
class NeuronParams:
    """Threshold, leak λ (1.0 = IF) and reset: `soft` subtracts Vth, `hard` resets to zero."""

    vth: float = 1.0
    leak: float = 1.0
    reset: str = "soft"


def heaviside(x: Tensor) -> Tensor:
    """Spike iff the membrane is strictly above threshold (x = v − Vth > 0), as NIR's IF."""
    return (x > 0).to(x.dtype)


def neuron_step(current: Tensor, v: Tensor, p: NeuronParams, spike: SpikeFn = heaviside) -> tuple[Tensor, Tensor]:
    """One step: h = λ·v + I; s = H(h − Vth); v' = h − Vth·s (soft) or h·(1 − s) (hard).

    With λ = 1 and soft reset this is IF with reset by subtraction (paper Eq. 11); for λ < 1 it is the
    SSF paper's LIF (Eq. S1): u[t] = λ(u[t−1] − Vth·o[t−1]) + I[t]."""
    h = v + current if p.leak == 1.0 else p.leak * v + current
    spikes = spike(h - p.vth)
    v_next = h - p.vth * spikes if p.reset == "soft" else h * (1.0 - spikes)
    return spikes, v_next


@torch.no_grad()
def neuron_step_(current: Tensor, v: Tensor, p: NeuronParams) -> tuple[Tensor, Tensor]:
    """`neuron_step` with the Heaviside spike, updating the membrane `v` in place: the same arithmetic bit
    for bit (Vth·s is exact, and h > Vth ⟺ h − Vth > 0 in floating point) without the temporaries, for the
    spike forward that keeps no graph (a third of its time went to them)."""
    h = v.add_(current) if p.leak == 1.0 else v.mul_(p.leak).add_(current)
    spikes = torch.gt(h, p.vth, out=torch.empty_like(h))
    if p.reset == "soft":
        h.sub_(spikes, alpha=p.vth)
    else:
        h.mul_(1.0 - spikes)
    return spikes, h


class _Surrogate(torch.autograd.Function):
    """Heaviside forward, smooth pseudo-derivative backward (the surrogate gradient of BPTT)."""

    @staticmethod
    def forward(ctx, x: Tensor, kind: str, alpha: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.kind, ctx.alpha = kind, alpha
        return heaviside(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        a = ctx.alpha
        if ctx.kind == "atan":  # SpikingJelly's ATan: α/2 / (1 + (π/2·α·x)²)
            d = (a / 2) / (1 + (math.pi / 2 * a * x) ** 2)
        elif ctx.kind == "sigmoid":  # derivative of σ(αx)
            s = torch.sigmoid(a * x)
            d = a * s * (1 - s)
        else:  # triangle of height α and half-width 1/α
            d = a * torch.clamp(1 - a * x.abs(), min=0)
        return grad * d, None, None


def surrogate_spike(kind: str, alpha: float) -> SpikeFn:
    if kind not in SURROGATES:
        raise ValueError(f"unknown surrogate {kind!r}")
    return lambda x: _Surrogate.apply(x, kind, alpha)
