import sys
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import divided_arch, spiky_net
from onnx import numpy_helper

import mpis.export.onnx as onnx_export
from mpis.arch.notation import PAPER_EXAMPLES
from mpis.cli import main
from mpis.errors import MpisError
from mpis.export.onnx import RateGraph, check_parity, export_onnx
from mpis.train.checkpoint import load_checkpoint
from mpis.train.data import load_dataset


@pytest.fixture(scope="module")
def test_images():
    test = load_dataset("digits").test
    return torch.stack([test[i][0] for i in range(len(test))])


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", str(checkpoint), "--allow-unsettled", "--onnx", str(path), "--with-rates"]) == 0
    return path


def test_onnx_runtime_matches_pytorch_on_the_whole_test_set(checkpoint, exported, test_images):
    net = load_checkpoint(checkpoint).net
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": test_images.numpy()})
    with torch.no_grad():
        graph = RateGraph(net, 5, with_rates=True)
        want = graph(test_images)
        exact = graph.double()(test_images.double())  # the truth both fp32 evaluations approximate
        unfolded = net.rate_iterations(test_images, 5)  # BN not folded: the trained network itself
        trained = net.classify(unfolded)
    onnx_error = float(np.abs(got[0] - exact[0].numpy()).max())
    torch_error = float((want[0].double() - exact[0]).abs().max())
    assert onnx_error <= max(1e-5, 4 * torch_error)  # the export's parity rule (README): no worse than 4x fp32
    assert (got[0].argmax(1) == trained.numpy().argmax(1)).all()
    # This 1-epoch net has BN gains up to ~100 in its loop, so fp32 rounding moves rates by up to ~5e-5;
    # the trained digits net of the README stays below 1e-5.
    for rate, neuron in zip(got[1:], net.neurons, strict=True):
        assert np.abs(rate - unfolded[neuron.name].numpy()).max() <= 1e-4


def test_file_is_self_contained_with_stable_names_and_a_dynamic_batch(exported):
    model = onnx.load(str(exported))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    assert model.graph.output[0].name == "logits"
    assert not any(p.name != exported.name for p in exported.parent.iterdir())  # no external-data side file
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        logits = session.run(["logits"], {"input": np.random.rand(batch, 1, 16, 16).astype(np.float32)})[0]
        assert logits.shape == (batch, 10)


def test_iteration_count_defaults_to_T_and_can_be_overridden(checkpoint, tmp_path):
    net = load_checkpoint(checkpoint).net
    x = torch.rand(4, 1, 16, 16)
    export_onnx(net, tmp_path / "k2.onnx", 2, False, x)
    session = ort.InferenceSession(str(tmp_path / "k2.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = net.classify(net.rate_iterations(x, 2))
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - want.numpy()).max() <= 1e-5


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--iters", "0"], "--iters must be >= 1"),
        (["--onnx", "/nonexistent-folder/model.onnx"], "does not exist"),
    ],
)
def test_bad_export_requests_fail_with_one_line(checkpoint, tmp_path, capsys, extra, words):
    args = ["export", str(checkpoint), "--allow-unsettled", "--onnx", str(tmp_path / "m.onnx"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
    assert not (tmp_path / "m.onnx").exists()


def test_corrupt_checkpoint_is_refused(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", str(bad), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "not a readable mpis checkpoint" in capsys.readouterr().err


def test_existing_file_is_kept_and_a_failed_parity_check_writes_nothing(checkpoint, tmp_path, monkeypatch):
    net = load_checkpoint(checkpoint).net
    target = tmp_path / "model.onnx"
    target.write_bytes(b"user data")
    with pytest.raises(MpisError, match="already exists"):
        export_onnx(net, target, 3, False, torch.rand(2, 1, 16, 16))
    monkeypatch.setattr(onnx_export, "RTOL", -1.0)
    monkeypatch.setattr(onnx_export, "FP32_MARGIN", -1.0)
    with pytest.raises(MpisError, match="disagrees"):
        export_onnx(net, target, 3, False, torch.rand(2, 1, 16, 16), overwrite=True)
    assert target.read_bytes() == b"user data"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_parity_is_judged_against_float64_and_refuses_a_graph_with_a_wrong_weight(checkpoint, tmp_path):
    net = load_checkpoint(checkpoint).net
    x = torch.rand(32, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    report = export_onnx(net, tmp_path / "m.onnx", 5, True, x)
    assert report.passed and report.argmax_agreement == 1.0 and report.onnx_rates is not None
    assert 0 < report.torch_logits < report.tolerance and report.logits_scale > 0.1
    model = onnx.load(str(tmp_path / "m.onnx"))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight = next(i for i in model.graph.initializer if i.name == conv.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    onnx.save(model, str(tmp_path / "wrong.onnx"))
    wrong = check_parity(RateGraph(net, 5, True).eval(), tmp_path / "wrong.onnx", x)
    assert not wrong.passed and wrong.onnx_logits > 10 * wrong.tolerance  # a 1 % weight error is not rounding


@pytest.mark.parametrize("arch", list(PAPER_EXAMPLES))
def test_every_paper_topology_exports_within_the_parity_rule(arch, tmp_path):
    shape = (2, 8, 8) if PAPER_EXAMPLES[arch][0] == "N-MNIST" else (3, 8, 8)
    net = spiky_net(divided_arch(arch), shape)
    report = export_onnx(net, tmp_path / "m.onnx", 6, False, torch.rand(16, *shape))
    assert report.passed and report.onnx_rates is None and report.argmax_agreement == 1.0
    # these random loops amplify rounding: ONNX Runtime is judged next to PyTorch fp32's own error
    assert report.onnx_logits <= max(1e-4 * report.logits_scale, 2 * report.torch_logits)


def _torchvision_stub(monkeypatch) -> None:
    """onnx2torch imports torchvision for its NMS and RoiAlign converters only; there is no CPU torchvision
    wheel here, and these graphs use neither."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        ops = types.ModuleType("torchvision.ops")
        ops.nms = ops.box_convert = ops.roi_align = None
        stub = types.ModuleType("torchvision")
        stub.ops = ops
        monkeypatch.setitem(sys.modules, "torchvision", stub)
        monkeypatch.setitem(sys.modules, "torchvision.ops", ops)


def test_onnx2torch_converts_the_file_and_computes_what_onnx_runtime_does(exported, test_images, monkeypatch):
    _torchvision_stub(monkeypatch)
    onnx2torch = pytest.importorskip("onnx2torch", reason="pip install --no-deps onnx2torch (as .ci/run does)")
    model = onnx.load(str(exported))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [onnx_export.OPSET]
    assert all(a.i == 0 for n in model.graph.node if n.op_type == "Reshape" for a in n.attribute)
    converted = onnx2torch.convert(model)
    want = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).run(
        None, {"input": test_images.numpy()}
    )
    with torch.no_grad():
        got = converted(test_images)
    for a, b in zip(got, want, strict=True):
        assert np.abs(a.numpy() - b).max() <= 1e-4
