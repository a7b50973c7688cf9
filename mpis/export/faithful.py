"""`mpis export` refuses to ship a graph that is not the model that was trained.

Before anything is written, the checkpoint is scored as it will ship (`mpis.model.deployed`) on test inputs:
the rate graph must have settled after its K iterations (mean |r_K − r_{K−1}| ≤ SETTLE_TOL), and a
spiking export must agree with it on a quick sample. Otherwise the export stops with one line naming the
remedy: a larger --iters when that settles the graph, else retraining with the Jacobian penalty; an
explicit --allow-unsettled ships it anyway.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from mpis.errors import MpisError
from mpis.model.deployed import (
    MIN_SPIKE_AGREEMENT,
    SETTLE_TOL,
    DeployedScores,
    default_nir_v_init,
    score_deployed,
)

SPIKE_SAMPLE = 64  # inputs of the quick spike-vs-rate agreement estimate
MAX_ITERS_FACTOR = 8  # the largest --iters suggested: this many times K
OVERRIDE = "--allow-unsettled"


def _scores(ckpt, x: Tensor, y: Tensor, iterations: int, with_spikes: bool, v_init: float | None) -> DeployedScores:
    cfg = ckpt.solver_cfg
    return score_deployed(ckpt.net, [(x, y)], iterations, cfg.T, horizon=cfg.T, v_init=v_init, with_spikes=with_spikes)


def _settling_iters(ckpt, x: Tensor, y: Tensor, iterations: int) -> int | None:
    """The smallest K·2^j (up to MAX_ITERS_FACTOR·K) after which the rate graph has settled, or None."""
    factor = 2
    while factor <= MAX_ITERS_FACTOR:
        if _scores(ckpt, x, y, iterations * factor, False, None).settled:
            return iterations * factor
        factor *= 2
    return None


def spiking_remedy(v_init: float | None, default: float | None, frames: bool, settled: bool, weight: float) -> str:
    """What to do about a spiking network that disagrees with the rate graph, by the likeliest cause: a
    non-default initial potential; event frames (played in order, against the mean frame's equilibrium);
    near-ties of a settled, penalised loop; else a loop the penalty should make contractive."""
    if v_init != default and default is not None:
        return f"export from the default initial potential (no --v-init: {default:g})"
    if frames and settled:
        return (
            "with event frames the spiking network integrates the frames in their order while the rate graph is "
            "the equilibrium of their mean, and an IF neuron cannot take back spikes fired on a burst: retrain with "
            "--events mean (the default), which drives the spiking network with the mean frame the rate graph sees"
        )
    if weight > 0 and settled:
        return (
            f"the loop is penalised (--jac-reg {weight:g}) and settled, so the spikes round differently where the "
            "rate graph's top two classes are close: train longer for wider margins, or run the spiking network "
            "longer (mpis check --T 30,100 shows how agreement grows with T)"
        )
    if weight > 0:
        return f"retrain with a larger Jacobian penalty (this run: --jac-reg {weight:g})"
    return "retrain with the Jacobian penalty (mpis train --jac-reg 1, the default)"


def check_faithful(
    ckpt,
    x: Tensor,
    y: Tensor | None,
    iterations: int,
    spiking_v_init: float | None | bool,
    allow: bool,
    say: Callable[[str], None],
) -> None:
    """Score the rate graph (K = `iterations`) on `x` and, unless `spiking_v_init` is False, the spiking
    network from that v_init on the first SPIKE_SAMPLE inputs; `y` None (no labelled test set at hand):
    settling only. Raise MpisError with the remedy unless `allow`."""
    labels = y if y is not None else x.new_zeros(len(x), dtype=int)
    rate = _scores(ckpt, x, labels, iterations, False, None)
    trained = ckpt.metrics.get("test_acc")
    accuracy = ""
    if y is not None:
        accuracy = f"; accuracy {rate.rate_acc:.2%} on {rate.count} test inputs"
        accuracy += f" (training's last test accuracy {trained:.2%})" if trained is not None else ""
    say(f"rate graph after K = {iterations} iterations: mean |r_K - r_K-1| {rate.settle_mean:.1e}{accuracy}")
    problems = []
    weight = ckpt.solver_cfg.jac_reg
    penalty = (
        f"with a larger Jacobian penalty (this run: --jac-reg {weight:g})"
        if weight > 0
        else "with the Jacobian penalty (mpis train --jac-reg 1, the default)"
    )
    if not rate.settled:
        larger = _settling_iters(ckpt, x, labels, iterations)
        remedy = f"pass --iters {larger} (settles it), or retrain" if larger else "retrain"
        problems.append(
            f"the rate graph has not settled after K = {iterations} iterations (mean |r_K - r_K-1| "
            f"{rate.settle_mean:.1e} on {rate.count} inputs, above {SETTLE_TOL:g}): the ONNX graph is not the "
            f"model that was trained; {remedy} {penalty}"
        )
    if spiking_v_init is not False:
        part = slice(0, SPIKE_SAMPLE)
        quick = _scores(ckpt, x[part], labels[part], iterations, True, spiking_v_init)
        say(
            f"spiking network at T = {quick.steps} vs the rate graph: argmax agreement {quick.agreement:.4f} on "
            f"{quick.count} inputs (mpis check measures it on the whole test set)"
        )
        if quick.agreement < MIN_SPIKE_AGREEMENT:
            default = default_nir_v_init(ckpt.net)
            remedy = spiking_remedy(spiking_v_init, default, x.dim() == 5, rate.settled, weight)
            problems.append(
                f"the spiking network agrees with the rate graph on only {quick.agreement:.0%} of {quick.count} "
                f"inputs at T = {quick.steps} (below {MIN_SPIKE_AGREEMENT:.0%}); {remedy}"
            )
    if problems and not allow:
        raise MpisError("; and ".join(problems) + f"; nothing written ({OVERRIDE} exports it anyway)")
    for problem in problems:
        say(f"warning: {problem} (exported anyway: {OVERRIDE})")
