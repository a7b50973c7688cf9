"""Run an `mpis export --target T` NIR file through toolchain T's own importer; save its spike counts.

Standalone on purpose (numpy, torch, nir and the toolchain only, no mpis): `mpis check --toolchain` runs
it with the toolchain's interpreter, which may be another environment (Sinabs pins nir <= 1.0.4).

    python toolchain_runner.py TOOLCHAIN FILE.nir INPUTS.npy OUT.npz STEPS BATCH THREADS

INPUTS.npy: (B, *input shape) fed at every step, or (B, frames, *input shape), frame t·frames//STEPS at
step t (as mpis). OUT.npz: the spike count of every node named in the file's metadata "layers", and
"logits", the importer's output summed over the steps. THREADS: torch's intra-op threads (mpis check
--threads). One line of JSON on stdout: the versions used and the threads torch ran with.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

import numpy as np
import torch

Step = Callable[[torch.Tensor], tuple[torch.Tensor, Callable[[str], torch.Tensor]]]


def _graph_executor(model, key: Callable[[str], str]) -> Step:
    """One run of nirtorch.load's GraphExecutor (Norse, Sinabs): a node's output is in `state.cache`."""
    state = None

    def step(x: torch.Tensor):
        nonlocal state
        output, state = model(x, state)
        return output, lambda name: state.cache[key(name)]

    return step


def _norse(graph):
    """norse.torch.from_nir with its defaults (dt = 0.001: the file's LIF(tau = dt) thresholds)."""
    import norse
    import norse.torch
    from nirtorch.utils import sanitize_name

    logging.disable(logging.WARNING)  # "Graph executor is deprecated"
    return lambda batch: _graph_executor(norse.torch.from_nir(graph), sanitize_name), getattr(norse, "__version__", "?")


def _sinabs(graph):
    """sinabs.from_nir, one model per batch size (its layers hold their state and the batch size)."""
    import warnings

    import sinabs
    from nirtorch.utils import sanitize_name

    warnings.filterwarnings("ignore")
    return lambda batch: _graph_executor(sinabs.from_nir(graph, batch_size=batch), sanitize_name), sinabs.__version__


def _snntorch(graph):
    """snntorch.import_nir.import_from_nir: a nirtorch 2 GraphModule of snnTorch neurons that keep their
    own state (init_hidden), reset for every batch; node outputs are read by forward hooks."""
    import contextlib

    import snntorch
    from snntorch.import_nir import import_from_nir

    with contextlib.redirect_stdout(sys.stderr):  # it prints as it converts
        module = import_from_nir(graph)
    outputs: dict[str, torch.Tensor] = {}
    for name, child in module.named_children():
        child.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))

    def make(batch: int) -> Step:
        for neuron in module.modules():
            if hasattr(neuron, "reset_mem"):
                neuron.reset_mem()
        state = None

        def step(x: torch.Tensor):
            nonlocal state
            output, state = module(x, state)
            return output, lambda name: outputs[name.replace(".", "_")]

        return step

    return make, snntorch.__version__


IMPORTERS = {"norse": _norse, "sinabs": _sinabs, "snntorch": _snntorch}


def main(argv: list[str]) -> int:
    import nir

    toolchain, path, inputs, out = argv[:4]
    steps, batch, threads = (int(v) for v in argv[4:7])
    if toolchain not in IMPORTERS:
        print(f"no importer for {toolchain!r}", file=sys.stderr)
        return 2
    torch.set_num_threads(threads)  # torch's own default counts the machine's cores, not --threads
    try:  # a universal or Sinabs file has shape-(1,) neuron parameters, which nir 1.0.8's types refuse
        graph = nir.read(path, type_check=False)
    except TypeError:  # nir <= 1.0.4 (Sinabs' venv) has no type checking to switch off
        graph = nir.read(path)
    layers = graph.metadata["layers"]
    x_all = torch.from_numpy(np.load(inputs))
    make, version = IMPORTERS[toolchain](graph)
    counts = {layer: [] for layer in layers}
    logits = []
    with torch.no_grad():
        for start in range(0, len(x_all), batch):
            x = x_all[start : start + batch]
            step = make(len(x))  # fresh state for every batch
            frames = x.shape[1] if x.dim() == len(graph.metadata["input_shape"]) + 2 else 0
            total, seen = 0.0, {}
            for t in range(steps):
                output, node_output = step(x[:, t * frames // steps] if frames else x)
                total = total + output
                for layer, info in layers.items():
                    spikes = node_output(str(info["spikes"]))
                    seen[layer] = spikes.clone() if layer not in seen else seen[layer] + spikes
            for layer in layers:
                counts[layer].append(seen[layer].numpy())
            logits.append(np.asarray(total))
    arrays = {f"layer_{layer}": np.concatenate(parts) for layer, parts in counts.items()}
    np.savez(out, logits=np.concatenate(logits), **arrays)
    versions = {"toolchain": toolchain, "version": version, "nir": getattr(nir, "__version__", "?")}
    print(json.dumps({**versions, "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
