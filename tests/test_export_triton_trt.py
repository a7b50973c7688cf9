import importlib.util

import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from mpis.cli import main


def test_triton_repository_config_parses_as_triton_model_config(checkpoint, tmp_path):
    repo = tmp_path / "repo"
    args = ["export", str(checkpoint), "--allow-unsettled", "--triton-repo", str(repo), "--name", "digits",
            "--with-rates", "--max-batch-size", "64"]  # fmt: skip
    assert main(args) == 0
    assert (repo / "digits" / "1" / "model.onnx").is_file()
    config = text_format.Parse((repo / "digits" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "digits" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64 and config.HasField("dynamic_batching")
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [1, 16, 16])]
    assert config.output[0].name == "logits" and list(config.output[0].dims) == [10]
    assert [o.name for o in config.output[1:]] == ["rate_stem1", "rate_s1_l1", "rate_s2_l1", "rate_s1_l2", "rate_s2_l2"]
    assert all(o.data_type == model_config_pb2.TYPE_FP32 for o in config.output)
    assert sorted(p.name for p in repo.iterdir()) == ["digits"]  # no staging folders left


def test_existing_triton_model_is_kept(checkpoint, tmp_path, capsys):
    (tmp_path / "repo" / "mpis").mkdir(parents=True)
    (tmp_path / "repo" / "mpis" / "mine.txt").write_text("keep")
    assert main(["export", str(checkpoint), "--triton-repo", str(tmp_path / "repo")]) == 2  # before any scoring
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "repo" / "mpis" / "mine.txt").read_text() == "keep"


def test_bad_triton_model_name_is_refused_before_any_scoring(checkpoint, tmp_path, capsys, monkeypatch):
    def scored(*args, **kwargs):
        raise AssertionError("the model was scored before the name was checked")

    monkeypatch.setattr("mpis.export.faithful.check_faithful", scored)
    assert main(["export", str(checkpoint), "--triton-repo", str(tmp_path), "--name", "a b/c"]) == 2
    assert "--name" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available(), reason="TensorRT is present"
)
def test_tensorrt_export_without_tensorrt_or_cuda_is_one_clear_line(checkpoint, tmp_path, capsys):
    assert main(["export", str(checkpoint), "--allow-unsettled", "--trt", str(tmp_path / "m.plan")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("TensorRT is not installed" in err[0] or "CUDA" in err[0])
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(), reason="needs TensorRT and CUDA"
)
def test_tensorrt_engine_matches_onnx_runtime(checkpoint, tmp_path):
    onnx_path, plan = tmp_path / "m.onnx", tmp_path / "m.plan"
    assert main(["export", str(checkpoint), "--allow-unsettled", "--onnx", str(onnx_path), "--trt", str(plan)]) == 0
    assert main(["infer", "--engine", str(plan), "--onnx", str(onnx_path), "--tolerance", "1e-4"]) == 0
