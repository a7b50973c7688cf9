"""Reference recordings beside a toolchain NIR file: a NIR data file (`nir.read_data`, nir >= 1.0.7) with
a few test inputs as fed at every step, the spikes mpis's net emits at every node that holds a neuron
layer's spikes, and the per-step output, so that a toolchain user can check an import against mpis without
mpis (README: a 20-line check for Norse).

Everything is in the file's own layout (node names, ghost grid, flattened per step): spikes of node N at
step t are what the toolchain's module for N outputs at step t.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import Tensor

from mpis.export.fixed_point import INPUT_BITS
from mpis.export.toolchains import NORSE_DT, SNNTORCH_DT, ToolchainExport

REFERENCE_INPUTS = 8  # a handful: enough to catch a wrong import, small enough to keep the file small
STEP_SECONDS = {"norse": NORSE_DT, "snntorch": SNNTORCH_DT, "universal": NORSE_DT}  # importer dt; Sinabs: steps


def reference_path_for(nir_path) -> str:
    """`model.nir` -> `model.reference.h5` (HDF5 written by `nir.write_data`)."""
    name = str(nir_path)
    return (name[: -len(".nir")] if name.endswith(".nir") else name) + ".reference.h5"


def on_input_grid(x: Tensor) -> Tensor:
    """Inputs rounded to the grid the file's weights are exact on (multiples of 2^-8): the recorded inputs
    are the ones the reference spikes belong to, so a toolchain fed them must reproduce every spike."""
    scale = 2.0**INPUT_BITS
    return torch.round(x * scale) / scale


def reference_data(result: ToolchainExport, x: Tensor, steps: int) -> bytes:
    """The NIR data file's bytes for inputs `x` (B, C, H, W) or event frames (B, frames, C, H, W)."""
    import nir

    dt = STEP_SECONDS.get(result.target, 1.0)
    net = result.net
    net.v_init = float(result.graph.metadata["v_init"])
    frames = x.shape[1] if x.dim() == 5 else 0
    fed, outputs = [], []
    spikes: dict[str, list[Tensor]] = {layer: [] for layer in result.spike_nodes}
    last_stream = net.graph.state[-1]
    with torch.no_grad():
        for t, values in enumerate(net.spike_steps(x, steps)):
            fed.append((x[:, t * frames // steps] if frames else x).flatten(1))
            for layer, geometry in result.geometries.items():
                spikes[layer].append(_file_layout(values[layer], geometry).flatten(1))
            outputs.append(net.ops["head"](values[last_stream]))
    nodes = {
        "input": _node("input", torch.stack(fed, 1), dt),
        "output": _node("output", torch.stack(outputs, 1), dt),
    }
    for layer, node in result.spike_nodes.items():
        nodes[node] = _node("spikes", torch.stack(spikes[layer], 1).bool(), dt)
    buffer = io.BytesIO()
    nir.write_data(buffer, nir.NIRGraphData(nodes))
    return buffer.getvalue()


def _node(observable: str, data: Tensor, dt: float):
    import nir

    array = data.numpy() if data.dtype == torch.bool else data.numpy().astype(np.float32)
    return nir.NIRNodeData({observable: nir.TimeGriddedData(array, dt)})


def _file_layout(native: Tensor, geometry) -> Tensor:
    """A neuron layer's map (B, C, n, n) on the file's grid: pixel i at dilation·i, ghosts never spike."""
    if not geometry.dilation:
        return native
    out = native.new_zeros((native.shape[0], *geometry.shape))
    step = geometry.dilation
    out[..., : step * geometry.size : step, : step * geometry.size : step] = native
    return out
