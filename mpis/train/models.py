"""Build the trainable model a run uses — MPIS equilibrium or BPTT — around the one network description."""

from __future__ import annotations

from torch import Tensor, nn

from mpis.config import ModelConfig, SolverConfig, TrainConfig
from mpis.model.bptt import BPTTModel
from mpis.model.equilibrium import EquilibriumModel, SolveInfo
from mpis.model.network import MPISNet


def build_model(
    model_cfg: ModelConfig, solver_cfg: SolverConfig, train_cfg: TrainConfig, input_shape: tuple[int, int, int]
) -> EquilibriumModel | BPTTModel:
    net = MPISNet.from_config(model_cfg, input_shape)
    if train_cfg.method == "bptt":
        return BPTTModel(net, solver_cfg.T, train_cfg.surrogate, train_cfg.surrogate_alpha)
    return EquilibriumModel(net, solver_cfg)


def step_outputs(model: nn.Module, x: Tensor) -> tuple[Tensor, SolveInfo | None]:
    """Per-step outputs (steps, batch, classes) and, for MPIS, the solve's statistics (residual, Jacobian)."""
    out = model(x)
    if isinstance(out, tuple):  # EquilibriumModel: one output, at the equilibrium
        logits, info = out
        return logits[None], info
    return out, None
