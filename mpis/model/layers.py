"""The linear pieces of an MPIS network: conv+BN layers and the resampling maps between resolutions."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn


def batch_statistics(y: Tensor) -> tuple[Tensor, Tensor, float]:
    """Per-channel mean and (biased) variance over batch and space, across all DDP processes.

    The sums are all-reduced with autograd support, so K processes with batch B normalise and
    differentiate exactly like one process with batch K·B (synchronised BN, on CPU/gloo as on NCCL).
    One formula serves both cases."""

    def reduce(t: Tensor) -> Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            with warnings.catch_warnings():  # its deprecation names a private replacement without autograd docs
                warnings.simplefilter("ignore", FutureWarning)
                return dist_fn.all_reduce(t, group=_statistics_group())
        return t

    count = torch.tensor([float(y.numel() // y.shape[1])], device=y.device, dtype=y.dtype)
    sums = reduce(torch.cat([y.sum(dim=(0, 2, 3)), count]))
    total = sums[-1]
    mean = sums[:-1] / total
    # Two passes (mean, then squared deviations): E[y²] − E[y]² cancels catastrophically for channels
    # that are almost constant, and would then differ between one process and several.
    var = reduce((y - mean[:, None, None]).square().sum(dim=(0, 2, 3))) / total
    return mean, var, float(total.detach())


_GROUPS: dict[int, dist.ProcessGroup] = {}


def _statistics_group() -> dist.ProcessGroup:
    """A process group of its own for BN statistics: DDP's asynchronous gradient all-reduces run on the
    default group during backward, and sharing it would let the two kinds of collective interleave."""
    key = id(dist.group.WORLD)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group()
    return _GROUPS[key]


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

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, eps: float = 1e-5):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps)

    def forward(self, x: Tensor, stats: str = "running") -> Tensor:
        """`running`: deployed statistics; `batch`: this batch's; `track`: this batch's, and update the
        running ones (ordinary BN training, used per time step by BPTT)."""
        if stats == "running":  # BN folded into the conv: one op per step instead of three
            weight, bias = self._folded(self.bn.running_mean, self.bn.running_var)
            return F.conv2d(x, weight, bias, self.conv.stride, self.conv.padding)
        y = self.conv(x)
        mean, var, count = batch_statistics(y)
        if stats == "track":
            self._update(mean, var, count)
        return self._normalise(y, mean, var)

    def _normalise(self, y: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        bn = self.bn
        scale = bn.weight / torch.sqrt(var + bn.eps)
        return y * scale[:, None, None] + (bn.bias - mean * scale)[:, None, None]

    @torch.no_grad()
    def _update(self, mean: Tensor, var: Tensor, count: float) -> None:
        """Move the running statistics towards these (the first batch sets them outright)."""
        bn = self.bn
        unbiased = var * count / max(count - 1.0, 1.0)
        momentum = 1.0 if int(bn.num_batches_tracked) == 0 else bn.momentum
        bn.running_mean.lerp_(mean.detach(), momentum)
        bn.running_var.lerp_(unbiased.detach(), momentum)
        bn.num_batches_tracked += 1

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> Tensor:
        """Update the running statistics from this batch, then normalise with them."""
        y = self.conv(x)
        self._update(*batch_statistics(y))
        return self._normalise(y, self.bn.running_mean, self.bn.running_var)

    def _folded(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        bn = self.bn
        scale = bn.weight / torch.sqrt(var + bn.eps)
        return self.conv.weight * scale[:, None, None, None], bn.bias - mean * scale

    def folded(self) -> tuple[Tensor, Tensor]:
        """Weight and bias of the single conv equal to conv→BN with the running statistics (for export)."""
        weight, bias = self._folded(self.bn.running_mean, self.bn.running_var)
        return weight.detach(), bias.detach()


class FoldedConv(nn.Conv2d):
    """A ConvBN with BN folded into the conv: what inference graphs (ONNX, NIR) contain."""

    @classmethod
    def from_conv_bn(cls, layer: ConvBN) -> FoldedConv:
        conv = layer.conv
        folded = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True)
        weight, bias = layer.folded()
        folded.weight.data.copy_(weight)
        folded.bias.data.copy_(bias)
        return folded

    def forward(self, x: Tensor, stats: str = "running") -> Tensor:
        return super().forward(x)


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
