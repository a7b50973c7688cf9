"""Checkpoints hold the weights and every config, so later commands need nothing else.

Written atomically (temporary file in the same folder, then rename) and read with
`torch.load(weights_only=True)`: only tensors and plain Python values, no pickled code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpis.config import ModelConfig, SolverConfig, TrainConfig, config_from_dict
from mpis.errors import MpisError
from mpis.train.models import build_model

FORMAT = "mpis-checkpoint"
VERSION = 1


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, then rename over `path`; on failure the target is left untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the user's usual mode
        _fsync(tmp)  # the bytes on disk before the name points at them: a power cut leaves old or new
        os.replace(tmp, path)
        _fsync(path.parent)  # and the rename itself
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync(path: Path | str) -> None:
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
) -> None:
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
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


class Checkpoint:
    """A loaded checkpoint: configs, input shape, the rebuilt trainer model (MPIS or BPTT; CPU, eval mode)
    and its network."""

    def __init__(self, payload: dict[str, Any], path: Path):
        self.path = path
        self.model_cfg: ModelConfig = config_from_dict(ModelConfig, payload["model"])
        self.solver_cfg: SolverConfig = config_from_dict(SolverConfig, payload["solver"])
        self.train_cfg: TrainConfig = config_from_dict(TrainConfig, payload["train"])
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
    try:
        return Checkpoint(payload, path)
    except (KeyError, TypeError) as err:
        raise MpisError(f"{path} is a damaged mpis checkpoint (missing or bad field {err})") from None
