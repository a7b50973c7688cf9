"""Prototype: ONE NIR file per net that norse.torch.from_nir, snntorch.import_nir.import_from_nir and
sinabs.from_nir all run as a non-leaky integrate-and-fire neuron with reset by subtraction
(u_t = u_{t-1} + I_t - Vth*s_{t-1}, s_t = [u_t > theta]), compared with a numpy reference.

    OMP_NUM_THREADS=1 python bench/nir_one_file_probe.py [--seed S]    # everything (docs/one-nir-file.md)
    python bench/nir_one_file_probe.py --run sinabs FILE.nir INPUTS.npy OUT.npz NAMES_JSON            # one importer

Patterns (see docs/one-nir-file.md):
  universal  conv self-loop integrator; importer-detecting "switch" (an LIF with r != 1 that fires every
             step in Norse and Sinabs, never in snnTorch) selects a Norse/Sinabs threshold LIF(tau=1e-3)
             or an snnTorch threshold LIF(tau=1e-4); Sinabs' multi-spike count k is capped by k - MS_1(k-1).
             Works with every importer's defaults.
  dt         conv self-loop integrator, one threshold LIF(tau=1e-4) + the Sinabs cap. Needs
             norse.torch.from_nir(..., dt=1e-4).
Builds with mpis's schedule check; runs each importer with numpy, torch, nir, h5py and that toolchain only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

F32 = np.float32
N, C, B, T = 6, 2, 2, 50  # grid side, channels, batch, steps
GRID = 2.0**-12  # membrane resolution: inputs on 2^-8 times weights on 2^-4
H_GHOST = 2.0**30  # per step on a ghost's input
H_SWITCH = 2.0**20  # silences the threshold of the other importer family
TAU_NORSE = 1e-3  # = norse.torch.from_nir's default dt: memoryless there (and in Sinabs: exp(-1/tau) = 0)
TAU_SNN = 1e-4  # = snnTorch's hard-coded dt: memoryless there (and in Sinabs)
SINABS_PY = os.environ.get("MPIS_SINABS_PYTHON", ".venv-sinabs/bin/python")  # .ci/install-sinabs


# ---------------------------------------------------------------------------------------------------
# graph building (main venv, nir 1.0.8)
# ---------------------------------------------------------------------------------------------------
class Graph:
    def __init__(self, nir):
        self.nir = nir
        self.nodes: dict[str, object] = {}
        self.order: list[str] = []
        self.edges: list[tuple[str, str]] = []
        self.back: set[tuple[str, str]] = set()
        self.shape_in: dict[str, tuple] = {}
        self.shape_out: dict[str, tuple] = {}

    def add(self, name, node, shape_in, shape_out):
        assert name not in self.nodes, name
        self.nodes[name] = node
        self.order.append(name)
        self.shape_in[name], self.shape_out[name] = tuple(shape_in), tuple(shape_out)
        return name

    def edge(self, a, c, back=False):
        self.edges.append((a, c))
        if back:
            self.back.add((a, c))

    # node factories ---------------------------------------------------------------------------------
    def conv(self, weight, bias, padding=0, stride=1, side=N):
        return self.nir.Conv2d(
            input_shape=np.array([side, side]),
            weight=np.ascontiguousarray(weight, dtype=F32),
            stride=stride,
            padding=padding,
            dilation=1,
            groups=1,
            bias=np.asarray(bias, dtype=F32),
        )

    def diag(self, channels, value, bias=0.0):
        w = (value * np.eye(channels, dtype=F32))[:, :, None, None]
        return self.conv(w, np.full(channels, bias, F32))

    def lif(self, tau, r, theta):
        one = np.ones(1, F32)
        return self.nir.LIF(tau=tau * one, r=r * one, v_leak=0 * one, v_threshold=theta * one, v_reset=0 * one)

    def paint(self, channels, pattern):
        """(1,1,1) -> (channels, N, N): paints `pattern` (N x N) times the scalar input (padding N-1)."""
        w = np.broadcast_to(np.asarray(pattern, F32)[::-1, ::-1], (channels, 1, N, N))
        return self.conv(w, np.zeros(channels, F32), padding=N - 1, side=1)

    def zero_conv(self, shape_a, shape_c):
        (ca, ha, _), (cc, hc, _) = shape_a, shape_c
        w = np.zeros((cc, ca, 1, 1), F32)
        if ha == hc:
            return self.conv(w, np.zeros(cc), side=ha)
        if hc == 1:
            return self.conv(w, np.zeros(cc), stride=ha, side=ha)
        assert ha == 1
        return self.conv(np.zeros((cc, ca, hc, hc), F32), np.zeros(cc), padding=hc - 1, side=1)


def build_prefix(g: Graph, pattern: str):
    """input, a (1,1,1) constant 1, and for `universal` the importer switch: on = 1 in Norse and Sinabs
    (LIF(tau = 1e-3) memoryless, r ignored: 1 > 0.75 every step), 0 in snnTorch (Leaky(beta = 0.9) with
    its threshold divided by r*dt/tau = 2^-10 * 0.1: 7680, out of reach of a membrane <= 10); off = 1 - on."""
    nir = g.nir
    g.add("input", nir.Input(input_type={"input": np.array([1, N, N])}), (1, N, N), (1, N, N))
    g.add("const", g.conv(np.zeros((1, 1, 1, 1)), np.ones(1), stride=N), (1, N, N), (1, 1, 1))
    g.edge("input", "const")
    if pattern == "universal":
        g.add("on", g.lif(TAU_NORSE, 2.0**-10, 0.75), (1, 1, 1), (1, 1, 1))
        g.edge("const", "on")
        g.add("off", g.conv(-np.ones((1, 1, 1, 1)), np.ones(1), side=1), (1, 1, 1), (1, 1, 1))
        g.edge("on", "off")


def neuron(g: Graph, name: str, channels: int, theta: float, vth: float, ghosts: np.ndarray | None, pattern: str):
    """One IF-subtract layer; returns (inlet, spikes). `ghosts`: N x N bool mask of non-neurons (or None)."""
    shape = (channels, N, N)
    one = (1, 1, 1)
    level = theta + GRID / 2  # u > theta on the 2^-12 grid  <=>  u > level  <=>  u >= level (Sinabs' MultiSpike)
    inlet, spikes, reset = f"{name}_i", f"{name}_s", f"{name}_reset"
    g.add(inlet, g.diag(channels, 1.0), shape, shape)
    g.edge(inlet, inlet, back=True)
    inhib = []
    if ghosts is not None:
        gp = g.add(f"{name}_ghosts", g.paint(channels, np.where(ghosts, -H_GHOST, 0.0)), one, shape)
        g.edge("const", gp)
        inhib.append(gp)

    def capped(source: str, tau: float, r: float) -> list[str]:
        """Sinabs' MultiSpike gives k = trunc(a/level) spikes: k - MS_1(k - 1) is one spike; in Norse and
        snnTorch k is 0 or 1 and MS_1(k - 1) stays 0 (input <= 0)."""
        p = g.add(f"{source}_km1", g.diag(channels, 1.0, bias=-1.0), shape, shape)
        g.edge(source, p)
        m = g.add(f"{source}_cap", g.lif(tau, r, 1.0), shape, shape)
        g.edge(p, m)
        nm = g.add(f"{source}_negcap", g.diag(channels, -1.0), shape, shape)
        g.edge(m, nm)
        return [source, nm]

    if pattern == "universal":
        # Norse/Sinabs branch: LIF(tau = 1e-3), silenced in snnTorch by -H * off
        hs = g.add(f"{name}_hoff", g.paint(channels, np.full((N, N), -H_SWITCH)), one, shape)
        g.edge("off", hs)
        tn = g.add(f"{name}_tn", g.lif(TAU_NORSE, 10.0, level), shape, shape)
        for src in (inlet, *inhib, hs):
            g.edge(src, tn)
        parts = capped(tn, TAU_NORSE, 10.0)
        # snnTorch branch: LIF(tau = 1e-4) (beta = 0), silenced in Norse and Sinabs by -H * on; in Norse it is
        # unstable (v = 10 i - 9 v), so its spikes pass a gate LIF(tau = 1e-3, theta 0.5) also fed -H * on
        hn = g.add(f"{name}_hon", g.paint(channels, np.full((N, N), -H_SWITCH)), one, shape)
        g.edge("on", hn)
        ts = g.add(f"{name}_ts", g.lif(TAU_SNN, 1.0, level), shape, shape)
        for src in (inlet, *inhib, hn):
            g.edge(src, ts)
        gs = g.add(f"{name}_gs", g.lif(TAU_NORSE, 10.0, 0.5), shape, shape)
        g.edge(ts, gs)
        g.edge(hn, gs)
        parts.append(gs)
    else:  # "dt": one threshold, memoryless everywhere once Norse runs at dt = 1e-4
        t = g.add(f"{name}_t", g.lif(TAU_SNN, 1.0, level), shape, shape)
        for src in (inlet, *inhib):
            g.edge(src, t)
        parts = capped(t, TAU_SNN, 1.0)
    g.add(spikes, g.diag(channels, 1.0), shape, shape)
    for p in parts:
        g.edge(p, spikes)
    g.add(reset, g.diag(channels, -vth), shape, shape)
    g.edge(spikes, reset)
    g.edge(reset, inlet, back=True)
    return inlet, spikes


def schedule(g: Graph):
    """Each node's first edge leads to the next node of g.order (an all-zero conv where there is none), so
    nirtorch.load's depth-first walk and nirtorch 2.6's name order both run g.order."""
    forward = [e for e in g.edges if e not in g.back]
    first, order = [], []
    for a, c in zip(g.order, g.order[1:], strict=False):
        order.append(a)
        if (a, c) in forward:
            first.append((a, c))
            continue
        z = f"{a}_seq"
        g.nodes[z] = g.zero_conv(g.shape_out[a], g.shape_in[c])
        order.append(z)
        first += [(a, z), (z, c)]
    order.append(g.order[-1])
    edges = first + [e for e in g.edges if e not in first]
    from mpis.export.toolchains import _depth_first  # nirtorch.load's walk, as mpis's export checks it

    visited = _depth_first("input", edges)
    assert visited == order, (visited, order)
    pos = {n: i for i, n in enumerate(order)}
    for a, c in edges:
        assert (pos[a] >= pos[c]) == ((a, c) in g.back), (a, c)
    return order, edges


def build(kind: str, pattern: str, rng: np.random.Generator):
    """kind 'ghost': input -> conv -> IF layer whose odd rows/columns are ghosts -> head.
    kind 'loop': input -> W1 -> L1 -> W2 -> L2 -> W3 -> back into L1 (previous step) -> head."""
    import nir

    g = Graph(nir)
    build_prefix(g, pattern)
    weights = lambda co, ci: rng.integers(-16, 17, size=(co, ci, 3, 3)).astype(F32) / 16  # noqa: E731
    spec = {"vth": 1.0, "layers": []}
    w1 = weights(C, 1) + 0.25
    g.add("w1", g.conv(w1, np.zeros(C), padding=1), (1, N, N), (C, N, N))
    g.edge("input", "w1")
    if kind == "ghost":
        ghosts = np.ones((N, N), bool)
        ghosts[::2, ::2] = False
        i1, s1 = neuron(g, "l1", C, 1.0, 1.0, ghosts, pattern)
        g.edge("w1", i1)
        spec["layers"] = [{"name": "l1", "spikes": s1, "theta": 1.0, "ghosts": ghosts.tolist()}]
        last = s1
        spec["w"] = {"w1": w1.tolist()}
    else:
        i1, s1 = neuron(g, "l1", C, 1.0, 1.0, None, pattern)
        g.edge("w1", i1)
        w2 = weights(C, C) / 2 + 1 / 16
        g.add("w2", g.conv(w2, np.zeros(C), padding=1), (C, N, N), (C, N, N))
        g.edge(s1, "w2")
        i2, s2 = neuron(g, "l2", C, 0.75, 1.0, None, pattern)
        g.edge("w2", i2)
        w3 = weights(C, C) / 2
        g.add("w3", g.conv(w3, np.zeros(C), padding=1), (C, N, N), (C, N, N))
        g.edge(s2, "w3")
        g.edge("w3", i1, back=True)
        spec["layers"] = [
            {"name": "l1", "spikes": s1, "theta": 1.0, "ghosts": None},
            {"name": "l2", "spikes": s2, "theta": 0.75, "ghosts": None},
        ]
        spec["w"] = {"w1": w1.tolist(), "w2": w2.tolist(), "w3": w3.tolist()}
        last = s2
    flat = nir.Flatten(input_type={"input": np.array([C, N, N])}, start_dim=-3, end_dim=-1)
    g.add("flat", flat, (C, N, N), (C * N * N,))
    g.edge(last, "flat")
    fc = rng.integers(-8, 9, size=(3, C * N * N)).astype(F32) / 8
    g.add("fc", nir.Affine(weight=fc, bias=np.zeros(3, F32)), (C * N * N,), (3,))
    g.edge("flat", "fc")
    order, edges = schedule(g)
    width = len(str(len(order)))
    names = {n: n if n == "input" else f"n{i:0{width}d}_{n}" for i, n in enumerate(order)}
    nodes = {names[n]: g.nodes[n] for n in order}
    nodes["output"] = nir.Output(output_type={"output": np.array([3])})
    nir_edges = [(names[a], names[c]) for a, c in edges] + [(names["fc"], "output")]
    graph = nir.NIRGraph(nodes=nodes, edges=nir_edges, type_check=False)
    for layer in spec["layers"]:
        layer["spikes"] = names[layer["spikes"]]
    return graph, spec, len(order)


def write(graph, path: Path):
    """nir.write, then drop what nir 1.0.4 (Sinabs) refuses: every `v_reset` and node `metadata`."""
    import h5py
    import nir

    nir.write(path, graph)
    dropped = 0
    with h5py.File(path, "r+") as f:
        nodes = f["node"]["nodes"]
        for name in nodes:
            for key in ("v_reset", "metadata"):
                if key in nodes[name]:
                    del nodes[name][key]
                    dropped += 1
    return dropped


def reference(spec, x: np.ndarray) -> dict[str, np.ndarray]:
    """The IF-subtract neuron in float64 numpy: x (T, B, 1, N, N) -> spikes per layer (T, B, C, N, N)."""
    import torch
    import torch.nn.functional as F

    conv = lambda a, w: F.conv2d(torch.from_numpy(a), torch.tensor(w, dtype=torch.float64), padding=1).numpy()  # noqa: E731
    w = spec["w"]
    layers = spec["layers"]
    u = [np.zeros((B, C, N, N)) for _ in layers]
    s = [np.zeros((B, C, N, N)) for _ in layers]
    out = {layer["name"]: [] for layer in layers}
    for t in range(T):
        xt = x[t].astype(np.float64)
        for k, layer in enumerate(layers):
            if k == 0:
                inp = conv(xt, w["w1"]) + (conv(s[-1], w["w3"]) if len(layers) == 2 else 0)
            else:
                inp = conv(s[0], w["w2"])
            u[k] = u[k] + inp - spec["vth"] * s[k]
            new = (u[k] > layer["theta"]).astype(np.float64)
            if layer["ghosts"] is not None:
                new[..., np.array(layer["ghosts"])] = 0.0
            s[k] = new
            out[layer["name"]].append(new)
    return {k: np.stack(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------
# running one importer (any venv)
# ---------------------------------------------------------------------------------------------------
def run_importer(toolchain: str, path: str, x: np.ndarray, names: list[str], **options) -> dict[str, np.ndarray]:
    import contextlib
    import logging
    import warnings

    import nir
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    try:
        graph = nir.read(path)
    except ValueError:  # nir 1.0.8: LIF parameters of shape (1,) fail the type check (FINDINGS.md)
        graph = nir.read(path, type_check=False)
    spikes = {n: [] for n in names}
    if toolchain in ("norse", "sinabs"):
        from nirtorch.utils import sanitize_name

        if toolchain == "norse":
            import norse.torch

            model = norse.torch.from_nir(graph, **options)
        else:
            import sinabs

            model = sinabs.from_nir(graph, batch_size=x.shape[1])
        state = None
        with torch.no_grad():
            for t in range(len(x)):
                _, state = model(torch.from_numpy(x[t]), state)
                for n in names:
                    spikes[n].append(state.cache[sanitize_name(n)].numpy().copy())
    else:
        from snntorch.import_nir import import_from_nir

        with contextlib.redirect_stdout(sys.stderr):
            model = import_from_nir(graph)
        outputs = {}
        for name, child in model.named_children():
            child.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
        for m in model.modules():
            if hasattr(m, "reset_mem"):
                m.reset_mem()
        state = None
        with torch.no_grad():
            for t in range(len(x)):
                _, state = model(torch.from_numpy(x[t]), state)
                for n in names:
                    spikes[n].append(outputs[n.replace(".", "_")].numpy().copy())
    return {n: np.stack(v) for n, v in spikes.items()}


def run_sinabs(path: Path, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray] | str:
    with tempfile.TemporaryDirectory() as tmp:
        xs, out = Path(tmp) / "x.npy", Path(tmp) / "out.npz"
        np.save(xs, x)
        proc = subprocess.run(
            [SINABS_PY, __file__, "--run", "sinabs", str(path), str(xs), str(out), json.dumps(names)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if proc.returncode:
            return proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"
        data = np.load(out)
        return {n: data[f"s{i}"] for i, n in enumerate(names)}


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray] | str, spec) -> str:
    if isinstance(got, str):
        return f"FAILED: {got}"
    parts = []
    total_eq = total = 0
    for layer in spec["layers"]:
        r, s = ref[layer["name"]], got[layer["spikes"]]
        if r.shape != s.shape:
            return f"FAILED: shape {s.shape} != {r.shape} for {layer['name']}"
        eq = int((r == s).sum())
        total_eq, total = total_eq + eq, total + r.size
        parts.append(f"{layer['name']} {eq / r.size:.6f} (ref {int(r.sum())} spikes, got {int(s.sum())})")
    return f"{total_eq / total:.6f}  [" + "; ".join(parts) + "]"


def main(seed: int = 0, patterns=("universal", "dt")) -> int:
    import nir

    rng = np.random.default_rng(seed)
    files = Path(tempfile.mkdtemp(prefix="nir-one-file-"))  # the probe's files, never inside the project
    print(f"seed {seed}: T = {T}, batch {B}, {C} channels on {N}x{N}")
    for pattern in patterns:
        for kind in ("ghost", "loop"):
            graph, spec, count = build(kind, pattern, rng)
            path = files / f"{pattern}_{kind}.nir"
            dropped = write(graph, path)
            # nir 1.0.8 reading the file it wrote, without v_reset, parameters of shape (1,)
            try:
                nir.read(path)
                strict = "ok"
            except Exception as err:  # noqa: BLE001
                strict = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            nir.read(path, type_check=False)
            x = (rng.integers(0, 256, size=(T, B, 1, N, N)) / 256).astype(F32)
            ref = reference(spec, x)
            names = [layer["spikes"] for layer in spec["layers"]]
            print(
                f"== {pattern} / {kind}: {count} nodes, dropped {dropped} v_reset/metadata datasets; "
                f"nir 1.0.8 read(type_check=True): {strict}"
            )
            runs = {
                "norse (defaults)": partial(run_importer, "norse", str(path), x, names),
                "norse (dt=1e-4)": partial(run_importer, "norse", str(path), x, names, dt=1e-4),
                "snntorch": partial(run_importer, "snntorch", str(path), x, names),
                "sinabs": partial(run_sinabs, path, x, names),
            }
            for label, fn in runs.items():
                try:
                    got = fn()
                except Exception as err:  # noqa: BLE001
                    got = f"{type(err).__name__}: {err}"
                print(f"   {label:18s} {compare(ref, got, spec)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--run":
        _, _, toolchain, path, xs, out, names = sys.argv
        names = json.loads(names)
        result = run_importer(toolchain, path, np.load(xs), names)
        np.savez(out, **{f"s{i}": result[n] for i, n in enumerate(names)})
        sys.exit(0)
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patterns", default="universal,dt")
    args = parser.parse_args()
    sys.exit(main(args.seed, tuple(args.patterns.split(","))))
