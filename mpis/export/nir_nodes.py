"""Standard-NIR building blocks for the spiking graph (design note nir-mapping.md §2-3).

NIR 1.0's `IF` resets to a value; DBReLU equivalence needs reset by subtraction. Written exactly with
standard nodes:  in -> I(r=1) -> Threshold(θ) -> spikes, with a Scale(−Vth) self-loop from the spikes
back into the integrator (a back-edge, read one step late). The integrator then holds the pre-reset
membrane v[t−1] + in[t]; an initial potential v0 is the threshold shift θ = Vth − v0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mpis.errors import MpisError


def subtract_reset_if(name: str, shape: tuple[int, ...], vth: float, v_init: float | np.ndarray = 0.0):
    """Nodes and edges of one IF layer with reset by subtraction; feed `{name}.i`, read `{name}.spikes`."""
    import nir

    ones = np.ones(shape, dtype=np.float32)
    threshold = (vth - np.asarray(v_init, dtype=np.float32)) * ones
    nodes = {
        f"{name}.i": nir.I(r=ones),
        f"{name}.spikes": nir.Threshold(threshold=threshold.astype(np.float32)),
        f"{name}.reset": nir.Scale(scale=-vth * ones),
    }
    edges = [(f"{name}.i", f"{name}.spikes"), (f"{name}.spikes", f"{name}.reset"), (f"{name}.reset", f"{name}.i")]
    return nodes, edges


def read_nir(path: str | Path):
    """`nir.read` with type checking, turning a missing, truncated or foreign file into one clear error."""
    import nir

    path = Path(path)
    if not path.is_file():
        raise MpisError(f"NIR file {path} does not exist")
    try:
        return nir.read(path)
    except Exception as err:  # h5py and nir raise many types for damaged or foreign files
        raise MpisError(f"{path} is not a readable NIR file ({type(err).__name__}: {str(err)[:120]})") from None
