"""`mpis serve`: Triton's HTTP protocol checked with the official `tritonclient`, against ONNX Runtime."""

import contextlib
import gzip
import http.client
import importlib.util
import io
import json
import logging
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.http as triton
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException

from mpis.cli import main
from mpis.errors import MpisError
from mpis.serve import limits
from mpis.serve import server as server_module
from mpis.serve.server import Limits, ModelServer, RequestError, json_array, parse_pbtxt, read_model

MAX_BATCH = 8
BODY_LIMIT = 200_000
JSON_LIMIT = 100_000
TENSORRT_READY = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.fixture(scope="module")
def repo(checkpoint, tmp_path_factory):
    """REPO/digits from `mpis export --triton-repo` (logits and the rates of every layer)."""
    repo = tmp_path_factory.mktemp("serve") / "repo"
    args = ["export", str(checkpoint), "--allow-unsettled", "--triton-repo", str(repo), "--name", "digits",
            "--with-rates", "--max-batch-size", str(MAX_BATCH), "--batch", "8"]  # fmt: skip
    assert main(args) == 0
    return repo


@pytest.fixture(scope="module")
def session(repo):
    return ort.InferenceSession(str(repo / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def server(repo):
    with ModelServer(repo, port=0, limits=Limits(max_body_bytes=BODY_LIMIT, max_json_bytes=JSON_LIMIT)) as server:
        yield server


@pytest.fixture
def client(server):
    client = triton.InferenceServerClient(server.url)
    yield client
    client.close()


def images(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, 1, 16, 16), dtype=np.float32)


def infer(client, x: np.ndarray, binary_in: bool = True, outputs: list | None = None, **kwargs):
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary_in)
    return client.infer("digits", [tensor], outputs=outputs, **kwargs)


def send(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """A raw HTTP request (for what tritonclient would refuse to send); returns the status and the JSON body."""
    host, port = server.url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request(method, path, body, headers or {})
    response = connection.getresponse()
    payload = json.loads(response.read() or b"{}")
    connection.close()
    return response.status, payload


def copy_repo(repo, target, config_edit=None):
    shutil.copytree(repo, target)
    if config_edit is not None:
        config = target / "digits" / "config.pbtxt"
        config.write_text(config_edit(config.read_text()))
    return target


def test_health_and_metadata_as_triton_reports_them(server, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("digits", "2")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("digits")
    assert metadata["platform"] == "onnxruntime_onnx" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 16, 16]}]
    assert [o["name"] for o in metadata["outputs"]][:2] == ["logits", "rate_stem1"]
    config = client.get_model_config("digits")
    assert config["max_batch_size"] == MAX_BATCH and config["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    assert [s["name"] for s in client.get_inference_statistics()["model_stats"]] == ["digits"]
    status, payload = send(server, "GET", "/v2/nowhere")
    assert status == 404 and payload["error"]


@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
def test_logits_equal_onnx_runtime(client, session, binary_in, binary_out):
    x = images(3)
    wanted = [triton.InferRequestedOutput("logits", binary_data=binary_out)]
    result = infer(client, x, binary_in, wanted, request_id="r-7")
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["logits"] and response["id"] == "r-7"
    assert ("data" in response["outputs"][0]) is not binary_out
    np.testing.assert_array_equal(result.as_numpy("logits"), session.run(["logits"], {"input": x})[0])


def test_every_output_by_default_and_a_chosen_one_alone(client, session):
    x = images(2, seed=1)
    want = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x}), strict=True))
    result = infer(client, x)  # tritonclient asks for every output, as binary
    for name, value in want.items():
        np.testing.assert_array_equal(result.as_numpy(name), value)
    alone = infer(client, x, outputs=[triton.InferRequestedOutput("rate_s2_l2")])
    assert [o["name"] for o in alone.get_response()["outputs"]] == ["rate_s2_l2"]
    np.testing.assert_array_equal(alone.as_numpy("rate_s2_l2"), want["rate_s2_l2"])


def test_compressed_request_bodies(client, session):
    x = images(2, seed=2)
    for algorithm in ("gzip", "deflate"):
        result = infer(client, x, request_compression_algorithm=algorithm)
        np.testing.assert_array_equal(result.as_numpy("logits"), session.run(["logits"], {"input": x})[0])


def test_json_data_may_be_nested(server, session):
    x = images(2, seed=4)
    entry = {"name": "input", "shape": [2, 1, 16, 16], "datatype": "FP32", "data": x.tolist()}
    status, payload = send(server, "POST", "/v2/models/digits/infer", json.dumps({"inputs": [entry]}).encode())
    assert status == 200 and payload["outputs"][0]["shape"] == [2, 10]
    logits = np.array([o["data"] for o in payload["outputs"] if o["name"] == "logits"][0], dtype=np.float32)
    np.testing.assert_array_equal(logits.reshape(2, 10), session.run(["logits"], {"input": x})[0])


def _json(entry_changes: dict | None = None, rows: int = 2, **request) -> bytes:
    entry = {"name": "input", "shape": [rows, 1, 16, 16], "datatype": "FP32", "data": images(rows).ravel().tolist()}
    entry.update(entry_changes or {})
    return json.dumps({"inputs": [entry], **request}).encode()


def _binary(x: np.ndarray, size: int | None = None, trailing: bytes = b"", padding: int = 0) -> tuple[bytes, dict]:
    entry = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    entry["parameters"] = {"binary_data_size": x.nbytes if size is None else size}
    header = json.dumps({"inputs": [entry]}).encode() + b" " * padding
    return header + x.tobytes() + trailing, {"Inference-Header-Content-Length": str(len(header))}


def _with_inf() -> np.ndarray:
    x = images(2)
    x[1, 0, 3, 4] = np.inf
    return x


INFER = "/v2/models/digits/infer"
BAD_REQUESTS = {
    "unknown model": ("/v2/models/nope/infer", _json(), {}, 404),
    "unknown version": ("/v2/models/digits/versions/7/infer", _json(), {}, 404),
    "wrong input name": (INFER, _json({"name": "image"}), {}, 400),
    "missing input": (INFER, json.dumps({"inputs": []}).encode(), {}, 400),
    "wrong shape": (INFER, _json({"shape": [2, 1, 16, 15], "data": [0.5] * 480}), {}, 400),
    "wrong rank": (INFER, _json({"shape": [512]}), {}, 400),
    "wrong datatype": (INFER, _json({"datatype": "FP64"}), {}, 400),
    "NaN in JSON data": (INFER, _json({"data": [float("nan")] * 512}), {}, 400),
    "Inf in binary data": (INFER, *_binary(_with_inf()), 400),
    "batch above max_batch_size": (INFER, *_binary(images(MAX_BATCH + 1)), 400),
    "batch 0": (INFER, _json({"shape": [0, 1, 16, 16], "data": []}), {}, 400),
    "data of the wrong length": (INFER, _json({"data": [0.5] * 100}), {}, 400),
    "data that are not numbers": (INFER, _json({"data": ["a"] * 512}), {}, 400),
    "unknown output": (INFER, _json(outputs=[{"name": "probabilities"}]), {}, 400),
    "malformed JSON": (INFER, b'{"inputs": [', {}, 400),
    "JSON that is not an object": (INFER, b"[1, 2]", {}, 400),
    "deeply nested JSON": (INFER, b"[" * 100_000, {}, 400),
    "header length beyond the body": (INFER, _binary(images(2))[0], {"Inference-Header-Content-Length": "99999"}, 400),
    "header length not a number": (INFER, _binary(images(2))[0], {"Inference-Header-Content-Length": "12a"}, 400),
    "binary data without header length": (INFER, _binary(images(2))[0], {}, 400),
    "binary_data_size too large": (INFER, *_binary(images(2), size=4096), 400),
    "binary data left over": (INFER, *_binary(images(2), trailing=b"\0" * 8), 400),
    "body over the size limit": (INFER, *_binary(images(2), trailing=b"\0" * BODY_LIMIT), 413),
    "JSON body over the JSON limit": (INFER, b" " * JSON_LIMIT + _json(), {}, 413),
    "JSON header over the JSON limit": (INFER, *_binary(images(2), padding=JSON_LIMIT), 413),
    "broken gzip body": (INFER, b"not gzip", {"Content-Encoding": "gzip"}, 400),
    "gzip bomb over the limit": (INFER, gzip.compress(b" " * (4 * BODY_LIMIT)), {"Content-Encoding": "gzip"}, 413),
    "true as FP32 data": (INFER, _json({"data": [True] * 512}), {}, 400),
    "true among FP32 numbers": (INFER, _json({"data": [0.5] * 511 + [True]}), {}, 400),
    "negative dim": (INFER, _json({"shape": [-1, 1, 16, 16]}), {}, 400),
    "fractional dim": (INFER, _json({"shape": [2.0, 1, 16, 16]}), {}, 400),
    "true as a dim": (INFER, _json({"shape": [True, 1, 16, 16], "data": [0.5] * 256}), {}, 400),
    "shape not a list": (INFER, _json({"shape": "2x1x16x16"}), {}, 400),
    "binary_data_output not a boolean": (INFER, _json(parameters={"binary_data_output": "false"}), {}, 400),
    "unsupported encoding": (INFER, _json(), {"Content-Encoding": "br"}, 400),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_request_gets_its_status_and_the_server_keeps_serving(server, client, session, case):
    path, body, headers, status = BAD_REQUESTS[case]
    got, payload = send(server, "POST", path, body, headers)
    assert got == status and isinstance(payload["error"], str) and payload["error"]
    x = images(1, seed=3)
    np.testing.assert_array_equal(infer(client, x).as_numpy("logits"), session.run(["logits"], {"input": x})[0])


def test_tritonclient_sees_the_errors_with_their_status(client):
    with pytest.raises(InferenceServerException, match="unknown model") as err:
        client.get_model_metadata("nope")
    assert err.value.status() == "404"
    with pytest.raises(InferenceServerException, match="batch size 9") as err:
        infer(client, images(MAX_BATCH + 1))
    assert err.value.status() == "400"


REFUSAL_MESSAGES = {  # the request, and words its refusal must say
    "negative dim": (_json({"shape": [-1, 1, 16, 16]}), {}, ["dim -1 in shape [-1, 1, 16, 16] must be a non-negative"]),
    "data of the wrong length": (_json({"data": [0.5] * 100}), {}, ["data has 100 values, shape [2, 1, 16, 16] needs"]),
    "false among FP32 numbers": (_json({"data": [0.5] * 511 + [False]}), {}, ["true or false, which is not a FP32"]),
    "JSON over the JSON limit": (b" " * JSON_LIMIT + _json(), {}, [f"limit of {JSON_LIMIT} bytes for JSON", "binary"]),
    "body over the size limit": (*_binary(images(2), trailing=b"\0" * BODY_LIMIT), [f"limit of {BODY_LIMIT} bytes"]),
}


@pytest.mark.parametrize("case", REFUSAL_MESSAGES, ids=list(REFUSAL_MESSAGES))
def test_refusals_say_what_was_wrong(server, case):
    body, headers, words = REFUSAL_MESSAGES[case]
    _, payload = send(server, "POST", INFER, body, headers)
    assert all(w in payload["error"] for w in words), payload["error"]


@pytest.mark.parametrize(
    ("data", "datatype", "words"),
    [
        ([1, 2, True], "INT32", "true or false"),
        ([1.5, 2, 3], "INT32", "must be integers"),
        ([1, 2, 300], "INT8", "range -128..127"),
        ([-1, 2, 3], "UINT8", "range 0..255"),
        ([1, 0, 1], "BOOL", "true or false"),
        ([[1, 2], [3]], "FP32", "neither flat nor nested as shape [3]"),
        ([[0]] * 3, "FP32", "neither flat nor nested as shape [3]"),
        ([1, "2", 3], "FP32", "only numbers"),
        (5, "FP32", "must be a list"),
    ],
)
def test_json_data_is_never_cast_silently(data, datatype, words):
    with pytest.raises(RequestError, match=re.escape(words)) as err:
        json_array(data, datatype, [3], "input 'x'")
    assert err.value.status == 400
    assert json_array([True, False, True], "BOOL", [3], "x").tolist() == [True, False, True]
    assert json_array([[1, -2, 127]], "INT8", [1, 3], "x").dtype == np.int8


HEAD = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: mpis\r\n"  # without the blank line that ends it


@pytest.fixture(scope="module")
def strict(repo):
    """A server with short timeouts: 1 s for a head, 0.5 s for a body, 0.3 s for an idle kept-alive connection."""
    with ModelServer(repo, port=0, limits=Limits(header_timeout=1, body_timeout=0.5, keep_alive_timeout=0.3)) as server:
        yield server


def _connect(server) -> socket.socket:
    host, port = server.url.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _until_closed(sock: socket.socket) -> bytes:
    """All that the server sends until it closes the connection (a socket timeout if it never does)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def _raw_request(body: bytes) -> bytes:
    return HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body


def _wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the server did not get there in time"
        time.sleep(0.01)


def test_a_slow_head_or_body_gets_408_at_its_timeout(strict):
    started = time.monotonic()
    head, body = _connect(strict), _connect(strict)
    head.sendall(HEAD)
    body.sendall(HEAD + b"Content-Length: 1000\r\n\r\n{")
    answer = _until_closed(body)
    assert answer.startswith(b"HTTP/1.1 408") and b"request body not received within 0.5 s" in answer
    assert 0.45 < time.monotonic() - started < 0.95
    answer = _until_closed(head)
    assert answer.startswith(b"HTTP/1.1 408") and b"request head not received within 1 s" in answer
    assert 0.95 < time.monotonic() - started < 3


def test_a_body_that_keeps_coming_is_not_cut_at_the_body_timeout(strict):
    """96 KiB sent over ~1 s, twice the body timeout: each 64 KiB received extends it by a second."""
    request = _raw_request(b" " * (96 << 10) + _json(rows=1))
    sock, pieces = _connect(strict), 8
    step = len(request) // pieces + 1
    for i in range(pieces):
        sock.sendall(request[i * step : (i + 1) * step])
        time.sleep(0.125)
    answer = _until_closed(sock)  # served, then closed when idle for the keep-alive timeout
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_idle_connections_are_closed_new_at_the_header_timeout_kept_alive_at_the_keep_alive_one(strict):
    started = time.monotonic()
    fresh, kept = _connect(strict), _connect(strict)
    kept.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: mpis\r\n\r\n")
    assert _until_closed(kept).startswith(b"HTTP/1.1 200")
    assert 0.25 < time.monotonic() - started < 0.9  # the 0.3 s keep-alive timeout, not the 1 s one
    assert _until_closed(fresh) == b""  # never sent a byte: closed without a word
    assert 0.95 < time.monotonic() - started < 3


def test_over_the_connection_cap_the_oldest_waiting_is_evicted_or_the_newcomer_gets_503(repo, session):
    with ModelServer(repo, port=0, limits=Limits(max_connections=4)) as server:
        guard = server.socket.guard
        slow = [_connect(server) for _ in range(4)]
        for sock in slow:
            sock.sendall(HEAD)
        _wait_for(lambda: len(guard.waiting) == 4)
        client, x = triton.InferenceServerClient(server.url, connection_timeout=10, network_timeout=10), images(1)
        np.testing.assert_array_equal(infer(client, x).as_numpy("logits"), session.run(["logits"], {"input": x})[0])
        assert _until_closed(slow[0]) == b""  # the oldest made room
        for sock in slow[1:]:  # the others are still open
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
        for sock in [*slow, client]:
            sock.close()
        _wait_for(lambda: guard.open == 0)

        gate, batcher = threading.Event(), server.models["digits"].batcher
        healthy = batcher._run

        def held(inputs):
            gate.wait(10)
            return healthy(inputs)

        batcher._run = held  # every connection busy with a request: none may be evicted
        busy = [_connect(server) for _ in range(4)]
        for sock in busy:
            sock.sendall(_raw_request(_json(rows=1)))
        _wait_for(lambda: guard.open == 4 and not guard.waiting)
        refused = _connect(server)
        refused.sendall(_raw_request(_json(rows=1)))
        answer = _until_closed(refused)
        assert answer.startswith(b"HTTP/1.1 503") and b"limit of 4 connections" in answer
        gate.set()
        for sock in busy:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            sock.close()


def test_a_head_over_16_kib_is_refused(strict):
    sock = _connect(strict)
    sock.sendall(HEAD + b"X-Padding: " + b"a" * (16 << 10) + b"\r\n\r\n")
    assert _until_closed(sock).startswith(b"HTTP/1.1 400")


def test_at_the_cap_the_guard_evicts_the_oldest_waiting_defers_while_settling_refuses_when_all_are_busy():
    guard = limits.ConnectionGuard(2)  # headroom 1
    for _ in range(2):
        assert guard.verdict() is True
        guard.admit()
    assert guard.verdict() is None  # accepted, not yet made: they may turn out to be evictable
    a, b, c = (mock.Mock() for _ in range(3))  # what the guard sees of a connection: its transport
    guard.waits(a, anew=True)
    guard.waits(b, anew=True)
    assert guard.verdict() is True
    guard.admit()
    a.transport.abort.assert_called_once()
    b.transport.abort.assert_not_called()
    assert guard.verdict() is None  # a is evicted but not yet closed: the headroom is full
    guard.lost(a)
    guard.waits(c, anew=True)
    guard.works(b)
    guard.works(c)
    assert guard.verdict() is False  # every connection is busy with a request: 503
    guard.waits(b, anew=True)
    assert guard.verdict() is True


def test_repeated_log_lines_and_running_out_of_descriptors_are_one_line_per_interval(monkeypatch):
    records, clock = [], [1000.0]
    monkeypatch.setattr(limits.time, "monotonic", lambda: clock[0])
    handler = logging.Handler()
    handler.emit = records.append
    limits.limit_log_rate()
    limits.log.addHandler(handler)
    out_of_files = {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many files")}
    try:
        for _ in range(1000):
            limits.loop_exception(None, out_of_files)
        clock[0] += limits.LOG_INTERVAL_S
        limits.loop_exception(None, out_of_files)
    finally:
        limits.log.removeHandler(handler)
    assert [r.exc_info for r in records] == [None, None]  # two lines, no traceback
    assert "Too many files" in records[0].getMessage() and "999 more like this" in records[1].getMessage()


def _limited_process() -> None:
    """In the server's process: 256 file descriptors (as `ulimit -n 256`), and Ctrl-C as a terminal has it."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_slow_connections_past_the_open_files_limit_neither_starve_a_client_nor_flood_the_log(repo, session):
    command = [sys.executable, "-m", "mpis", "serve", str(repo), "--port", "0", "--header-timeout", "60"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_limited_process
    )
    slow = []
    try:
        url = process.stdout.readline().split("http://")[1].split(": ")[0]
        host, port = url.rsplit(":", 1)
        for _ in range(300):  # more than the server has descriptors
            slow.append(socket.create_connection((host, int(port)), timeout=10))
            slow[-1].sendall(HEAD)
        with socket.create_connection((host, int(port)), timeout=10) as gone:  # leaves in the middle of a body
            gone.sendall(HEAD + b"Content-Length: 1000\r\n\r\n{")
        client, x = triton.InferenceServerClient(url, connection_timeout=10, network_timeout=10), images(1)
        np.testing.assert_array_equal(infer(client, x).as_numpy("logits"), session.run(["logits"], {"input": x})[0])
    finally:
        for sock in slow:
            sock.close()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert len(err) < 20_000 and "Traceback" not in err and "Too many open files" not in err, err[-3000:]
    assert "at most " in err  # the note: fewer connections than the default 1024


def test_a_failing_backend_is_a_500_and_the_server_keeps_serving(repo, session):
    with ModelServer(repo, port=0) as server:
        batcher = server.models["digits"].batcher
        healthy, batcher._run = batcher._run, lambda inputs: 1 / 0
        status, payload = send(server, "POST", INFER, _json())
        assert status == 500 and "inference failed" in payload["error"]
        batcher._run = healthy
        x = images(1)
        logits = infer(triton.InferenceServerClient(server.url), x).as_numpy("logits")
        np.testing.assert_array_equal(logits, session.run(["logits"], {"input": x})[0])


def _concurrently(url: str, batches: list[np.ndarray]) -> list[np.ndarray]:
    """One client thread per batch, released together; returns each request's logits."""
    results: list = [None] * len(batches)
    start = threading.Barrier(len(batches))

    def request(i: int) -> None:
        client = triton.InferenceServerClient(url)
        start.wait()
        results[i] = infer(client, batches[i]).as_numpy("logits")

    threads = [threading.Thread(target=request, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _counts(url: str) -> tuple[int, int]:
    stats = triton.InferenceServerClient(url).get_inference_statistics("digits")["model_stats"][0]
    return stats["inference_count"], stats["execution_count"]


def test_statistics_have_tritons_shape_and_count_requests_rows_queue_and_compute(repo, tmp_path):
    delay = "max_queue_delay_microseconds: "
    slow = copy_repo(repo, tmp_path / "repo", lambda text: text.replace(delay + "100", delay + "2000000"))
    with ModelServer(slow, port=0) as server:
        client = triton.InferenceServerClient(server.url)
        _concurrently(server.url, [images(2, seed=i) for i in range(4)])  # 4 requests, one execution of 8
        infer(client, images(3))  # one request, one execution of 3 (after the 2 s queue delay)
        with pytest.raises(InferenceServerException):
            infer(client, images(MAX_BATCH + 1))  # refused before the model: not a model request
        response = client.get_inference_statistics("digits")
    # Triton's own message accepts it field for field (unknown or mistyped fields raise)
    message = json_format.ParseDict(response, service_pb2.ModelStatisticsResponse())
    (stats,) = message.model_stats
    assert (stats.name, stats.version) == ("digits", "1")
    assert (stats.inference_count, stats.execution_count) == (11, 2)
    requests = stats.inference_stats
    for phase in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(requests, phase).count == 5 and getattr(requests, phase).ns > 0, phase
    assert requests.fail.count == 0 and requests.cache_hit.count == 0
    assert requests.queue.ns >= 1.9e9  # the lone request waited out the 2 s queue delay
    assert requests.success.ns > requests.queue.ns + requests.compute_infer.ns
    assert {b.batch_size: b.compute_infer.count for b in stats.batch_stats} == {3: 1, 8: 1}
    assert stats.last_inference > 0


def test_dynamic_batching_joins_concurrent_requests_up_to_max_batch_size(repo, session, tmp_path):
    delay = "max_queue_delay_microseconds: "
    slow = copy_repo(repo, tmp_path / "repo", lambda text: text.replace(delay + "100", delay + "2000000"))
    with ModelServer(slow, port=0) as server:
        batches = [images(2, seed=i) for i in range(4)]  # 8 rows: one full batch, released at once
        for x, logits in zip(batches, _concurrently(server.url, batches), strict=True):
            np.testing.assert_allclose(logits, session.run(["logits"], {"input": x})[0], rtol=0, atol=1e-5)
        assert _counts(server.url) == (8, 1)
        batches = [images(5, seed=i) for i in range(2)]  # 5 + 5 > 8: never one batch, requests are not split
        for x, logits in zip(batches, _concurrently(server.url, batches), strict=True):
            np.testing.assert_allclose(logits, session.run(["logits"], {"input": x})[0], rtol=0, atol=1e-5)
        assert _counts(server.url) == (18, 3)
    with ModelServer(slow, port=0, batching=False) as server:
        _concurrently(server.url, [images(2, seed=i) for i in range(4)])
        assert _counts(server.url) == (8, 4)
        assert "dynamic_batching" not in triton.InferenceServerClient(server.url).get_model_config("digits")


def test_bounded_concurrent_load_has_no_failures(server, session):
    clients, requests = 4, 25
    inputs = [images(1, seed=10 + i) for i in range(clients)]
    wanted = [session.run(["logits"], {"input": x})[0] for x in inputs]
    failures = [0] * clients
    before = _counts(server.url)

    def run(i: int) -> None:
        client = triton.InferenceServerClient(server.url)
        for _ in range(requests):
            try:
                ok = np.allclose(infer(client, inputs[i]).as_numpy("logits"), wanted[i], rtol=0, atol=1e-5)
            except InferenceServerException:
                ok = False
            failures[i] += not ok

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [0] * clients
    assert _counts(server.url)[0] - before[0] == clients * requests


def test_cli_serves_until_interrupted(repo):
    command = [
        sys.executable,
        "-m",
        "mpis",
        "serve",
        str(repo),
        "--port",
        "0",
        "--no-batching",
        "--max-json-mb",
        "0.01",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as a terminal delivers it, even when this test runs in a background job that ignores SIGINT
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:") and "digits v1 (onnxruntime_onnx" in line
        client = triton.InferenceServerClient(line.split("http://")[1].split(": ")[0])
        assert infer(client, images(1)).as_numpy("logits").shape == (1, 10)
        with pytest.raises(InferenceServerException, match="limit of 10485 bytes for JSON") as err:
            infer(client, images(4), binary_in=False)  # 1024 numbers: ~20 KB of JSON
        assert err.value.status() == "413"
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 130 and "Traceback" not in err


def _fake_engine(repo, tmp_path):
    """A repository with a tensorrt_plan model beside the ONNX one (the engine file is not real)."""
    target = copy_repo(repo, tmp_path / "repo")
    shutil.copytree(target / "digits", target / "digits_trt")
    (target / "digits_trt" / "1" / "model.onnx").rename(target / "digits_trt" / "1" / "model.plan")
    config = target / "digits_trt" / "config.pbtxt"
    config.write_text(
        config.read_text().replace('"digits"', '"digits_trt"').replace("onnxruntime_onnx", "tensorrt_plan")
    )
    return target


@pytest.mark.skipif(TENSORRT_READY, reason="TensorRT and CUDA are present")
def test_engine_models_are_left_out_without_tensorrt(repo, tmp_path):
    with ModelServer(_fake_engine(repo, tmp_path), port=0) as server:
        assert list(server.models) == ["digits"] and "not serving digits_trt" in server.notes[0]
        client = triton.InferenceServerClient(server.url)
        assert client.is_model_ready("digits") and not client.is_model_ready("digits_trt")


def _corrupt_onnx(repo, tmp_path, stack):
    target = copy_repo(repo, tmp_path / "repo")
    (target / "digits" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    return str(target)


def _config(edit):
    return lambda repo, tmp_path, stack: str(copy_repo(repo, tmp_path / "repo", edit))


def _taken_port(repo, tmp_path, stack):
    taken = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
    return f"{repo} --port {taken.getsockname()[1]}"


STARTUP_ERRORS = {
    "missing repository": (lambda repo, tmp_path, stack: str(tmp_path / "nowhere"), "does not exist"),
    "empty repository": (lambda repo, tmp_path, stack: str(tmp_path), "holds no model"),
    "a file, not a repository": (
        lambda repo, tmp_path, stack: str(repo / "digits" / "config.pbtxt"),
        "is a file; a model repository is a folder",
    ),
    "corrupt ONNX file": (_corrupt_onnx, "ONNX Runtime cannot load"),
    "config syntax error": (_config(lambda text: text.replace("}", "", 1)), "config.pbtxt"),
    "config unlike the model": (_config(lambda text: text.replace("1, 16, 16", "1, 16, 15")), "config says input"),
    "config of another platform": (
        _config(lambda text: text.replace("onnxruntime_onnx", "pytorch_libtorch")),
        "not served",
    ),  # fmt: skip
    "port in use": (_taken_port, "cannot listen on 127.0.0.1"),
    "bad port": (lambda repo, tmp_path, stack: f"{repo} --port 70000", "--port"),
    "a limit of 0": (lambda repo, tmp_path, stack: f"{repo} --header-timeout 0", "--header-timeout must be positive"),
    "no engine for --backend tensorrt": (
        lambda repo, tmp_path, stack: f"{repo} --backend tensorrt",
        "no tensorrt_plan",
    ),
}
if not TENSORRT_READY:
    STARTUP_ERRORS["--backend tensorrt without TensorRT or CUDA"] = (
        lambda repo, tmp_path, stack: f"{_fake_engine(repo, tmp_path)} --backend tensorrt",
        "TensorRT",
    )


@pytest.mark.parametrize("case", STARTUP_ERRORS, ids=list(STARTUP_ERRORS))
def test_startup_errors_are_one_line(repo, tmp_path, capsys, case):
    make, words = STARTUP_ERRORS[case]
    with contextlib.ExitStack() as stack:
        assert main(["serve", *make(repo, tmp_path, stack).split()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpis: error: ") and words in err[0], err


HAND_WRITTEN = r"""
# comments, repeated blocks, the `backend:` form, angle brackets, fields mpis does not use
name: "hand"
backend: "onnxruntime"
max_batch_size: 4
input { name: "input", data_type: TYPE_FP32, dims: [1, 16, 16] }
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching < max_queue_delay_microseconds: 2500 preferred_batch_size: [2, 4] >
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "note" value: { string_value: "a \"quoted\" value" } }
"""


def test_config_reader_agrees_with_tritons_own_protobuf(repo, tmp_path):
    (tmp_path / "hand" / "1").mkdir(parents=True)
    (tmp_path / "hand" / "config.pbtxt").write_text(HAND_WRITTEN)
    (tmp_path / "hand" / "1" / "model.onnx").write_bytes(b"")
    for folder in (repo / "digits", tmp_path / "hand"):
        want = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        got = read_model(folder)
        assert got.name == want.name and got.max_batch_size == want.max_batch_size
        assert [(t.name, list(t.dims)) for t in got.inputs] == [(t.name, list(t.dims)) for t in want.input]
        assert [(t.name, list(t.dims)) for t in got.outputs] == [(t.name, list(t.dims)) for t in want.output]
        assert got.queue_delay_s == pytest.approx(want.dynamic_batching.max_queue_delay_microseconds * 1e-6)
    assert read_model(tmp_path / "hand").platform == "onnxruntime_onnx"
    assert parse_pbtxt(HAND_WRITTEN)["parameters"][0]["value"][0]["string_value"] == ['a "quoted" value']
    for broken in ('name: "x', "input {", "}", "dims: [1, 2", "max_batch_size:"):
        with pytest.raises(ValueError):
            parse_pbtxt(broken)
    with pytest.raises(MpisError, match="no version folder"):
        (tmp_path / "hand" / "1" / "model.onnx").unlink()
        read_model(tmp_path / "hand")


def readme_client_snippet() -> str:
    """The python block of the README's serving section, as a user would copy it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Serving", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readmes_client_snippet_runs_against_mpis_serve(checkpoint, tmp_path):
    repo = tmp_path / "triton"
    assert (
        main(["export", str(checkpoint), "--allow-unsettled", "--triton-repo", str(repo), "--batch", "8"]) == 0
    )  # model "mpis"
    snippet = readme_client_snippet()
    assert '"127.0.0.1:8000"' in snippet
    printed = io.StringIO()
    with ModelServer(repo, port=0) as server, contextlib.redirect_stdout(printed):
        exec(compile(snippet.replace("127.0.0.1:8000", server.url), "README.md", "exec"), {})
    assert printed.getvalue().startswith("predicted [")


@pytest.mark.skipif(shutil.which("perf_analyzer") is None, reason="no perf_analyzer (.ci/install-perf-analyzer)")
def test_perf_analyzer_measures_mpis_serve_without_being_told_the_version(server):
    """Triton's own load tool: it finds the version from the statistics (no -x) and reports server-side times.
    Stability is loosened (-s 1000: any three windows within 11x) so that a loaded CI machine does not fail it."""
    command = [
        "perf_analyzer",
        "-m",
        "digits",
        "-u",
        server.url,
        "--concurrency-range",
        "2",
        "--measurement-mode",
        "count_windows",
        "--measurement-request-count",
        "30",
        "-s",
        "1000",
        "--max-trials",
        "10",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    server_side = result.stdout.split("Server:", 1)[1]
    assert "failed to find the requested model version" not in result.stdout + result.stderr
    counts = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in server_side.splitlines()[1:4])}
    assert int(counts["Inference count"]) >= 30 and int(counts["Successful request count"]) >= 30
    assert "compute infer" in server_side


def test_stopping_does_not_wait_for_a_client_that_never_finishes_its_request(repo):
    """A client holding a half-sent request must not hold the server's shutdown (CI's suite once stalled at
    the server fixture's teardown); the grace period bounds it."""
    with ModelServer(repo, port=0) as server:
        host, port = server.url.rsplit(":", 1)
        held = socket.create_connection((host, int(port)))
        held.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nxx")
        time.sleep(0.2)
        started = time.monotonic()
    stopped_after = time.monotonic() - started
    held.close()
    assert stopped_after < 3 * server_module.SHUTDOWN_GRACE_S
