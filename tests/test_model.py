import pytest
import torch
import torch.nn.functional as F
from conftest import contractive_net

from mpis.config import SolverConfig
from mpis.model.equilibrium import EquilibriumModel


def _rate_model(**solver) -> EquilibriumModel:
    return EquilibriumModel(contractive_net(), SolverConfig(**solver)).eval()


def test_rate_forward_reaches_a_fixed_point():
    model = _rate_model(forward="rate", solver="anderson", T=100, tol=1e-7)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        _, info = model(x)
    assert info.residual.max() < 1e-4


def test_spike_rates_approach_the_rate_fixed_point_as_T_grows():
    model = _rate_model(forward="rate", solver="anderson", T=100, tol=1e-7)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        fixed, _ = model.solve(x, {})
        errors = []
        for steps in (20, 400):
            spiking = model.net.simulate(x, steps).state_rates
            errors.append(max((spiking[k] - fixed[k]).abs().mean().item() for k in fixed))
    assert errors[1] < errors[0] / 4
    assert errors[1] < 0.01


def _param_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True), params


def test_implicit_gradient_matches_unrolled_to_convergence():
    model = _rate_model(forward="rate", solver="anderson", T=200, tol=1e-9, b_max_iter=300, b_tol=1e-10)
    net = model.net
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([1, 4, 7])

    logits, _ = model(x)
    implicit, params = _param_grads(model, F.cross_entropy(logits, y))

    explicit = net.explicit_rates(x)
    state = net.zero_state(3, x.device)
    for _ in range(150):
        state = net.loop_step(state, explicit)
    unrolled, _ = _param_grads(model, F.cross_entropy(net.classify(state), y))

    num = sum(((a - b) ** 2).sum() for a, b in zip(implicit, unrolled, strict=True) if a is not None)
    den = sum((b**2).sum() for b in unrolled if b is not None)
    assert (num / den).sqrt() < 1e-3


def test_phantom_gradient_is_finite_and_points_downhill():
    model = _rate_model(forward="spike", grad="phantom", T=20)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    logits, _ = model(x)
    loss = F.cross_entropy(logits, y)
    grads, params = _param_grads(model, loss)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p -= 0.05 * g
        assert F.cross_entropy(model(x)[0], y) < loss


@pytest.mark.parametrize("forward", ["spike", "rate"])
def test_memory_saved_for_backward_does_not_grow_with_T(forward):
    def saved_bytes(steps: int) -> int:
        model = EquilibriumModel(
            contractive_net(), SolverConfig(forward=forward, T=steps, solver="fixed_point_iter", tol=0.0)
        )
        model.train()
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits, _ = model(torch.rand(4, 1, 8, 8))
        return total

    assert saved_bytes(5) == saved_bytes(60) > 0


def test_frame_sequences_drive_the_spiking_form_frame_by_frame():
    net = contractive_net()
    frames = torch.rand(2, 4, 1, 8, 8)
    with torch.no_grad():
        played = net.simulate(frames, 4).spike_counts
        held = net.simulate(frames[:, 0], 4).spike_counts
    assert any(not torch.equal(played[k], held[k]) for k in played)


def test_bfloat16_spike_solve_counts_whole_spikes_and_stays_near_float32():
    exact = _rate_model(forward="spike", T=30)
    low = _rate_model(forward="spike", T=30, solve_dtype="bfloat16")
    low.load_state_dict(exact.state_dict())
    x = torch.rand(16, 1, 8, 8)
    reference, _ = exact.solve(x, {})
    rates, _ = low.solve(x, {})
    for name, r in rates.items():
        assert r.dtype == torch.float32  # the membranes integrate in float32, not bfloat16
        counts = r * 30
        assert torch.allclose(counts, counts.round(), atol=1e-4)
        assert (r - reference[name]).abs().mean() < 0.005
        assert (r != reference[name]).float().mean() < 0.05


def test_spike_forward_stops_once_the_mean_rates_are_within_spike_tol_of_a_fixed_point():
    net, x = contractive_net(), torch.rand(4, 1, 8, 8)
    full_model = EquilibriumModel(net, SolverConfig(T=100)).eval()
    early_model = EquilibriumModel(net, SolverConfig(T=100, spike_tol=0.05)).eval()
    with torch.no_grad():
        full, steps = full_model.solve(x, {})
        early, early_steps = early_model.solve(x, {})
        stepped = early_model.layout.pack(net.loop_step(early, net.explicit_rates(x)))
        residual = (stepped - early_model.layout.pack(early)).norm(dim=1) / stepped.norm(dim=1)
    assert steps == 100
    assert early_steps < 100 and early_steps % 5 == 0  # checked every 5 steps
    assert residual.mean() <= 0.05
    assert max((early[k] - full[k]).abs().mean().item() for k in full) < 0.05


def test_an_unsettled_loop_runs_all_T_steps_whatever_the_spike_tol():
    model = _rate_model(T=40, spike_tol=1e-9)
    with torch.no_grad():
        _, steps = model.solve(torch.rand(4, 1, 8, 8), {})
    assert steps == 40


def test_event_frames_get_a_batchnorm_epsilon_that_bounds_the_loop_gain():
    """N-MNIST channels fed by sparse events have batch variances near 1e-5: with torch's ε, BN turns them
    into loop gains in the hundreds. `--bn-eps 0` (the default) picks ε by dataset; the checkpoint stores it."""
    from mpis.config import EVENT_BN_EPS, LEGACY_BN_EPS, ModelConfig
    from mpis.model.network import MPISNet

    assert ModelConfig().for_dataset("nmnist").bn_eps == EVENT_BN_EPS == 1.0
    assert ModelConfig().for_dataset("digits").bn_eps == LEGACY_BN_EPS
    assert ModelConfig(bn_eps=0.25).for_dataset("nmnist").bn_eps == 0.25  # an explicit choice stays
    net = MPISNet.from_config(ModelConfig(arch="4C3-1F1*(6C3)-FC10").for_dataset("nmnist"), (2, 8, 8))
    assert {op.bn.eps for op in net.ops.values() if hasattr(op, "bn")} == {1.0}


def test_a_checkpoint_written_before_bn_eps_existed_loads_with_torchs_epsilon(checkpoint, tmp_path):
    from mpis.train.checkpoint import load_checkpoint

    payload = torch.load(checkpoint, weights_only=True)
    assert payload["model"]["bn_eps"] == 1e-5  # training resolved "by dataset" for digits and stored it
    del payload["model"]["bn_eps"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    net = load_checkpoint(old).net
    assert {op.bn.eps for op in net.ops.values() if hasattr(op, "bn")} == {1e-5}


def test_a_checkpoint_written_before_events_existed_plays_frames_as_it_was_trained(checkpoint, tmp_path):
    from mpis.train.checkpoint import load_checkpoint

    payload = torch.load(checkpoint, weights_only=True)
    assert payload["train"]["events"] == "mean"  # today's default
    del payload["train"]["events"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    assert load_checkpoint(old).train_cfg.events == "frames"


def test_a_checkpoint_written_before_jac_radius_existed_resumes_without_the_radius_term(checkpoint, tmp_path):
    from mpis.train.checkpoint import load_checkpoint

    payload = torch.load(checkpoint, weights_only=True)
    assert payload["solver"]["jac_radius"] == 0.5  # today's default
    del payload["solver"]["jac_radius"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    assert load_checkpoint(old).solver_cfg.jac_radius == 0.0
