import os
import subprocess
import sys

import h5py
import nir
import nirtorch
import numpy as np
import pytest
import torch

from mpis.errors import MpisError
from mpis.export import nir_limits
from mpis.export.nir_limits import check_declared_sizes
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


# ---- sizes declared in the file, checked before anything is read ------------------------------------------
def declared_bomb(path, shape=(2**14, 2**14, 3)) -> None:
    """A valid IF graph whose integrator's `r` is replaced by a chunked, compressed dataset of `shape` that
    holds only its fill value: a few kilobytes on disk, 3 GiB once read."""
    nir.write(path, if_graph(1.0, 0.0, (4,)))
    with h5py.File(path, "a") as f:
        node = f["node/nodes/layer.i"]
        del node["r"]
        node.create_dataset("r", shape=shape, dtype="float32", chunks=(256, 256, 1), compression="gzip", fillvalue=1)


# Peak memory of this process image: VmHWM, not ru_maxrss, which Linux carries over from the forking parent
# (a large pytest process) through exec.
READ_AND_MEASURE = """
import sys
from mpis.cli import main
code = main(sys.argv[1:])
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(int(status.split()[0]) // 1024)
sys.exit(code)
"""


def test_a_kilobyte_file_declaring_gigabytes_is_refused_in_one_line_before_reading(tmp_path):
    path = tmp_path / "bomb.nir"
    declared_bomb(path)
    assert path.stat().st_size < 100_000
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MPIS_NIR_MAX_GIB", None)
    args = [sys.executable, "-c", READ_AND_MEASURE, "simulate", str(path), "--T", "3"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpis: error: ") and "Traceback" not in done.stderr, err
    assert "declares over 2 GiB of arrays" in err[0] and "16384x16384x3 float32" in err[0]
    assert int(done.stdout.split()[-1]) < 500  # MB at peak, torch included; reading it would take 3.2 GB


def test_a_dataset_linked_twice_counts_twice_and_the_limit_can_be_raised(tmp_path, monkeypatch):
    path = tmp_path / "links.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("a/w", shape=(700, 1024), dtype="uint8", chunks=(100, 1024), compression="gzip")
        f["b"] = h5py.SoftLink("/a/w")  # nir.read would read it twice
    monkeypatch.setenv("MPIS_NIR_MAX_GIB", str(1 / 1024))  # 1 MiB: one copy fits, two do not
    with pytest.raises(MpisError, match=r"declares over 0.000976562 GiB .*MPIS_NIR_MAX_GIB"):
        check_declared_sizes(path)
    monkeypatch.setenv("MPIS_NIR_MAX_GIB", str(2 / 1024))
    check_declared_sizes(path)


def test_a_link_to_another_file_is_refused(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("w", data=np.zeros(3))
    nir.write(tmp_path / "if.nir", if_graph(1.0, 0.0))
    with h5py.File(tmp_path / "if.nir", "a") as f:
        f["node/nodes/layer.i/extra"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/w")
    with pytest.raises(MpisError, match="links to another file"):
        read_nir(tmp_path / "if.nir")


def test_absurd_node_and_edge_counts_are_refused(tmp_path, monkeypatch):
    nir.write(tmp_path / "if.nir", if_graph(1.0, 0.0))  # 5 nodes, 5 edges
    monkeypatch.setattr(nir_limits, "NIR_MAX_EDGES", 4)
    with pytest.raises(MpisError, match="declares 5 edges, over 4"):
        read_nir(tmp_path / "if.nir")
    monkeypatch.setattr(nir_limits, "NIR_MAX_EDGES", 5)
    read_nir(tmp_path / "if.nir")
    monkeypatch.setattr(nir_limits, "NIR_MAX_NODES", 4)
    with pytest.raises(MpisError, match="declares over 4 nodes"):
        read_nir(tmp_path / "if.nir")


def test_a_declared_activation_shape_beyond_the_limit_is_refused(tmp_path):
    shape = np.array([4096, 4096, 4096])  # nothing of it is stored: the runtime would allocate it per input
    graph = nir.NIRGraph(
        {"input": nir.Input(input_type={"input": shape}), "output": nir.Output(output_type={"output": shape})},
        [("input", "output")],
    )
    nir.write(tmp_path / "wide.nir", graph)
    with pytest.raises(MpisError, match="node 'input' declares the shape 4096x4096x4096"):
        read_nir(tmp_path / "wide.nir")
