import nir
import nirtorch
import numpy as np
import pytest
import torch

from mpis.errors import MpisError
from mpis.export.nir_nodes import read_nir, subtract_reset_if
from mpis.model.neurons import NeuronParams, neuron_step
from mpis.spike.nirtorch_map import node_map


def if_graph(vth: float, v_init, shape=(1,)) -> nir.NIRGraph:
    nodes, edges = subtract_reset_if("layer", shape, vth, v_init)
    nodes["input"] = nir.Input(input_type={"input": np.array(shape)})
    nodes["output"] = nir.Output(output_type={"output": np.array(shape)})
    edges += [("input", "layer.i"), ("layer.spikes", "output")]
    return nir.NIRGraph(nodes, edges)


def run_nir(graph: nir.NIRGraph, currents: torch.Tensor) -> list[torch.Tensor]:
    module = nirtorch.nir_to_torch(graph, node_map())
    state, spikes = None, []
    for current in currents:
        out, state = module(current, state)
        spikes.append(out)
    return spikes


def test_integrator_threshold_scale_loop_is_an_if_neuron_with_subtract_reset(tmp_path):
    nir.write(tmp_path / "if.nir", if_graph(1.0, 0.0))
    graph = read_nir(tmp_path / "if.nir")
    spikes = run_nir(graph, torch.full((9, 1, 1), 0.375))
    # v: .375 .75 1.125* .5 .875 1.25* .625 1.0 (not > Vth) 1.375*
    assert [int(s) for s in spikes] == [0, 0, 1, 0, 0, 1, 0, 0, 1]


def test_initial_potential_as_threshold_shift_equals_starting_at_v0():
    torch.manual_seed(0)
    v0 = np.array([0.0, 0.25, 0.5, 0.9], dtype=np.float32)
    currents = torch.rand(40, 1, 4) * 1.2 - 0.1
    shifted = torch.stack(run_nir(if_graph(1.0, v0, (4,)), currents))
    v, direct = torch.from_numpy(v0)[None], []
    for current in currents:
        s, v = neuron_step(current, v, NeuronParams(vth=1.0))
        direct.append(s)
    assert torch.equal(shifted, torch.stack(direct))


@pytest.mark.parametrize("content", [b"", b"not hdf5 at all", b"\x89HDF\r\n\x1a\n" + b"\x00" * 10])
def test_a_truncated_or_foreign_file_fails_with_one_line(tmp_path, content):
    path = tmp_path / "broken.nir"
    path.write_bytes(content)
    with pytest.raises(MpisError, match="not a readable NIR file") as err:
        read_nir(path)
    assert "\n" not in str(err.value)


def test_a_truncated_real_nir_file_fails_with_one_line(tmp_path):
    nir.write(tmp_path / "if.nir", if_graph(1.0, 0.0))
    data = (tmp_path / "if.nir").read_bytes()
    (tmp_path / "cut.nir").write_bytes(data[: len(data) // 2])
    with pytest.raises(MpisError, match="not a readable NIR file"):
        read_nir(tmp_path / "cut.nir")
