"""What a NIR file may declare before mpis reads it (`read_nir`). An HDF5 dataset declares its shape in a few
bytes whatever it holds (compressed, or chunks never written: the fill value), and h5py allocates all of it
on reading: a 33 KB file declaring 2.8 GiB of weights was measured at 3.17 GB of memory before its error.
So every size is checked first: the arrays' bytes and the node and edge counts from the file's metadata
(nothing read), then the shapes nir infers from them, before the spike runtime allocates per input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mpis.errors import MpisError

NIR_MAX_GIB = 2.0
"""Bytes of arrays a file may declare, summed over its datasets. A fixed size rather than a share of free
memory, so that a file is accepted or refused alike on every machine and at every moment: the paper's largest
net exports 1.1 GB (README, NIR export size) and reading holds the arrays about twice (h5py's, then the
runtime's). A larger file of one's own: set MPIS_NIR_MAX_GIB."""
NIR_MAX_NODES = 100_000  # the paper's nets export at most 572
NIR_MAX_EDGES = 1_000_000
NIR_MAX_ELEMENTS = 2**24  # values per input in one node's input or output: 128x the paper's largest layer
NIR_MAX_DEPTH = 32  # nested groups (a subgraph is two levels more); deeper is a loop of links


def nir_max_bytes() -> int:
    text = os.environ.get("MPIS_NIR_MAX_GIB", "")
    try:
        gib = float(text) if text else NIR_MAX_GIB
    except ValueError:
        raise MpisError(f"MPIS_NIR_MAX_GIB must be a number of GiB, got {text!r}") from None
    return int(gib * 2**30)


def check_declared_sizes(path: Path) -> None:
    """Refuse a file whose datasets declare more than `nir_max_bytes()`, or more than NIR_MAX_NODES nodes or
    NIR_MAX_EDGES edges, reading only the file's metadata. Every link counts as often as `nir.read` follows it
    (two links to one dataset are read twice); a link to another file is refused."""
    import h5py

    limit = nir_max_bytes()
    totals = {"bytes": 0, "nodes": 0}

    def refuse(what: str) -> MpisError:
        return MpisError(f"{path} {what}; refused before reading")

    def walk(group, depth: int) -> None:
        if depth > NIR_MAX_DEPTH:
            raise refuse(f"nests groups deeper than {NIR_MAX_DEPTH} (a loop of links?)")
        for name in group:
            if isinstance(group.get(name, getlink=True), h5py.ExternalLink):
                raise refuse(f"links to another file ({group.name}/{name})")
            item = group[name]
            if isinstance(item, h5py.Group):
                if name == "nodes":
                    totals["nodes"] += len(item)
                    if totals["nodes"] > NIR_MAX_NODES:
                        raise refuse(f"declares over {NIR_MAX_NODES:,} nodes")
                walk(item, depth + 1)
                continue
            if name == "edges" and item.shape and item.shape[0] > NIR_MAX_EDGES:
                raise refuse(f"declares {item.shape[0]:,} edges, over {NIR_MAX_EDGES:,}")
            totals["bytes"] += (item.size or 0) * item.dtype.itemsize
            if totals["bytes"] > limit:
                shape = "x".join(map(str, item.shape))
                raise refuse(
                    f"declares over {limit / 2**30:g} GiB of arrays ({item.name}: {shape} {item.dtype}; "
                    "MPIS_NIR_MAX_GIB raises the limit)"
                )

    try:
        with h5py.File(path, "r") as f:
            walk(f, 0)
    except MpisError:
        raise
    except Exception as err:  # h5py raises many types for damaged or foreign files
        raise MpisError(f"{path} is not a readable NIR file ({type(err).__name__}: {str(err)[:120]})") from None


def check_shapes(graph, path: Path) -> None:
    """Refuse a graph with a node that takes or gives more than NIR_MAX_ELEMENTS values per input (the types
    nir inferred from the declared shapes): the spike runtime allocates them for every input of a batch."""
    for name, node in graph.nodes.items():
        if hasattr(node, "nodes"):  # a subgraph
            check_shapes(node, path)
        for types in (getattr(node, "input_type", None), getattr(node, "output_type", None)):
            for dims in (types or {}).values():
                try:
                    shape = np.atleast_1d(np.asarray(dims, dtype=np.float64))
                except (TypeError, ValueError):
                    continue  # a type nir left undefined (None): nothing is allocated from it
                if (shape < 0).any() or float(np.prod(shape)) > NIR_MAX_ELEMENTS:
                    raise MpisError(
                        f"{path}: node {name!r} declares the shape {'x'.join(f'{d:g}' for d in shape)} "
                        f"(more than {NIR_MAX_ELEMENTS:,} values per input, or negative); refused"
                    )
