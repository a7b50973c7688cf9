"""The linear pieces of an MPIS network: conv+BN layers and the resampling maps between resolutions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def down_size(size: int, stride: int) -> int:
    """Output size of a k×k conv with padding k//2 (odd k) and this stride: ceil(size / stride)."""
    return -(-size // stride)


class ConvBN(nn.Module):
    """Conv (no bias) followed by BatchNorm, with the statistics chosen explicitly by the caller.

    The forward solve (spiking or rate) normalises with the running statistics: it is then the very
    network that is deployed, one per-sample map whose BN folds exactly into the conv. The one
    differentiable step at the fixed point uses batch statistics, so gradients flow through them as in
    ordinary BN training (measured on digits: 95 % vs 89 % after 5 epochs with frozen statistics).
    `calibrate` moves the running statistics towards the fixed point's batch statistics.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor, batch_stats: bool = False) -> Tensor:
        y = self.conv(x)
        if batch_stats:
            bn = self.bn
            return F.batch_norm(y, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        return self._normalise(y)

    def _normalise(self, y: Tensor) -> Tensor:
        bn = self.bn
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> Tensor:
        """Move the running statistics towards this batch's (the first batch sets them outright)."""
        y = self.conv(x)
        bn = self.bn
        mean = y.mean(dim=(0, 2, 3))
        var = y.var(dim=(0, 2, 3), unbiased=True) if y.numel() > y.shape[1] else torch.ones_like(mean)
        momentum = 1.0 if int(bn.num_batches_tracked) == 0 else bn.momentum
        bn.running_mean.lerp_(mean, momentum)
        bn.running_var.lerp_(var, momentum)
        bn.num_batches_tracked += 1
        return self._normalise(y)

    def folded(self) -> tuple[Tensor, Tensor]:
        """Weight and bias of the single conv equal to conv→BN (for export)."""
        bn = self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        weight = self.conv.weight * scale[:, None, None, None]
        bias = bn.bias - bn.running_mean * scale
        return weight.detach(), bias.detach()


class NearestUp(nn.Module):
    """Nearest-neighbour up-sampling by an integer factor, cropped to the target size (odd maps)."""

    def __init__(self, factor: int, size: tuple[int, int]):
        super().__init__()
        self.factor = factor
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        x = x.repeat_interleave(self.factor, dim=2).repeat_interleave(self.factor, dim=3)
        return x[:, :, : self.size[0], : self.size[1]]

    def extra_repr(self) -> str:
        return f"factor={self.factor}, size={self.size}"


def upsampler(
    in_channels: int, out_channels: int, factor: int, src: tuple[int, int], dst: tuple[int, int]
) -> nn.Module:
    """Transposed conv that maps `src` exactly onto `dst` = ceil-inverse of `factor` down-sampling.

    Kernel 2f−1 with padding f−1 is the adjoint of a 3×3 stride-2 conv for f=2 and keeps every output
    pixel covered; output_padding absorbs odd sizes.
    """
    if factor == 1:
        return nn.Conv2d(in_channels, out_channels, 3, 1, padding=1)
    kernel, padding = 2 * factor - 1, factor - 1
    extra = tuple(d - ((s - 1) * factor - 2 * padding + kernel) for s, d in zip(src, dst, strict=True))
    return nn.ConvTranspose2d(in_channels, out_channels, kernel, factor, padding, output_padding=extra)


def downsampler(channels: int, steps: int) -> nn.Module:
    """`steps` chained 3×3 stride-2 convs: each halves the resolution (ceil), as HRNet's fusion does."""
    return nn.Sequential(*[nn.Conv2d(channels, channels, 3, 2, padding=1) for _ in range(steps)])


class Classifier(nn.Module):
    """Flatten the smallest stream's rates (no batch axis assumed beyond dim 0) and apply one FC."""

    def __init__(self, features: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(features, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1))
