"""Dyadic weights: the arithmetic of a spiking net made exact, so every toolchain gets the same spikes.

Importers sum a neuron's inputs in their own order and with their own neuron formulas, and float32
rounding differs with the order; one spike flipped at a near-tie then spreads through the equilibrium
loop (digits net, T = 100: 0.6 % of spike counts differ between Norse and mpis with float weights).
With every weight and bias a multiple of 2^−e (e per op: `bits` significant bits for its largest
weight, as fixed-point neuromorphic hardware stores them), spikes are integers and a map read through
two ops is a multiple of 2^−(e1 + e2): every sum below 2^(24 − e1 − e2) is exact in float32, whatever
the order. An op that reads another op's output gets fewer bits where needed so that ±16·Vth stays exact
(the range where spike decisions are made); beyond it a sum may round, which `mpis check --toolchain`
would show.
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


def _budget_sharers(net: MPISNet, node) -> list[nn.Module]:
    """The ops whose exponents add up on one map before the next neuron, from `node`'s op on, where that map
    reads a fused sum: a fusion op whose sum a Trans map reads, that Trans op and the first layer's conv that
    reads it; or such a Trans op and that conv. Elsewhere [`node`'s own ops]: an op takes what is left."""
    own = _chain(net.ops[node.name])
    sums = [r for r in net.graph.nodes if r.kind == "sum" and node.name in r.inputs]
    if sums:
        trans = next((t for t in net.graph.nodes if sums[0].name in t.delayed), None)
        return own + (_budget_sharers(net, trans) if trans is not None else [])
    if any(net.graph.node(s).kind == "sum" for s in node.delayed):
        reader = next((r for r in net.graph.nodes if node.name in r.inputs and r.kind in ("conv", "linear")), None)
        return own + (_chain(net.ops[reader.name]) if reader is not None else [])
    return own


def _shares(net: MPISNet) -> dict[str, tuple[int, int]]:
    """Per op node that shares the float32 budget (see `_budget_sharers`): (Σ of the sharers' exponent
    offsets, their count), measured on the weights before any rounding. An op's exponent is its significant
    bits plus an offset (−1 − ⌊log2 max|w|⌋), so splitting the budget left after the offsets equally gives
    every sharer the same significant bits: small weights do not starve the op after them."""
    shares = {}
    for node in net.graph.nodes:
        if node.kind in ("conv", "linear"):
            sharers = [op for op in _budget_sharers(net, node) if _exponent(op, 0) is not None]
            if len(sharers) > 1:
                shares[node.name] = (sum(_exponent(op, 0) for op in sharers), len(sharers))
    return shares


def _cap(op: nn.Module, bits: int, fraction: int, budget: int, share: tuple[int, int] | None) -> int:
    """The exponent `op` gets: `bits` significant bits, at most what the budget left after `fraction` allows
    (an equal share of significant bits with the ops that follow, where `share` says so)."""
    e = min(_exponent(op, bits), budget - fraction)
    if share is not None:
        offsets, count = share
        e = min(e, (budget - fraction - offsets) // count + _exponent(op, 0))
    return e


def _state_fraction(net: MPISNet, name: str, bits: int, budget: int, shares: dict) -> int:
    """Fractional bits of a map read through a back-edge: 0 for spikes; for a fused sum, the largest of its
    terms, each a chain of ops on spikes (the exponents `dyadic_copy` gives those ops)."""
    node = net.graph.node(name)
    if node.kind == "neuron":
        return 0
    if node.kind == "sum":
        return max(_state_fraction(net, term, bits, budget, shares) for term in node.inputs)
    if node.kind in ("conv", "linear") and not node.delayed:
        fraction = max(_state_fraction(net, source, bits, budget, shares) for source in node.inputs)
        for op in _chain(net.ops[node.name]):
            if _exponent(op, bits) is not None:
                fraction += _cap(op, bits, fraction, budget, shares.get(node.name))
        return fraction
    raise MpisError(f"{name}: a back-edge map read through {node.kind} {name} cannot be written exactly")


def dyadic_copy(net: MPISNet, bits: int) -> tuple[MPISNet, dict[str, Grid], int]:
    """A folded copy of `net` with dyadic weights and the grid of every map. Each op keeps `bits`
    significant bits, fewer where it reads another op's output and the product grid would leave less
    than ±16·Vth exact in float32 (small weights need many fractional bits); the fewest kept is returned."""
    if not 2 <= bits <= 16:
        raise MpisError(f"--weight-bits must be between 2 and 16, got {bits}")
    folded = net.folded_copy()
    grids: dict[str, Grid] = {}
    # the finest grid on which ±16·Vth is still exact in float32
    budget = MANTISSA_BITS - math.ceil(math.log2(EXACT_RANGE * folded.neuron.vth))
    fewest = bits
    # Maps of the previous step a Trans map reads: spikes (0 fractional bits), or a sum fused after the last
    # FEB layer, whose grid is that of the fusion ops that read spikes (computed as the loop below will).
    with torch.no_grad():
        shares = _shares(folded)
        state = {
            n: _state_fraction(folded, n, bits, budget, shares) for node in folded.graph.nodes for n in node.delayed
        }
        for node in folded.graph.nodes:
            if node.kind == "input":
                grids[node.name] = Grid(INPUT_BITS)
            elif node.kind == "neuron":
                grids[node.name] = Grid(0)  # spikes
            elif node.kind == "sum":
                grids[node.name] = Grid(max(grids[i].fraction for i in node.inputs))
            elif node.kind in ("conv", "linear"):
                read = [grids[s].fraction for s in node.inputs if s in grids] + [state[s] for s in node.delayed]
                fraction = max(read, default=0)
                for op in _chain(folded.ops[node.name]):
                    e = _exponent(op, bits)
                    if e is None:
                        continue
                    e = _cap(op, bits, fraction, budget, shares.get(node.name))  # fewer where a chain would not fit
                    if e < _exponent(op, 2):
                        raise MpisError(
                            f"{node.name}: fewer than 2 significant bits are left for its weights on a 2^-{budget} "
                            f"grid (exact to ±{EXACT_RANGE:g}·Vth); the net's weights are too small for exact sums"
                        )
                    fewest = min(fewest, e - _exponent(op, bits) + bits)
                    for p in op.parameters():
                        p.copy_(torch.round(p * 2.0**e) / 2.0**e)
                    fraction += e
                grids[node.name] = Grid(fraction)
        head = folded.ops["head"].fc
        e = _exponent(head, bits)
        for p in head.parameters():
            p.copy_(torch.round(p * 2.0**e) / 2.0**e)
    return folded, grids, fewest
