"""Every default in one place. The CLI generates its flags from these dataclasses, and a checkpoint
stores them, so later commands (export, check) rebuild exactly the trained model."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from mpis.errors import MpisError

FORWARD_MODES = ("spike", "rate")
GRAD_MODES = ("ift", "phantom")
SOLVERS = ("fixed_point_iter", "anderson", "broyden")
METHODS = ("mpis", "bptt")
LOSSES = ("sdt", "tet", "lts", "tets")
NEURONS = ("if", "lif")
RESETS = ("soft", "hard")
SURROGATES = ("atan", "sigmoid", "triangle")
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "nmnist")
EVENT_DATASETS = ("nmnist",)
LEGACY_BN_EPS = 1e-5  # torch's default, and what every checkpoint without a stored bn_eps was trained with
# Event frames: channels fed by sparse events have batch variances near 1e-5, so BN with torch's ε divides
# them into loop gains in the hundreds (‖J‖²/dim 15,242 at initialisation on N-MNIST); ε = 1 bounds the gain.
EVENT_BN_EPS = 1.0
# How the spiking network is driven by an event recording: its mean frame (events per step) as a constant
# current, the input the rate graph is trained on and the ONNX graph sees; or its T frames in order.
EVENT_PLAYBACK = ("mean", "frames")


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    arch: str = _opt("16C3S1-2F1*(32C3S2-48C3S1)-FC10", "architecture in the paper's notation")
    vth: float = _opt(1.0, "firing threshold Vth of every neuron")
    v_init: float = _opt(0.0, "initial membrane potential v(0) (the starting value when --imp is set)")
    imp: bool = _opt(False, "learnable initial membrane potential, one per neuron (no weight decay)")
    neuron: str = _opt("if", "spiking neuron: integrate-and-fire, or leaky (LIF, leak --leak)", NEURONS)
    leak: float = _opt(0.9, "LIF leak λ: v <- λ·v + I each step (ignored by IF, which is λ = 1)")
    reset: str = _opt("soft", "after a spike: subtract Vth (soft) or reset to zero (hard)", RESETS)
    dropout: float = _opt(0.05, "variational dropout rate (one channel mask per sample and solve)")
    upsample: str = _opt("transpose", "up-sampling fusion module", ("transpose", "nearest"))
    bn_eps: float = _opt(
        0.0,
        "BatchNorm ε, the floor under each channel's batch variance (0: by dataset, "
        f"{EVENT_BN_EPS:g} for event frames (nmnist), whose sparse channels would otherwise give the loop "
        f"gains in the hundreds and a rate graph that never settles; {LEGACY_BN_EPS:g} otherwise)",
    )

    def validate(self) -> None:
        if not self.vth > 0:
            raise MpisError(f"--vth must be > 0, got {self.vth}")
        if not 0.0 <= self.dropout < 1.0:
            raise MpisError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.leak <= 1.0:
            raise MpisError(f"--leak must be in (0, 1], got {self.leak}")
        if not self.bn_eps >= 0.0:
            raise MpisError(f"--bn-eps must be >= 0 (0: by dataset), got {self.bn_eps}")

    def for_dataset(self, dataset: str) -> ModelConfig:
        """This config with `bn_eps` 0 ("by dataset") replaced by the dataset's value, as a checkpoint stores it."""
        if self.bn_eps > 0:
            return self
        return replace(self, bn_eps=EVENT_BN_EPS if dataset in EVENT_DATASETS else LEGACY_BN_EPS)

    @property
    def effective_bn_eps(self) -> float:
        return self.bn_eps if self.bn_eps > 0 else LEGACY_BN_EPS

    @property
    def effective_leak(self) -> float:
        return self.leak if self.neuron == "lif" else 1.0


@dataclass
class SolverConfig:
    forward: str = _opt("spike", "forward solve: T-step IF simulation, or DBReLU fixed point", FORWARD_MODES)
    T: int = _opt(30, "simulation steps (spike) / maximum solver iterations (rate)")
    solver: str = _opt("anderson", "fixed-point solver of the rate forward (TorchDEQ)", SOLVERS)
    tol: float = _opt(1e-4, "relative residual at which the rate forward stops")
    spike_tol: float = _opt(
        0.0,
        "stop the training spike forward once the time-mean rates r̄ are this close to a fixed point "
        "(‖f(r̄) − r̄‖/‖f(r̄)‖, batch mean, checked every 5 steps; 0: always T steps): the phantom gradient's "
        "damped steps start from r̄ and finish the solve",
    )
    solve_dtype: str = _opt(
        "float32",
        "dtype of the spike forward's convolutions in training (membranes and rates stay float32); "
        "bfloat16 is ~1.5x faster on CPUs with AVX512-BF16/AMX and on GPUs",
        ("float32", "bfloat16"),
    )
    grad: str = _opt(
        "phantom", "phantom gradient (damped unrolled steps at r*), or implicit differentiation", GRAD_MODES
    )
    b_solver: str = _opt("fixed_point_iter", "solver of the adjoint linear system (TorchDEQ)", SOLVERS)
    b_max_iter: int = _opt(20, "maximum iterations of the adjoint solve")
    b_tol: float = _opt(1e-5, "residual at which the adjoint solve stops")
    phantom_steps: int = _opt(5, "unrolled steps of the phantom gradient")
    phantom_tau: float = _opt(0.8, "damping of the phantom gradient steps")
    jac_reg: float = _opt(
        1.0,
        "weight of the Jacobian penalty ‖J_f(r*)‖²_F/dim (Hutchinson, one vector): a contractive loop is what "
        "makes the exported rate graph, the spiking network and the trained model one model (0: off)",
    )
    jac_radius: float = _opt(
        0.5,
        "largest gain allowed along the loop's dominant direction (a power method on J_f(r*), 8 rate steps per "
        "penalised batch); the excess squared is added to the Jacobian penalty. ‖J‖²_F/dim averages over every "
        "direction, so one mode with |λ| > 1 — a period-2 oscillation the ONNX graph's plain iteration never "
        "leaves (N-MNIST, seed 0) — hardly moves it, and a mode near 1 slows the spiking network (0: off)",
    )
    jac_reg_every: int = _opt(
        1,
        "estimate the Jacobian penalty on every k-th training batch only, weighted k times (the same penalty on "
        "average, 1/k of its double backward)",
    )
    jac_reg_warmup: float = _opt(
        1.0,
        "epochs over which the Jacobian penalty's weight rises linearly from 0 to --jac-reg, when the penalty "
        "exceeds the task loss at the first batch (on digits it is 100x the task loss there and would otherwise "
        "spend the high-learning-rate phase on it alone); a penalty already below the task loss (N-MNIST with its "
        "BN ε) has its full weight from the first step",
    )

    def validate(self) -> None:
        for name in ("T", "b_max_iter", "phantom_steps", "jac_reg_every"):
            if getattr(self, name) < 1:
                raise MpisError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.phantom_tau <= 1.0:
            raise MpisError(f"--phantom-tau must be in (0, 1], got {self.phantom_tau}")
        if not self.spike_tol >= 0.0:
            raise MpisError(f"--spike-tol must be >= 0, got {self.spike_tol}")
        if not self.jac_reg >= 0.0:
            raise MpisError(f"--jac-reg must be >= 0, got {self.jac_reg}")
        if not self.jac_radius >= 0.0:
            raise MpisError(f"--jac-radius must be >= 0 (0: off), got {self.jac_radius}")
        if not self.jac_reg_warmup >= 0.0:
            raise MpisError(f"--jac-reg-warmup must be >= 0 epochs, got {self.jac_reg_warmup}")


@dataclass
class TrainConfig:
    method: str = _opt("mpis", "mpis: equilibrium training; bptt: unrolled over T with a surrogate gradient", METHODS)
    loss: str = _opt(
        "sdt", "sdt: CE of the time-mean output; tet: mean per-step CE; lts: last step; tets: TET-S", LOSSES
    )
    label_smoothing: float = _opt(0.01, "ε of TET-S (label smoothing)")
    surrogate: str = _opt("atan", "surrogate gradient of the spike in BPTT", SURROGATES)
    surrogate_alpha: float = _opt(2.0, "sharpness α of the surrogate")
    dataset: str = _opt("digits", "dataset (digits is embedded; the others read --data-dir)", DATASETS)
    data_dir: str | None = _opt(None, "folder with the dataset's standard files (not needed for digits)")
    epochs: int = _opt(15, "training epochs")
    batch_size: int = _opt(64, "batch size")
    lr: float = _opt(1e-2, "peak learning rate (cosine schedule)")
    optimizer: str = _opt("adamw", "optimizer", ("adamw", "sgd"))
    weight_decay: float = _opt(1e-4, "weight decay (not applied to BN and biases)")
    train_limit: int = _opt(0, "train on the first N training examples only (0: all; for quick experiments)")
    test_limit: int = _opt(0, "test on the first N test examples only (0: all)")
    deployed_limit: int = _opt(
        2000,
        "test examples on which each epoch also scores the model as it ships: the ONNX rate graph and the "
        "spiking network at T from the exported v_init (0: all)",
    )
    events: str = _opt(
        "mean",
        "how event recordings (nmnist) drive the network: mean — each recording's events per step (its mean "
        "frame) as a constant current every step, the input the rate graph is trained on and the ONNX graph "
        "sees (spiking vs ONNX agreement 0.98 at T = 30 on the 2-epoch subset model); frames — its T frames in "
        "recording order, as a sensor delivers them (0.81: an IF neuron cannot take back spikes fired on a "
        "saccade's burst; README)",
        EVENT_PLAYBACK,
    )
    seed: int = _opt(0, "random seed (same seed, same result on CPU)")
    device: str = _opt("auto", "torch device: auto (CUDA when available), cpu, cuda, cuda:1, ...")

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise MpisError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("train_limit", "test_limit", "deployed_limit"):
            if getattr(self, name) < 0:
                raise MpisError(f"--{name.replace('_', '-')} must be >= 0 (0: all), got {getattr(self, name)}")
        if not self.lr > 0:
            raise MpisError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise MpisError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not self.surrogate_alpha > 0:
            raise MpisError(f"--surrogate-alpha must be > 0, got {self.surrogate_alpha}")


CONFIG_CLASSES = (ModelConfig, SolverConfig, TrainConfig)


def check_choices(config: Any) -> None:
    for f in fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value not in choices:
            raise MpisError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")
    config.validate()


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config from a checkpoint; unknown keys are an error, not silently dropped."""
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise MpisError(f"unknown {cls.__name__} keys in checkpoint: {', '.join(sorted(unknown))}")
    return cls(**data)


__all__ = [
    "ModelConfig",
    "SolverConfig",
    "TrainConfig",
    "CONFIG_CLASSES",
    "check_choices",
    "config_from_dict",
]
