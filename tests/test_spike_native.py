"""The native-layout runtime: the same spikes as the per-node program, from the model's ops."""

import nir
import numpy as np
import pytest
import torch
from conftest import divided_arch, spiky_net

from mpis.arch.notation import PAPER_EXAMPLES
from mpis.cli import main
from mpis.errors import MpisError
from mpis.export.nir import build_nir, export_nir
from mpis.export.nir_nodes import read_nir
from mpis.model.network import MPISNet
from mpis.spike.simulate import compile_graph

DIGITS_ARCH = "16C3S1-2F1*(32C3S2-48C3S1)-FC10"


pytestmark = pytest.mark.usefixtures("one_thread")


def both_layouts(graph, x: torch.Tensor, steps: int, **run):
    """(per-node result, native result, the native program) of one simulation in x's dtype."""
    per_node = compile_graph(graph, dtype=x.dtype).run(x, steps, **run)
    native = compile_graph(graph, dtype=x.dtype, layout="native")
    return per_node, native.run(x, steps, **run), native


def differing(a, b) -> int:
    assert set(a.spike_counts) == set(b.spike_counts)
    return sum(int((a.spike_counts[k] != b.spike_counts[k]).sum()) for k in a.spike_counts)


@pytest.mark.parametrize("arch", list(PAPER_EXAMPLES))
def test_every_paper_topology_gives_the_per_node_spikes_in_float64(arch, tmp_path):
    """Written and read back; in float64 the other summation order cannot flip a threshold."""
    shape = (2, 8, 8) if PAPER_EXAMPLES[arch][0] == "N-MNIST" else (3, 8, 8)
    export_nir(spiky_net(divided_arch(arch), shape, v_init=0.5), tmp_path / "net.nir", max_param_growth=100.0)
    x = torch.rand(2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    per_node, native, program = both_layouts(read_nir(tmp_path / "net.nir"), x, steps=5)
    assert differing(per_node, native) == 0
    assert sum(float(c.sum()) for c in native.spike_counts.values()) > 0
    torch.testing.assert_close(native.output, per_node.output)
    assert any(layer.factor > 1 for layer in program.native.layers.values())  # polyphase layers were rebuilt


@pytest.mark.parametrize("leak", [1.0, 0.9])
def test_digits_net_in_float32_differs_only_by_rounding_and_burn_in_is_honoured(leak):
    net = spiky_net(DIGITS_ARCH, (1, 16, 16), v_init=0.5 if leak == 1.0 else 0.0, leak=leak)
    graph = build_nir(net, steps=20).graph
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    per_node, native, program = both_layouts(graph, x, steps=20, burn_in=5)
    total = sum(c.numel() for c in per_node.spike_counts.values())
    assert differing(per_node, native) <= 1e-3 * total
    assert torch.equal(per_node.scores.argmax(1), native.scores.argmax(1))
    assert len(program.native.ops) < len([n for n in graph.nodes.values() if isinstance(n, nir.Conv2d)]) / 4


def test_frame_inputs_run_through_the_per_node_program(tmp_path):
    net = spiky_net("2F1*(4C3S1-4C3S2)-FC10", (2, 8, 8))
    graph = build_nir(net, steps=6).graph
    frames = torch.rand(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    per_node, native, _ = both_layouts(graph, frames, steps=6)
    assert differing(per_node, native) == 0 and torch.equal(per_node.output, native.output)


def test_graphs_without_mpis_metadata_and_unknown_layouts_are_refused():
    shape = np.array([1])
    graph = nir.NIRGraph(
        {
            "input": nir.Input(input_type={"input": shape}),
            "i": nir.I(r=np.ones(1, dtype=np.float32)),
            "spikes": nir.Threshold(threshold=np.ones(1, dtype=np.float32)),
            "reset": nir.Scale(scale=-np.ones(1, dtype=np.float32)),
            "output": nir.Output(output_type={"output": shape}),
        },
        [("input", "i"), ("i", "spikes"), ("spikes", "reset"), ("reset", "i"), ("spikes", "output")],
    )
    with pytest.raises(MpisError, match="no layer metadata"):
        compile_graph(graph, layout="native")
    with pytest.raises(MpisError, match="unknown layout 'sparse'"):
        compile_graph(graph, layout="sparse")


def test_blocks_whose_op_metadata_is_wrong_are_refused():
    graph = build_nir(spiky_net(DIGITS_ARCH, (1, 16, 16)), steps=5).graph
    blocks = [n for n in graph.nodes.values() if str(n.metadata.get("op", "")) == "s1_trans"]
    blocks[0].metadata["out_phase"] = np.array([3, 3]) if tuple(blocks[0].metadata["out_phase"]) != (3, 3) else [0, 0]
    with pytest.raises(MpisError, match="s1_trans|reads part"):
        compile_graph(graph, layout="native")


def test_cli_simulate_native_layout_gives_the_same_accuracy(tmp_path, capsys):
    net = MPISNet("4C3-2F1*(6C3S2-8C3)-FC10", (1, 16, 16), v_init=0.5).eval()
    export_nir(net, tmp_path / "net.nir", steps=5, dataset="digits")
    lines = {}
    for layout in ("graph", "native"):
        assert main(["simulate", str(tmp_path / "net.nir"), "--limit", "32", "--layout", layout]) == 0
        lines[layout] = [line for line in capsys.readouterr().out.splitlines() if "accuracy" in line or "  " in line]
    assert lines["graph"][0].split("(")[0] == lines["native"][0].split("(")[0]
    assert lines["graph"][1:] == lines["native"][1:]


# ---- ghost-layout files (the universal default, --target norse, N-MNIST's nirtorch file) ---------------
def ghost_file_input(arch: str) -> tuple[int, int, int]:
    dataset = PAPER_EXAMPLES[arch][0]
    return (2, 34, 34) if dataset == "N-MNIST" else (3, 16, 16) if dataset.startswith("CIFAR") else (1, 16, 16)


@pytest.mark.parametrize("arch", list(PAPER_EXAMPLES))
def test_the_universal_file_of_every_paper_topology_runs_natively_with_every_spike_of_the_graph_layout(arch):
    """Channels ÷ 16; the CIFAR nets fuse after the last FEB layer (relays, painted biases, up-sampled sums)."""
    from mpis.export.toolchains import build_toolchain_nir
    from mpis.spike.lattice_layout import LatticeProgram

    shape = ghost_file_input(arch)
    graph = build_toolchain_nir(spiky_net(divided_arch(arch), shape), "universal", 0.5).graph
    x = torch.round(torch.rand(3, *shape, generator=torch.Generator().manual_seed(5)) * 256) / 256
    per_node, native, program = both_layouts(graph, x, steps=10)
    assert isinstance(program.native, LatticeProgram)
    assert differing(per_node, native) == 0
    assert all(float(c.mean()) > 0.005 for c in native.spike_counts.values())  # every layer fires
    assert torch.equal(per_node.scores, native.scores)
    helpers = [n for n in graph.nodes if n.endswith((".tn", ".ts", ".gs", ".cap"))]
    assert not set(helpers) & set(program.native.order)  # the importers' helper neurons are not run


@pytest.mark.parametrize("target", ["universal", "norse", "nirtorch"])
def test_the_n_mnist_net_plays_event_frames_natively_as_the_graph_layout_does(target):
    """Maps 34, 17, 9 (three dilations, odd sizes); frames replace the input at every step."""
    from mpis.export.toolchains import build_toolchain_nir

    shape = (2, 34, 34)
    graph = build_toolchain_nir(spiky_net(divided_arch("2F1*(32C3S1-32C3S2-64C3S1)-FC10"), shape), target, 0.0).graph
    frames = (torch.rand(3, 5, *shape, generator=torch.Generator().manual_seed(6)) < 0.2).float()
    per_node, native, _ = both_layouts(graph, frames, steps=10, burn_in=2)
    assert differing(per_node, native) == 0
    assert sum(float(c.sum()) for c in native.spike_counts.values()) > 0
    assert torch.equal(per_node.scores, native.scores) and torch.equal(per_node.output, native.output)


def test_a_ghost_file_whose_metadata_misplaces_a_layer_is_refused_not_simulated():
    from mpis.export.toolchains import build_toolchain_nir

    graph = build_toolchain_nir(spiky_net(DIGITS_ARCH, (1, 16, 16)), "universal", 0.5).graph
    graph.metadata["layers"]["s2_l1"]["dilation"] = 2  # its pixels are at multiples of 4
    with pytest.raises(MpisError, match=r"cannot run this graph in native layout \(.*\); use --layout graph"):
        compile_graph(graph, layout="native")


def test_a_ghost_file_whose_metadata_names_a_missing_node_is_one_line_not_a_traceback():
    from mpis.export.toolchains import build_toolchain_nir

    graph = build_toolchain_nir(spiky_net(DIGITS_ARCH, (1, 16, 16)), "universal", 0.5).graph
    del graph.metadata["vth"]
    with pytest.raises(MpisError, match=r"native layout \(the file's metadata does not describe its graph"):
        compile_graph(graph, layout="native")
