import pytest
import torch

from mpis.config import ModelConfig, SolverConfig, TrainConfig
from mpis.train.losses import readout, spiking_loss
from mpis.train.models import build_model, step_outputs

ARCH = "4C3-2F1*(6C3S2-8C3)-FC10"
SHAPE = (1, 8, 8)


def one_step(method: str, loss: str = "sdt", **model) -> torch.nn.Module:
    cfg = ModelConfig(arch=ARCH, dropout=0.1, **model)
    net_model = build_model(cfg, SolverConfig(T=6), TrainConfig(method=method, loss=loss), SHAPE).train()
    x, y = torch.rand(8, *SHAPE), torch.randint(0, 10, (8,))
    outputs, _ = step_outputs(net_model, x)
    value = spiking_loss(loss, outputs, y, smoothing=0.1)
    value.backward()
    assert torch.isfinite(value)
    grads = [p.grad for p in net_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    return net_model


@pytest.mark.parametrize("method", ["mpis", "bptt"])
@pytest.mark.parametrize(
    "neuron", [{"neuron": "if"}, {"neuron": "lif", "leak": 0.5}, {"neuron": "lif", "leak": 0.9, "reset": "hard"}]
)
@pytest.mark.parametrize("loss", ["sdt", "tet", "lts", "tets"])
def test_every_neuron_and_loss_option_trains_one_step_without_nan(method, neuron, loss):
    one_step(method, loss, vth=0.5, **neuron)


def test_bptt_returns_one_output_per_time_step():
    model = one_step("bptt")
    with torch.no_grad():
        outputs, info = step_outputs(model.eval(), torch.rand(3, *SHAPE))
    assert outputs.shape == (6, 3, 10) and info is None


@pytest.mark.parametrize("method", ["mpis", "bptt"])
def test_learnable_initial_membrane_potential_receives_gradients(method):
    model = one_step(method, imp=True, v_init=0.25)
    imp = dict(model.net.imp.named_parameters())
    assert imp and all(p.grad is not None and p.grad.abs().sum() > 0 for p in imp.values())
    assert all(torch.all(p == 0.25) for p in imp.values())  # starts at v_init


def test_imp_sets_the_starting_membrane_of_the_spike_forward():
    cfg = ModelConfig(arch=ARCH, imp=True)
    net = build_model(cfg, SolverConfig(T=4), TrainConfig(), SHAPE).net.eval()
    x = torch.rand(2, *SHAPE)
    before = net.simulate(x, 4).spike_counts
    with torch.no_grad():
        for p in net.imp.values():
            p.fill_(0.99)
    after = net.simulate(x, 4).spike_counts
    assert sum(v.sum() for v in after.values()) > sum(v.sum() for v in before.values())


def test_imp_is_excluded_from_weight_decay():
    from mpis.train.loop import param_groups

    model = build_model(ModelConfig(arch=ARCH, imp=True), SolverConfig(), TrainConfig(), SHAPE)
    decayed = {id(p) for p in param_groups(model, 1e-4)[0]["params"]}
    assert not any(id(p) in decayed for p in model.net.imp.parameters())


def test_losses_on_a_hand_made_output():
    # Two steps, one sample: step 1 says class 0, step 2 says class 1.
    outputs = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]])
    target = torch.tensor([1])
    ce = torch.nn.functional.cross_entropy
    assert spiking_loss("sdt", outputs, target) == pytest.approx(ce(torch.tensor([[1.0, 1.0]]), target).item())
    assert spiking_loss("lts", outputs, target) == pytest.approx(ce(outputs[1], target).item())
    tet = (ce(outputs[0], target) + ce(outputs[1], target)) / 2
    assert spiking_loss("tet", outputs, target) == pytest.approx(tet.item())
    smooth = torch.tensor([[0.05, 0.95]])  # (1 − ε)·onehot + ε/K with ε = 0.1, K = 2
    tets = -(smooth * outputs.log_softmax(-1)).sum(-1).mean()
    assert spiking_loss("tets", outputs, target, smoothing=0.1) == pytest.approx(tets.item())
    assert readout("lts", outputs).argmax().item() == 1


def test_jacobian_penalty_is_only_computed_when_training_with_jac_reg():
    x = torch.rand(4, *SHAPE)
    plain = build_model(ModelConfig(arch=ARCH), SolverConfig(T=6, jac_reg=0.0), TrainConfig(), SHAPE).train()
    reg = build_model(ModelConfig(arch=ARCH), SolverConfig(T=6, jac_reg=1.0), TrainConfig(), SHAPE)
    assert plain(x)[1].jacobian is None
    assert reg.train()(x)[1].jacobian.requires_grad
    with torch.no_grad():
        assert reg.eval()(x)[1].jacobian is None


def test_jac_reg_every_k_estimates_the_penalty_on_every_kth_training_batch():
    x = torch.rand(4, *SHAPE)
    model = build_model(ModelConfig(arch=ARCH), SolverConfig(T=6, jac_reg_every=2), TrainConfig(), SHAPE).train()
    assert [model(x)[1].jacobian is not None for _ in range(5)] == [True, False, True, False, True]


def _exact_loop_jacobian(model, x) -> torch.Tensor:
    """J_f at the eval-mode fixed point of one input, exactly (small nets only)."""
    model.eval()
    with torch.no_grad():
        masks = {}
        z = model.layout.pack(model.solve(x[:1], masks)[0])
        func = model._map(model.net.explicit_rates(x[:1], masks), masks, "running")
    return torch.autograd.functional.jacobian(func, z)[0, :, 0, :]


def test_descending_the_jacobian_penalty_makes_the_loop_contract():
    """Gradient steps on the penalty alone shrink the loop map's exact Jacobian at the fixed point."""
    torch.manual_seed(0)
    solver = SolverConfig(T=6, forward="rate", jac_reg=1.0)
    model = build_model(ModelConfig(arch=ARCH, dropout=0.0, vth=0.5), solver, TrainConfig(), SHAPE)
    x = torch.rand(8, *SHAPE)

    def exact_frobenius() -> float:
        return float(_exact_loop_jacobian(model, x).pow(2).sum())

    before = exact_frobenius()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(30):
        model.train()
        penalty = model(x)[1].jacobian
        optimizer.zero_grad()
        penalty.backward()
        optimizer.step()
    assert before > 0 and exact_frobenius() < 0.6 * before


def test_the_radius_penalty_adds_only_the_dominant_gain_above_jac_radius():
    x = torch.rand(4, *SHAPE)
    off = build_model(ModelConfig(arch=ARCH), SolverConfig(T=6, jac_radius=0.0), TrainConfig(), SHAPE).train()
    info = off(x)[1]
    assert info.gain is None and info.penalty is info.jacobian
    on = build_model(ModelConfig(arch=ARCH), SolverConfig(T=6, jac_radius=0.1), TrainConfig(), SHAPE).train()
    info = on(x)[1]
    assert info.gain.shape == (4,) and info.gain.requires_grad
    excess = (info.gain - 0.1).clamp(min=0).square().mean()
    assert info.penalty.item() == pytest.approx((info.jacobian + excess).item())


def test_the_radius_penalty_leaves_the_training_random_stream_unchanged():
    """The power method's random start comes from its own generator: dropout masks and Hutchinson's vectors
    after it are the same with or without the radius term."""
    x = torch.rand(4, *SHAPE)
    draws = []
    for radius in (0.0, 0.8):
        model = build_model(ModelConfig(arch=ARCH), SolverConfig(T=6, jac_radius=radius), TrainConfig(), SHAPE)
        torch.manual_seed(3)
        model.train()(x)
        draws.append(torch.rand(5))
    assert torch.equal(draws[0], draws[1])


def test_descending_the_radius_penalty_removes_a_loop_mode_with_gain_above_one():
    """A net whose loop has an eigenvalue beyond the unit circle (the plain iteration the ONNX graph unrolls
    never settles) is brought inside it by the radius term alone."""
    torch.manual_seed(0)
    solver = SolverConfig(T=6, forward="rate", jac_radius=0.5)
    model = build_model(ModelConfig(arch=ARCH, dropout=0.0, vth=0.1), solver, TrainConfig(), SHAPE)
    x = torch.rand(8, *SHAPE)
    radius = lambda: float(torch.linalg.eigvals(_exact_loop_jacobian(model, x)).abs().max())  # noqa: E731
    before = radius()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(40):
        model.train()
        info = model(x)[1]
        optimizer.zero_grad()
        (info.penalty - info.jacobian).backward()
        optimizer.step()
    assert before > 1.0 and radius() < 1.0


def test_the_snntorch_peer_of_the_speed_bench_computes_the_same_network_as_mpis_bptt():
    """bench/train_speed.py's peer baseline is only a fair comparison if it is the same network."""
    import sys
    from pathlib import Path

    pytest.importorskip("snntorch")
    from conftest import spiky_net

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from peer_snntorch import same_logits

    assert same_logits(spiky_net("4C3S1-2F1*(6C3S2-8C3S1)-FC10", (1, 12, 12)), steps=12) == 0.0
