"""`mpis serve REPO`: serve a Triton model repository over Triton's HTTP protocol (KServe v2).

For machines without NVIDIA Triton Inference Server: the same repository (`mpis export --triton-repo`),
the same wire protocol, so a client written against one works against the other. Implemented: health,
server and model metadata, model config, the statistics extension (Triton's per-request and
per-batch-size counters and times, so perf_analyzer reads server-side latency), and inference with JSON
tensors and Triton's binary tensor data extension (the default of `tritonclient`), gzip/deflate request
bodies, and dynamic batching as the model's config asks for it. What one client may take (body sizes, a
JSON body far less than binary data, connections, time to send a request) is bounded: `limits.py`.
Not implemented: gRPC, shared memory, sequence batching, the repository API, response compression.

Each model is run by its platform's backend: `onnxruntime_onnx` by ONNX Runtime (CPU, or CUDA when
onnxruntime-gpu has it), `tensorrt_plan` by TensorRT when it and a CUDA GPU are present (`--backend auto`
skips the engine models otherwise, with a note). The TensorRT path is untested on the CPU machines this
project is tested on.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import math
import re
import socket
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpis import __version__
from mpis.errors import MpisError
from mpis.serve.batching import DynamicBatcher, Tensors

try:
    import uvicorn
    from fastapi import FastAPI, Request, Response
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    from mpis.serve.limits import (
        MAX_HEAD_BYTES,
        ConnectionGuard,
        GuardedProtocol,
        Limits,
        Listener,
        connection_cap,
        limit_log_rate,
        loop_exception,
    )
except ImportError as _err:
    raise MpisError(f"mpis serve needs the serve extra ({_err.name} is missing): pip install 'mpis[serve]'") from None

SHUTDOWN_GRACE_S = 5  # seconds open connections get to finish when the server stops

PLATFORMS = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
ORT_TYPES = {  # ONNX Runtime's type names -> KServe's
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}
BACKEND_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}  # config `backend:` form
DTYPES = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


# --- config.pbtxt (protobuf text format) -----------------------------------------------------------------

_TOKEN = re.compile(r"""\s+|#[^\n]*|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|[{}\[\]:,;<>]|[^\s{}\[\]:,;<>"'#]+""")


def parse_pbtxt(text: str) -> dict[str, list]:
    """Protobuf text format as a dict of field name -> list of values (messages are dicts, enums and
    identifiers strings, numbers int/float); enough for Triton's ModelConfig without its .proto."""
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"unexpected {text[pos]!r} at character {pos}")
        if not match.group().isspace() and not match.group().startswith("#"):
            tokens.append(match.group())
        pos = match.end()
    return _message(tokens, 0, None)[0]


def _message(tokens: list[str], i: int, closing: str | None) -> tuple[dict[str, list], int]:
    fields: dict[str, list] = {}
    while i < len(tokens) and tokens[i] != closing:
        name = tokens[i]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"expected a field name, got {name!r}")
        i += 1 + (i + 1 < len(tokens) and tokens[i + 1] == ":")
        values = fields.setdefault(name, [])
        if i < len(tokens) and tokens[i] == "[":
            i += 1
            while i < len(tokens) and tokens[i] != "]":
                value, i = _value(tokens, i)
                values.append(value)
                i += i < len(tokens) and tokens[i] == ","
            if i >= len(tokens):
                raise ValueError("missing ']'")
            i += 1
        else:
            value, i = _value(tokens, i)
            values.append(value)
        i += i < len(tokens) and tokens[i] in (",", ";")
    if closing is not None and i >= len(tokens):
        raise ValueError(f"missing {closing!r}")
    return fields, i + (closing is not None)


def _value(tokens: list[str], i: int) -> tuple[object, int]:
    if i >= len(tokens):
        raise ValueError("unexpected end of text")
    token = tokens[i]
    if token in ("{", "<"):
        return _message(tokens, i + 1, "}" if token == "{" else ">")
    if token[0] in "\"'":
        return re.sub(r"\\(.)", r"\1", token[1:-1]), i + 1
    if token in ("}", "]", ">", ":", ",", ";", "["):
        raise ValueError(f"unexpected {token!r}")
    for kind in (int, float):
        try:
            return kind(token), i + 1
        except ValueError:
            pass
    return token, i + 1


# --- the repository ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # KServe name: FP32, INT64, ...
    dims: tuple[int, ...]  # without the batch axis when max_batch_size > 0; -1 = any size


@dataclass(frozen=True)
class ModelSpec:
    name: str
    platform: str
    version: str
    path: Path  # the model file
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    queue_delay_s: float | None  # None: the config has no dynamic_batching


def _one(message: dict[str, list], key: str, default: object, kind: type) -> object:
    values = message.get(key, [default])
    if not isinstance(values[-1], kind):
        raise ValueError(f"{key} must be {kind.__name__}, got {values[-1]!r}")
    return values[-1]


def _tensor(message: dict[str, list]) -> TensorSpec:
    data_type = _one(message, "data_type", "TYPE_INVALID", str).removeprefix("TYPE_")
    if data_type not in DTYPES:
        raise ValueError(f"data_type TYPE_{data_type} is not served (numeric types only)")
    dims = message.get("dims", [])
    if not all(isinstance(d, int) and d >= -1 for d in dims):
        raise ValueError(f"dims must be integers >= -1, got {dims}")
    return TensorSpec(_one(message, "name", None, str), data_type, tuple(dims))


def read_model(folder: Path) -> ModelSpec:
    """The model in REPO/NAME from its config.pbtxt and its newest numbered version folder."""
    config = folder / "config.pbtxt"
    try:
        message = parse_pbtxt(config.read_text())
        name = _one(message, "name", folder.name, str)
        if name != folder.name:
            raise ValueError(f"name {name!r} differs from its folder's name")
        backend = _one(message, "backend", "", str)
        platform = _one(message, "platform", BACKEND_PLATFORMS.get(backend, backend), str)
        if platform not in PLATFORMS:
            raise ValueError(f"platform {platform!r} is not served (only {', '.join(PLATFORMS)})")
        max_batch_size = _one(message, "max_batch_size", 0, int)
        inputs = tuple(_tensor(t) for t in message.get("input", []))
        outputs = tuple(_tensor(t) for t in message.get("output", []))
        if not inputs or not outputs:
            raise ValueError("it declares no input or no output")
        batching = message.get("dynamic_batching")
        delay = _one(batching[-1], "max_queue_delay_microseconds", 0, int) * 1e-6 if batching else None
        filename = _one(message, "default_model_filename", PLATFORMS[platform], str)
    except (OSError, ValueError, AttributeError) as err:
        raise MpisError(f"{config}: {err}") from None
    versions = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / filename).is_file())
    if not versions:
        raise MpisError(f"model {name}: no version folder holds {filename} (expected {folder}/1/{filename})")
    path = folder / str(versions[-1]) / filename  # Triton's default version policy: the latest one
    if max_batch_size < 1:
        delay = None  # no batch axis, nothing to batch along
    return ModelSpec(name, platform, str(versions[-1]), path, max_batch_size, inputs, outputs, delay)


class OnnxRuntimeModel:
    """An ONNX Runtime session that returns the config's outputs by name."""

    def __init__(self, spec: ModelSpec):
        import onnxruntime as ort

        available = ort.get_available_providers()
        self.providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            options = ort.SessionOptions()  # idle ORT threads must not spin: the HTTP loop needs those cores
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = ort.InferenceSession(str(spec.path), options, providers=self.providers)
        except Exception as err:  # ONNX Runtime raises its own types for unreadable or invalid files
            raise MpisError(f"model {spec.name}: ONNX Runtime cannot load {spec.path}: {_first_line(err)}") from None
        _check_names(spec, [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        nodes = {n.name: n for n in [*self.session.get_inputs(), *self.session.get_outputs()]}
        for tensor in (*spec.inputs, *spec.outputs):  # a mismatch here would fail every request instead
            node, batch = nodes[tensor.name], [-1] if spec.max_batch_size > 0 else []
            shape = [d if isinstance(d, int) else -1 for d in node.shape]
            fits = len(shape) == len(batch) + len(tensor.dims)
            fits = fits and all(-1 in (a, b) or a == b for a, b in zip(shape, [*batch, *tensor.dims], strict=True))
            if ORT_TYPES.get(node.type) != tensor.datatype or not fits:
                raise MpisError(
                    f"model {spec.name}: config says {tensor.name} is {tensor.datatype} {[*batch, *tensor.dims]}, "
                    f"the ONNX model has {node.type} {node.shape}"
                )
        self.output_names = [o.name for o in spec.outputs]

    def __call__(self, inputs: Tensors) -> Tensors:
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs), strict=True))


class TensorRTModel:
    """A deserialised engine with one execution context (the batcher runs one batch at a time)."""

    def __init__(self, spec: ModelSpec):
        from mpis.export.tensorrt import require_tensorrt

        trt = require_tensorrt()
        import torch

        self.torch = torch
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(spec.path.read_bytes())
        if engine is None:
            raise MpisError(f"model {spec.name}: {spec.path} is not an engine for this TensorRT version and GPU")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        _check_names(spec, [n for n in names if is_input[n]], [n for n in names if not is_input[n]])
        self.context = engine.create_execution_context()
        self.dtypes = {o.name: torch.from_numpy(np.zeros(0, DTYPES[o.datatype])).dtype for o in spec.outputs}
        self.providers = ["TensorRT"]

    def __call__(self, inputs: Tensors) -> Tensors:
        torch = self.torch
        device = {n: torch.from_numpy(np.ascontiguousarray(v)).cuda() for n, v in inputs.items()}
        for name, tensor in device.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name, dtype in self.dtypes.items():
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}


def _check_names(spec: ModelSpec, inputs: list[str], outputs: list[str]) -> None:
    if sorted(t.name for t in spec.inputs) != sorted(inputs):
        raise MpisError(f"model {spec.name}: config inputs {[t.name for t in spec.inputs]}, the model has {inputs}")
    missing = [t.name for t in spec.outputs if t.name not in outputs]
    if missing:
        raise MpisError(f"model {spec.name}: config outputs {missing} are not outputs of {spec.path}")


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


@dataclass
class Loaded:
    models: dict[str, ServedModel]
    notes: list[str] = field(default_factory=list)  # models left out, and why


def load_repository(repo: Path, backend: str = "auto", batching: bool = True) -> Loaded:
    """Every model of the repository that `backend` serves; `auto` leaves out TensorRT engines (with a
    note) when TensorRT or CUDA is missing, `tensorrt` serves only the engines and insists on both."""
    if repo.is_file():
        raise MpisError(
            f"{repo} is a file; a model repository is a folder of NAME/config.pbtxt (mpis export --triton-repo)"
        )
    if not repo.is_dir():
        raise MpisError(f"model repository {repo} does not exist")
    folders = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))  # .staging
    specs = [read_model(p) for p in folders if (p / "config.pbtxt").is_file()]
    if not specs:
        raise MpisError(f"{repo} holds no model (no NAME/config.pbtxt); write one with mpis export --triton-repo")
    engines = [s for s in specs if s.platform == "tensorrt_plan"]
    chosen = [s for s in specs if s.platform == "onnxruntime_onnx"]
    loaded = Loaded({})
    if backend == "tensorrt" and not engines:
        raise MpisError(f"--backend tensorrt: {repo} has no tensorrt_plan model (mpis export --trt --triton-repo)")
    if backend != "onnxruntime" and engines:
        from mpis.export.tensorrt import require_tensorrt

        try:
            require_tensorrt()
            chosen = engines if backend == "tensorrt" else specs
        except MpisError as err:
            if backend == "tensorrt":
                raise
            loaded.notes.append(f"not serving {', '.join(s.name for s in engines)}: {err}")
    if not chosen:
        raise MpisError(f"{repo} has no model for --backend {backend}")
    for spec in chosen:
        run = TensorRTModel(spec) if spec.platform == "tensorrt_plan" else OnnxRuntimeModel(spec)
        loaded.models[spec.name] = ServedModel(spec, run, batching)
    return loaded


# --- the protocol -----------------------------------------------------------------------------------------


class RequestError(Exception):
    """A request the protocol refuses: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class InferRequest:
    inputs: Tensors
    rows: int  # along the batch axis (1 for a model without one)
    outputs: list[tuple[str, bool]]  # (name, as binary)
    request_id: str | None


class ServedModel:
    """A loaded model: its spec, its backend behind a dynamic batcher, and the protocol's views of it."""

    def __init__(self, spec: ModelSpec, run: OnnxRuntimeModel | TensorRTModel, batching: bool):
        self.spec = spec
        self.providers = run.providers
        self.batcher = DynamicBatcher(spec.name, run, spec.max_batch_size, spec.queue_delay_s if batching else None)

    def metadata(self) -> dict:
        batch = [-1] if self.spec.max_batch_size > 0 else []

        def tensors(specs: tuple[TensorSpec, ...]) -> list[dict]:
            return [{"name": t.name, "datatype": t.datatype, "shape": [*batch, *t.dims]} for t in specs]

        return {
            "name": self.spec.name,
            "versions": [self.spec.version],
            "platform": self.spec.platform,
            "inputs": tensors(self.spec.inputs),
            "outputs": tensors(self.spec.outputs),
        }

    def config(self) -> dict:
        """The served configuration in the JSON form of Triton's ModelConfig (the fields mpis reads)."""

        def tensors(specs: tuple[TensorSpec, ...]) -> list[dict]:
            return [{"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": list(t.dims)} for t in specs]

        config = {
            "name": self.spec.name,
            "platform": self.spec.platform,
            "max_batch_size": self.spec.max_batch_size,
            "input": tensors(self.spec.inputs),
            "output": tensors(self.spec.outputs),
        }
        if self.batcher.delay is not None:
            config["dynamic_batching"] = {"max_queue_delay_microseconds": round(self.batcher.delay * 1e6)}
        return config

    def statistics(self) -> dict:
        """Triton's ModelStatistics of this model (JSON form of the statistics extension)."""
        return self.batcher.stats.as_dict(self.spec.name, self.spec.version)

    def parse(self, body: bytes, header_length: str | None, json_limit: int) -> InferRequest:
        """Validate an infer request (JSON header, then the binary tensor data of the inputs that have a
        binary_data_size, in the order of the inputs) against the config; the JSON part may not pass
        `json_limit` bytes."""
        if header_length is None:
            header, binary = body, b""
        else:
            if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
                raise RequestError(400, f"Inference-Header-Content-Length {header_length!r} is not 0..{len(body)}")
            if int(header_length) > json_limit:
                raise RequestError(
                    413, f"JSON header of {header_length} bytes exceeds the limit of {json_limit} bytes for JSON"
                )
            header, binary = body[: int(header_length)], body[int(header_length) :]
        try:
            with _collector_paused():
                request = json.loads(header)
        except (ValueError, RecursionError) as err:
            raise RequestError(400, f"malformed inference request JSON: {_first_line(err)}") from None
        if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
            raise RequestError(400, "the inference request must be a JSON object with an 'inputs' list")
        specs = {t.name: t for t in self.spec.inputs}
        inputs: Tensors = {}
        offset = 0
        for item in request["inputs"]:
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str) or name not in specs:
                raise RequestError(
                    400, f"unexpected input {name!r} for model {self.spec.name!r} (inputs: {list(specs)})"
                )
            if name in inputs:
                raise RequestError(400, f"input {name!r} is given twice")
            inputs[name], offset = self._tensor(item, specs[name], binary, offset)
        if offset != len(binary):
            raise RequestError(
                400, f"{len(binary)} bytes of binary data, but the inputs' binary_data_size add to {offset}"
            )
        missing = [n for n in specs if n not in inputs]
        if missing:
            raise RequestError(400, f"missing input(s) {missing} for model {self.spec.name!r}")
        rows = 1
        if self.spec.max_batch_size > 0:
            rows = next(iter(inputs.values())).shape[0]
            if any(v.shape[0] != rows for v in inputs.values()):
                raise RequestError(400, "inputs differ in batch size")
            if not 1 <= rows <= self.spec.max_batch_size:
                raise RequestError(
                    400, f"batch size {rows} is outside 1..{self.spec.max_batch_size} (max_batch_size of the model)"
                )
        return InferRequest(inputs, rows, self._outputs(request), _request_id(request))

    def _tensor(self, item: dict, spec: TensorSpec, binary: bytes, offset: int) -> tuple[np.ndarray, int]:
        what = f"input {spec.name!r}"
        if item.get("datatype") != spec.datatype:
            raise RequestError(400, f"{what}: datatype {item.get('datatype')!r}, expected {spec.datatype}")
        shape = _shape(item.get("shape"), ([-1] if self.spec.max_batch_size > 0 else []) + list(spec.dims), what)
        dtype, count = DTYPES[spec.datatype], math.prod(shape)
        parameters = _parameters(item, what)
        if "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            if type(size) is not int or size != count * dtype.itemsize or offset + size > len(binary):
                raise RequestError(
                    400,
                    f"input {spec.name!r}: binary_data_size {size!r} for {count * dtype.itemsize} bytes of data "
                    f"({len(binary) - offset} left in the body)",
                )
            array = np.frombuffer(binary, dtype, count, offset).reshape(shape).astype(dtype.newbyteorder("="))
            offset += size
        elif "data" in item:
            array = json_array(item["data"], spec.datatype, shape, what)
        else:
            raise RequestError(400, f"input {spec.name!r} has neither data nor a binary_data_size parameter")
        if dtype.kind == "f" and not np.isfinite(array).all():
            raise RequestError(400, f"input {spec.name!r} holds NaN or Inf")
        return array, offset

    def _outputs(self, request: dict) -> list[tuple[str, bool]]:
        default = _flag(_parameters(request, "the request"), "binary_data_output", False)
        known = [t.name for t in self.spec.outputs]
        wanted = request.get("outputs")
        if wanted is None:
            return [(name, default) for name in known]
        if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
            raise RequestError(400, "'outputs' must be a list of objects")
        chosen = []
        for output in wanted:
            if output.get("name") not in known:
                raise RequestError(400, f"unexpected output {output.get('name')!r} (outputs: {known})")
            parameters = _parameters(output, f"output {output['name']!r}")
            chosen.append((output["name"], _flag(parameters, "binary_data", default)))
        return chosen

    def encode(self, request: InferRequest, outputs: Tensors) -> Response:
        """The infer response: JSON data, or binary data after the JSON header for outputs asked as binary."""
        datatypes = {t.name: t.datatype for t in self.spec.outputs}
        described, blobs = [], []
        for name, binary in request.outputs:
            array = outputs[name]
            entry = {"name": name, "datatype": datatypes[name], "shape": list(array.shape)}
            if binary:
                blobs.append(np.ascontiguousarray(array, DTYPES[datatypes[name]]).tobytes())
                entry["parameters"] = {"binary_data_size": len(blobs[-1])}
            else:
                entry["data"] = array.reshape(-1).tolist()
            described.append(entry)
        response = {"model_name": self.spec.name, "model_version": self.spec.version, "outputs": described}
        if request.request_id is not None:
            response["id"] = request.request_id
        header = json.dumps(response).encode()
        if not blobs:
            return Response(header, media_type="application/json")
        return Response(
            b"".join([header, *blobs]),
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(len(header))},
        )


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Decoded JSON holds no reference cycles, but its lists make the cyclic garbage collector run again and
    again over the whole heap while they are created: 8 MiB of `[0],` took 1.6 s to decode, 0.25 s without."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _shape(shape: object, want: list[int], what: str) -> list[int]:
    """A request's shape, checked against the config's (`want`, -1: any size)."""
    if not isinstance(shape, list):
        raise RequestError(400, f"{what}: shape must be a list of integers, got {type(shape).__name__}")
    if len(shape) != len(want):
        raise RequestError(400, f"{what}: shape has {len(shape)} dims, expected {len(want)}: {want} (-1: any)")
    for dim in shape:
        if type(dim) is not int or dim < 0:  # `type`, not isinstance: JSON true is a Python int
            raise RequestError(400, f"{what}: dim {json.dumps(dim)} in shape {shape} must be a non-negative integer")
    if not all(w in (-1, s) for s, w in zip(shape, want, strict=True)):
        raise RequestError(400, f"{what}: shape {shape}, expected {want} (-1: any)")
    return shape


def json_array(data: object, datatype: str, shape: list[int], what: str) -> np.ndarray:
    """JSON tensor data, flat or nested as `shape`, as an array of `datatype`, refusing what a cast would
    change silently: true/false for a number type (a Python bool is an int), numbers for BOOL, fractions
    or out-of-range values for an integer type."""
    if not isinstance(data, list):
        raise RequestError(400, f"{what}: data must be a list, got {type(data).__name__}")
    values = _values(data, shape, what)
    kinds, dtype = set(map(type, values)), DTYPES[datatype].newbyteorder("=")
    if dtype.kind == "b":
        if not kinds <= {bool}:
            raise RequestError(400, f"{what}: BOOL data must be true or false")
    elif bool in kinds:
        raise RequestError(400, f"{what}: data holds true or false, which is not a {datatype} value")
    elif not kinds <= {int, float}:
        raise RequestError(400, f"{what}: data must hold only numbers")
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        if float in kinds:
            raise RequestError(400, f"{what}: {datatype} data must be integers")
        if values and not (info.min <= min(values) and max(values) <= info.max):
            raise RequestError(400, f"{what}: data outside {datatype}'s range {info.min}..{info.max}")
    try:
        return np.asarray(values, dtype).reshape(shape)
    except OverflowError:  # an integer beyond float64
        raise RequestError(400, f"{what}: data outside {datatype}'s range") from None


def _values(data: list, shape: list[int], what: str) -> list:
    """The values of JSON tensor data, flat or nested as `shape`, in row-major order. A nesting is checked
    level by level before it is walked, so that a body of many tiny lists is refused at the cost of the
    shape's values, not of the body's lists (numpy takes seconds over a few million)."""
    values = data
    if data and type(data[0]) is list:
        values = [data]
        for size in shape:
            if not all(type(item) is list and len(item) == size for item in values):
                raise RequestError(400, f"{what}: data is neither flat nor nested as shape {shape}")
            values = [value for item in values for value in item]
    if len(values) != math.prod(shape):
        raise RequestError(400, f"{what}: data has {len(values)} values, shape {shape} needs {math.prod(shape)}")
    if any(type(value) is list for value in values):
        raise RequestError(400, f"{what}: data is neither flat nor nested as shape {shape}")
    return values


def _parameters(item: dict, what: str) -> dict:
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError(400, f"parameters of {what} must be an object")
    return parameters


def _flag(parameters: dict, key: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if type(value) is not bool:  # "false" would be true
        raise RequestError(400, f"parameter {key} must be true or false, got {json.dumps(value)}")
    return value


def _request_id(request: dict) -> str | None:
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(400, "'id' must be a string")
    return request_id


async def _read_body(request: Request, limit: int, advice: str) -> bytes:
    """The (decompressed) body, refused with 413 above `limit` bytes (the message ends with `advice`). An
    oversized body is still read to its end, discarded, so that the client gets the 413 rather than a
    connection reset while it is sending."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
    except ClientDisconnect:  # gone (or cut at the body timeout): answered to no one, and not logged
        raise RequestError(400, "the client closed the connection before the end of the body") from None
    if size > limit:
        raise RequestError(413, f"request body of {size} bytes exceeds the limit of {limit} bytes{advice}")
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("gzip", "deflate"):
        inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)
        try:
            body = inflater.decompress(body, limit + 1)
        except zlib.error as err:
            raise RequestError(400, f"body is not valid {encoding} data: {err}") from None
        if len(body) > limit:
            raise RequestError(413, f"decompressed request body exceeds the limit of {limit} bytes{advice}")
    elif encoding != "identity":
        raise RequestError(400, f"unsupported Content-Encoding {encoding!r} (gzip, deflate)")
    return body


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def build_app(models: dict[str, ServedModel], limits: Limits) -> FastAPI:
    """The KServe v2 HTTP endpoints over `models`; every refusal is {"error": ...} with its status."""
    json_advice = (
        " for JSON (--max-json-mb); tensors sent as binary data (Triton's binary tensor data extension, "
        f"tritonclient's default) may take up to {limits.max_body_bytes} bytes"
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for model in models.values():
            model.batcher.start()
        try:
            yield
        finally:
            for model in models.values():
                await model.batcher.stop()

    app = FastAPI(title="mpis serve", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        return _error(err.status, str(err))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    def model(name: str, version: str | None) -> ServedModel:
        if name not in models:
            raise RequestError(404, f"Request for unknown model: '{name}' is not found")
        if version not in (None, models[name].spec.version):
            raise RequestError(404, f"Request for unknown model: '{name}' version {version} is not found")
        return models[name]

    @app.get("/v2/health/live")
    @app.get("/v2/health/ready")
    async def health() -> Response:
        return Response()

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "mpis", "version": __version__, "extensions": ["binary_tensor_data", "statistics"]}

    @app.get("/v2/models/stats")
    async def all_statistics() -> dict:
        return {"model_stats": [m.statistics() for m in models.values()]}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> dict:
        return model(name, version).metadata()

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        model(name, version)
        return Response()

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str | None = None) -> dict:
        return model(name, version).config()

    @app.get("/v2/models/{name}/stats")
    @app.get("/v2/models/{name}/versions/{version}/stats")
    async def model_statistics(name: str, version: str | None = None) -> dict:
        return {"model_stats": [model(name, version).statistics()]}

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        served = model(name, version)
        arrived = time.monotonic_ns()
        header_length = request.headers.get("inference-header-content-length")
        if header_length is None:  # all JSON: held to the JSON limit before it is read
            body = await _read_body(request, limits.json_bytes, json_advice)
        else:
            body = await _read_body(request, limits.max_body_bytes, " (--max-body-mb)")
        parsed = served.parse(body, header_length, limits.json_bytes)
        try:
            outputs = await served.batcher.infer(parsed.inputs, parsed.rows)
        except Exception as err:  # the backend failed on a valid request: the server's fault, not the client's
            served.batcher.stats.requests["fail"].add(time.monotonic_ns() - arrived)
            raise RequestError(500, f"inference failed: {_first_line(err)}") from None
        response = served.encode(parsed, outputs)
        served.batcher.stats.requests["success"].add(time.monotonic_ns() - arrived)
        return response

    return app


# --- the server -------------------------------------------------------------------------------------------


def bind(host: str, port: int) -> Listener:
    """The listening socket, bound here so that a taken port is one clear line (uvicorn would exit). It
    comes from getaddrinfo, so its protocol is IPPROTO_TCP: asyncio sets TCP_NODELAY only on connections
    of such sockets, and without it Nagle's algorithm and delayed ACKs add ~40 ms to every response."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )[0]
        sock = Listener(family, kind, proto)
    except OSError as err:
        raise MpisError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections wait in the backlog from here on, before uvicorn accepts them
    except OSError as err:
        sock.close()
        raise MpisError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn's server with `loop_exception` as its event loop's exception handler."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(loop_exception)
        await super().startup(sockets)


class ModelServer:
    """A loaded repository bound to host:port; `run()` serves until interrupted (the CLI), and the context
    manager serves from a background thread (tests, benchmarks)."""

    def __init__(
        self,
        repo: Path,
        host: str = "127.0.0.1",
        port: int = 8000,
        backend: str = "auto",
        batching: bool = True,
        limits: Limits | None = None,  # None: the defaults
    ):
        limits = limits or Limits()
        loaded = load_repository(Path(repo), backend, batching)
        self.models, self.notes = loaded.models, loaded.notes
        cap, note = connection_cap(limits.max_connections)  # after loading: the models' descriptors are counted
        self.notes += [note] if note else []
        self.socket = bind(host, port)
        self.socket.guard = guard = ConnectionGuard(cap)
        port = self.socket.getsockname()[1]
        self.url = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        config = uvicorn.Config(
            build_app(self.models, limits),
            loop="asyncio",  # its selector loop accepts through Listener.accept (uvloop would bypass it)
            http=functools.partial(GuardedProtocol, guard=guard, limits=limits),
            ws="none",  # an upgrade would hand the connection to a protocol the guard does not see
            timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]  # uvicorn takes a float
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,  # a client that keeps its connection open cannot hold shutdown
        )
        limit_log_rate()
        self._server = _Uvicorn(config)
        self._thread: threading.Thread | None = None

    def describe(self) -> str:
        parts = []
        for name, model in self.models.items():
            spec = model.spec
            mode = "no batching" if model.batcher.delay is None else f"dynamic batching ≤{spec.max_batch_size}"
            parts.append(f"{name} v{spec.version} ({spec.platform}, {model.providers[0]}, {mode})")
        return f"serving on http://{self.url}: " + "; ".join(parts)

    def run(self) -> None:
        self._server.run(sockets=[self.socket])

    def __enter__(self) -> ModelServer:
        self._thread = threading.Thread(target=self.run, name="mpis-serve", daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise MpisError("the server stopped while starting (see its log above)")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=2 * SHUTDOWN_GRACE_S)
        if self._thread.is_alive():  # a request still computing past the grace period: stop without it
            self._server.force_exit = True
            self._thread.join(timeout=SHUTDOWN_GRACE_S)
        self.socket.close()


def serve(repo: Path, host: str, port: int, backend: str, batching: bool, limits: Limits) -> None:
    """`mpis serve`: load, bind, say what is served where, and serve until Ctrl-C."""
    server = ModelServer(repo, host, port, backend, batching, limits)
    for note in server.notes:
        print(f"mpis: note: {note}", file=sys.stderr)
    print(server.describe(), flush=True)
    server.run()
