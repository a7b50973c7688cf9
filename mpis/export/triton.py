"""`mpis export --triton-repo`: a Triton Inference Server model repository for the exported graph.

REPO/NAME/config.pbtxt + REPO/NAME/1/model.onnx (platform onnxruntime_onnx), and, when a TensorRT engine
was built, REPO/NAME_trt/config.pbtxt + REPO/NAME_trt/1/model.plan (platform tensorrt_plan): Triton
serves one platform per model, so the engine is a second model with the same tensors. Dims exclude the
batch axis (max_batch_size > 0); dynamic batching is on.
"""

from __future__ import annotations

import re
import shutil
from functools import partial
from pathlib import Path

from mpis.errors import MpisError
from mpis.export.outputs import ExportOutputs
from mpis.train.checkpoint import atomic_write, fsync_path, remove_leftovers

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
    plan_path: Path | None,
    overwrite: bool,
    staged: ExportOutputs,
) -> list[Path]:
    """Stage the model folder(s) in `staged`, committed with the export's other files. A new model appears
    whole (its folder renamed into place); an existing one (--overwrite) is replaced Triton's way: version
    N+1 beside N, then the new config.pbtxt, then N removed, so the repository never lacks a model."""
    check_model_settings(name, max_batch_size)
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MpisError(f"cannot create Triton repository {repo}: {err.strerror}") from None
    models = [(name, "onnxruntime_onnx", onnx_path, "model.onnx")]
    if plan_path is not None:
        models.append((f"{name}_trt", "tensorrt_plan", plan_path, "model.plan"))
    for model, *_ in models:
        target = repo / model
        if target.exists() and not (overwrite and target.is_dir()):
            raise MpisError(f"{target} already exists; choose another --name or pass --overwrite")
    for model, platform, source, filename in models:
        target = repo / model
        config = model_config(model, platform, max_batch_size, inputs, outputs)
        try:
            if target.is_dir():
                _stage_next_version(target, config, source, filename, staged)
            else:
                folder = staged.folder(repo, model)
                (folder / "1").mkdir()
                shutil.copyfile(source, folder / "1" / filename)
                (folder / "config.pbtxt").write_text(config)
                folder.chmod(0o755)
                staged.on_commit(partial(_rename_into_place, folder, target))
        except OSError as err:
            raise MpisError(f"cannot write Triton model {target}: {err.strerror}") from None
    return [repo / model for model, *_ in models]


def _stage_next_version(target: Path, config: str, source: Path, filename: str, staged: ExportOutputs) -> None:
    remove_leftovers(target / "config.pbtxt")  # a killed export's, in its atomic write
    versions = [int(p.name) for p in target.iterdir() if p.name.isdigit()]
    version = max(versions, default=0) + 1
    folder = staged.folder(target, str(version))
    shutil.copyfile(source, folder / filename)
    folder.chmod(0o755)

    def swap() -> None:
        _rename_into_place(folder, target / str(version))
        atomic_write(target / "config.pbtxt", lambda tmp: Path(tmp).write_text(config))
        for old in versions:
            shutil.rmtree(target / str(old))
        fsync_path(target)

    staged.on_commit(swap)


def _rename_into_place(folder: Path, target: Path) -> None:
    folder.rename(target)
    fsync_path(target.parent)
