import os
import subprocess
import sys

import nir
import numpy as np
import pytest
import torch
from conftest import TINY_ARCH, contractive_net

from mpis.cli import main
from mpis.errors import MpisError
from mpis.export.nir import build_nir
from mpis.export.nir_nodes import subtract_reset_if
from mpis.model.network import MPISNet
from mpis.spike.graph_layout import dense_macs, fan_out, schedule, synaptic_ops
from mpis.spike.nirtorch_map import run_nirtorch
from mpis.spike.simulate import compile_graph, layer_counts

pytestmark = pytest.mark.usefixtures("one_thread")


def ones(*shape) -> np.ndarray:
    return np.ones(shape, dtype=np.float32)


def with_io(nodes: dict, edges: list, first: str, last: str, shape, out_shape=None) -> nir.NIRGraph:
    nodes = {"input": nir.Input(input_type={"input": np.array(shape)}), **nodes}
    nodes["output"] = nir.Output(output_type={"output": np.array(out_shape or shape)})
    return nir.NIRGraph(nodes, [("input", first), *edges, (last, "output")])


def spike_train(program, node: str, current: float, steps: int) -> list[int]:
    """Cumulative spike count of a one-neuron node after 1..steps steps of a constant current."""
    x = torch.full((1, 1), current)
    return [int(program.run(x, t).spike_counts[node].item()) for t in range(1, steps + 1)]


def compact_if(v_init: float) -> nir.IF:
    meta = {"reset": "subtract", "v_init": v_init}
    return nir.IF(r=ones(1), v_threshold=ones(1), v_reset=0 * ones(1), metadata=meta)


def exported_graph(tmp_path, net=None, flavour="exact", name="net.nir") -> tuple[nir.NIRGraph, MPISNet]:
    """An MPIS net (default: the tiny contractive one on 1x8x8 inputs) written to and read back from a file."""
    net = net or contractive_net()
    nir.write(tmp_path / name, build_nir(net, flavour, steps=6, dataset="digits").graph)
    return nir.read(tmp_path / name), net


# ---- semantics on hand-checked graphs -----------------------------------------------------------
def test_subtract_reset_loop_fires_the_hand_computed_train():
    nodes, edges = subtract_reset_if("layer", (1,), vth=1.0)
    program = compile_graph(with_io(nodes, edges, "layer.i", "layer.spikes", (1,)))
    # v: .375 .75 1.125* .5 .875 1.25* .625 1.0 (not > Vth) 1.375*
    assert spike_train(program, "layer.spikes", 0.375, 9) == [0, 0, 1, 1, 1, 2, 2, 2, 3]


def test_compact_if_follows_its_metadata_and_zero_reset_shows_the_spec_reading():
    graph = with_io({"layer": compact_if(0.5)}, [], "layer", "layer", (1,))
    subtract, zero = compile_graph(graph), compile_graph(graph, reset="zero")
    assert subtract.resets == {"layer": "subtract"} and zero.resets == {"layer": "zero"}
    # from v0 = .5, subtract 1: .875 1.25* .625 1.0 1.375* .75 1.125* .5 .875
    assert spike_train(subtract, "layer", 0.375, 9) == [0, 1, 1, 1, 2, 2, 3, 3, 3]
    # the NIR spec: start at v_reset = 0, back to 0 after a spike: .375 .75 1.125* .375 .75 1.125* ...
    assert spike_train(zero, "layer", 0.375, 9) == [0, 0, 1, 1, 1, 2, 2, 2, 3]
    # the exact flavour writes the same neuron as a threshold shift θ = Vth − v0: same spikes
    nodes, edges = subtract_reset_if("layer", (1,), vth=1.0, v_init=0.5)
    exact = compile_graph(with_io(nodes, edges, "layer.i", "layer.spikes", (1,)))
    assert spike_train(exact, "layer.spikes", 0.375, 9) == [0, 1, 1, 1, 2, 2, 3, 3, 3]
    in_float64 = compile_graph(graph, dtype=torch.float64)
    assert in_float64.run(torch.full((1, 1), 0.375), 2).spike_counts["layer"].dtype == torch.float64
    assert spike_train(in_float64, "layer", 0.375, 9) == [0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_a_back_edge_reads_the_previous_step():
    # sum = input + echo (back-edge), acc += sum, echo = acc / 2
    nodes = {"a_sum": nir.Scale(scale=ones(1)), "b_acc": nir.I(r=ones(1)), "c_echo": nir.Scale(scale=0.5 * ones(1))}
    edges = [("a_sum", "b_acc"), ("b_acc", "c_echo"), ("c_echo", "a_sum")]
    graph = with_io(nodes, edges, "a_sum", "b_acc", (1,))
    _, steps, _ = schedule(graph)
    assert [s.node for s in steps] == ["a_sum", "b_acc", "c_echo"]
    assert dict(steps[0].inputs) == {"input": False, "c_echo": True}
    program = compile_graph(graph)
    # t0: 1 -> acc 1; t1: 1 + .5 -> 2.5; t2: 1 + 1.25 -> 4.75 (same-step echo would give 1, 3, ...)
    assert [program.run(torch.ones(1, 1), t).output.item() for t in (1, 2, 3)] == [1.0, 2.5, 4.75]


def test_event_frames_are_played_frame_t_times_frames_over_T():
    graph = with_io({"acc": nir.I(r=ones(1))}, [], "acc", "acc", (1,))
    frames = torch.tensor([[[1.0], [10.0]]])  # (batch, frames, 1)
    assert compile_graph(graph).run(frames, 4).output.item() == 22.0  # frames 0, 0, 1, 1


# ---- the independent interpreters -------------------------------------------------------------------
@pytest.mark.parametrize(("batch", "leak"), [(1, 1.0), (3, 1.0), (2, 0.9)])
def test_same_spikes_and_logits_as_nirtorch_on_an_exported_mpis_graph(tmp_path, batch, leak):
    # polyphase convs, Trans back-edges, reset (and leak) feedback loops, Flatten, Affine
    graph, net = exported_graph(
        tmp_path, contractive_net() if leak == 1.0 else MPISNet(TINY_ARCH, (1, 8, 8), leak=leak)
    )
    x = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    result = compile_graph(graph, sum_order="nirtorch").run(x, 12)
    logits, counts = run_nirtorch(graph, x, 12)
    assert set(counts) == set(result.spike_counts) and len(counts) > len(net.neurons)
    for name, count in counts.items():
        assert torch.equal(count, result.spike_counts[name]), name
    assert sum(float(c.sum()) for c in counts.values()) > 0
    assert torch.equal(logits, result.output)
    layers = layer_counts(graph, result.spike_counts)
    assert {n: tuple(c.shape[1:]) for n, c in layers.items()} == {n.name: n.shape for n in net.neurons}


@pytest.mark.filterwarnings("ignore:nirtorch.load is being deprecated:DeprecationWarning")
def test_same_spikes_as_norse_for_zero_reset_if_and_lif():
    pytest.importorskip("norse")
    from norse.torch.utils.import_nir import from_nir

    rng = np.random.default_rng(0)

    def conv(c_in: int, c_out: int) -> nir.Conv2d:
        weight = rng.normal(0, 0.8, (c_out, c_in, 3, 3)).astype(np.float32)
        return nir.Conv2d((6, 6), weight, 1, 1, 1, 1, np.full(c_out, 0.1, np.float32))

    nodes = {
        "a_conv": conv(1, 3),
        "b_if": nir.IF(r=ones(3, 6, 6), v_threshold=ones(3, 6, 6), v_reset=0 * ones(3, 6, 6)),
        "c_conv": conv(3, 2),
        "d_lif": nir.LIF(
            tau=4 * ones(2, 6, 6), r=ones(2, 6, 6), v_leak=0 * ones(2, 6, 6), v_threshold=0.5 * ones(2, 6, 6)
        ),
    }
    edges = [("a_conv", "b_if"), ("b_if", "c_conv"), ("c_conv", "d_lif")]
    graph = with_io(nodes, edges, "a_conv", "d_lif", (1, 6, 6), (2, 6, 6))
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    norse, state, counts = from_nir(graph, dt=1.0), None, {}
    with torch.no_grad():
        for _ in range(20):
            _, state = norse(x, state)
            for name in ("b_if", "d_lif"):
                counts[name] = counts.get(name, 0) + state.cache[name]
    result = compile_graph(graph).run(x, 20)
    for name, count in counts.items():
        assert count.sum() > 0 and torch.equal(count, result.spike_counts[name]), name


def test_compact_flavour_matches_exact_and_the_spec_reset_loses_fidelity(tmp_path):
    exact, net = exported_graph(tmp_path)
    compact, _ = exported_graph(tmp_path, net, flavour="compact", name="compact.nir")
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))

    def rates(graph, reset=None) -> dict[str, torch.Tensor]:
        counts = compile_graph(graph, reset=reset).run(x, 20).spike_counts
        return {n: c / 20 for n, c in layer_counts(graph, counts).items()}

    reference, subtract, zero = rates(exact), rates(compact), rates(compact, "zero")
    for name, rate in reference.items():
        assert (subtract[name] - rate).abs().max() <= 0.05, name  # same neuron, rounded differently
    # resetting to zero throws away the charge above threshold: fewer spikes, other rates
    assert sum(float(r.sum()) for r in zero.values()) < sum(float(r.sum()) for r in subtract.values())
    assert max(float((zero[n] - r).abs().mean()) for n, r in reference.items()) > 0.01


# ---- what the runtime reports -------------------------------------------------------------------------
def test_layer_counts_reassemble_polyphase_nodes_in_native_layout():
    nodes = {
        f"l.p{a}{b}": nir.Threshold(
            threshold=ones(1, 2, 2), metadata={"layer": "l", "layout": "polyphase", "factor": 2, "phase": [a, b]}
        )
        for a in range(2)
        for b in range(2)
    }
    nodes["other"] = nir.Threshold(threshold=ones(1, 2, 2))
    edges = [("input", n) for n in nodes] + [(n, "output") for n in nodes]
    graph = nir.NIRGraph(
        {
            "input": nir.Input(input_type={"input": np.array([1, 2, 2])}),
            **nodes,
            "output": nir.Output({"output": [1, 2, 2]}),
        },
        edges,
        metadata={"layers": {"l": {"shape": [1, 4, 4], "factor": 2}}},
    )
    counts = {name: torch.full((1, 1, 2, 2), 10.0 * int(name[3]) + int(name[4])) for name in nodes if name != "other"}
    counts["other"] = torch.zeros(1, 1, 2, 2)
    layers = layer_counts(graph, counts)
    assert set(layers) == {"l", "other"}
    native = layers["l"][0, 0]
    assert all(native[i, j] == 10 * (i % 2) + j % 2 for i in range(4) for j in range(4))
    del counts["l.p11"]
    with pytest.raises(MpisError, match="needs 4 phase nodes"):
        layer_counts(graph, counts)


def test_synaptic_ops_count_spikes_times_nonzero_fan_out():
    neuron, edges = subtract_reset_if("n", (1, 3, 3), vth=1.0)
    weight = ones(1, 1, 3, 3)
    nodes = {**neuron, "w": nir.Conv2d((3, 3), weight, 1, 1, 1, 1, np.zeros(1, np.float32))}
    for flat in ("n_flat", "w_flat"):
        nodes[flat] = nir.Flatten(input_type={"input": np.array([1, 3, 3])}, start_dim=0)
    head = ones(2, 9)
    head[1, 4] = 0.0  # a zero weight is no synapse
    nodes["x_head"] = nir.Affine(weight=head, bias=np.zeros(2, np.float32))
    edges += [("n.spikes", "w"), ("w", "w_flat"), ("n.spikes", "n_flat"), ("n_flat", "x_head"), ("w_flat", "x_head")]
    graph = with_io(nodes, edges, "n.i", "x_head", (1, 3, 3), (2,))
    program = compile_graph(graph)
    fan = fan_out(program)["n.spikes"][0]
    # conv 3x3 with padding 1: a corner pixel reaches 4 outputs, an edge 6, the centre 9; +2 (+1) from the head
    assert fan.tolist() == [[6, 8, 6], [8, 10, 8], [6, 8, 6]]
    result = program.run(torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(0)), 10)
    counts = result.spike_counts["n.spikes"]
    assert torch.equal(synaptic_ops(program, result.spike_counts), (counts[:, 0] * fan).sum((1, 2)).double())
    assert dense_macs(program) == 49 + 17 == fan.sum()  # every synapse once: the conv's in-bounds taps, the head


# ---- bad input: one clear error ------------------------------------------------------------------------
def test_unsupported_node_types_are_named():
    nodes = {"a": nir.CubaLIF(tau_syn=ones(1), tau_mem=ones(1), r=ones(1), v_leak=ones(1), v_threshold=ones(1))}
    nodes["b"] = nir.Delay(delay=ones(1))
    with pytest.raises(MpisError, match=r"CubaLIF \(node 'a'\), Delay \(node 'b'\)"):
        compile_graph(with_io(nodes, [("a", "b")], "a", "b", (1,)))


def test_a_truncated_file_is_one_clear_error(tmp_path):
    exported_graph(tmp_path)
    data = (tmp_path / "net.nir").read_bytes()
    (tmp_path / "cut.nir").write_bytes(data[: len(data) // 2])
    with pytest.raises(MpisError, match="not a readable NIR file"):
        compile_graph(tmp_path / "cut.nir")


def test_bad_steps_input_shapes_and_unorderable_cycles_are_errors():
    graph = with_io({"acc": nir.I(r=ones(2))}, [], "acc", "acc", (2,))
    program = compile_graph(graph)
    for steps in (0, -3):
        with pytest.raises(MpisError, match="positive integer"):
            program.run(torch.ones(1, 2), steps)
    with pytest.raises(MpisError, match=r"does not fit the graph's Input 2"):
        program.run(torch.ones(1, 3), 4)
    with pytest.raises(MpisError, match="unknown reset"):
        compile_graph(graph, reset="hard")
    loop = {"acc": nir.I(r=ones(2)), "x": nir.Scale(scale=ones(2)), "y": nir.Scale(scale=ones(2))}
    with pytest.raises(MpisError, match="cannot order nodes x, y"):
        compile_graph(with_io(loop, [("x", "y"), ("y", "x")], "acc", "acc", (2,)))


def test_cli_simulate_reports_accuracy_rates_and_synaptic_ops(tmp_path, capsys):
    exported_graph(tmp_path, MPISNet(TINY_ARCH, (1, 16, 16)).eval(), name="digits.nir")
    assert main(["simulate", str(tmp_path / "digits.nir"), "--T", "3", "--limit", "20", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "digits test set, T = 3" in out and "accuracy" in out and "on 20 inputs" in out
    assert "firing rate" in out and "s1_l1" in out and "synaptic ops" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.nir"], "does not exist"),
        (["broken.nir"], "not a readable NIR file"),
        (["net.nir", "--T", "0"], "--T must be >= 1"),
        (["net.nir"], "digits inputs are 1x16x16, but the graph's Input takes 1x8x8"),
    ],
)
def test_cli_simulate_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    exported_graph(tmp_path)
    (tmp_path / "broken.nir").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 10)
    assert main(["simulate", str(tmp_path / args[0]), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_burn_in_counts_only_the_steps_after_it(tmp_path):
    """Counting after a burn-in of B steps equals the counts of B + T steps minus those of the first B."""
    torch.manual_seed(0)
    net = MPISNet(TINY_ARCH, (1, 16, 16)).eval()
    program = compile_graph(build_nir(net).graph)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    full, first, after = program.run(x, 13), program.run(x, 5), program.run(x, 8, burn_in=5)
    for node, count in after.spike_counts.items():
        assert torch.equal(count, full.spike_counts[node] - first.spike_counts[node])
    assert torch.allclose(after.scores, full.scores - first.scores, atol=1e-5)
    assert sum(int(c.sum()) for c in after.spike_counts.values()) > 0
    with pytest.raises(MpisError, match="burn-in"):
        program.run(x, 8, burn_in=-1)


def test_same_file_gives_the_same_spikes_in_every_process(tmp_path):
    # Three currents whose float32 sum depends on the order of the additions: (1e8 - 1e8) + 1 = 1, but
    # (1e8 + 1) - 1e8 = 0. nirtorch adds them in the order of a set (string hashing, per process); the
    # runtime adds them by name, so every process fires every step.
    nodes = {
        name: nir.Affine(weight=np.array([[w]], np.float32), bias=np.zeros(1, np.float32))
        for name, w in (("a_big", 1e8), ("b_minus_big", -1e8), ("c_one", 1.0))
    }
    nodes["d_if"] = nir.IF(r=ones(1), v_threshold=0.5 * ones(1), v_reset=0 * ones(1))
    sums = [n for n in nodes if n != "d_if"]
    nodes |= {"input": nir.Input(input_type={"input": np.array([1])})}
    nodes |= {"output": nir.Output(output_type={"output": np.array([1])})}
    edges = [("input", n) for n in sums] + [(n, "d_if") for n in sums] + [("d_if", "output")]
    graph = nir.NIRGraph(nodes, edges)
    path = tmp_path / "order.nir"
    nir.write(path, graph)
    script = (
        "import sys, torch; from mpis.spike.simulate import compile_graph; "
        "r = compile_graph(sys.argv[1]).run(torch.ones(1, 1), 10); print(int(r.spike_counts['d_if'].sum()))"
    )
    counts = {
        subprocess.run(
            [sys.executable, "-c", script, str(path)],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in range(6)
    }
    assert counts == {"10"}
