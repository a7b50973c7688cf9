"""Losses over per-step outputs (steps, batch, classes), from the IMP/LTS/TET-S poster and TET.

An MPIS model has one output (its equilibrium), passed as a single step: SDT, TET and LTS then all
reduce to cross-entropy on it, and TET-S to cross-entropy with label smoothing ε."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def readout(kind: str, outputs: Tensor) -> Tensor:
    """The prediction a loss trains: the last step for LTS, the time mean otherwise."""
    return outputs[-1] if kind == "lts" else outputs.mean(dim=0)


def spiking_loss(kind: str, outputs: Tensor, target: Tensor, smoothing: float = 0.0) -> Tensor:
    """sdt: CE of the time-mean output; tet: mean over steps of per-step CE; lts: CE of the last step;
    tets: TET with labels smoothed to (1 − ε)·y + ε/K."""
    if kind in ("sdt", "lts"):
        return F.cross_entropy(readout(kind, outputs), target)
    steps = outputs.shape[0]
    eps = smoothing if kind == "tets" else 0.0
    return F.cross_entropy(outputs.flatten(0, 1), target.repeat(steps), label_smoothing=eps)
