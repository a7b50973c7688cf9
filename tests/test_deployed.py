"""The model as it ships: training scores it every epoch, and `mpis export` refuses a graph that is not the
model that was trained (unsettled rate graph, spiking network that disagrees) unless told otherwise."""

import json

import onnxruntime as ort
import pytest
import torch
from conftest import TINY_ARCH, contractive_net

from mpis.cli import main
from mpis.config import ModelConfig, SolverConfig, TrainConfig
from mpis.model.deployed import SETTLE_TOL, rate_graph
from mpis.model.equilibrium import EquilibriumModel
from mpis.train.checkpoint import save_checkpoint
from mpis.train.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def digits_test() -> tuple[torch.Tensor, torch.Tensor]:
    test = load_dataset("digits").test
    return torch.stack([test[i][0] for i in range(len(test))]), torch.tensor(
        [int(test[i][1]) for i in range(len(test))]
    )


def contractive_checkpoint(tmp_path, steps: int):
    """A checkpoint of the tiny contractive net at T = `steps` (its rate graph settles after 3 iterations:
    mean |r_K - r_K-1| 1.2e-3 at K = 2, 5e-6 at K = 3)."""
    net = contractive_net(shape=load_dataset("digits").input_shape)
    solver = SolverConfig(T=steps)
    path = tmp_path / f"T{steps}" / "model.pt"
    path.parent.mkdir()
    model_cfg = ModelConfig(arch=TINY_ARCH)
    save_checkpoint(path, EquilibriumModel(net, solver), model_cfg, solver, TrainConfig(), {"test_acc": 0.1})
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpis: error: "), err
    return err[0]


def test_training_records_the_accuracy_of_the_onnx_file_it_will_export(checkpoint, tmp_path):
    metrics = [json.loads(line) for line in (checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    x, y = digits_test()
    assert last["deployed_inputs"] == len(y) and last["deployed_T"] == 5 and last["deployed_v_init"] == 0.5
    assert 0.0 <= last["spike_onnx_agreement"] <= 1.0 and last["rate_settle"] >= 0.0
    path = tmp_path / "m.onnx"
    assert main(["export", str(checkpoint), "--onnx", str(path), "--allow-unsettled"]) == 0
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    onnx_acc = float((torch.from_numpy(logits).argmax(1) == y).float().mean())
    assert abs(onnx_acc - last["onnx_acc"]) <= 1.5 / len(y)  # an argmax tie may round either way


def test_epoch_line_shows_the_deployed_scores(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--arch", TINY_ARCH, "--T", "4", "--epochs", "1", "--train-limit", "128", "--out", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "deployed on 360: onnx " in err and "spike(T=4)" in err and "agree " in err


def test_settling_is_measured_between_the_last_two_iterations():
    net = contractive_net(shape=load_dataset("digits").input_shape).folded_copy()
    x, _ = digits_test()
    _, at2 = rate_graph(net, x, 2, None)
    _, at3 = rate_graph(net, x, 3, None)
    last, before = net.rate_iterations(x, 3), net.rate_iterations(x, 2)
    direct = torch.cat([(last[n.name] - before[n.name]).abs().flatten(1) for n in net.neurons], 1).mean(1)
    assert torch.allclose(at3, direct) and float(at2.mean()) > SETTLE_TOL >= float(at3.mean())


def test_export_writes_a_settled_rate_graph_with_no_flags(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    assert main(["export", str(contractive_checkpoint(tmp_path, 3)), "--onnx", str(path)]) == 0
    assert path.is_file()
    assert "rate graph after K = 3 iterations: mean |r_K - r_K-1|" in capsys.readouterr().out


def test_export_refuses_an_unsettled_rate_graph_naming_the_iterations_that_settle_it(tmp_path, capsys):
    path, checkpoint = tmp_path / "m.onnx", str(contractive_checkpoint(tmp_path, 2))
    assert main(["export", checkpoint, "--onnx", str(path)]) == 2
    line = one_error_line(capsys)
    assert "has not settled after K = 2 iterations" in line and "pass --iters 4" in line
    assert "--allow-unsettled" in line and not path.exists()
    assert main(["export", checkpoint, "--onnx", str(path), "--iters", "4"]) == 0


def test_export_refuses_an_untrained_net_and_says_retrain_with_the_jacobian_penalty(checkpoint, tmp_path, capsys):
    path = tmp_path / "m.nir"
    assert main(["export", str(checkpoint), "--nir", str(path)]) == 2
    line = one_error_line(capsys)
    assert "retrain with a larger Jacobian penalty (this run: --jac-reg 1)" in line and not path.exists()


def test_export_refuses_a_spiking_network_that_disagrees_with_the_settled_rate_graph(tmp_path, capsys):
    # the contractive net at T = 6 has settled; from v_init -3Vth its neurons stay silent for 3 of the 6 steps
    path, checkpoint = tmp_path / "m.nir", str(contractive_checkpoint(tmp_path, 6))
    assert main(["export", checkpoint, "--nir", str(path), "--v-init", "-3"]) == 2
    line = one_error_line(capsys)
    assert "the spiking network agrees with the rate graph on only" in line and "has not settled" not in line
    assert "export from the default initial potential (no --v-init: 0.5)" in line
    assert not path.exists()
    assert main(["export", checkpoint, "--nir", str(path)]) == 0  # from Vth/2 (the default) it agrees


def test_allow_unsettled_exports_with_a_warning(checkpoint, tmp_path, capsys):
    path = tmp_path / "m.onnx"
    assert main(["export", str(checkpoint), "--onnx", str(path), "--allow-unsettled"]) == 0
    assert path.is_file() and "warning: the rate graph has not settled" in capsys.readouterr().out


def test_a_disagreeing_spiking_network_gets_the_remedy_of_its_likeliest_cause():
    from mpis.export.faithful import spiking_remedy

    assert "no --v-init: 0.5" in spiking_remedy(-3.0, 0.5, frames=False, settled=True, weight=1.0)
    assert "integrates the frames in their order" in spiking_remedy(0.5, 0.5, frames=True, settled=True, weight=1.0)
    assert "top two classes are close" in spiking_remedy(0.5, 0.5, frames=False, settled=True, weight=1.0)
    assert "larger Jacobian penalty (this run: --jac-reg 1)" in spiking_remedy(0.5, 0.5, False, False, 1.0)
    assert "mpis train --jac-reg 1, the default" in spiking_remedy(0.5, 0.5, False, True, 0.0)
