"""Neuron models as pure functions: the rate form (DBReLU) and the spiking form (IF, reset by subtraction).

An IF neuron that subtracts Vth after each spike fires, over T steps, at rate
clamp(mean input / Vth, 0, 1) up to an O(1/T) boundary term (paper Eq. 11-16): that is why the
DBReLU map below is the equilibrium rate of the spiking network.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def dbrelu(current: Tensor, vth: float) -> Tensor:
    """Double-bounded ReLU (paper Eq. 10): the firing rate of an IF neuron driven by `current`."""
    return torch.clamp(current / vth, 0.0, 1.0)


class IFState(NamedTuple):
    """Membrane potential after the last reset."""

    v: Tensor


def if_initial_state(like: Tensor, v_init: float) -> IFState:
    return IFState(torch.full_like(like, v_init))


def if_step(current: Tensor, state: IFState, vth: float) -> tuple[Tensor, IFState]:
    """One step of integrate-and-fire with reset by subtraction: spike iff v > Vth (strict, as NIR)."""
    v = state.v + current
    spikes = (v > vth).to(current.dtype)
    return spikes, IFState(v - vth * spikes)
