"""Simulating an exported spiking graph: `compile_graph` picks the layout (`graph_layout`: every node as
written, the same spikes in every process; native: the model's FLOPs, per layer — `native_layout` for an mpis
polyphase `exact` export, `lattice_layout` for a ghost-layout file such as the default universal one),
`layer_counts` reads the spikes back per model layer, `evaluate` runs a dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mpis.errors import MpisError
from mpis.export.nir import native_layer
from mpis.export.nir_nodes import read_nir
from mpis.export.toolchains import NORSE_DT
from mpis.spike.graph_layout import Program, compile_program, counts_model_synapses, dense_macs, synaptic_ops
from mpis.spike.lattice_layout import compile_lattice, is_ghost_file
from mpis.spike.native_layout import compile_native

LAYOUTS = ("graph", "native")
# The files this runtime simulates, by their metadata's target: how their LIF nodes run (None: as NIR's
# equations with dt = 1; a dt: as norse.torch.from_nir runs them at that dt, which is what the universal
# file's neurons need to be IF with reset by subtraction, docs/one-nir-file.md).
RUNS_AS: dict[str, float | None] = {"nirtorch": None, "norse": NORSE_DT, "universal": NORSE_DT}


def compile_graph(
    graph,
    device: str | torch.device = "cpu",
    reset: str | None = None,
    dtype: torch.dtype = torch.float32,
    layout: str = "graph",
    sum_order: str = "sorted",
) -> Program:
    """Compile a NIR graph (or a .nir file) for `device` and `dtype`; `reset` overrides every IF/LIF node's
    reset mode (`subtract` or `zero`, default: each node's metadata, else the NIR spec's reset to v_reset).
    `layout`: `graph` runs every node as written (the same spikes in every process; with `sum_order=
    "nirtorch"`, nirtorch's bit for bit in this process); `native` runs an mpis export per layer at the
    model's resolution (`lattice_layout` for ghost-layout files, `native_layout` for polyphase ones)."""
    if isinstance(graph, str | Path):
        graph = read_nir(graph)
    target = getattr(graph, "metadata", {}).get("target", "nirtorch")
    if target not in RUNS_AS:
        raise MpisError(
            f"this file is written for {target}'s own importer (mpis export --target {target}), whose neurons read "
            f"differently; run it there: mpis check CHECKPOINT --toolchain {target}"
        )
    if layout not in LAYOUTS:
        raise MpisError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    program = compile_program(graph, device, reset, dtype, sum_order, RUNS_AS[target])
    if layout == "native":
        compile_native_layout = compile_lattice if is_ghost_file(graph) else compile_native
        try:
            program.native = compile_native_layout(program)
        except MpisError as err:
            raise MpisError(f"cannot run this graph in native layout ({err}); use --layout graph") from None
    return program


# ---- what a simulation measured -----------------------------------------------------------------
def layer_counts(graph, spike_counts: dict[str, Tensor]) -> dict[str, Tensor]:
    """Spike counts per MPIS neuron layer in native layout (batch, C, H, W), from the per-node counts and
    the spiking nodes' metadata ({"layer", "layout", "factor", "phase"}; the phase node (a, b) of a layer at
    factor f holds pixels (f·i + a, f·j + b)). Nodes without layer metadata keep their node name."""
    phases: dict[str, dict[tuple[int, int], Tensor]] = {}
    factors: dict[str, int] = {}
    out: dict[str, Tensor] = {}
    for name, count in spike_counts.items():
        meta = graph.nodes[name].metadata
        if "layer" not in meta:
            out[name] = count
            continue
        layer, factor = str(meta["layer"]), int(meta.get("factor", 1))
        phase = tuple(int(p) for p in np.atleast_1d(meta.get("phase", (0, 0))))
        factors[layer] = factor
        phases.setdefault(layer, {})[phase] = count
    layers = graph.metadata.get("layers", {})
    for layer, info in layers.items():  # ghost layout (export.toolchains): one node, pixels at dilation D
        if isinstance(info, dict) and "dilation" in info and str(info["spikes"]) in spike_counts:
            step, size = max(int(info["dilation"]), 1), int(info["size"])
            out.pop(str(info["spikes"]), None)
            out[layer] = spike_counts[str(info["spikes"])][..., : step * size : step, : step * size : step]
    for layer, parts in phases.items():
        factor = factors[layer]
        if sorted(parts) != [(a, b) for a in range(factor) for b in range(factor)]:
            raise MpisError(
                f"layer {layer!r} at factor {factor} needs {factor**2} phase nodes, the graph has {len(parts)}"
            )
        out[layer] = parts[(0, 0)] if factor == 1 else native_layer(parts, factor)
        expected = layers.get(layer, {}).get("shape")
        if expected is not None and tuple(out[layer].shape[1:]) != tuple(int(s) for s in expected):
            raise MpisError(
                f"layer {layer!r} reassembles to {tuple(out[layer].shape[1:])}, its metadata says {tuple(expected)}"
            )
    return out


def firing_rate(count: Tensor, steps: int) -> float:
    """Supplement Eq. 1, r_l = s_l / (T · n_l), averaged over the batch of `count` (batch, *layer shape)."""
    return float(count.double().mean()) / steps


# ---- a dataset through the spiking network ----------------------------------------------------------
@dataclass
class Evaluation:
    """Accuracy, per-layer firing rates r_l = s_l / (T·n_l) (layer -> (shape, rate)) and the energy proxy:
    synaptic operations per input over all steps against `dense_macs` per input of one rate step."""

    inputs: int
    steps: int
    accuracy: float
    rates: dict[str, tuple[tuple[int, ...], float]]
    synaptic_ops: float
    dense_macs: int
    seconds: float

    def lines(self) -> list[str]:
        dense = self.steps * self.dense_macs
        if not dense:
            synapses = (
                "synaptic ops: not counted on a toolchain file (its ghost layout and helper nodes are not the "
                "model's synapses; mpis check CHECKPOINT counts the model's)"
            )
        else:
            share = f"{self.synaptic_ops / dense:.2%}"
            synapses = (
                f"synaptic ops {self.synaptic_ops:.3g} per input (spikes x fan-out) vs {dense:.3g} MACs of T dense "
                f"rate steps (T x {self.dense_macs:.3g} synapses): {share}"
            )
        out = [
            f"accuracy {self.accuracy:.4f} on {self.inputs} inputs (spiking, T = {self.steps}; {self.seconds:.1f} s)",
            "firing rate r_l = s_l / (T·n_l):",
        ]
        width = max((len(name) for name in self.rates), default=0)
        out += [f"  {n:<{width}}  {'x'.join(map(str, s)):<12} {r:.4f}" for n, (s, r) in self.rates.items()]
        out.append(synapses)
        return out


def evaluate(
    program: Program,
    dataset,
    steps: int,
    batch: int = 256,
    classes: int | None = None,
    burn_in: int = 0,
    progress: bool = False,
) -> Evaluation:
    """Run every (input, label) of `dataset` through the spiking network for `steps` counted steps."""
    import time

    from torch.utils.data import DataLoader
    from tqdm import tqdm

    correct, seen, spikes, shapes, synops = 0, 0, {}, {}, 0.0
    synapses = counts_model_synapses(program)
    start = time.perf_counter()
    loader = DataLoader(dataset, batch_size=batch)
    for x, y in tqdm(loader, desc="simulating", unit="batch", disable=not progress, leave=False, mininterval=1):
        result = program.run(x, steps, burn_in)
        if classes is not None and result.scores.shape[1:] != (classes,):
            raise MpisError(
                f"the graph outputs {tuple(result.scores.shape[1:])} per input, the dataset has {classes} classes"
            )
        correct += int((result.scores.argmax(1).cpu() == y).sum())
        seen += len(y)
        for layer, count in layer_counts(program.graph, result.spike_counts).items():
            spikes[layer] = spikes.get(layer, 0.0) + float(count.double().sum())
            shapes[layer] = tuple(count.shape[1:])
        if synapses:
            synops += float(synaptic_ops(program, result.spike_counts).sum())
    if not seen:
        raise MpisError("the dataset is empty")
    seconds = time.perf_counter() - start
    rates = {n: (shapes[n], spikes[n] / (seen * steps * int(np.prod(shapes[n])))) for n in spikes}
    macs = dense_macs(program) if synapses else 0
    return Evaluation(seen, steps, correct / seen, rates, synops / seen, macs, seconds)
