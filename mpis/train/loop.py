"""`mpis train`: the epoch loop around the equilibrium model, with metrics and atomic checkpoints."""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mpis.config import ModelConfig, SolverConfig, TrainConfig, check_choices
from mpis.errors import MpisError
from mpis.model.equilibrium import EquilibriumModel
from mpis.model.network import MPISNet
from mpis.train.checkpoint import atomic_write, save_checkpoint
from mpis.train.data import DataSplit, load_dataset

RUN_FILES = ("model.pt", "metrics.jsonl")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MpisError(f"--device {name!r} is not a torch device (try cpu, cuda, cuda:0)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MpisError(f"--device {name}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on BN affine parameters and biases (1-D tensors)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    plain = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_model(model_cfg: ModelConfig, solver_cfg: SolverConfig, data: DataSplit) -> EquilibriumModel:
    net = MPISNet(model_cfg.arch, data.input_shape, model_cfg.vth, model_cfg.dropout, model_cfg.upsample)
    if net.arch.classes != data.classes:
        raise MpisError(f"arch ends in FC{net.arch.classes} but the dataset has {data.classes} classes")
    return EquilibriumModel(net, solver_cfg, model_cfg.v_init)


@torch.no_grad()
def evaluate(model: EquilibriumModel, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        logits, _ = model(x.to(device))
        correct += int((logits.argmax(1).cpu() == y).sum())
        total += len(y)
    return correct / max(total, 1)


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MpisError(f"--out {out} exists and is not a folder")
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise MpisError(
            f"--out {out} already holds a run ({', '.join(existing)}); pick a new folder or pass --overwrite"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".mpis-write-test"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise MpisError(f"cannot write to --out {out}: {err.strerror}") from None


def train(
    model_cfg: ModelConfig,
    solver_cfg: SolverConfig,
    train_cfg: TrainConfig,
    out: Path,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, write one JSON line per epoch to out/metrics.jsonl and out/model.pt; return the last metrics."""
    for cfg in (model_cfg, solver_cfg, train_cfg):
        check_choices(cfg)
    device = resolve_device(train_cfg.device)
    out = Path(out)
    data = load_dataset(train_cfg.dataset, train_cfg.data_dir, frames=solver_cfg.T)
    prepare_out_dir(out, overwrite)

    generator = seed_everything(train_cfg.seed)
    model = build_model(model_cfg, solver_cfg, data).to(device)
    train_loader = DataLoader(data.train, batch_size=train_cfg.batch_size, shuffle=True, generator=generator)
    test_loader = DataLoader(data.test, batch_size=max(train_cfg.batch_size, 256))
    if train_cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(param_groups(model, train_cfg.weight_decay), lr=train_cfg.lr)
    else:
        optimizer = torch.optim.SGD(param_groups(model, train_cfg.weight_decay), lr=train_cfg.lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=train_cfg.lr, total_steps=train_cfg.epochs * len(train_loader), pct_start=0.15
    )
    metrics_path = out / "metrics.jsonl"
    lines: list[str] = []
    metrics: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for epoch in range(1, train_cfg.epochs + 1):
        model.train()
        start = time.perf_counter()
        loss_sum = correct = seen = 0
        residual_sum = 0.0
        bar = tqdm(
            train_loader,
            desc=f"epoch {epoch}/{train_cfg.epochs}",
            disable=not progress,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            if data.augment is not None:
                x = data.augment(x)
            logits, info = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if not torch.isfinite(loss):
                raise MpisError(f"training diverged at epoch {epoch} (loss {loss.item()}); lower --lr")
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            residual_sum += float(info.residual.sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        seconds = time.perf_counter() - start
        test_acc = evaluate(model, test_loader, device)
        metrics = {
            "epoch": epoch,
            "loss": loss_sum / seen,
            "train_acc": correct / seen,
            "test_acc": test_acc,
            "seconds": round(seconds, 3),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            "residual": residual_sum / seen,
            "lr": schedule.get_last_lr()[0],
        }
        lines.append(json.dumps(metrics))
        atomic_write(metrics_path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
        save_checkpoint(out / "model.pt", model, model_cfg, solver_cfg, train_cfg, metrics)
        if progress:
            print(
                f"epoch {epoch}: loss {metrics['loss']:.4f}  train {metrics['train_acc']:.4f}  "
                f"test {test_acc:.4f}  {seconds:.1f}s  residual {metrics['residual']:.3f}",
                file=sys.stderr,
            )
    return metrics
