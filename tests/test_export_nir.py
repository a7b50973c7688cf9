"""NIR export: the file type-checks on reading, and nirtorch running it gives the PyTorch model's spikes."""

import nir
import numpy as np
import pytest
import torch
from conftest import TINY_ARCH, divided_arch, spiky_net

from mpis.arch.notation import PAPER_EXAMPLES, parse_arch
from mpis.cli import main
from mpis.errors import MpisError
from mpis.export.nir import build_nir, export_nir
from mpis.export.nir_nodes import read_nir
from mpis.model.network import MPISNet
from mpis.spike.nirtorch_map import run_nirtorch
from mpis.spike.simulate import compile_graph, layer_counts
from mpis.train.checkpoint import load_checkpoint
from mpis.train.data import load_dataset


def _compare(net: MPISNet, graph, x: torch.Tensor, steps: int) -> tuple[int, int]:
    """(differing, total) spike counts over all neurons: nirtorch on the NIR graph vs net.simulate."""
    _, counts = run_nirtorch(graph, x, steps)
    got = layer_counts(graph, counts)
    want = net.folded_copy().to(x.dtype).simulate(x, steps).spike_counts
    assert set(got) == set(want)
    differing = sum(int((got[k] != want[k]).sum()) for k in want)
    assert sum(int(want[k].sum()) for k in want) > 0
    return differing, sum(w.numel() for w in want.values())


@pytest.mark.parametrize("arch", list(PAPER_EXAMPLES))
def test_every_paper_topology_spikes_like_the_pytorch_model(arch, tmp_path):
    """Written, read back with type checking (nodes come back sorted by name), and run by nirtorch in
    float64 (rounding out of the way): the spike counts must be identical."""
    shape = (2, 8, 8) if PAPER_EXAMPLES[arch][0] == "N-MNIST" else (3, 8, 8)
    net = spiky_net(divided_arch(arch), shape, v_init=0.5)
    export_nir(net, tmp_path / "net.nir", max_param_growth=100.0)
    graph = read_nir(tmp_path / "net.nir")
    x = torch.rand(2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    differing, total = _compare(net, graph, x, steps=4)
    assert differing == 0, f"{differing} of {total} spike counts differ"


def test_without_a_polyphase_path_the_spikes_are_identical_in_float32():
    """One stream at one resolution: every conv is copied as is, so the sums match bit for bit."""
    net = spiky_net("4C3-1F2*(6C3-8C3)-FC10", (1, 8, 8))
    export = build_nir(net)
    assert {layout.factor for layout in export.layouts.values()} == {1}
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    differing, _ = _compare(net, export.graph, x, steps=12)
    assert differing == 0


def test_trained_checkpoint_exports_a_type_checked_file_that_spikes_like_the_model(checkpoint, tmp_path):
    path = tmp_path / "model.nir"
    # the model simulates from its own v_init 0; the export's default is Vth/2 (default_nir_v_init)
    args = ["export", str(checkpoint), "--allow-unsettled", "--nir", str(path), "--v-init", "0", "--target", "nirtorch"]
    assert main(args) == 0
    graph = read_nir(path)  # nir.read with type checking
    assert graph.metadata["arch"] == str(parse_arch(TINY_ARCH)) and graph.metadata["flavour"] == "exact"
    assert int(graph.metadata["T"]) == 5
    assert {type(n) for n in graph.nodes.values()} <= {
        nir.Input,
        nir.Output,
        nir.Conv2d,
        nir.I,
        nir.Threshold,
        nir.Scale,
        nir.Flatten,
        nir.Affine,
    }
    assert any(a == b or b < a for a, b in graph.edges if a[:4].isdigit() and b[:4].isdigit())  # back-edges
    ckpt = load_checkpoint(checkpoint)
    test = load_dataset("digits", None).test
    x = torch.stack([test[i][0] for i in range(16)])
    differing, total = _compare(ckpt.net, graph, x, steps=20)
    print(f"{differing} of {total} spike counts differ (float32 summation order)")
    assert differing <= 0.001 * total


def test_compact_flavour_has_one_if_node_per_layer_phase_with_subtract_reset_metadata(tmp_path):
    net = spiky_net(TINY_ARCH, (1, 16, 16), v_init=0.25)
    path = tmp_path / "compact.nir"
    export_nir(net, path, flavour="compact", steps=7)
    graph = read_nir(path)
    spiking = [n for n in graph.nodes.values() if isinstance(n, nir.IF)]
    assert not any(isinstance(n, nir.Threshold) for n in graph.nodes.values())
    phases = sum(int(info["factor"]) ** 2 for info in graph.metadata["layers"].values())
    assert len(spiking) == phases
    assert all(n.metadata["reset"] == "subtract" for n in spiking)
    stem = next(n for n in spiking if n.metadata["layer"] == "stem1")
    assert float(stem.metadata["v_init"]) == 0.25


def test_initial_potential_option_shifts_every_threshold():
    net = spiky_net(TINY_ARCH, (1, 16, 16))
    base = build_nir(net).graph
    shifted = build_nir(net, v_init=0.5).graph
    for name, node in base.nodes.items():
        if isinstance(node, nir.Threshold):
            assert np.allclose(node.threshold - shifted.nodes[name].threshold, 0.5)


def test_parameter_growth_above_the_limit_is_refused_without_writing(tmp_path):
    net = spiky_net(TINY_ARCH, (1, 16, 16))
    path = tmp_path / "big.nir"
    with pytest.raises(MpisError, match="max-param-growth"):
        export_nir(net, path, max_param_growth=1.0)
    assert not path.exists()


@pytest.mark.parametrize(
    ("kwargs", "shape", "message"),
    [
        ({"reset": "hard"}, (1, 16, 16), "reset by subtraction"),
        ({"leak": 0.9, "v_init": 0.5}, (1, 16, 16), "threshold shift only for IF"),
    ],
)
def test_unsupported_models_are_refused_by_name(kwargs, shape, message):
    net = MPISNet(TINY_ARCH, shape, **kwargs)
    with pytest.raises(MpisError, match=message):
        build_nir(net)


def test_odd_map_sizes_export_in_the_ghost_layout_with_the_models_spikes():
    """The paper's N-MNIST net at 34×34 (maps 34, 17, 9): no polyphase grid fits, the ghost layout does."""
    net = spiky_net(divided_arch("2F1*(32C3S1-32C3S2-64C3S1)-FC10"), (2, 34, 34))
    result = build_nir(net, "exact", v_init=0.5)
    assert result.graph.metadata["layout"] == "ghost" and result.growth < 1.5
    x = torch.round(torch.rand(4, 2, 34, 34) * 256) / 256
    counts = layer_counts(result.graph, compile_graph(result.graph).run(x, 15).spike_counts)
    folded = net.folded_copy()
    folded.v_init = 0.5
    want = folded.simulate(x, 15).spike_counts
    same = sum(int((counts[k] == want[k]).sum()) for k in want)
    assert same / sum(w.numel() for w in want.values()) > 0.999
    native = layer_counts(result.graph, compile_graph(result.graph, layout="native").run(x, 15).spike_counts)
    same = sum(int((native[k] == counts[k]).sum()) for k in counts)  # --layout native reads it too
    assert same / sum(c.numel() for c in counts.values()) > 0.999
    with pytest.raises(MpisError, match="--flavour exact"):
        build_nir(net, "compact")


def test_cli_refuses_to_overwrite_an_existing_file(checkpoint, tmp_path, capsys):
    path = tmp_path / "model.nir"
    path.write_text("keep me")
    assert main(["export", str(checkpoint), "--nir", str(path)]) == 2  # refused before any scoring
    assert "already exists" in capsys.readouterr().err
    assert path.read_text() == "keep me"
