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
    """`nir.read` with type checking, turning a missing, truncated or foreign file into one clear error."""
    import nir

    path = Path(path)
    if not path.is_file():
        raise MpisError(f"NIR file {path} does not exist")
    try:
        return nir.read(path, type_check=type_check)
    except Exception as err:  # h5py and nir raise many types for damaged or foreign files
        problem = err
    try:  # a file for Sinabs' nir 1.0.4 broadcasts neuron parameters, which nir 1.0.8's types refuse
        graph = nir.read(path, type_check=False)
        if graph.metadata.get("target") == "sinabs":
            return graph
    except Exception:  # the first error is the one to report
        pass
    raise MpisError(f"{path} is not a readable NIR file ({type(problem).__name__}: {str(problem)[:120]})") from None


def writable_nir_path(path: str | Path, overwrite: bool) -> Path:
    """`path` checked before any work: its folder exists, and an existing file is kept unless `overwrite`."""
    path = Path(path)
    if not path.parent.is_dir():
        raise MpisError(f"folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise MpisError(f"{path} already exists; choose another path or pass --overwrite")
    return path


def write_nir(path: Path, graph, type_check: bool = True, finish=None) -> None:
    """Write atomically; `finish(tmp)` edits the file first, and it must read back (with type checking
    unless the target's nir does none) before it replaces anything."""
    import nir

    from mpis.train.checkpoint import atomic_write

    def write(tmp: str) -> None:
        nir.write(tmp, graph)
        if finish is not None:
            finish(tmp)
        read_nir(tmp, type_check=type_check)

    try:
        atomic_write(path, write)
    except PermissionError as err:
        raise MpisError(f"cannot write {path}: {err.strerror}") from None
