"""TensorRT engine from the exported ONNX file (TensorRT 10/11 Python API), and a runner that checks an
engine against ONNX Runtime. Needs the `tensorrt` package and a CUDA GPU; without them every entry point
fails with one line that names what is missing.

FP16: TensorRT 10 still has `BuilderFlag.FP16`; TensorRT 11 networks are strongly typed and have no such
flag, so there the ONNX model is converted to fp16 first (onnxconverter-common, fp32 I/O kept).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from mpis.errors import MpisError
from mpis.export.onnx import INPUT_NAME


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MpisError("TensorRT is not installed (pip install 'mpis[trt]' on a CUDA machine)") from None
    import torch

    if not torch.cuda.is_available():
        raise MpisError("TensorRT needs a CUDA GPU, and none is available")
    return trt


def _fp16_onnx(onnx_path: Path, folder: Path) -> Path:
    try:
        import onnx
        from onnxconverter_common import float16
    except ImportError:
        raise MpisError("--fp16 on TensorRT 11 needs onnxconverter-common (pip install onnxconverter-common)") from None
    model = float16.convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    path = folder / "model.fp16.onnx"
    onnx.save(model, str(path))
    return path


def build_engine(
    onnx_path: Path, plan_path: Path, input_shape: tuple[int, ...], max_batch: int, opt_batch: int, fp16: bool
) -> None:
    """Parse the ONNX file and serialise an engine with one optimisation profile over batch 1..max_batch."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    with tempfile.TemporaryDirectory() as folder:
        source = onnx_path
        use_flag = fp16 and hasattr(trt.BuilderFlag, "FP16")
        if fp16 and not use_flag:
            source = _fp16_onnx(onnx_path, Path(folder))
        flags = 0
        if (
            hasattr(trt, "NetworkDefinitionCreationFlag")
            and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
            and not use_flag
        ):
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(Path(source).read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise MpisError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if use_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, *input_shape), (opt_batch, *input_shape), (max_batch, *input_shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MpisError("TensorRT failed to build the engine (see its log above)")
    Path(plan_path).write_bytes(bytes(serialized))


def run_engine(plan_path: Path, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Run a serialised engine on one batch (device buffers from torch), returning every output."""
    trt = require_tensorrt()
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise MpisError(f"{plan_path} is not a TensorRT engine for this TensorRT version and GPU")
    context = engine.create_execution_context()
    context.set_input_shape(INPUT_NAME, inputs.shape)
    device_input = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)).cuda()
    context.set_tensor_address(INPUT_NAME, device_input.data_ptr())
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), device="cuda", dtype=torch.float32)
            context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise MpisError("TensorRT execution failed")
    stream.synchronize()
    return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}


def check_engine(plan_path: Path, onnx_path: Path, inputs: np.ndarray) -> float:
    """Max |Δlogits| between the engine and ONNX Runtime (CPU) on `inputs`."""
    import onnxruntime as ort

    if not Path(plan_path).is_file():
        raise MpisError(f"engine {plan_path} does not exist")
    engine_out = run_engine(plan_path, inputs)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    reference = session.run(["logits"], {INPUT_NAME: inputs})[0]
    return float(np.max(np.abs(engine_out["logits"] - reference)))
