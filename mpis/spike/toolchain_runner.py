"""Run an `mpis export --target T` NIR file through toolchain T's own importer; save its spike counts.

Standalone on purpose (numpy, torch, nir and the toolchain only, no mpis): `mpis check --toolchain` runs
it with the toolchain's interpreter, which may be another environment (Sinabs pins nir <= 1.0.4).

    python toolchain_runner.py TOOLCHAIN FILE.nir INPUTS.npy OUT.npz STEPS BATCH

INPUTS.npy: (B, *input shape) fed at every step, or (B, frames, *input shape), frame t·frames//STEPS at
step t (as mpis). OUT.npz: the spike count of every node named in the file's metadata "layers", and
"logits", the importer's output summed over the steps. One line of JSON on stdout: the versions used.
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import torch


def _norse(graph):
    """norse.torch.from_nir with its defaults (dt = 0.001: the file's LIF(tau = dt) thresholds)."""
    import norse
    import norse.torch
    from nirtorch.utils import sanitize_name

    logging.disable(logging.WARNING)  # "Graph executor is deprecated"
    return lambda batch: norse.torch.from_nir(graph), sanitize_name, getattr(norse, "__version__", "?")


def _sinabs(graph):
    """sinabs.from_nir, one model per batch size (its layers hold their state and the batch size)."""
    import warnings

    import sinabs
    from nirtorch.utils import sanitize_name

    warnings.filterwarnings("ignore")
    return lambda batch: sinabs.from_nir(graph, batch_size=batch), sanitize_name, sinabs.__version__


IMPORTERS = {"norse": _norse, "sinabs": _sinabs}


def main(argv: list[str]) -> int:
    import nir

    toolchain, path, inputs, out, steps, batch = argv[0], argv[1], argv[2], argv[3], int(argv[4]), int(argv[5])
    if toolchain not in IMPORTERS:
        print(f"no importer for {toolchain!r}", file=sys.stderr)
        return 2
    graph = nir.read(path)
    layers = graph.metadata["layers"]
    x_all = torch.from_numpy(np.load(inputs))
    make, key, version = IMPORTERS[toolchain](graph)
    counts = {layer: [] for layer in layers}
    logits = []
    with torch.no_grad():
        for start in range(0, len(x_all), batch):
            x = x_all[start : start + batch]
            model = make(len(x))  # fresh state for every batch
            frames = x.shape[1] if x.dim() == len(graph.metadata["input_shape"]) + 2 else 0
            state, total, seen = None, 0.0, {}
            for t in range(steps):
                step_input = x[:, t * frames // steps] if frames else x
                output, state = model(step_input, state)
                total = total + output
                for layer, info in layers.items():
                    spikes = state.cache[key(str(info["spikes"]))]
                    seen[layer] = spikes.clone() if layer not in seen else seen[layer] + spikes
            for layer in layers:
                counts[layer].append(seen[layer].numpy())
            logits.append(np.asarray(total))
    arrays = {f"layer_{layer}": np.concatenate(parts) for layer, parts in counts.items()}
    np.savez(out, logits=np.concatenate(logits), **arrays)
    print(json.dumps({"toolchain": toolchain, "version": version, "nir": getattr(nir, "__version__", "?")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
