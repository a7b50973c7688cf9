"""Build the trainable model a run uses — MPIS equilibrium or BPTT — around the one network description."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mpis.config import ModelConfig, SolverConfig, TrainConfig
from mpis.model.bptt import BPTTModel
from mpis.model.equilibrium import EquilibriumModel, SolveInfo
from mpis.model.network import MPISNet


def build_model(
    model_cfg: ModelConfig, solver_cfg: SolverConfig, train_cfg: TrainConfig, input_shape: tuple[int, int, int]
) -> EquilibriumModel | BPTTModel:
    """The model, its weights channels-last (see `on_device`)."""
    net = MPISNet.from_config(model_cfg, input_shape)
    if train_cfg.method == "bptt":
        model = BPTTModel(net, solver_cfg.T, train_cfg.surrogate, train_cfg.surrogate_alpha)
    else:
        model = EquilibriumModel(net, solver_cfg)
    return model.to(memory_format=torch.channels_last)


def on_device(x: Tensor, device: torch.device) -> Tensor:
    """A batch on `device`, images channels-last: oneDNN's convolutions are fastest in that layout (the
    loop's transposed convs 3.4x on CPU; bench/train_speed.py measures the whole step)."""
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def step_outputs(model: nn.Module, x: Tensor) -> tuple[Tensor, SolveInfo | None]:
    """Per-step outputs (steps, batch, classes) and, for MPIS, the solve's statistics (residual, Jacobian)."""
    out = model(x)
    if isinstance(out, tuple):  # EquilibriumModel: one output, at the equilibrium
        logits, info = out
        return logits[None], info
    return out, None
