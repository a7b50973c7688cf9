import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpis.export.polyphase import from_polyphase, polyphase_conv, to_polyphase
from mpis.model.layers import downsampler, upsampler


def nearest_up(x):
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


CASES = {
    # name: (op, C_in, C_out, f_in, f_out)
    "conv-transpose-k3-s2 (Trans, U)": (upsampler(5, 3, 2, (6, 6), (12, 12)), 5, 3, 1, 2),
    "conv-k3-s2 (layer, D)": (downsampler(4, 1), 4, 4, 2, 1),
    "conv-k3-s1 at f=2": (nn.Conv2d(3, 4, 3, padding=1), 3, 4, 2, 2),
    "conv-k3-s2 f=4 -> f=2": (downsampler(2, 1), 2, 2, 4, 2),
    "conv-transpose-k3-s2 f=2 -> f=4": (upsampler(2, 3, 2, (6, 6), (12, 12)), 2, 3, 2, 4),
    "nearest-x2": (nearest_up, 3, 3, 1, 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_polyphase_conv_equals_the_original_op(name):
    op, c_in, c_out, f_in, f_out = CASES[name]
    torch.manual_seed(0)
    with torch.no_grad():
        if isinstance(op, nn.Module):
            for p in op.parameters():
                p.uniform_(-1, 1)
        weight, bias = polyphase_conv(op, c_in, f_in, f_out)
        grid = 6  # a 6×6 coarse grid: even full-resolution sizes at every factor
        x = torch.randn(2, c_in, f_in * grid, f_in * grid)
        want = to_polyphase(op(x), f_out)
        got = F.conv2d(to_polyphase(x, f_in), weight, bias, padding=weight.shape[-1] // 2)
    assert weight.shape[:2] == (c_out * f_out**2, c_in * f_in**2)
    assert weight.shape[-1] <= 3  # minimal kernels: all-zero outer taps cropped
    assert (got - want).abs().max() <= 1e-5
    assert torch.equal(from_polyphase(to_polyphase(x, f_in), f_in), x)
