import pytest
import torch

from mpis.model.neurons import NeuronParams, dbrelu, neuron_step, surrogate_spike


def run(current: float, steps: int, p: NeuronParams, v0: float = 0.0) -> tuple[list[int], float]:
    v, spikes = torch.full((1,), v0), []
    for _ in range(steps):
        s, v = neuron_step(torch.tensor([current]), v, p)
        spikes.append(int(s))
    return spikes, v.item()


def test_if_soft_reset_spike_train_for_constant_input():
    # v: .375 .75 1.125* .5 .875 1.25* .625 1.0 (not > Vth) 1.375*
    spikes, v = run(0.375, 9, NeuronParams())
    assert spikes == [0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert v == pytest.approx(0.375)


def test_if_hard_reset_loses_the_charge_above_threshold():
    # v: .375 .75 1.125* -> 0, .375 .75 1.125* -> 0, ...
    spikes, v = run(0.375, 9, NeuronParams(reset="hard"))
    assert spikes == [0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert v == 0.0
    spikes, _ = run(0.625, 6, NeuronParams(reset="hard"))
    assert spikes == [0, 1, 0, 1, 0, 1]  # soft reset would carry .25 and fire at step 4 and 5 in a row


def test_lif_leaks_between_inputs():
    # λ = 0.5, I = 0.75: h = .75, 1.125* -> .125, .8125, 1.15625* -> .15625, .828125
    spikes, v = run(0.75, 5, NeuronParams(leak=0.5))
    assert spikes == [0, 1, 0, 1, 0]
    assert v == pytest.approx(0.828125)


def test_lif_below_its_rheobase_never_fires():
    spikes, _ = run(0.4, 50, NeuronParams(leak=0.5))  # steady state 0.4 / (1 - 0.5) = 0.8 < Vth
    assert sum(spikes) == 0


def test_initial_membrane_potential_shifts_first_spike():
    spikes, _ = run(0.375, 4, NeuronParams(), v0=0.5)
    assert spikes == [0, 1, 0, 0]


def test_dbrelu_clamps_to_unit_interval():
    assert dbrelu(torch.tensor([-1.0, 0.5, 1.0, 3.0]), vth=2.0).tolist() == [0.0, 0.25, 0.5, 1.0]


@pytest.mark.parametrize("kind", ["atan", "sigmoid", "triangle"])
def test_surrogate_spikes_forward_and_peaks_at_threshold(kind):
    x = torch.tensor([-0.25, 0.0, 0.25], requires_grad=True)
    out = surrogate_spike(kind, 2.0)(x)
    out.sum().backward()
    assert out.tolist() == [0.0, 0.0, 1.0]
    assert x.grad[1] > x.grad[0] > 0 and x.grad[0] == pytest.approx(x.grad[2].item())
