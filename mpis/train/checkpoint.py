"""Checkpoints hold the weights and every config, so later commands need nothing else, and the training
state (optimizer, schedule, RNG, every epoch's metrics) so that `mpis train --resume` continues a run.

Written atomically (temporary file in the same folder, then rename) and read with
`torch.load(weights_only=True)`: only tensors and plain Python values, no pickled code.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpis.config import LEGACY_BN_EPS, ModelConfig, SolverConfig, TrainConfig, config_from_dict
from mpis.errors import MpisError
from mpis.train.models import build_model

FORMAT = "mpis-checkpoint"
VERSION = 1


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
SPACE_MARGIN = 1 << 20  # beyond a file's own bytes: the folder entry, the file system's blocks


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, then rename over `path`; on failure the target is left untouched. A full
    disk is one clear error, whatever layer of the writer met it."""
    path = Path(path)
    try:
        _atomic_write(path, write)
    except OSError as err:
        if err.errno in NO_SPACE:
            raise MpisError(no_space_message(path, "")) from None
        raise


def no_space_message(path: Path, size: str) -> str:
    return (
        f"no space left on the device for {path}{size} ({free_mb(path.parent):,.0f} MB free); "
        "the file there before is intact"
    )


def free_mb(folder: Path) -> float:
    return shutil.disk_usage(folder).free / 2**20


def remove_leftovers(path: Path) -> list[Path]:
    """Delete the temporary files a killed `atomic_write(path, …)` left beside `path` (kill -9 runs no
    cleanup); returns what was removed."""
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for leftover in stale:
        leftover.unlink(missing_ok=True)
    return stale


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the user's usual mode
        fsync_path(tmp)  # the bytes on disk before the name points at them: a power cut leaves old or new
        os.replace(tmp, path)
        fsync_path(path.parent)  # and the rename itself
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_path(path: Path | str) -> None:
    """fsync a file (its bytes) or a folder (its entries: a rename is durable only then)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    path: Path,
    model: nn.Module,
    model_cfg: ModelConfig,
    solver_cfg: SolverConfig,
    train_cfg: TrainConfig,
    metrics: dict[str, Any],
    run_state: dict[str, Any] | None = None,
) -> None:
    """Write the checkpoint; `run_state` (mpis train's optimizer, schedule, RNG and metrics history) makes it
    resumable. Serialised in memory first, so that its exact size is checked against the free space before
    the file is touched: a full disk is one line, not a half-written archive or a torch traceback."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": asdict(model_cfg),
        "solver": asdict(solver_cfg),
        "train": asdict(train_cfg),
        "input_shape": list(model.net.input_shape),
        "metrics": metrics,
        "state_dict": {k: v.detach().cpu() for k, v in model.net.state_dict().items()},
    }
    if run_state is not None:
        payload["run"] = run_state
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    size = f" ({len(data) / 2**20:,.1f} MB)"
    if free_mb(path.parent) * 2**20 < len(data) + SPACE_MARGIN:
        raise MpisError(no_space_message(path, size))
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


class Checkpoint:
    """A loaded checkpoint: configs, input shape, the rebuilt trainer model (MPIS or BPTT; CPU, eval mode)
    and its network."""

    def __init__(self, payload: dict[str, Any], path: Path):
        self.path = path
        # Checkpoints from before --bn-eps were all trained with torch's ε.
        model = {"bn_eps": LEGACY_BN_EPS, **payload["model"]}
        self.model_cfg: ModelConfig = config_from_dict(ModelConfig, model)
        solver = {"jac_radius": 0.0, **payload["solver"]}  # checkpoints from before --jac-radius trained without it
        self.solver_cfg: SolverConfig = config_from_dict(SolverConfig, solver)
        train = {"events": "frames", **payload["train"]}  # checkpoints from before --events played frames
        self.train_cfg: TrainConfig = config_from_dict(TrainConfig, train)
        self.input_shape = tuple(int(v) for v in payload["input_shape"])
        self.metrics: dict[str, Any] = payload.get("metrics", {})
        try:
            self.model = build_model(self.model_cfg, self.solver_cfg, self.train_cfg, self.input_shape)
            self.model.net.load_state_dict(payload["state_dict"])
        except RuntimeError as err:
            raise MpisError(
                f"checkpoint {path} does not match its own architecture: {str(err).splitlines()[0]}"
            ) from None
        self.model.eval()
        self.net = self.model.net


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    payload = read_payload(path)
    try:
        return Checkpoint(payload, path)
    except (KeyError, TypeError) as err:
        raise MpisError(f"{path} is a damaged mpis checkpoint (missing or bad field {err})") from None


def read_payload(path: Path) -> dict[str, Any]:
    """The checkpoint's raw dictionary, checked to be a complete mpis checkpoint of this version."""
    if path.is_dir():
        raise MpisError(f"checkpoint {path} is a folder; pass the model.pt inside it")
    if not path.is_file():
        raise MpisError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut-off one has no central directory
        raise MpisError(
            f"{path} is not a readable mpis checkpoint: not a complete PyTorch archive "
            f"({path.stat().st_size:,} bytes; truncated, or another kind of file)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise MpisError(
            f"{path} is not a readable mpis checkpoint: it holds objects other than tensors and plain values, "
            "which are refused (weights_only loading)"
        ) from None
    except Exception as err:  # torch raises many types for damaged archives
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise MpisError(
            f"{path} is not a readable mpis checkpoint: damaged archive ({type(err).__name__}: {detail})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise MpisError(f"{path} is not an mpis checkpoint (no '{FORMAT}' marker)")
    if payload.get("version") != VERSION:
        raise MpisError(f"{path} has checkpoint version {payload.get('version')}; this mpis reads {VERSION}")
    return payload
