"""`mpis export --triton-repo`: a Triton Inference Server model repository for the exported graph.

REPO/NAME/config.pbtxt + REPO/NAME/1/model.onnx (platform onnxruntime_onnx), and, when a TensorRT engine
was built, REPO/NAME_trt/config.pbtxt + REPO/NAME_trt/1/model.plan (platform tensorrt_plan): Triton
serves one platform per model, so the engine is a second model with the same tensors. Dims exclude the
batch axis (max_batch_size > 0); dynamic batching is on.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from mpis.errors import MpisError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
QUEUE_DELAY_US = 100


def model_config(
    name: str,
    platform: str,
    max_batch_size: int,
    inputs: list[tuple[str, tuple[int, ...]]],
    outputs: list[tuple[str, tuple[int, ...]]],
) -> str:
    """The text of a config.pbtxt (protobuf text format of Triton's ModelConfig)."""

    def tensors(items: list[tuple[str, tuple[int, ...]]]) -> str:
        return ",\n".join(
            f'  {{\n    name: "{n}"\n    data_type: TYPE_FP32\n    dims: [ {", ".join(map(str, d))} ]\n  }}'
            for n, d in items
        )

    return (
        f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch_size}\n'
        f"input [\n{tensors(inputs)}\n]\noutput [\n{tensors(outputs)}\n]\n"
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {QUEUE_DELAY_US}\n}}\n"
    )


def check_model_settings(name: str, max_batch_size: int) -> None:
    """Refuse a model name Triton would not load, and a batch size below 1 (the CLI asks before any work)."""
    if not NAME_PATTERN.match(name):
        raise MpisError(f"--name {name!r}: use letters, digits, '_', '.', '-' (Triton model names)")
    if max_batch_size < 1:
        raise MpisError(f"--max-batch-size must be >= 1, got {max_batch_size}")


def write_triton_repo(
    repo: Path,
    name: str,
    onnx_path: Path,
    inputs: list[tuple[str, tuple[int, ...]]],
    outputs: list[tuple[str, tuple[int, ...]]],
    max_batch_size: int,
    plan_path: Path | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the model folder(s); each appears whole (built beside it, then renamed) or not at all."""
    check_model_settings(name, max_batch_size)
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MpisError(f"cannot create Triton repository {repo}: {err.strerror}") from None
    models = [(name, "onnxruntime_onnx", onnx_path, "model.onnx")]
    if plan_path is not None:
        models.append((f"{name}_trt", "tensorrt_plan", plan_path, "model.plan"))
    for model, *_ in models:
        if (repo / model).exists() and not overwrite:
            raise MpisError(f"{repo / model} already exists; choose another --name or pass --overwrite")
    written = []
    for model, platform, source, filename in models:
        staging = Path(tempfile.mkdtemp(dir=repo, prefix=f".{model}."))
        try:
            (staging / "1").mkdir()
            shutil.copyfile(source, staging / "1" / filename)
            (staging / "config.pbtxt").write_text(model_config(model, platform, max_batch_size, inputs, outputs))
            staging.chmod(0o755)
            target = repo / model
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
            written.append(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return written
