"""Dyadic weights: the arithmetic of a spiking net made exact, so every toolchain gets the same spikes.

Importers sum a neuron's inputs in their own order and with their own neuron formulas, and float32
rounding differs with the order; one spike flipped at a near-tie then spreads through the equilibrium
loop (digits net, T = 100: 0.6 % of spike counts differ between Norse and mpis with float weights).
With every weight and bias a multiple of 2^−e (e per op: `bits` significant bits for its largest
weight, as fixed-point neuromorphic hardware stores them), spikes are integers and a map read through
two ops is a multiple of 2^−(e1 + e2): every sum below 2^(24 − e1 − e2) is exact in float32, whatever
the order. Export refuses a net whose maps' resolution leaves less than ±16·Vth exact (the range where
spike decisions are made); beyond it a sum may round, which `mpis check --toolchain` would show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mpis.errors import MpisError
from mpis.model.network import MPISNet

MANTISSA_BITS = 24  # float32: multiples of 2^−f below 2^(24 − f) in magnitude are exact
EXACT_RANGE = 16.0  # in units of Vth: sums and membranes must be exact at least this far from zero
INPUT_BITS = 8  # inputs are taken to be multiples of 2^-8 (8-bit pixels, event counts): then exact too


@dataclass(frozen=True)
class Grid:
    """A map's values are multiples of 2^−`fraction`."""

    fraction: int


def _chain(module: nn.Module) -> list[nn.Module]:
    return [op for child in module for op in _chain(child)] if isinstance(module, nn.Sequential) else [module]


def _exponent(op: nn.Module, bits: int) -> int | None:
    params = [p for p in op.parameters() if p.dim() > 1]
    if not params:
        return None
    largest = max(float(p.abs().max()) for p in params)
    return bits - 1 - math.floor(math.log2(largest)) if largest > 0 else 0


def dyadic_copy(net: MPISNet, bits: int) -> tuple[MPISNet, dict[str, Grid]]:
    """A folded copy of `net` with dyadic weights and the grid of every map; refuses (naming the map)
    where float32 could not hold ±16·Vth exactly, which a lower `bits` then fixes."""
    if not 2 <= bits <= 16:
        raise MpisError(f"--weight-bits must be between 2 and 16, got {bits}")
    folded = net.folded_copy()
    grids: dict[str, Grid] = {}
    limit = EXACT_RANGE * folded.neuron.vth
    with torch.no_grad():
        for node in folded.graph.nodes:
            if node.kind == "input":
                grids[node.name] = Grid(INPUT_BITS)
            elif node.kind == "neuron":
                grids[node.name] = Grid(0)  # spikes
            elif node.kind == "sum":
                grids[node.name] = Grid(max(grids[i].fraction for i in node.inputs))
            elif node.kind in ("conv", "linear"):
                # a Trans map reads spikes of the previous step (0 fractional bits)
                fraction = max((grids[s].fraction for s in node.inputs if s in grids), default=0)
                for op in _chain(folded.ops[node.name]):
                    e = _exponent(op, bits)
                    if e is not None:
                        for p in op.parameters():
                            p.copy_(torch.round(p * 2.0**e) / 2.0**e)
                        fraction += e
                if limit > 2.0 ** (MANTISSA_BITS - fraction):
                    raise MpisError(
                        f"{node.name}: sums on a 2^-{fraction} grid are exact only below "
                        f"{2.0 ** (MANTISSA_BITS - fraction):g}, less than {EXACT_RANGE:g}·Vth; lower --weight-bits"
                    )
                grids[node.name] = Grid(fraction)
        head = folded.ops["head"].fc
        e = _exponent(head, bits)
        for p in head.parameters():
            p.copy_(torch.round(p * 2.0**e) / 2.0**e)
    return folded, grids
