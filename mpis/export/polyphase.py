"""Stride-2 linear maps as stride-1 convolutions on a polyphase layout (docs/nir-mapping.md §4).

A map stored at factor f over the coarse grid of its loop is kept as `pixel_unshuffle(x, f)`:
(C, f·H, f·W) -> (f²·C, H, W). Any linear op between two such maps that commutes with a shift by one
grid cell (strided conv, transposed conv, nearest up-sampling, stride-1 conv) is then an ordinary
stride-1 Conv2d on the grid. Its kernel is read off by probing the op with one impulse per input
channel on a grid large enough that no border is touched; all-zero outer taps are cropped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def polyphase_conv(
    op: Callable[[Tensor], Tensor],
    in_channels: int,
    in_factor: int,
    out_factor: int,
    reach: int = 3,
    chunk: int = 64,
) -> tuple[Tensor, Tensor]:
    """Weight (f_out²·C_out, f_in²·C_in, k, k) and bias of the grid conv equal to `op`.

    `op` maps (N, C_in, f_in·G, f_in·G) to (N, C_out, f_out·G, f_out·G) for any grid size G; `reach`
    bounds the kernel radius searched for (in grid cells)."""
    grid = 4 * reach + 3
    centre = grid // 2
    channels = in_channels * in_factor**2
    zero = op(torch.zeros(1, in_channels, in_factor * grid, in_factor * grid))
    responses = []
    for start in range(0, channels, chunk):  # chunked: wide layers at high factors would not fit at once
        count = min(chunk, channels - start)
        impulses = torch.zeros(count, channels, grid, grid)
        impulses[torch.arange(count), torch.arange(start, start + count), centre, centre] = 1.0
        response = op(F.pixel_shuffle(impulses, in_factor)) - zero  # (count, C_out, f·G, f·G)
        responses.append(F.pixel_unshuffle(response, out_factor))
    response = torch.cat(responses)  # (C_in', C_out', G, G)
    bias = F.pixel_unshuffle(zero, out_factor)[0, :, centre, centre]
    # conv (cross-correlation) with padding r: w[o, i, a, b] = response[i, o, centre + r − a, centre + r − b]
    nonzero = response.abs().amax(dim=(0, 1)) > 0
    rows, cols = torch.nonzero(nonzero, as_tuple=True)
    radius = int(max((rows - centre).abs().max(), (cols - centre).abs().max())) if len(rows) else 0
    if radius > reach:
        raise ValueError(f"op reaches {radius} grid cells, more than reach={reach}")
    window = response[:, :, centre - radius : centre + radius + 1, centre - radius : centre + radius + 1]
    weight = window.flip(-1, -2).transpose(0, 1).contiguous()
    return weight, bias


def to_polyphase(x: Tensor, factor: int) -> Tensor:
    return F.pixel_unshuffle(x, factor) if factor > 1 else x


def from_polyphase(x: Tensor, factor: int) -> Tensor:
    return F.pixel_shuffle(x, factor) if factor > 1 else x
