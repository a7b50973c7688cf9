"""The MPIS equilibrium core: solve for the fixed point without autograd, then differentiate one step.

Forward (no graph kept, so memory does not grow with T):
  - `spike`: T-step IF simulation; the fixed point is the time-mean of the stream outputs (the paper);
  - `rate`: a TorchDEQ solver (fixed-point iteration, Anderson, Broyden) on the DBReLU map.
Backward, from one differentiable application of f at the fixed point r*:
  - `ift`: implicit differentiation (TorchDEQ's IFT functor solves g = J_f(r*)^T g + dL/dr);
  - `phantom`: a few damped unrolled steps from r* (TorchDEQ's phantom gradient).
TorchDEQ supplies the solvers and the gradient functors; the network and its state layout are ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchdeq.grad import backward_factory
from torchdeq.loss import jac_reg
from torchdeq.solver import get_solver

from mpis.config import SolverConfig
from mpis.model.network import BNMode, MPISNet, Values


@dataclass(frozen=True)
class StateLayout:
    """How the per-stream state tensors are laid side by side in the flat (B, D) vector TorchDEQ solves."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def pack(self, values: Values) -> Tensor:
        return torch.cat([_channels_last_view(values[n]).flatten(1) for n in self.names], dim=1)

    def unpack(self, flat: Tensor) -> Values:
        sizes = [math.prod(s) for s in self.shapes]
        parts = torch.split(flat, sizes, dim=1)
        return {n: _from_channels_last(p, s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}


def _unit_rows(flat: Tensor) -> Tensor:
    return flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-12)


def _channels_last_view(value: Tensor) -> Tensor:
    """(B, C, H, W) as (B, H, W, C): the flat vector keeps channels innermost, so the convolutions of the
    solve read channels-last tensors without a copy (NCHW inputs to channels-last weights cost ~1.6x)."""
    return value.permute(0, 2, 3, 1) if value.dim() == 4 else value


def _from_channels_last(part: Tensor, shape: tuple[int, ...]) -> Tensor:
    if len(shape) != 3:
        return part.reshape(part.shape[0], *shape)
    channels, height, width = shape
    return part.reshape(part.shape[0], height, width, channels).permute(0, 3, 1, 2)


POWER_ITERS = 8  # power-method steps (N-MNIST seed 0: 4 read the median |λ| 1.08 as 0.96, 8 as 1.05)
FD_STEP = 1e-2  # forward-difference step along a unit direction (rates are O(1), ‖r*‖ O(10) per sample)


@dataclass
class SolveInfo:
    """Relative residual ‖f(r*) − r*‖ / ‖f(r*)‖ per sample, the forward iterations used, and (training with
    --jac-reg, on every --jac-reg-every-th batch) the differentiable estimate of ‖J_f(r*)‖²_F / dim, the
    per-sample gain of J_f(r*) along its dominant direction (--jac-radius > 0) and the penalty they make."""

    residual: Tensor
    steps: int
    jacobian: Tensor | None = None
    gain: Tensor | None = None
    penalty: Tensor | None = None


class EquilibriumModel(nn.Module):
    """An MPISNet trained as an equilibrium model; `forward(x)` returns logits and solve statistics."""

    def __init__(self, net: MPISNet, solver: SolverConfig):
        super().__init__()
        self.net = net
        self.solver = solver
        self.horizon = solver.T  # the IMP's charge is spread over T steps in the rate form
        self.penalised_forwards = 0  # training forwards so far: the penalty is estimated on every k-th
        self.layout = StateLayout(net.graph.state, tuple(net.graph.node(n).shape for n in net.graph.state))
        if solver.grad == "ift":
            self._gradient = backward_factory(
                "ift",
                b_solver=get_solver(solver.b_solver),
                b_solver_kwargs={"max_iter": solver.b_max_iter, "tol": solver.b_tol, "stop_mode": "rel"},
            )
        else:
            self._gradient = backward_factory(solver.phantom_steps, tau=solver.phantom_tau)

    @torch.no_grad()
    def solve(self, x: Tensor, masks: Values) -> tuple[Values, int]:
        """The fixed point of the stream outputs, computed without an autograd graph."""
        if self.solver.forward == "spike":
            low = self.solver.solve_dtype == "bfloat16"
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=low):
                settled = self._settled(x, masks) if self.solver.spike_tol > 0 else None
                record = self.net.simulate(x, self.solver.T, masks, count_spikes=False, settled=settled)
            return record.state_rates, record.steps
        explicit = self.net.explicit_rates(x, masks, horizon=self.horizon)
        func = self._map(explicit, masks, "running")
        z0 = self.layout.pack(self.net.zero_state(x.shape[0], x.device, x.dtype))
        # Plain iteration returns its last iterate (the T-step map, continuous in the weights); the
        # accelerated solvers return their lowest-residual iterate.
        plain = self.solver.solver == "fixed_point_iter"
        z, _, info = get_solver(self.solver.solver)(
            func, z0, max_iter=self.solver.T, tol=self.solver.tol, stop_mode="rel", return_final=plain
        )
        return self.layout.unpack(z), int(info["nstep"].max())

    def _settled(self, x: Tensor, masks: Values):
        """Whether spike-mean rates are within --spike-tol of a fixed point of the map the simulation runs."""
        explicit = self.net.explicit_rates(x, masks, horizon=self.horizon)

        def settled(rates: Values) -> bool:
            step = self.layout.pack(self.net.loop_step(rates, explicit, masks, horizon=self.horizon))
            now = self.layout.pack(rates)
            residual = (step - now).norm(dim=1) / (step.norm(dim=1) + 1e-9)
            return float(residual.mean()) <= self.solver.spike_tol

        return settled

    def _map(self, explicit: Values, masks: Values, bn: BNMode):
        layout, net = self.layout, self.net

        def func(z: Tensor, tau: float = 1.0) -> Tensor:
            step = layout.pack(net.loop_step(layout.unpack(z), explicit, masks, bn, self.horizon))
            return step if tau == 1.0 else tau * step + (1.0 - tau) * z

        return func

    @torch.no_grad()
    def calibrate(self, x: Tensor, state: Values, masks: Values) -> None:
        """Update BN running statistics from the pre-activations at the fixed point (training only)."""
        explicit = self.net.explicit_rates(x, masks, "calibrate")
        self.net.loop_step(state, explicit, masks, "calibrate")

    def forward(self, x: Tensor) -> tuple[Tensor, SolveInfo]:
        masks = self.net.sample_dropout_masks(x.shape[0], x.device)
        state, steps = self.solve(x, masks)
        if self.training:
            self.calibrate(x, state, masks)
        bn: BNMode = "batch" if self.training else "running"
        explicit = self.net.explicit_rates(x, masks, bn, self.horizon)
        func = self._map(explicit, masks, bn)
        z_star = self.layout.pack(state).detach()
        if torch.is_grad_enabled():
            z_out = self._gradient(self, func, z_star)[-1]
        else:
            z_out = func(z_star)
        with torch.no_grad():
            residual = (z_out - z_star).norm(dim=1) / (z_out.norm(dim=1) + 1e-9)
        jacobian = gain = penalty = None
        if self.training and self.solver.jac_reg > 0 and torch.is_grad_enabled():
            self.penalised_forwards += 1
            if (self.penalised_forwards - 1) % self.solver.jac_reg_every == 0:
                z = z_star.clone().requires_grad_()
                at_star = func(z)
                jacobian = penalty = jac_reg(at_star, z)
                if self.solver.jac_radius > 0:
                    gain = self._dominant_gain(func, z_star, at_star)
                    penalty = penalty + (gain - self.solver.jac_radius).clamp(min=0).square().mean()
        return self.net.classify(self.layout.unpack(z_out)), SolveInfo(residual, steps, jacobian, gain, penalty)

    def _dominant_gain(self, func, z_star: Tensor, at_star: Tensor) -> Tensor:
        """‖J_f(r*) w‖ per sample for w the dominant (largest |λ|) eigenvector of J_f, differentiable in the
        weights. ‖J‖²_F/dim averages over every direction (23,680 on the N-MNIST net), so one mode with |λ| > 1
        — an oscillation the ONNX graph's plain iteration never leaves — hardly moves it; this gain is that
        mode's.
        The power method runs on forward differences (f(r* + εw) − f(r*))/ε, exact for DBReLU's piecewise-
        linear map wherever no neuron crosses a kink: one rate step each, no backward pass (TorchDEQ's
        power_method takes a vector-Jacobian product per step, 1.9x the time here). Its random start comes from
        its own generator, so the training's random stream (dropout, Hutchinson) is the same without it.
        `at_star`: f(r*) as the Hutchinson estimate computed it, reused rather than run twice more."""
        start = torch.Generator(device=z_star.device).manual_seed(self.penalised_forwards)
        direction = torch.randn(z_star.shape, generator=start, device=z_star.device, dtype=z_star.dtype)
        base = at_star.detach()
        with torch.no_grad():
            for _ in range(POWER_ITERS):
                direction = _unit_rows(func(z_star + FD_STEP * _unit_rows(direction)) - base)
        return (func(z_star + FD_STEP * direction) - at_star).norm(dim=1) / FD_STEP
