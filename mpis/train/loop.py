"""`mpis train`: the epoch loop around the equilibrium model, with metrics and atomic checkpoints.

Each epoch is committed in one step: model.pt holds the weights, the training state and every epoch's
metrics, and metrics.jsonl is rewritten from it afterwards. A run killed anywhere therefore loses at most
the epoch in progress, and `--resume` continues from model.pt (rewriting metrics.jsonl to match it)."""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from mpis.config import ModelConfig, SolverConfig, TrainConfig, check_choices
from mpis.errors import MpisError
from mpis.model.deployed import DeployedScores, score_deployed
from mpis.model.equilibrium import EquilibriumModel
from mpis.train.checkpoint import (
    SPACE_MARGIN,
    atomic_write,
    free_mb,
    read_payload,
    remove_leftovers,
    save_checkpoint,
)
from mpis.train.data import load_dataset
from mpis.train.losses import readout, spiking_loss
from mpis.train.models import build_model, on_device, step_outputs

RUN_FILES = ("model.pt", "metrics.jsonl")
RESUMABLE_CHANGES = ("device", "data_dir")  # settings a resumed run may change: they do not alter the run


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on BN affine parameters, biases (1-D tensors) and initial membrane potentials."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        (plain if p.ndim <= 1 or ".imp." in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, loss_kind: str) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        outputs, _ = step_outputs(model, on_device(x, device))
        correct += int((readout(loss_kind, outputs).argmax(1).cpu() == y).sum())
        total += len(y)
    return correct / max(total, 1)


def first(dataset: Dataset, limit: int) -> Dataset:
    """The first `limit` examples (0: all): a fixed subset, the same in every epoch and run."""
    return dataset if limit <= 0 or limit >= len(dataset) else Subset(dataset, range(limit))


def evaluate_deployed(
    model: nn.Module, loader: DataLoader, device: torch.device, solver_cfg: SolverConfig
) -> DeployedScores:
    """The test inputs through the two forms that ship: `mpis export`'s ONNX rate graph (K = T iterations
    from zero) and its NIR spiking network (T steps from the exported v_init)."""
    model.eval()
    batches = ((on_device(x, device), y) for x, y in loader)
    return score_deployed(model.net, batches, solver_cfg.T, solver_cfg.T, horizon=solver_cfg.T)


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0


def jac_reg_weight(solver_cfg: SolverConfig, epochs_done: float, warm_up: bool | None = True) -> float:
    """The Jacobian penalty's weight after `epochs_done` epochs: --jac-reg, ramped in over --jac-reg-warmup
    when the run warms it up (`warm_up`: decided at its first batch, `needs_warm_up`; None: not yet)."""
    if solver_cfg.jac_reg_warmup <= 0.0 or warm_up is False:
        return solver_cfg.jac_reg
    return solver_cfg.jac_reg * min(1.0, epochs_done / solver_cfg.jac_reg_warmup)


def needs_warm_up(solver_cfg: SolverConfig, task_loss: Tensor, penalty: Tensor, ddp: Distributed) -> bool:
    """Whether the penalty at full weight would outweigh the task loss at the first batch (means over every
    process, so that a torchrun job decides as one process does): only then is it ramped in."""
    values = torch.stack([task_loss.detach(), penalty.detach()]).double().cpu()
    if ddp.world > 1:
        values = values.to(task_loss.device)
        dist.all_reduce(values)
        values = values.cpu() / ddp.world
    return bool(solver_cfg.jac_reg * values[1] > values[0])


def prepare_out_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse an --out that holds another run (saying how to resume it) or that cannot be written."""
    if out.exists() and not out.is_dir():
        raise MpisError(f"--out {out} exists and is not a folder")
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not overwrite and not resume:
        raise MpisError(
            f"--out {out} already holds a run ({run_progress(out) or ', '.join(existing)}); pass --resume to "
            "continue it, --overwrite to replace it, or pick a new folder"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".mpis-write-test"
        probe.touch()
        probe.unlink()
        for name in RUN_FILES:
            remove_leftovers(out / name)
    except OSError as err:
        raise MpisError(f"cannot write to --out {out}: {err.strerror}") from None


def run_progress(out: Path) -> str:
    """'epoch 3 of 12 done' for the run in `out`, or '' when its model.pt cannot tell."""
    try:
        run = read_payload(out / "model.pt").get("run", {})
        done = "complete" if run["epoch"] >= run["epochs"] else "done"
        return f"epoch {run['epoch']} of {run['epochs']} {done}"
    except (MpisError, KeyError, TypeError):
        return ""


def resume_configs(out: Path, given: dict[str, Any]) -> tuple[ModelConfig, SolverConfig, TrainConfig]:
    """The configs of the run in `out`, for --resume. `given` holds the settings named on the command line:
    any that differs from the run's (other than RESUMABLE_CHANGES) is refused, since a resumed run must be
    the run that was started."""
    from mpis.config import CONFIG_CLASSES, config_from_dict

    path = out / "model.pt"
    if not path.is_file():
        raise MpisError(f"--resume: {out} holds no finished epoch to continue from; start the run without --resume")
    payload = read_payload(path)
    if "run" not in payload:
        raise MpisError(f"--resume: {path} holds no training state (written by an older mpis, or not by mpis train)")
    configs = [
        config_from_dict(cls, payload[key])
        for cls, key in zip(CONFIG_CLASSES, ("model", "solver", "train"), strict=True)
    ]
    stored = {name: value for cfg in configs for name, value in vars(cfg).items()}
    for name, value in given.items():
        if name not in RESUMABLE_CHANGES and stored.get(name) != value:
            flag = "--T" if name == "T" else "--" + name.replace("_", "-")
            raise MpisError(
                f"--resume continues the run as it was started: {flag} {value} differs from its {stored.get(name)} "
                "(drop the flag, or start a new run with --overwrite or another --out)"
            )
    for cfg in configs:
        for name in RESUMABLE_CHANGES:
            if name in given and hasattr(cfg, name):
                setattr(cfg, name, given[name])
    return tuple(configs)


def checkpoint_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """What one checkpoint will take: the network's state, and the optimizer's state (Adam's two moments, or
    SGD's momentum) once it exists; before the first step it is estimated from the parameters."""
    net = sum(t.numel() * t.element_size() for t in model.net.state_dict().values())
    params = sum(p.numel() * p.element_size() for group in optimizer.param_groups for p in group["params"])
    return net + params * (2 if isinstance(optimizer, torch.optim.AdamW) else 1) + SPACE_MARGIN


def check_space(out: Path, needed: int) -> None:
    """Refuse before training when --out cannot hold the next checkpoint beside the last one."""
    if free_mb(out) * 2**20 < needed:
        raise MpisError(
            f"--out {out} has {free_mb(out):,.0f} MB free; a checkpoint of this run needs about "
            f"{needed / 2**20:,.1f} MB: free some space first"
        )


def rng_state() -> dict[str, Any]:
    """Every generator the epoch loop draws from, as tensors and plain values (weights_only checkpoints)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(
    model_cfg: ModelConfig,
    solver_cfg: SolverConfig,
    train_cfg: TrainConfig,
    out: Path,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Train, write one JSON line per epoch to out/metrics.jsonl and out/model.pt; return the last metrics.
    With `resume`, continue the run in `out` from its last complete epoch."""
    for cfg in (model_cfg, solver_cfg, train_cfg):
        check_choices(cfg)
    model_cfg = model_cfg.for_dataset(train_cfg.dataset)
    ddp = Distributed.from_env()
    device = resolve_device(train_cfg.device)
    if ddp.world > 1 and device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    if ddp.world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(model_cfg, solver_cfg, train_cfg, Path(out), overwrite, progress, resume, device, ddp)
    finally:
        if ddp.world > 1:
            dist.destroy_process_group()


def _train(
    model_cfg: ModelConfig,
    solver_cfg: SolverConfig,
    train_cfg: TrainConfig,
    out: Path,
    overwrite: bool,
    progress: bool,
    resume: bool,
    device: torch.device,
    ddp: Distributed,
) -> dict[str, Any]:
    data = load_dataset(train_cfg.dataset, train_cfg.data_dir, frames=solver_cfg.T, events=train_cfg.events)
    seed_everything(train_cfg.seed)
    model = build_model(model_cfg, solver_cfg, train_cfg, data.input_shape).to(device)
    if model.net.arch.classes != data.classes:
        raise MpisError(f"arch ends in FC{model.net.arch.classes} but the dataset has {data.classes} classes")
    if ddp.main:  # only now: an arch that does not fit the data must not leave an empty --out behind
        prepare_out_dir(out, overwrite, resume)
        if data.note:
            print(f"note: {data.note}", file=sys.stderr)
    trained = DistributedDataParallel(model) if ddp.world > 1 else model
    # The same sampler with one replica or K: K processes with batch B see exactly the batches of size K·B
    # that one process sees, so a torchrun job reproduces a single-process run.
    train_set, test_set = first(data.train, train_cfg.train_limit), first(data.test, train_cfg.test_limit)
    sampler = DistributedSampler(train_set, ddp.world, ddp.rank, shuffle=True, seed=train_cfg.seed)
    train_loader = DataLoader(train_set, batch_size=train_cfg.batch_size, sampler=sampler, drop_last=True)
    if len(train_loader) == 0:
        raise MpisError(f"{len(train_set)} training examples make no batch of --batch-size {train_cfg.batch_size}")
    test_loader = DataLoader(test_set, batch_size=max(train_cfg.batch_size, 256))
    deployed_loader = DataLoader(first(test_set, train_cfg.deployed_limit), batch_size=max(train_cfg.batch_size, 256))
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
    done = 0  # epochs complete
    warm_up: bool | None = None  # ramp the Jacobian penalty in? Decided at the first penalised batch
    if resume:
        payload = read_payload(out / "model.pt")
        run = payload["run"]
        model.net.load_state_dict(payload["state_dict"])
        optimizer.load_state_dict(run["optimizer"])
        schedule.load_state_dict(run["schedule"])
        set_rng_state(run["rng"])
        done, lines = run["epoch"], list(run["history"])
        warm_up = run.get("jac_reg_warm_up", True)
        if isinstance(model, EquilibriumModel):  # the penalty's cadence and power-method starts carry on
            model.penalised_forwards = done * len(train_loader)
        metrics = json.loads(lines[-1]) if lines else {}
        if ddp.main:  # metrics.jsonl may lag model.pt by one epoch (a kill between the two writes)
            atomic_write(metrics_path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in lines)))
            if done >= train_cfg.epochs:
                print(f"note: the run in {out} is complete ({done} of {train_cfg.epochs} epochs)", file=sys.stderr)
            elif progress:
                print(f"resuming {out} after epoch {done} of {train_cfg.epochs}", file=sys.stderr)
    if ddp.main:
        check_space(out, checkpoint_bytes(model, optimizer))
        if overwrite and not resume:  # the old run goes as the new one starts: the two are never mixed
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    begun = time.perf_counter()
    bar = tqdm(  # one bar over the whole run, so that its estimate is the time left for all epochs
        total=train_cfg.epochs * len(train_loader),
        initial=done * len(train_loader),
        disable=not (progress and ddp.main),
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        unit="step",
        mininterval=0.2 if sys.stderr.isatty() else 10,  # a log file gets a line every 10 s, not a stream
    )
    steps_done = done * len(train_loader)
    for epoch in range(done + 1, train_cfg.epochs + 1):
        trained.train()
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        totals = torch.zeros(9, dtype=torch.float64)  # loss, correct, seen, residual, Jacobian sums; Jacobian seen;
        # forward steps (spike steps or solver iterations), dominant-direction gains summed over samples; gains seen
        bar.set_description(f"epoch {epoch}/{train_cfg.epochs}")
        for x, y in train_loader:
            x, y = on_device(x, device), y.to(device)
            if data.augment is not None:
                x = data.augment(x)
            outputs, info = step_outputs(trained, x)
            loss = spiking_loss(train_cfg.loss, outputs, y, train_cfg.label_smoothing)
            jacobian = None if info is None else info.jacobian
            if jacobian is not None:
                if warm_up is None:
                    warm_up = needs_warm_up(solver_cfg, loss, info.penalty, ddp)
                weight = jac_reg_weight(solver_cfg, steps_done / len(train_loader), warm_up) * solver_cfg.jac_reg_every
                loss = loss + weight * info.penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            steps_done += 1
            if not torch.isfinite(loss):
                raise MpisError(f"training diverged at epoch {epoch} (loss {loss.item()}); lower --lr")
            with torch.no_grad():
                correct = (readout(train_cfg.loss, outputs).argmax(1) == y).sum()
                res = 0.0 if info is None else float(info.residual.sum())
                jac, jac_seen = (0.0, 0) if jacobian is None else (float(jacobian) * len(y), len(y))
                steps = 0 if info is None else info.steps * len(y)
                gain, gain_seen = (0.0, 0) if info is None or info.gain is None else (float(info.gain.sum()), len(y))
                sums = [loss.item() * len(y), float(correct), len(y), res, jac, jac_seen, steps, gain, gain_seen]
                totals += torch.tensor(sums, dtype=torch.float64)
            bar.update()
            bar.set_postfix(loss=f"{totals[0] / totals[2]:.3f}", acc=f"{totals[1] / totals[2]:.3f}", refresh=False)
        seconds = time.perf_counter() - start
        if ddp.world > 1:
            dist.all_reduce(totals)
        if not ddp.main:
            dist.barrier()
            continue
        test_acc = evaluate(model, test_loader, device, train_cfg.loss)
        deployed = evaluate_deployed(model, deployed_loader, device, solver_cfg)
        metrics = {
            "epoch": epoch,
            "method": train_cfg.method,
            "loss": float(totals[0] / totals[2]),
            "train_acc": float(totals[1] / totals[2]),
            "test_acc": test_acc,
            "seconds": round(seconds, 3),
            "device": str(device),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            "residual": float(totals[3] / totals[2]) if train_cfg.method == "mpis" else None,
            "jacobian": float(totals[4] / totals[5]) if totals[5] > 0 else None,
            "loop_gain": float(totals[7] / totals[8]) if totals[8] > 0 else None,
            "forward_steps": float(totals[6] / totals[2]) if train_cfg.method == "mpis" else None,
            "jac_reg_weight": jac_reg_weight(solver_cfg, steps_done / len(train_loader), warm_up),
            "lr": schedule.get_last_lr()[0],
            **deployed.metrics(),
        }
        lines.append(json.dumps(metrics))
        run_state = {
            "epoch": epoch,
            "epochs": train_cfg.epochs,
            "history": lines,
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "rng": rng_state(),
            "jac_reg_warm_up": warm_up,
        }
        save_checkpoint(out / "model.pt", model, model_cfg, solver_cfg, train_cfg, metrics, run_state)
        atomic_write(metrics_path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in lines)))
        if progress:
            left = (train_cfg.epochs - epoch) * (time.perf_counter() - begun) / (epoch - done)
            bar.write(
                f"epoch {epoch}/{train_cfg.epochs}: loss {metrics['loss']:.4f}  train {metrics['train_acc']:.4f}  "
                f"test {test_acc:.4f}  {seconds:.1f}s"
                + (f"  (about {_minutes(left)} left)" if left else "")
                + f"\n  {deployed.summary()}",
                file=sys.stderr,
            )
        if ddp.world > 1:
            dist.barrier()
    bar.close()
    return metrics


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
