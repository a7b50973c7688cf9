"""The NIR hand-off: files written for a toolchain's own importer (`mpis export --target`) run in that
importer with mpis's spike counts, bit for bit; `mpis check --toolchain` measures it. Each toolchain's
tests skip when it is not installed (CI installs them: .ci/run)."""

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nir
import pytest
import torch
from conftest import divided_arch, spiky_net

from mpis.arch.notation import PAPER_EXAMPLES, parse_arch
from mpis.cli import main
from mpis.errors import MpisError
from mpis.export.fixed_point import dyadic_copy
from mpis.export.toolchains import _check_schedule, _depth_first, build_toolchain_nir, export_toolchain_nir
from mpis.model.network import MPISNet
from mpis.spike.toolchains import Toolchain, parse_toolchains, run_toolchain
from mpis.train.checkpoint import load_checkpoint
from mpis.train.data import load_dataset

needs_norse = pytest.mark.skipif(importlib.util.find_spec("norse") is None, reason="norse not installed")
needs_snntorch = pytest.mark.skipif(importlib.util.find_spec("snntorch") is None, reason="snntorch not installed")
SINABS_PYTHON = os.environ.get("MPIS_SINABS_PYTHON", "")  # Sinabs' own venv (.ci/install-sinabs)
TARGETS = [
    pytest.param("norse", marks=needs_norse),
    pytest.param(
        "sinabs",
        marks=pytest.mark.skipif(not Path(SINABS_PYTHON).is_file(), reason="MPIS_SINABS_PYTHON not set (Sinabs venv)"),
    ),
    pytest.param("snntorch", marks=needs_snntorch),
]


def toolchain_spec(target: str) -> str:
    return f"sinabs={SINABS_PYTHON}" if target == "sinabs" else target


def mpis_spikes(export, x: torch.Tensor, steps: int, v_init: float):
    """mpis's own spiking forward of the net the file was written from (folded, dyadic weights)."""
    net = export.net
    net.v_init = v_init
    return net.simulate(x, steps)


def identical_share(run, record) -> float:
    same = sum(int((run.counts[k] == v).sum()) for k, v in record.spike_counts.items())
    return same / sum(v.numel() for v in record.spike_counts.values())


def through_importer(net, target: str, v_init: float, x: torch.Tensor, steps: int, tmp_path: Path):
    """The file as `mpis export --target` writes it, run by the target's own importer: (export, run)."""
    path = tmp_path / f"{target}.nir"
    export = export_toolchain_nir(net, path, target, v_init)
    return export, run_toolchain(parse_toolchains(toolchain_spec(target))[0], path, x, steps, batch=16)


def fuses_inside_the_block(arch: str) -> bool:
    parsed = parse_arch(arch)
    return parsed.fusion_layer < len(parsed.feb)


# ---- each toolchain's own importer -----------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("v_init", [0.0, 0.5])
def test_importer_reproduces_every_spike_count_of_a_trained_net(checkpoint, tmp_path, target, v_init):
    net = load_checkpoint(checkpoint).net
    x = load_dataset("digits").test.tensors[0][:32]
    export, run = through_importer(net, target, v_init, x, 20, tmp_path)
    record = mpis_spikes(export, x, 20, v_init)
    assert identical_share(run, record) == 1.0
    assert sum(float(c.sum()) for c in record.spike_counts.values()) > 0
    assert torch.equal(run.logits.argmax(1), export.net.classify(record.state_rates).argmax(1))


def paper_input(arch: str) -> tuple[int, int, int]:
    dataset = PAPER_EXAMPLES[arch][0]
    return (2, 34, 34) if dataset == "N-MNIST" else (3, 16, 16) if dataset.startswith("CIFAR") else (3, 8, 8)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("arch", list(PAPER_EXAMPLES))
def test_importer_reproduces_every_paper_topology(arch, target, tmp_path):
    """Channels ÷ 16, spiky random weights; the N-MNIST net at its own 34×34 (maps 34, 17, 9); the CIFAR nets,
    which fuse after the last FEB layer, at 16×16."""
    shape = paper_input(arch)
    x = torch.round(torch.rand(8, *shape) * 256) / 256  # 8-bit pixels: exact in every sum too
    export, run = through_importer(spiky_net(divided_arch(arch), shape), target, 0.5, x, 15, tmp_path)
    record = mpis_spikes(export, x, 15, 0.5)
    assert identical_share(run, record) == 1.0
    assert all(float(c.mean()) > 0.01 for c in record.spike_counts.values())  # every layer fires


@pytest.mark.parametrize("target", TARGETS)
def test_importer_plays_event_frames_as_mpis_does(target, tmp_path):
    shape = (2, 34, 34)
    net = spiky_net(divided_arch("2F1*(32C3S1-32C3S2-64C3S1)-FC10"), shape)
    frames = (torch.rand(4, 6, *shape) < 0.2).float()
    export, run = through_importer(net, target, 0.0, frames, 12, tmp_path)
    assert identical_share(run, mpis_spikes(export, frames, 12, 0.0)) == 1.0


# ---- one file for every importer ----------------------------------------------------------------
@pytest.mark.parametrize("v_init", [0.0, 0.5])
def test_the_default_nir_file_runs_in_every_importer_with_mpis_spikes(checkpoint, tmp_path, v_init):
    """`mpis export --nir` with no --target, of a trained digits net: the file every importer reads."""
    net = load_checkpoint(checkpoint).net
    x = load_dataset("digits").test.tensors[0][:32]
    path = tmp_path / "model.nir"
    assert main(["export", str(checkpoint), "--nir", str(path), "--v-init", str(v_init), "--allow-unsettled"]) == 0
    assert nir.read(path, type_check=False).metadata["target"] == "universal"
    export = build_toolchain_nir(net, "universal", v_init)  # the net the file was written from: the reference
    record = mpis_spikes(export, x, 20, v_init)
    assert sum(float(c.sum()) for c in record.spike_counts.values()) > 0
    for target in TARGETS:
        if any(mark.args[0] for mark in target.marks):  # not installed here
            continue
        run = run_toolchain(parse_toolchains(toolchain_spec(target.values[0]))[0], path, x, 20, batch=16)
        assert identical_share(run, record) == 1.0, target.values[0]
        assert torch.equal(run.logits.argmax(1), export.net.classify(record.state_rates).argmax(1))


@pytest.mark.parametrize("target", TARGETS)
def test_the_universal_file_plays_event_frames_at_34x34_as_mpis_does(target, tmp_path):
    """The N-MNIST net (maps 34, 17, 9: odd sizes, three dilations) on event frames."""
    shape = (2, 34, 34)
    net = spiky_net(divided_arch("2F1*(32C3S1-32C3S2-64C3S1)-FC10"), shape)
    frames = (torch.rand(4, 6, *shape) < 0.2).float()
    path = tmp_path / "universal.nir"
    export = export_toolchain_nir(net, path, "universal", 0.0)
    run = run_toolchain(parse_toolchains(toolchain_spec(target))[0], path, frames, 12, batch=16)
    assert identical_share(run, mpis_spikes(export, frames, 12, 0.0)) == 1.0


def test_the_universal_file_is_the_same_in_every_process(tmp_path):
    script = (
        "import sys, torch; sys.path.insert(0, 'tests'); from conftest import spiky_net; "
        "from mpis.export.toolchains import export_toolchain_nir; "
        "export_toolchain_nir(spiky_net('4C3-2F1*(6C3S2-8C3)-FC10', (1, 16, 16)), sys.argv[1], 'universal', 0.5)"
    )
    root = Path(__file__).resolve().parents[1]
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{seed}.nir")], cwd=root, env=env)
        assert done.returncode == 0
    assert (tmp_path / "1.nir").read_bytes() == (tmp_path / "2.nir").read_bytes()


# ---- what every target shares -------------------------------------------------------------------
def test_ghost_layout_keeps_the_models_kernels_where_polyphase_multiplied_them():
    export = build_toolchain_nir(spiky_net(divided_arch("2F1*(32C3S1-32C3S2-64C3S1)-FC10"), (2, 34, 34)), "norse", 0.5)
    assert export.growth < 2.0


CIFAR_ARCH = "120C3S1-120C3S2-2F3*(240C3S1-360C3S1-480C3S2)-FC10"


@pytest.mark.parametrize("target", TARGETS)
def test_the_universal_file_holds_a_net_that_fuses_after_the_last_feb_layer(target, tmp_path):
    """The paper's CIFAR-10 topology (channels ÷ 16): the Trans maps read fused sums, up-sampled; the file
    keeps those sums exactly 0 off their grid (biases painted on it, the strided fusion read by phase)."""
    shape = (3, 16, 16)
    x = torch.round(torch.rand(6, *shape) * 256) / 256
    path = tmp_path / "universal.nir"
    export = export_toolchain_nir(spiky_net(divided_arch(CIFAR_ARCH), shape), path, "universal", 0.5)
    run = run_toolchain(parse_toolchains(toolchain_spec(target))[0], path, x, 15, batch=16)
    record = mpis_spikes(export, x, 15, 0.5)
    assert identical_share(run, record) == 1.0
    assert all(float(c.mean()) > 0.01 for c in record.spike_counts.values())  # every layer fires
    assert torch.equal(run.logits.argmax(1), export.net.classify(record.state_rates).argmax(1))


@pytest.mark.parametrize("target", ["universal", "nirtorch"])
def test_mpis_runtime_runs_a_net_that_fuses_after_the_last_feb_layer_with_the_models_spikes(target, tmp_path):
    from mpis.spike.simulate import compile_graph, layer_counts

    shape = (3, 16, 16)
    x = torch.round(torch.rand(3, *shape) * 256) / 256
    path = tmp_path / f"{target}.nir"
    export = export_toolchain_nir(spiky_net(divided_arch(CIFAR_ARCH), shape), path, target, 0.5)
    program = compile_graph(path)
    counts = layer_counts(program.graph, program.run(x, 12).spike_counts)
    record = mpis_spikes(export, x, 12, 0.5)
    assert sorted(counts) == sorted(record.spike_counts)
    assert all(torch.equal(counts[k], v) for k, v in record.spike_counts.items())


def test_a_strided_fusion_reads_each_phase_through_the_taps_that_reach_the_output_grid():
    from mpis.export.toolchains import _taps_from_phase

    op = torch.nn.Conv2d(1, 1, 3, 2, padding=1)  # output i reads inputs 2i − 1, 2i, 2i + 1
    assert _taps_from_phase(op, 0, 0).tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]  # 2i: the centre tap
    assert _taps_from_phase(op, 1, 1).tolist() == [[1, 0, 1], [0, 0, 0], [1, 0, 1]]  # 2i ± 1: the corners
    total = sum(_taps_from_phase(op, a, b) for a in (0, 1) for b in (0, 1))
    assert torch.equal(total, torch.ones(3, 3))  # every tap in exactly one phase


def test_both_importer_orders_are_valid_schedules_and_a_broken_one_is_caught():
    export = build_toolchain_nir(spiky_net(divided_arch("16C3S1-2F1*(32C3S2-48C3S1)-FC10"), (1, 8, 8)), "norse", 0.5)
    graph = export.graph
    order = ["input", *sorted(n for n in graph.nodes if n not in ("input", "output"))]  # what nirtorch 2.6 runs
    back = {(a, b) for a, b in graph.edges if a >= b and a != "input" and b != "output"}
    edges = [e for e in graph.edges if "output" not in e]
    _check_schedule(order, edges, back, "name order")
    _check_schedule(_depth_first("input", edges), edges, back, "depth-first order")
    sequencing = [e for e in edges if "seq." in e[1]]
    with pytest.raises(MpisError, match="wrong step"):  # without the sequencing convs' edges first
        reordered = [e for e in edges if e not in sequencing] + sequencing
        _check_schedule(_depth_first("input", reordered), reordered, back, "depth-first order")


def test_dyadic_weights_sit_on_their_grid_and_chained_ops_keep_sums_exact():
    net = MPISNet("16C3S1-2F1*(32C3S2-48C3S1)-FC10", (1, 28, 28)).eval()  # initial weights: small
    folded, grids, fewest = dyadic_copy(net, 8)
    for name, op in folded.ops.items():
        for p in op.parameters():
            fraction = grids[name].fraction if name in grids else 24
            assert torch.equal(torch.round(p * 2.0**fraction), p * 2.0**fraction), name
    assert max(g.fraction for g in grids.values()) <= 20  # ±16·Vth exact in float32
    assert 2 <= fewest < 8  # Trans → first layer: two ops of small weights share the 20 bits
    with pytest.raises(MpisError, match="between 2 and 16"):
        dyadic_copy(net, 17)


def test_learned_initial_potentials_need_an_explicit_v_init():
    net = spiky_net(divided_arch("16C3S1-2F1*(32C3S2-48C3S1)-FC10"), (1, 8, 8), imp=True)
    with pytest.raises(MpisError, match="--v-init"):
        build_toolchain_nir(net, "norse")


# ---- the CLI ----------------------------------------------------------------------------------------
def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpis: error: "), err
    return err[0]


def test_export_target_writes_a_file_the_reader_type_checks(checkpoint, tmp_path, capsys):
    path = tmp_path / "norse.nir"
    assert main(["export", str(checkpoint), "--allow-unsettled", "--nir", str(path), "--target", "norse"]) == 0
    out = capsys.readouterr().out
    assert "--target norse" in out and "sequencing convs" in out and re.search(r"\(\d\.\d\dx\)", out)
    graph = nir.read(path)
    assert graph.metadata["target"] == "norse" and graph.metadata["weight_bits"] == 8
    assert set(graph.metadata["layers"]) == {n.name for n in load_checkpoint(checkpoint).net.neurons}
    assert main(["export", str(checkpoint), "--nir", str(path), "--target", "norse"]) == 2  # before scoring
    assert "already exists" in one_error_line(capsys)


def test_export_target_refuses_a_nirtorch_flavour(checkpoint, tmp_path, capsys):
    args = ["export", str(checkpoint), "--nir", str(tmp_path / "x.nir"), "--target", "norse", "--flavour", "compact"]
    assert main(args) == 2
    assert "--flavour compact is for --target nirtorch" in one_error_line(capsys)
    assert not (tmp_path / "x.nir").exists()


def test_check_toolchain_rejects_an_unknown_name_and_a_missing_interpreter(checkpoint, tmp_path, capsys):
    base = ["check", str(checkpoint), "--T", "3", "--limit", "4", "--quiet", "--report", str(tmp_path / "r")]
    assert main([*base, "--toolchain", "lava"]) == 2
    assert "unknown toolchain 'lava'" in one_error_line(capsys)
    assert not (tmp_path / "r").exists()  # refused before anything was exported or simulated
    assert main([*base, "--toolchain", f"norse={tmp_path / 'nope' / 'python'}"]) == 2
    assert "no such interpreter" in one_error_line(capsys)


@needs_norse
def test_check_toolchain_reports_identity_and_agreement_and_names_what_cannot_run(checkpoint, tmp_path):
    """Norse runs; Spyx has no export (it cannot hold the loop: docs/toolchain-importers.md)."""
    folder = tmp_path / "report"
    args = ["check", str(checkpoint), "--T", "5", "--v-init", "0.5vth", "--iters", "5", "--limit", "24"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        spec = "norse,spyx,snntorch" + (f",sinabs={SINABS_PYTHON}" if Path(SINABS_PYTHON).is_file() else "")
        code = main([*args, "--threads", "2", "--report", str(folder), "--min-agreement", "0", "--toolchain", spec])
    assert code == 0
    text = out.getvalue()
    assert "toolchains (their own NIR importers" in text and "norse 1.1.0" in text
    # a line as each importer starts and as it ends (they may run for many minutes)
    assert "toolchain norse: toolchain_universal_v0.5vth.nir at T = 5 on 24 inputs, 2 thread(s) ...\n" in text
    assert re.search(r"toolchain norse 1.1.0: toolchain_universal_v0.5vth.nir at T = 5 ran in [0-9.]+ s\n", text)
    assert "toolchain spyx: skipped, no mpis export for it yet" in text
    report = json.loads((folder / "report.json").read_text())
    rows = {r["toolchain"]: r for r in report["toolchains"]}
    assert rows["norse"]["status"] == "ran" and rows["norse"]["identical"] == 1.0
    assert rows["norse"]["threads"] == 2  # --threads reached the importer's process
    assert rows["norse"]["agreement_mpis"] == 1.0 and 0.0 <= rows["norse"]["agreement_onnx"] <= 1.0
    # what the 8-bit weights cost, beside the bit-identity: the file's net against the float model
    assert "8-bit net vs float model" in text and 0.5 <= rows["norse"]["float_agreement"] <= 1.0
    assert 0.5 <= rows["norse"]["float_identical"] <= 1.0 and rows["norse"]["float_rate_error"] >= 0.0
    assert Path(rows["norse"]["file"]).is_file()
    assert rows["spyx"]["status"].startswith("no mpis export") and rows["spyx"]["identical"] is None
    for other in ("sinabs", "snntorch"):  # more importers compared with one mpis run, where installed
        if other not in rows:  # sinabs is asked for only where its own interpreter exists
            continue
        if rows[other]["status"] == "ran":
            assert rows[other]["identical"] == 1.0 and rows[other]["agreement_mpis"] == 1.0
        else:
            assert rows[other]["status"].startswith("not installed") and rows[other]["identical"] is None


@pytest.mark.parametrize("target", TARGETS)
def test_the_importer_runs_with_the_threads_asked_for(target, tmp_path):
    path = tmp_path / f"{target}.nir"
    export_toolchain_nir(spiky_net(divided_arch("16C3S1-2F1*(32C3S2-48C3S1)-FC10"), (1, 8, 8)), path, target, 0.5)
    toolchain, x = parse_toolchains(toolchain_spec(target))[0], torch.rand(2, 1, 8, 8)
    assert [run_toolchain(toolchain, path, x, 2, batch=2, threads=n).threads for n in (1, 3)] == [1, 3]


def test_a_toolchain_file_is_read_through_the_size_limits_before_its_importer_starts(tmp_path, monkeypatch):
    path = tmp_path / "norse.nir"
    export_toolchain_nir(spiky_net(divided_arch("16C3S1-2F1*(32C3S2-48C3S1)-FC10"), (1, 8, 8)), path, "norse", 0.5)
    monkeypatch.setenv("MPIS_NIR_MAX_GIB", str(1 / 2**30))  # one byte
    nowhere = Toolchain("norse", str(tmp_path / "no-python"))
    with pytest.raises(MpisError, match="GiB of arrays"):  # not the missing interpreter: nothing was started
        run_toolchain(nowhere, path, torch.rand(2, 1, 8, 8), 2, batch=2)


@pytest.mark.parametrize("target", ["universal", "norse"])
@pytest.mark.parametrize("frames", [0, 6])
def test_mpis_runtime_runs_the_universal_file_with_the_models_spikes(target, frames, tmp_path):
    """mpis's own graph runtime runs these files as Norse's importer does (LIF at dt = 1e-3, r ignored):
    every spike count of the dyadic net, and the summed per-step logits as the score."""
    from mpis.spike.simulate import compile_graph, layer_counts

    shape = (2, 34, 34) if frames else (1, 16, 16)
    arch = "2F1*(32C3S1-32C3S2-64C3S1)-FC10" if frames else "16C3S1-2F1*(32C3S2-48C3S1)-FC10"
    x = (torch.rand(3, frames, *shape) < 0.2).float() if frames else torch.rand(3, *shape).mul(256).floor().div(256)
    path = tmp_path / f"{target}.nir"
    export = export_toolchain_nir(spiky_net(divided_arch(arch), shape), path, target, 0.5)
    program = compile_graph(path)
    result = program.run(x, 12)
    counts = layer_counts(program.graph, result.spike_counts)
    record = mpis_spikes(export, x, 12, 0.5)
    assert sorted(counts) == sorted(record.spike_counts)  # the layers, not the pattern's helper neurons
    assert all(torch.equal(counts[k], v) for k, v in record.spike_counts.items())
    assert sum(float(v.sum()) for v in record.spike_counts.values()) > 0
    assert torch.allclose(result.scores / 12, export.net.classify(record.state_rates), atol=1e-4)


def test_the_default_nir_export_is_the_universal_file_and_mpis_simulate_evaluates_it(checkpoint, tmp_path, capsys):
    path = tmp_path / "model.nir"
    assert main(["export", str(checkpoint), "--nir", str(path), "--allow-unsettled"]) == 0
    assert "(--target universal: one file for Norse, snnTorch and Sinabs" in capsys.readouterr().out
    metadata = nir.read(path, type_check=False).metadata
    assert (
        metadata["target"] == "universal" and "norse.torch.from_nir(graph) at its default dt" in metadata["read_with"]
    )
    assert metadata["dataset"] == "digits"  # what mpis simulate runs it on by default
    assert (tmp_path / "model.reference.h5").is_file()  # its reference recordings, beside it
    assert main(["simulate", str(path), "--limit", "16", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"accuracy 0\.\d+ on 16 inputs \(spiking, T = 5", out)
    assert "s1_l1" in out and ".tn" not in out  # rates per model layer, not per helper neuron
    assert "run as norse.torch.from_nir runs them (dt = 0.001)" in out
    assert "synaptic ops: not counted on a toolchain file" in out  # its helper convs are not the model's synapses
    assert main(["simulate", str(path), "--limit", "16", "--quiet", "--layout", "native"]) == 0
    native = capsys.readouterr().out
    assert native.split("(spiking")[0] == out.split("(spiking")[0]  # the same accuracy, natively
    rates = [[line for line in text.splitlines() if line.startswith("  ")] for text in (out, native)]
    assert rates[0] and rates[0] == rates[1]  # and the same firing rates


@pytest.mark.parametrize("target", ["sinabs", "snntorch"])
def test_mpis_simulate_refuses_a_file_written_for_another_importer(target, tmp_path, capsys):
    path = tmp_path / f"{target}.nir"
    export_toolchain_nir(spiky_net(divided_arch("16C3S1-2F1*(32C3S2-48C3S1)-FC10"), (1, 8, 8)), path, target, 0.5)
    assert main(["simulate", str(path), "--T", "3", "--limit", "4", "--quiet"]) == 2
    assert f"mpis check CHECKPOINT --toolchain {target}" in one_error_line(capsys)


def test_quantisation_cost_grows_as_the_weights_lose_bits():
    from mpis.check.run import Quantisation
    from mpis.export.fixed_point import dyadic_copy

    net = spiky_net("4C3-2F1*(6C3S2-8C3)-FC10", (1, 16, 16), seed=3)
    x = torch.rand(16, 1, 16, 16)
    float_net = net.folded_copy()
    costs = {}
    for bits in (3, 8):
        quantised, dyadic = Quantisation(), dyadic_copy(net, bits)[0]
        record = dyadic.simulate(x, 20)
        quantised.add(record, dyadic.classify(record.state_rates).argmax(1), float_net.simulate(x, 20), float_net, 20)
        costs[bits] = quantised.result()
    same = Quantisation()
    record = float_net.simulate(x, 20)
    same.add(record, float_net.classify(record.state_rates).argmax(1), record, float_net, 20)
    assert same.result() == (1.0, 1.0, 0.0)
    assert costs[8][1] > costs[3][1] and costs[8][2] < costs[3][2]  # more bits: more identical counts, less error


def readme_reference_snippet() -> str:
    """The python block of the README's toolchain section, as a Norse user would copy it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Handing the file to a toolchain", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.skipif(importlib.util.find_spec("norse") is None, reason="needs norse")
def test_the_reference_recordings_check_a_norse_import_with_the_readmes_snippet(checkpoint, tmp_path):
    args = ["export", str(checkpoint), "--allow-unsettled", "--nir", str(tmp_path / "model.nir")]  # the default file
    assert main([*args, "--batch", "16"]) == 0
    recorded = nir.read_data(str(tmp_path / "model.reference.h5")).nodes
    assert recorded["input"].observables["input"].data.shape[:2] == (8, 5)  # 8 inputs, T = 5
    assert sum(int(recorded[n].observables["spikes"].data.sum()) for n in recorded if "spikes" in n) > 0
    snippet = readme_reference_snippet()
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Norse reproduces 1.000000 of mpis's spikes" in result.stdout
    # the check can fail: one spike flipped in the recording is seen
    data = nir.read_data(str(tmp_path / "model.reference.h5"))
    name = next(n for n in data.nodes if "spikes" in n)
    data.nodes[name].observables["spikes"].data[0, -1, 0] ^= True
    nir.write_data(str(tmp_path / "model.reference.h5"), data)
    again = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "Norse reproduces 0.99" in again.stdout


def test_a_net_the_universal_file_cannot_hold_gets_the_standard_file_by_default_with_the_reason(tmp_path, capsys):
    run = tmp_path / "run"
    arch = "4C3-2F2*(6C3S2-8C3)-FC10"
    args = ["train", "--arch", arch, "--T", "3", "--epochs", "1", "--neuron", "lif", "--quiet", "--out", str(run)]
    assert main(args) == 0
    path = tmp_path / "model.nir"
    assert main(["export", str(run / "model.pt"), "--nir", str(path), "--allow-unsettled"]) == 0
    out = capsys.readouterr().out
    assert "note: the universal NIR file cannot hold this net (toolchain export writes IF neurons with reset" in out
    assert "wrote the standard one instead (--target nirtorch" in out
    assert nir.read(path).metadata["flavour"] == "exact"
