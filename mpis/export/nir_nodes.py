"""Standard-NIR building blocks for the spiking graph (docs/nir-mapping.md §2-3).

NIR 1.0's `IF` resets to a value; DBReLU equivalence needs reset by subtraction. Written exactly with
standard nodes:  in -> I(r=1) -> Threshold(θ) -> spikes, with a Scale(−Vth) self-loop from the spikes
back into the integrator (a back-edge, read one step late). The integrator then holds the pre-reset
membrane v[t−1] + in[t]; an initial potential v0 is the threshold shift θ = Vth − v0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mpis.errors import MpisError
from mpis.export import UNCHECKED_TARGETS


def subtract_reset_if(
    name: str,
    shape: tuple[int, ...],
    vth: float,
    v_init: float | np.ndarray = 0.0,
    leak: float = 1.0,
    metadata: dict | None = None,
):
    """Nodes and edges of one IF layer with reset by subtraction; feed `{name}.i`, read `{name}.spikes`
    (which carries `metadata`). A leak λ < 1 (LIF) adds a Scale(λ−1) self-loop on the integrator and the
    reset subtracts λ·Vth: w[t] = w[t−1] + (λ−1)·w[t−1] − λ·Vth·s[t−1] + in[t]."""
    import nir

    ones = np.ones(shape, dtype=np.float32)
    threshold = (vth - np.asarray(v_init, dtype=np.float32)) * ones
    integrator, spikes, reset = f"{name}.i", f"{name}.spikes", f"{name}.reset"
    nodes = {
        integrator: nir.I(r=ones),
        spikes: nir.Threshold(threshold=threshold.astype(np.float32), metadata=dict(metadata or {})),
        reset: nir.Scale(scale=-leak * vth * ones),
    }
    edges = [(integrator, spikes), (spikes, reset), (reset, integrator)]
    if leak != 1.0:
        nodes[f"{name}.leak"] = nir.Scale(scale=(leak - 1.0) * ones)
        edges += [(integrator, f"{name}.leak"), (f"{name}.leak", integrator)]
    return nodes, edges


def read_nir(path: str | Path, type_check: bool = True):
    """`nir.read` with type checking, turning a missing, truncated, foreign or oversized file into one clear
    error; every size the file declares is checked before its arrays are read (mpis.export.nir_limits)."""
    import nir

    from mpis.export.nir_limits import check_declared_sizes, check_shapes

    path = Path(path)
    if not path.is_file():
        raise MpisError(f"NIR file {path} does not exist")
    check_declared_sizes(path)
    try:
        graph = nir.read(path, type_check=type_check)
    except Exception as err:  # h5py and nir raise many types for damaged or foreign files
        try:  # a file for Sinabs' nir 1.0.4 broadcasts neuron parameters, which nir 1.0.8's types refuse
            graph = nir.read(path, type_check=False)
        except Exception:  # the first error is the one to report
            graph = None
        if graph is None or graph.metadata.get("target") not in UNCHECKED_TARGETS:
            raise MpisError(f"{path} is not a readable NIR file ({type(err).__name__}: {str(err)[:120]})") from None
    check_shapes(graph, path)
    return graph


def writable_nir_path(path: str | Path, overwrite: bool) -> Path:
    """`path` checked before any work: its folder exists, and an existing file is kept unless `overwrite`."""
    path = Path(path)
    if not path.parent.is_dir():
        raise MpisError(f"folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise MpisError(f"{path} already exists; choose another path or pass --overwrite")
    return path


def write_nir(path: Path, graph, type_check: bool = True, finish=None) -> None:
    """Write atomically; `finish(file)` edits the HDF5 file first, and it must read back (with type checking
    unless the target's nir does none) before it replaces anything. Built in memory, so that libhdf5 never
    meets a full disk (it took the process down with a segfault); the bytes are then written like any file."""
    import io

    import nir

    from mpis.train.checkpoint import SPACE_MARGIN, atomic_write, free_mb, no_space_message

    buffer = io.BytesIO()
    nir.write(buffer, graph)
    if finish is not None:
        finish(buffer)
    data = buffer.getvalue()
    if free_mb(path.parent) * 2**20 < len(data) + SPACE_MARGIN:
        raise MpisError(no_space_message(path, f" ({len(data) / 2**20:,.1f} MB)"))

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)
        read_nir(tmp, type_check=type_check)

    try:
        atomic_write(path, write)
    except PermissionError as err:
        raise MpisError(f"cannot write {path}: {err.strerror}") from None
