import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import mpis.export.onnx as onnx_export
from mpis.cli import main
from mpis.errors import MpisError
from mpis.export.onnx import RateGraph, export_onnx
from mpis.train.checkpoint import load_checkpoint
from mpis.train.data import load_dataset


@pytest.fixture(scope="module")
def test_images():
    test = load_dataset("digits").test
    return torch.stack([test[i][0] for i in range(len(test))])


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", str(checkpoint), "--onnx", str(path), "--with-rates"]) == 0
    return path


def test_onnx_runtime_matches_pytorch_on_the_whole_test_set(checkpoint, exported, test_images):
    net = load_checkpoint(checkpoint).net
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": test_images.numpy()})
    with torch.no_grad():
        want = RateGraph(net, 5, with_rates=True)(test_images)
        unfolded = net.rate_iterations(test_images, 5)  # BN not folded: the trained network itself
        trained = net.classify(unfolded)
    assert np.abs(got[0] - want[0].numpy()).max() <= 1e-5
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
    args = ["export", str(checkpoint), "--onnx", str(tmp_path / "m.onnx"), *extra]
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
    monkeypatch.setattr(onnx_export, "ATOL", -1.0)
    with pytest.raises(MpisError, match="disagrees"):
        export_onnx(net, target, 3, False, torch.rand(2, 1, 16, 16), overwrite=True)
    assert target.read_bytes() == b"user data"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
