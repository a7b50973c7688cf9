"""`mpis check` and `mpis demo` on the tiny session checkpoint (trained T = 5): the table and report numbers,
the artifact cache, and one clear line for every bad input."""

import contextlib
import io
import json
import shutil
import struct
from pathlib import Path

import nir
import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import TINY_ARCH, contractive_net

from mpis.check.options import parse_steps, parse_v_inits
from mpis.check.report import loglog_slope
from mpis.cli import main
from mpis.export.nir import build_nir
from mpis.spike.simulate import compile_graph, layer_counts
from mpis.train.data import load_dataset

LAYERS = ["stem1", "s1_l1", "s2_l1", "s1_l2", "s2_l2"]
FAST = ["--iters", "5", "--limit", "24", "--batch", "16", "--quiet"]


@pytest.fixture(scope="module")
def checked(checkpoint, tmp_path_factory):
    """One check at T = 2, 5 with v_init 0 and Vth/2; (exit status, stdout, report folder)."""
    folder = tmp_path_factory.mktemp("check") / "report"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["check", str(checkpoint), "--T", "2,5", "--report", str(folder), "--min-agreement", "0", *FAST])
    return code, out.getvalue(), folder


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpis: error: "), err
    return err[0]


# ---- the numbers ------------------------------------------------------------------------------------
def test_check_prints_a_table_per_T_and_writes_report_json_and_png(checked):
    code, out, folder = checked
    assert code == 0
    assert "T = 2" in out and "T = 5" in out and "argmax agreement" in out and "synaptic ops / dense" in out
    assert "v_init 0" in out and "v_init 0.5vth" in out and "log-log slope" in out
    for layer in LAYERS:
        assert layer in out
    report = json.loads((folder / "report.json").read_text())
    assert report["T"] == [2, 5] and [v["label"] for v in report["v_init"]] == ["0", "0.5vth"]
    assert [v["value"] for v in report["v_init"]] == [0.0, 0.5]
    assert report["reference"]["K"] == 5 and report["inputs"] == 24 and report["dataset"] == "digits"
    assert len(report["rows"]) == 4 and report["passed"] is True
    for row in report["rows"]:
        assert 0.0 <= row["agreement"] <= 1.0
        assert 0.0 <= row["spike_accuracy"] <= 1.0 and 0.0 <= row["rate_accuracy"] <= 1.0
        assert row["synop_ratio"] > 0 and row["dense_macs_per_step"] > 0
        assert set(row["layers"]) == {*LAYERS, "all"}
        for err in row["layers"].values():
            assert 0.0 <= err["mean_abs"] <= err["max_abs"] <= 1.0
            assert err["mean_abs_times_T"] == pytest.approx(err["mean_abs"] * row["T"])
    assert set(report["slopes"]) == {"0", "0.5vth"} and set(report["slopes"]["0"]) == {*LAYERS, "all"}
    assert (folder / "check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = [report["checkpoint"], report["artifacts"]["report"], *report["artifacts"]["nir"].values()]
    assert all(Path(f).is_absolute() and Path(f).is_file() for f in files)  # readable from any folder
    assert out.strip().splitlines()[-1].startswith("PASS: argmax agreement spike vs ONNX at T = 5 is ")


def test_feed_forward_layer_error_is_below_one_step_and_half_a_step_with_vth_over_2(checked):
    """The stem sees a constant input: its count is floor(T·r) from v_init 0 (error < 1/T) and rounds
    from v_init Vth/2 (error <= 0.5/T), neuron by neuron."""
    report = json.loads((checked[2] / "report.json").read_text())
    for row in report["rows"]:
        bound = (1.0 if row["v_init"] == "0" else 0.5) / row["T"]
        assert row["layers"]["stem1"]["max_abs"] <= bound + 1e-5
    t5 = {r["v_init"]: r["layers"]["stem1"]["mean_abs"] for r in report["rows"] if r["T"] == 5}
    assert t5["0.5vth"] < t5["0"]


def test_report_numbers_match_an_independent_run_of_the_artifacts(checked):
    """Recompute one row from the files the check wrote: the NIR graph in the spike runtime, the ONNX graph
    in ONNX Runtime, per-neuron |counts/T - rate| in native layout."""
    folder = checked[2]
    report = json.loads((folder / "report.json").read_text())
    row = next(r for r in report["rows"] if r["v_init"] == "0" and r["T"] == 5)
    test = load_dataset("digits").test
    x = torch.stack([test[i][0] for i in range(24)])
    program = compile_graph(folder / "spikes_v0.nir")
    result = program.run(x, 5)
    counts = layer_counts(program.graph, result.spike_counts)
    session = ort.InferenceSession(str(folder / "rates_K5.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    rates = dict(zip(names, session.run(None, {"input": x.numpy()}), strict=True))
    for layer in LAYERS:
        diff = (counts[layer].double() / 5 - torch.from_numpy(rates[f"rate_{layer}"]).double()).abs()
        assert row["layers"][layer]["mean_abs"] == pytest.approx(float(diff.mean()), abs=1e-9)
        assert row["layers"][layer]["max_abs"] == pytest.approx(float(diff.max()), abs=1e-9)
    agreement = float((result.scores.argmax(1) == torch.from_numpy(rates["logits"]).argmax(1)).double().mean())
    assert row["agreement"] == pytest.approx(agreement)


def test_native_layout_gives_the_same_report_up_to_float32_rounding(checked, checkpoint, tmp_path):
    folder = tmp_path / "native"
    args = ["check", str(checkpoint), "--T", "2,5", "--report", str(folder), "--min-agreement", "0", *FAST]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*args, "--layout", "native"]) == 0
    graph, native = (json.loads((f / "report.json").read_text()) for f in (checked[2], folder))
    assert (graph["layout"], native["layout"]) == ("graph", "native")
    graph, native = graph["rows"], native["rows"]
    for want, got in zip(graph, native, strict=True):
        assert got["agreement"] == pytest.approx(want["agreement"], abs=1 / 24)
        for layer in LAYERS:
            assert got["layers"][layer]["mean_abs"] == pytest.approx(want["layers"][layer]["mean_abs"], abs=2e-3)


def test_loglog_slope_of_an_exact_power_law_and_with_zeros():
    assert loglog_slope([10, 30, 100], [0.5 / t for t in (10, 30, 100)]) == pytest.approx(-1.0)
    assert loglog_slope([10, 100], [0.1, 0.1]) == pytest.approx(0.0)
    assert loglog_slope([10, 30], [0.0, 0.1]) is None


def test_v_init_list_takes_values_multiples_of_vth_and_the_models_own():
    assert [(v.label, v.value) for v in parse_v_inits("0, 0.5vth,model,0.0", vth=2.0)] == [
        ("0", 0.0),
        ("0.5vth", 1.0),
        ("model", None),
    ]
    assert parse_steps("100,10,30,10") == (10, 30, 100)


# ---- the cache ----------------------------------------------------------------------------------------
def test_artifacts_are_reused_for_the_same_checkpoint_and_foreign_files_are_never_overwritten(
    checked, checkpoint, tmp_path, capsys
):
    folder = tmp_path / "report"
    shutil.copytree(checked[2], folder)
    stamp = (folder / "spikes_v0.nir").stat().st_mtime_ns, (folder / "rates_K5.onnx").stat().st_mtime_ns
    args = ["check", str(checkpoint), "--T", "5", "--report", str(folder), "--min-agreement", "0", *FAST, "--overwrite"]
    assert main(args) == 0
    assert ((folder / "spikes_v0.nir").stat().st_mtime_ns, (folder / "rates_K5.onnx").stat().st_mtime_ns) == stamp
    (folder / "spikes_v0.nir").write_bytes((folder / "spikes_v0.nir").read_bytes())  # touched: rewritten
    assert main(args) == 0
    assert (folder / "spikes_v0.nir").stat().st_mtime_ns != stamp[0]
    (folder / "spikes_v1.nir").write_text("mine")
    capsys.readouterr()
    assert main([*args, "--v-init", "1"]) == 2
    assert "was not written by mpis check" in one_error_line(capsys)
    assert (folder / "spikes_v1.nir").read_text() == "mine"


def test_an_earlier_report_is_not_replaced_without_overwrite(checked, checkpoint, tmp_path, capsys):
    """As `mpis export` treats its outputs: refused before any work (here a --toolchain run, as reported)."""
    folder = tmp_path / "report"
    shutil.copytree(checked[2], folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    args = ["check", str(checkpoint), "--T", "5", "--report", str(folder), "--min-agreement", "0", *FAST]
    assert main([*args, "--toolchain", "norse"]) == 2
    line = one_error_line(capsys)
    assert f"{folder / 'report.json'} already exists" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    (folder / "report.json").unlink()  # the plot alone is kept as well
    assert main(args) == 2
    assert f"{folder / 'check.png'} already exists" in one_error_line(capsys)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*args, "--overwrite"]) == 0
    assert json.loads((folder / "report.json").read_text())["T"] == [5]


# ---- exit status and bad input: one line each -----------------------------------------------------------
def test_agreement_below_min_agreement_exits_non_zero_after_writing_the_report(checkpoint, tmp_path, capsys):
    folder = tmp_path / "r"
    assert main(["check", str(checkpoint), "--T", "5", "--report", str(folder), "--min-agreement", "1.01", *FAST]) == 2
    assert "FAIL: " in (line := one_error_line(capsys)) and "below --min-agreement 1.01" in line
    assert json.loads((folder / "report.json").read_text())["passed"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_refused_before_anything_is_written(checkpoint, tmp_path, capsys):
    assert main(["check", str(checkpoint), "--T", "5", "--report", str(tmp_path / "r"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in one_error_line(capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("steps", ["0", "10,-3", "ten", "", "5,,10"])
def test_bad_T_list_is_one_line(checkpoint, tmp_path, capsys, steps):
    assert main(["check", str(checkpoint), f"--T={steps}", "--report", str(tmp_path / "r")]) == 2
    assert "--T must be a comma-separated list of positive integers" in one_error_line(capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--v-init", "half"], "--v-init must be a comma-separated list"),
        (["--iters", "0"], "--iters must be >= 1"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--min-agreement", "nan"], "--min-agreement must be"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--dataset", "mnist"], "pass --data-dir"),
    ],
)
def test_bad_options_are_one_line(checkpoint, tmp_path, capsys, extra, message):
    assert main(["check", str(checkpoint), "--T", "5", "--report", str(tmp_path / "r"), *extra]) == 2
    assert message in one_error_line(capsys)


def test_truncated_nir_file_is_one_line(checked, checkpoint, tmp_path, capsys):
    data = (checked[2] / "spikes_v0.nir").read_bytes()
    (tmp_path / "cut.nir").write_bytes(data[: len(data) // 2])
    assert main(["check", str(checkpoint), "--nir", str(tmp_path / "cut.nir"), "--report", str(tmp_path / "r")]) == 2
    assert "is not a readable NIR file" in one_error_line(capsys)


def test_nir_file_with_unsupported_nodes_is_one_line(checkpoint, tmp_path, capsys):
    one = np.ones(4, dtype=np.float32)
    nodes = {
        "input": nir.Input(input_type={"input": np.array([4])}),
        "cuba": nir.CubaLIF(tau_syn=one, tau_mem=one, r=one, v_leak=0 * one, v_threshold=one),
        "output": nir.Output(output_type={"output": np.array([4])}),
    }
    nir.write(tmp_path / "cuba.nir", nir.NIRGraph(nodes, [("input", "cuba"), ("cuba", "output")]))
    assert main(["check", str(checkpoint), "--nir", str(tmp_path / "cuba.nir"), "--report", str(tmp_path / "r")]) == 2
    assert "unsupported NIR node type(s): CubaLIF" in one_error_line(capsys)


def test_graph_input_shape_that_does_not_fit_the_dataset_is_one_line(checkpoint, tmp_path, capsys):
    nir.write(tmp_path / "small.nir", build_nir(contractive_net(TINY_ARCH, (1, 8, 8)), dataset="digits").graph)
    assert main(["check", str(checkpoint), "--nir", str(tmp_path / "small.nir"), "--report", str(tmp_path / "r")]) == 2
    assert "digits inputs are 1x16x16, but the graph's Input" in one_error_line(capsys)


def write_idx(path, array: np.ndarray) -> None:
    path.write_bytes(bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def test_dataset_whose_inputs_do_not_fit_the_checkpoint_is_one_line(checkpoint, tmp_path, capsys):
    images, labels = np.zeros((4, 28, 28), dtype=np.uint8), np.arange(4, dtype=np.uint8)
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", images)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels)
    args = [
        "check",
        str(checkpoint),
        "--dataset",
        "mnist",
        "--data-dir",
        str(tmp_path),
        "--report",
        str(tmp_path / "r"),
    ]
    assert main(args) == 2
    assert "mnist inputs are 1x28x28, but" in one_error_line(capsys)


def test_nir_file_of_another_network_is_one_line(checkpoint, tmp_path, capsys):
    from mpis.model.network import MPISNet

    other = MPISNet("4C3-1F1*(6C3)-FC10", (1, 16, 16)).eval()
    nir.write(tmp_path / "other.nir", build_nir(other, dataset="digits").graph)
    assert main(["check", str(checkpoint), "--nir", str(tmp_path / "other.nir"), "--report", str(tmp_path / "r")]) == 2
    assert "not the same network" in one_error_line(capsys)


def test_nir_and_v_init_together_are_refused(checked, checkpoint, tmp_path, capsys):
    nir_file = str(checked[2] / "spikes_v0.nir")
    assert main(["check", str(checkpoint), "--nir", nir_file, "--v-init", "0", "--report", str(tmp_path / "r")]) == 2
    assert "not both" in one_error_line(capsys)


def test_given_nir_file_is_checked_under_its_recorded_v_init(checked, checkpoint, tmp_path, capsys):
    nir_file = str(checked[2] / "spikes_v0.5vth.nir")
    args = ["check", str(checkpoint), "--nir", nir_file, "--T", "5", "--report", str(tmp_path / "r")]
    assert main([*args, "--min-agreement", "0", *FAST]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [v["value"] for v in report["v_init"]] == [0.5]
    ours = json.loads((checked[2] / "report.json").read_text())
    want = next(r for r in ours["rows"] if r["v_init"] == "0.5vth" and r["T"] == 5)
    assert report["rows"][0]["layers"]["all"]["mean_abs"] == pytest.approx(want["layers"]["all"]["mean_abs"])


# ---- demo ---------------------------------------------------------------------------------------------
def test_demo_trains_exports_checks_and_lists_every_artifact(tmp_path, capsys):
    out = tmp_path / "runs" / "demo"  # as in a fresh clone: runs/ does not exist yet
    args = ["demo", "--out", str(out), "--epochs", "1", "--arch", TINY_ARCH, "--T", "5", "--check-T", "2,5"]
    assert main([*args, "--limit", "16", "--min-agreement", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    for name in ("model.pt", "metrics.jsonl", "model.onnx", "model.nir", "check/report.json", "check/check.png"):
        assert (out / name).is_file() and str(out / name) in printed
    assert (out / "triton" / "mpis" / "config.pbtxt").is_file() and (
        out / "triton" / "mpis" / "1" / "model.onnx"
    ).is_file()
    graph = nir.read(out / "model.nir", type_check=False)  # the file mpis export --nir writes by default
    assert graph.metadata["target"] == "universal" and graph.metadata["v_init"] == 0.5  # the export default: Vth/2
    assert json.loads((out / "check" / "report.json").read_text())["T"] == [2, 5]
    assert main([*args, "--quiet"]) == 2  # an existing --out is refused
    assert "already exists" in one_error_line(capsys)


def test_a_mean_frame_check_drives_every_t_with_the_events_per_step_the_model_was_trained_on(tmp_path):
    """Binned at the simulated T, a mean frame at T = 12 would be a third of the T = 4 current the net was
    trained on: a different model. Every T gets the training T's mean frame."""
    from types import SimpleNamespace

    from test_data import encode_events

    from mpis.check.run import check_data
    from mpis.cli import main
    from mpis.train.checkpoint import load_checkpoint

    data_dir = tmp_path / "nmnist"
    for split in ("Train", "Test"):
        for digit in (3, 7):
            folder = data_dir / split / str(digit)
            folder.mkdir(parents=True)
            (folder / "00001.bin").write_bytes(encode_events([(1, 2, 0, 0), (33, 0, 1, 49), (5, 5, 1, 99)]))
    out = tmp_path / "run"
    args = ["train", "--dataset", "nmnist", "--data-dir", str(data_dir), "--arch", "4C3-2F1*(6C3S2-8C3)-FC10"]
    assert main([*args, "--T", "4", "--epochs", "1", "--batch-size", "2", "--quiet", "--out", str(out)]) == 0
    ckpt = load_checkpoint(out / "model.pt")
    data = check_data(SimpleNamespace(dataset=None, data_dir=None, limit=None), ckpt, out / "model.pt", (4, 12))
    at_4, at_12 = (data.splits[t].test[0][0] for t in (4, 12))
    assert at_4.shape == (2, 34, 34) and at_4.sum() == 3 / 4
    assert torch.equal(at_4, at_12)
