import os
import re
import subprocess
import sys

import pytest
import torch

from mpis.model.network import MPISNet

TINY_ARCH = "4C3-2F1*(6C3S2-8C3)-FC10"


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip cleanly on a machine without a CUDA device (CI, most laptops)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny graphs: intra-op threads only add synchronisation (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def spiky_net(arch: str, shape, seed: int = 0, **kwargs) -> MPISNet:
    """Random weights scaled up so that every layer fires often (a silent net would match trivially)."""
    torch.manual_seed(seed)
    net = MPISNet(arch, shape, **kwargs).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    return net


def divided_arch(arch: str) -> str:
    """A paper architecture with every channel count divided by 16 (at least 2): same topology, small."""
    return re.sub(r"(\d+)C", lambda m: f"{max(2, int(m.group(1)) // 16)}C", arch)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny net trained for one epoch on digits with T = 5 (shared by the export tests)."""
    from mpis.cli import main

    out = tmp_path_factory.mktemp("run")
    args = ["train", "--arch", TINY_ARCH, "--T", "5", "--epochs", "1", "--quiet", "--out", str(out)]
    assert main(args) == 0
    return out / "model.pt"


# Runs `mpis` with two faults on markers: SIGKILL just before the KILL_AT-th rename (the moment an atomic
# write or a staged export commits), and the disk filled to FILL_LEAVING free bytes before a torch.save.
FAULTY_MPIS = """
import os, shutil, signal, sys, torch
from mpis.cli import main
calls = 0
def killed_at_marker(rename):
    def wrapped(src, dst, *args, **kwargs):
        global calls
        calls += 1
        if calls == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(src, dst, *args, **kwargs)
    return wrapped
def full_disk_save(obj, f, *args, save=torch.save, **kwargs):
    folder = os.environ["FILL_FOLDER"]
    with open(os.path.join(folder, "filler"), "ab") as filler:
        filler.write(bytes(max(shutil.disk_usage(folder).free - int(os.environ["FILL_LEAVING"]), 0)))
    return save(obj, f, *args, **kwargs)
os.replace, os.rename = killed_at_marker(os.replace), killed_at_marker(os.rename)
if os.environ.get("FILL_FOLDER"):
    torch.save = full_disk_save
sys.exit(main(sys.argv[1:]))
"""


def faulty_mpis(*args: str, kill_at: int = 0, fill=None, leaving: int = 0) -> subprocess.CompletedProcess:
    """`mpis ARGS` in a subprocess, killed at rename number `kill_at` (0: never), or with its disk `fill`ed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT": str(kill_at), "FILL_FOLDER": str(fill or "")}
    env["FILL_LEAVING"] = str(leaving)
    return subprocess.run(
        [sys.executable, "-c", FAULTY_MPIS, *args], capture_output=True, text=True, timeout=600, env=env
    )


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs (root only: mount needs it), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)
