import pytest
import torch

from mpis.model.network import MPISNet

TINY_ARCH = "4C3-2F1*(6C3S2-8C3)-FC10"


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    torch.manual_seed(0)


def contractive_net(arch: str = TINY_ARCH, shape=(1, 8, 8), scale: float = 0.3) -> MPISNet:
    """A small net whose equilibrium map is a contraction (small feedback and BN gains), calibrated."""
    net = MPISNet(arch, shape)
    with torch.no_grad():
        for name, op in net.ops.items():
            if "trans" in name or "fuse" in name:
                for p in op.parameters():
                    p.mul_(scale)
        for node in net.loop_nodes:
            if node.kind == "conv":
                net.ops[node.name].bn.weight.fill_(scale)
                net.ops[node.name].bn.bias.fill_(0.2)
    return net.eval()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny net trained for one epoch on digits with T = 5 (shared by the export tests)."""
    from mpis.cli import main

    out = tmp_path_factory.mktemp("run")
    args = ["train", "--arch", TINY_ARCH, "--T", "5", "--epochs", "1", "--quiet", "--out", str(out)]
    assert main(args) == 0
    return out / "model.pt"
