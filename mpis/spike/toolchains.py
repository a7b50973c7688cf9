"""The NIR hand-off, measured: an exported file run by each toolchain's own importer (`mpis check
--toolchain`), in that toolchain's interpreter, compared spike count by spike count with mpis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mpis.errors import MpisError
from mpis.export.nir_nodes import read_nir
from mpis.export.toolchains import TARGETS, Geometry

TOOLCHAINS = ("norse", "sinabs", "snntorch", "spyx")
RUNNER = Path(__file__).with_name("toolchain_runner.py")
MODULES = {"norse": "norse", "sinabs": "sinabs", "snntorch": "snntorch", "spyx": "spyx"}


@dataclass(frozen=True)
class Toolchain:
    """A toolchain and the Python that has it (`norse`, or `sinabs=/venv/bin/python`)."""

    name: str
    python: str

    @property
    def exportable(self) -> bool:
        return self.name in TARGETS


def parse_toolchains(text: str) -> tuple[Toolchain, ...]:
    out = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, python = item.partition("=")
        if name not in TOOLCHAINS:
            raise MpisError(f"--toolchain: unknown toolchain {name!r}; choose from {', '.join(TOOLCHAINS)}")
        if python and not Path(python).is_file():
            raise MpisError(f"--toolchain {name}={python}: no such interpreter")
        out.append(Toolchain(name, python or sys.executable))
    if not out:
        raise MpisError("--toolchain is empty")
    return tuple(out)


def missing(toolchain: Toolchain) -> str | None:
    """Why the toolchain cannot run here (None: it can), asked of its own interpreter."""
    if not toolchain.exportable:
        return "no mpis export for it yet (docs/toolchain-importers.md)"
    probe = f"import {MODULES[toolchain.name]}, nir, torch"
    done = subprocess.run([toolchain.python, "-c", probe], capture_output=True, text=True, timeout=300)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"not installed for {toolchain.python} ({last[:120]})"
    return None


@dataclass
class ToolchainRun:
    counts: dict[str, Tensor]  # per neuron layer, the model's layout (B, C, n, n)
    logits: Tensor
    version: str
    seconds: float
    threads: int  # torch's intra-op threads in the importer's process, as it reported them


def run_toolchain(
    toolchain: Toolchain, path: Path, x: Tensor, steps: int, batch: int, threads: int = 1
) -> ToolchainRun:
    """`path` through the toolchain's importer on `x` for `steps` steps, in its own process with `threads`
    threads: torch's (the runner sets them) and every OpenMP/MKL pool's, which read the environment."""
    # read here first, through mpis's size limits: the runner's own nir.read then reads a file known to be sane
    # (and a file for an older nir may broadcast its parameters: no type check)
    graph = read_nir(path, type_check=False)
    layers = graph.metadata["layers"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory(prefix="mpis-toolchain-") as tmp:
        inputs, out = Path(tmp) / "inputs.npy", Path(tmp) / "out.npz"
        np.save(inputs, x.numpy().astype(np.float32))
        start = time.perf_counter()
        args = [toolchain.python, str(RUNNER), toolchain.name, str(path), str(inputs), str(out)]
        done = subprocess.run([*args, str(steps), str(batch), str(threads)], capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            raise MpisError(f"{toolchain.name}'s importer failed on {path}: {last[:200]}")
        result = np.load(out)
        counts = {}
        for layer, info in layers.items():
            geo = Geometry(int(info["channels"]), int(info["size"]), int(info["dilation"]), 0)
            counts[layer] = geo.to_native(torch.from_numpy(result[f"layer_{layer}"]))
        info = json.loads(done.stdout.strip().splitlines()[-1])
        logits, version = torch.from_numpy(result["logits"]), str(info.get("version", "?"))
        return ToolchainRun(counts, logits, version, seconds, int(info.get("threads", 0)))
