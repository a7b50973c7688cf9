"""The BPTT baseline: the same graph unrolled over T steps with spiking neurons and a surrogate gradient.

Memory grows with T (every step's activations are kept for backward): it is the reference the MPIS
equilibrium core is measured against."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mpis.model.network import MPISNet
from mpis.model.neurons import heaviside, surrogate_spike


class BPTTModel(nn.Module):
    """`forward(x)` returns the classifier output of every step: (T, batch, classes)."""

    def __init__(self, net: MPISNet, steps: int, surrogate: str = "atan", alpha: float = 2.0):
        super().__init__()
        self.net = net
        self.steps = steps
        self.spike = surrogate_spike(surrogate, alpha)

    def forward(self, x: Tensor) -> Tensor:
        net = self.net
        masks = net.sample_dropout_masks(x.shape[0], x.device)
        spike = self.spike if self.training else heaviside
        bn = "track" if self.training else "running"
        return torch.stack([net.classify(values) for values in net.spike_steps(x, self.steps, masks, spike, bn)])
