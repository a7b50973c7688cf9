"""`mpis check`: the spiking network (NIR file, spike runtime) against its rate graph (ONNX Runtime).

For every initial membrane potential v_init asked for, the checkpoint's spiking graph is exported to NIR
(one file per v_init; the file records it in its metadata) and simulated by `mpis.runtime.simulate` for
each T of the list; the rate graph is exported to ONNX with the rates of every neuron layer and run by
ONNX Runtime on the same inputs. Per layer, the spike rate counts/T of every neuron is compared with
ONNX's rate of the same neuron, both in native (B, C, H, W) layout (`layer_counts` reassembles a
polyphase layer from its phase nodes).

The reference is the DBReLU rates after K iterations from the zero state, with K = max(T list, the
checkpoint's T) unless `--iters` says otherwise: the spike rate at T estimates the equilibrium r*, and one
converged reference for every T makes the error curves comparable across T. How far the reference is
from converged is measured and reported: max |r_K − r_{K−1}| on the first batch (PyTorch, same map).
A plain v_init is not part of the rate map (it is a rounding choice of the spiking network, docs/nir-mapping.md
§3); a learned initial potential (`--imp`) is, as its v0/T share: for the model's own learned v_init the
reference of each T is an ONNX graph with horizon T.

Artifacts (ONNX, NIR, report.json, check.png) go into the report folder, `DIR/check/` next to the
checkpoint by default, with a manifest (`artifacts.json`) recording the checkpoint's SHA-256, the export
parameters and each file's size and mtime: a file is reused only when all of them still match, and a file
the manifest does not list is never overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mpis.errors import MpisError

DEFAULT_STEPS = (10, 30, 100, 300)
DEFAULT_MIN_AGREEMENT = 0.99
MANIFEST = "artifacts.json"
REPORT = "report.json"
PLOT = "check.png"
MODEL = "model"  # the v_init token for "the model's own initial potential"


# ---- parsing the command line's lists --------------------------------------------------------------
def parse_steps(text: str, flag: str = "--T") -> tuple[int, ...]:
    """'10,30,100' -> (10, 30, 100): positive integers, sorted, no duplicates."""
    try:
        steps = [int(v) for v in str(text).split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise MpisError(f"{flag} must be a comma-separated list of positive integers (e.g. 10,30,100), got {text!r}")
    return tuple(sorted(set(steps)))


@dataclass(frozen=True)
class VInit:
    """One initial membrane potential to check: `value` None = the model's own (learned IMP or its v_init)."""

    label: str
    value: float | None


def parse_v_inits(text: str, vth: float) -> tuple[VInit, ...]:
    """'0,0.5vth,model': absolute potentials, multiples of the threshold (suffix `vth`), or `model`."""
    out: dict[str, VInit] = {}
    for token in str(text).split(","):
        token = token.strip().lower()
        try:
            if token == MODEL:
                v = VInit(MODEL, None)
            elif token.endswith("vth"):
                factor = float(token[:-3] or 1)
                v = VInit(f"{factor:g}vth", factor * vth)
            else:
                v = VInit(f"{float(token):g}", float(token))
        except ValueError:
            raise MpisError(
                f"--v-init must be a comma-separated list of potentials (0.5), multiples of the threshold "
                f"(0.5vth) or 'model', got {text!r}"
            ) from None
        if v.value is not None and not math.isfinite(v.value):
            raise MpisError(f"--v-init values must be finite, got {token!r}")
        out.setdefault(v.label, v)
    return tuple(out.values())


# ---- the artifact cache ---------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Artifacts:
    """The report folder's files, each reused only when written from the same checkpoint with the same
    parameters and untouched since (size and mtime as recorded)."""

    def __init__(self, folder: Path, checkpoint_sha256: str):
        self.folder, self.sha = folder, checkpoint_sha256
        if folder.exists() and not folder.is_dir():
            raise MpisError(f"--report {folder} is not a folder")
        if not folder.parent.is_dir():
            raise MpisError(f"cannot create the report folder {folder}: {folder.parent} does not exist")
        try:
            folder.mkdir(exist_ok=True)
        except OSError as err:
            raise MpisError(f"cannot create the report folder {folder}: {err.strerror}") from None
        try:
            entries = json.loads((folder / MANIFEST).read_text()).get("files")
        except FileNotFoundError:
            entries = {}
        except (ValueError, AttributeError, OSError):
            entries = None
        if not isinstance(entries, dict):
            raise MpisError(
                f"{folder / MANIFEST} is damaged; remove it (and the files it lists) or use another --report"
            )
        self.entries: dict[str, dict] = entries

    def fresh(self, name: str, params: dict) -> bool:
        path, entry = self.folder / name, self.entries.get(name)
        if not entry or not path.is_file():
            return False
        stat = path.stat()
        return (
            entry.get("checkpoint_sha256") == self.sha
            and entry.get("params") == params
            and entry.get("size") == stat.st_size
            and entry.get("mtime_ns") == stat.st_mtime_ns
        )

    def claim(self, name: str) -> Path:
        """The path to (re)write: refused when a file is there that this cache did not write."""
        path = self.folder / name
        if path.exists() and name not in self.entries:
            raise MpisError(f"{path} exists and was not written by mpis check; move it or choose another --report")
        return path

    def record(self, name: str, params: dict) -> None:
        stat = (self.folder / name).stat()
        self.entries[name] = {
            "checkpoint_sha256": self.sha,
            "params": params,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        }
        from mpis.train.checkpoint import atomic_write

        text = json.dumps({"files": self.entries}, indent=1)
        atomic_write(self.folder / MANIFEST, lambda tmp: Path(tmp).write_text(text))


# ---- measurements ---------------------------------------------------------------------------------
@dataclass
class LayerError:
    shape: tuple[int, ...]
    mean_abs: float
    max_abs: float
    steps: int

    @property
    def mean_abs_times_t(self) -> float:
        return self.mean_abs * self.steps

    def as_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "mean_abs": self.mean_abs,
            "max_abs": self.max_abs,
            "mean_abs_times_T": self.mean_abs_times_t,
        }


@dataclass
class Row:
    """One (v_init, T): per-layer |Δrate| (plus "all": every neuron of every layer), argmax agreement,
    accuracies, synaptic operations per input against T dense rate steps."""

    v_init: str
    steps: int
    layers: dict[str, LayerError]
    agreement: float
    spike_accuracy: float
    rate_accuracy: float
    synaptic_ops: float
    dense_macs: int
    seconds: float

    @property
    def synop_ratio(self) -> float:
        dense = self.steps * self.dense_macs
        return self.synaptic_ops / dense if dense else float("nan")

    def as_dict(self) -> dict:
        return {
            "v_init": self.v_init,
            "T": self.steps,
            "layers": {name: err.as_dict() for name, err in self.layers.items()},
            "agreement": self.agreement,
            "spike_accuracy": self.spike_accuracy,
            "rate_accuracy": self.rate_accuracy,
            "synaptic_ops_per_input": self.synaptic_ops,
            "dense_macs_per_step": self.dense_macs,
            "synop_ratio": self.synop_ratio,
            "seconds": self.seconds,
        }


def loglog_slope(steps: list[int], errors: list[float]) -> float | None:
    """Least-squares slope of log(error) against log(T); None with fewer than two positive errors."""
    points = [(math.log(t), math.log(e)) for t, e in zip(steps, errors, strict=True) if e > 0]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


MIN_TOOLCHAIN_IDENTITY = 0.999  # share of spike counts a toolchain must reproduce exactly


@dataclass
class ToolchainRow:
    """One toolchain's importer on its file (`mpis export --target`), one v_init and T: the share of spike
    counts (per neuron and input) equal to mpis's, and argmax agreement with mpis and with ONNX."""

    toolchain: str
    v_init: str
    steps: int
    status: str  # "ran", or why not
    version: str = ""
    file: str = ""
    identical: float | None = None
    agreement_mpis: float | None = None
    agreement_onnx: float | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @property
    def failed(self) -> bool:
        return self.status == "ran" and self.identical < MIN_TOOLCHAIN_IDENTITY


@dataclass
class CheckReport:
    checkpoint: str
    checkpoint_sha256: str
    dataset: str
    inputs: int
    steps: tuple[int, ...]
    v_inits: tuple[VInit, ...]
    vth: float
    iterations: int
    reference: dict  # how good the reference is: see `_reference_quality`
    rows: list[Row]
    artifacts: dict[str, object]
    min_agreement: float
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    burn_in: int = 0
    layout: str = "graph"  # how the spike runtime ran the NIR graph
    toolchains: list[ToolchainRow] = field(default_factory=list)

    def row(self, v_init: str, steps: int) -> Row:
        return next(r for r in self.rows if r.v_init == v_init and r.steps == steps)

    def slopes(self) -> dict[str, dict[str, float | None]]:
        """Per v_init and layer ("all" included): the log-log slope of the mean |Δrate| over the T list."""
        out = {}
        for v in self.v_inits:
            rows = [self.row(v.label, t) for t in self.steps]
            out[v.label] = {
                name: loglog_slope(list(self.steps), [r.layers[name].mean_abs for r in rows]) for name in rows[0].layers
            }
        return out

    def failures(self) -> list[str]:
        """v_inits whose argmax agreement at the largest T is below `min_agreement`."""
        last = self.steps[-1]
        return [
            f"{self.row(v.label, last).agreement:.4f} (v_init {v.label})"
            for v in self.v_inits
            if self.row(v.label, last).agreement < self.min_agreement
        ]

    def toolchain_failures(self) -> list[str]:
        """Toolchains that ran but reproduced fewer than MIN_TOOLCHAIN_IDENTITY of mpis's spike counts."""
        return [
            f"{r.toolchain} {r.identical:.6f} (v_init {r.v_init}, T = {r.steps})" for r in self.toolchains if r.failed
        ]

    def as_dict(self) -> dict:
        return {
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "dataset": self.dataset,
            "inputs": self.inputs,
            "T": list(self.steps),
            "burn_in": self.burn_in,
            "layout": self.layout,
            "v_init": [{"label": v.label, "value": v.value} for v in self.v_inits],
            "vth": self.vth,
            "reference": {
                "what": "ONNX Runtime: DBReLU rates after K iterations from the zero state",
                "K": self.iterations,
                **self.reference,
            },
            "synop_ratio_what": "spikes x fan-out over T steps / (T x dense MACs of one rate step), per input",
            "rows": [r.as_dict() for r in self.rows],
            "slopes": self.slopes(),
            "min_agreement": self.min_agreement,
            "passed": not self.failures() and not self.toolchain_failures(),
            "artifacts": self.artifacts,
            "seconds": self.seconds,
            "toolchains": [t.as_dict() for t in self.toolchains],
            "toolchains_what": "each toolchain's own importer on its mpis export --target file (dyadic weights): "
            "share of spike counts equal to mpis's (every neuron and input), argmax agreement with mpis's spikes "
            "and with the ONNX rate graph",
        }

    def lines(self) -> list[str]:
        head = [
            f"{self.checkpoint}: {self.dataset} test set, {self.inputs} inputs; reference: ONNX Runtime, DBReLU "
            f"rates after K = {self.iterations} iterations"
            + (f"; spikes counted after a burn-in of {self.burn_in} steps" if self.burn_in else "")
            + ("; spike runtime in native layout" if self.layout == "native" else ""),
            f"  reference on the first {self.reference['inputs']} inputs: |r_K - r_K-1| mean "
            f"{self.reference['residual_mean_abs']:.1e}, max {self.reference['residual_max_abs']:.1e} (PyTorch); "
            f"ONNX Runtime vs PyTorch max |Δrate| {self.reference['onnx_vs_torch_max_abs']:.1e}",
        ]
        labels = [v.label for v in self.v_inits]
        names = list(self.rows[0].layers)
        width = max(len(n) for n in [*names, "argmax agreement", "accuracy spike / rate", "synaptic ops / dense"])
        col = 30
        out = list(head)
        for t in self.steps:
            rows = [self.row(label, t) for label in labels]
            out.append(f"T = {t}")
            out.append(f"  {'':<{width}} {'':<11}" + "".join(f"{'v_init ' + label:>{col}}" for label in labels))
            out.append(f"  {'layer':<{width}} {'shape':<11}" + f"{'mean |Δr|   ·T     max |Δr|':>{col}}" * len(rows))
            for name in names:
                shape = "x".join(map(str, rows[0].layers[name].shape))
                cells = "".join(
                    f"{e.mean_abs:>12.5f}{e.mean_abs_times_t:>7.3f}{e.max_abs:>11.4f}"
                    for e in (r.layers[name] for r in rows)
                )
                out.append(f"  {name:<{width}} {shape:<11}{cells}")
            out.append(f"  {'argmax agreement':<{width}} {'':<11}" + "".join(f"{r.agreement:>{col}.4f}" for r in rows))
            out.append(
                f"  {'accuracy spike / rate':<{width}} {'':<11}"
                + "".join(f"{f'{r.spike_accuracy:.4f} / {r.rate_accuracy:.4f}':>{col}}" for r in rows)
            )
            out.append(
                f"  {'synaptic ops / dense':<{width}} {'':<11}" + "".join(f"{r.synop_ratio:>{col}.2%}" for r in rows)
            )
        if len(self.steps) > 1:
            for label, slopes in self.slopes().items():
                text = ", ".join(f"{n} {'n/a' if s is None else f'{s:.2f}'}" for n, s in slopes.items())
                out.append(f"log-log slope of mean |Δrate| vs T, v_init {label}: {text}")
        if self.toolchains:
            out += toolchain_lines(self.toolchains)
        return out


def toolchain_lines(rows: list[ToolchainRow]) -> list[str]:
    """The toolchains' table: their own importers on their files, against mpis and ONNX."""
    out = [
        "toolchains (their own NIR importers, mpis export --target files, dyadic weights):",
        f"  {'toolchain':<20} {'v_init':<8} {'T':>5} {'identical spike counts':>23} {'argmax = mpis':>14} "
        f"{'argmax = ONNX':>14} {'seconds':>8}",
    ]
    for r in rows:
        name = f"{r.toolchain} {r.version}".strip()
        if r.status != "ran":
            out.append(f"  {name:<20} {r.v_init:<8} {r.steps:>5} {r.status}")
            continue
        out.append(
            f"  {name:<20} {r.v_init:<8} {r.steps:>5} {r.identical:>23.6f} {r.agreement_mpis:>14.4f} "
            f"{r.agreement_onnx:>14.4f} {r.seconds:>8.1f}"
        )
    return out


# ---- the check ------------------------------------------------------------------------------------
@dataclass
class CheckOptions:
    checkpoint: Path
    steps: tuple[int, ...] = DEFAULT_STEPS
    v_inits: str | None = None  # None: DEFAULT_V_INITS
    nir_files: tuple[Path, ...] = ()
    report_dir: Path | None = None
    iterations: int | None = None
    dataset: str | None = None
    data_dir: str | None = None
    limit: int | None = None
    batch: int = 128
    device: str = "cpu"
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    max_param_growth: float | None = None
    progress: bool = True
    threads: int = 1
    burn_in: int = 0  # steps simulated before spikes are counted (the loop settles from the zero state)
    layout: str = "graph"  # spike runtime: every node as written, or mpis layers in native layout (faster)
    toolchains: str | None = None  # e.g. "norse,sinabs=/venv/bin/python": their own importers, on toolchain files


DEFAULT_V_INITS = "0,0.5vth"


@dataclass
class _Spiking:
    """One spiking graph to check: its v_init, file, compiled program and the reference horizon."""

    v_init: VInit
    path: Path
    learned: bool  # the graph starts from a learned IMP: the reference carries its v0/T share
    graph: object = None
    program: object = None


def _onnx_outputs(path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


@contextlib.contextmanager
def torch_threads(threads: int):
    """Intra-op threads for a block. The default is 1: the per-step ops of these graphs are small, and on a
    shared machine extra threads stall (measured: 28 s vs 1.3 s for one 20-step run of a tiny net)."""
    if threads < 1:
        raise MpisError(f"--threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_check(opts: CheckOptions) -> CheckReport:
    """Export (or reuse) the artifacts, run both graphs on the test set, return the measurements."""
    with torch_threads(opts.threads):
        return _run_check(opts)


def _run_check(opts: CheckOptions) -> CheckReport:

    from mpis.export import DEFAULT_MAX_PARAM_GROWTH
    from mpis.export.nir import export_nir
    from mpis.export.nir_nodes import read_nir
    from mpis.export.onnx import INPUT_NAME, LOGITS_NAME, export_onnx
    from mpis.runtime.simulate import compile_graph
    from mpis.train.checkpoint import load_checkpoint
    from mpis.train.data import load_dataset

    start = time.perf_counter()
    for flag, value in (("--iters", opts.iterations), ("--batch", opts.batch), ("--limit", opts.limit)):
        if value is not None and value < 1:
            raise MpisError(f"{flag} must be >= 1, got {value}")
    if opts.burn_in < 0:
        raise MpisError(f"--burn-in must be >= 0, got {opts.burn_in}")
    if not (math.isfinite(opts.min_agreement) and opts.min_agreement >= 0):
        raise MpisError(f"--min-agreement must be a fraction >= 0 (e.g. 0.99), got {opts.min_agreement:g}")
    toolchains = ()
    if opts.toolchains is not None:  # refused before minutes of simulation, not after
        from mpis.spike.toolchains import parse_toolchains

        toolchains = parse_toolchains(opts.toolchains)
    if opts.nir_files and opts.v_inits is not None:
        raise MpisError("pass either --v-init (exported here) or --nir files (their own v_init), not both")
    steps = tuple(sorted(set(opts.steps)))
    if not steps or min(steps) < 1:
        raise MpisError(f"every T must be >= 1, got {','.join(map(str, opts.steps))}")
    from mpis.train.loop import resolve_device

    resolve_device(opts.device)  # before any file is written
    checkpoint = Path(opts.checkpoint).resolve()  # the report names files wherever it is read from
    ckpt = load_checkpoint(checkpoint)
    net, vth = ckpt.net, ckpt.net.neuron.vth
    if ckpt.train_cfg.method != "mpis":
        raise MpisError(f"{checkpoint} was trained with --method {ckpt.train_cfg.method}; mpis check needs an MPIS net")
    v_inits = () if opts.nir_files else parse_v_inits(opts.v_inits or DEFAULT_V_INITS, vth)
    iterations = opts.iterations or max(steps[-1], ckpt.solver_cfg.T)
    sha = file_sha256(checkpoint)
    folder = Path(opts.report_dir).resolve() if opts.report_dir else checkpoint.parent / "check"
    cache = Artifacts(folder, sha)

    # data: the spike graph sees frames=T for event data, the rate graph their mean
    dataset = opts.dataset or ckpt.train_cfg.dataset
    data_dir = opts.data_dir if opts.dataset else (opts.data_dir or ckpt.train_cfg.data_dir)
    splits = {t: load_dataset(dataset, data_dir, frames=t) for t in (steps if dataset == "nmnist" else steps[:1])}
    first = splits[steps[0]]
    if tuple(first.input_shape) != tuple(ckpt.input_shape):
        shape, expected = ("x".join(map(str, s)) for s in (first.input_shape, ckpt.input_shape))
        raise MpisError(f"{dataset} inputs are {shape}, but {checkpoint} takes {expected}")
    if first.classes != net.arch.classes:
        raise MpisError(f"{dataset} has {first.classes} classes, the net {net.arch.classes}")
    count = len(first.test) if opts.limit is None else min(opts.limit, len(first.test))
    if count == 0:
        raise MpisError(f"the {dataset} test set is empty")

    def sample_for(t: int, index: range) -> tuple[torch.Tensor, torch.Tensor]:
        test = splits[t if dataset == "nmnist" else steps[0]].test
        items = [test[i] for i in index]
        return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])

    # the spiking graphs: exported here (one per v_init) or given
    growth = DEFAULT_MAX_PARAM_GROWTH if opts.max_param_growth is None else opts.max_param_growth
    if growth <= 0:
        raise MpisError(f"--max-param-growth must be > 0, got {growth:g}")
    spiking: list[_Spiking] = []
    nir_paths: dict[str, str] = {}
    for v in v_inits:
        name = f"spikes_v{v.label}.nir"
        params = {"kind": "nir", "flavour": "exact", "v_init": v.value, "T": ckpt.solver_cfg.T}
        if not cache.fresh(name, params):
            export_nir(
                net, cache.claim(name), "exact", v.value, ckpt.solver_cfg.T, ckpt.train_cfg.dataset, True, growth
            )
            cache.record(name, params)
        spiking.append(_Spiking(v, folder / name, v.value is None and len(net.imp) > 0))
    for path in (Path(p).resolve() for p in opts.nir_files):
        graph = read_nir(path)
        recorded = graph.metadata.get("v_init", "?")
        label = path.stem if isinstance(recorded, str) else f"{float(recorded):g}"
        if any(s.v_init.label == label for s in spiking):
            label = f"{label} ({path.name})"
        value = float(recorded) if not isinstance(recorded, str) else None
        spiking.append(_Spiking(VInit(label, value), path, recorded == "learned" and len(net.imp) > 0, graph))
    if not spiking:
        raise MpisError("nothing to check: --v-init is empty")
    v_inits = tuple(s.v_init for s in spiking)
    layer_names = [n.name for n in net.neurons]
    for s in spiking:
        nir_paths[s.v_init.label] = str(s.path)
        graph = s.graph if s.graph is not None else read_nir(s.path)
        s.program = compile_graph(graph, opts.device, layout=opts.layout)
        if tuple(s.program.input_shape) != tuple(first.input_shape):
            shape, expected = ("x".join(map(str, x)) for x in (first.input_shape, s.program.input_shape))
            raise MpisError(f"{dataset} inputs are {shape}, but the graph's Input in {s.path} takes {expected}")
        layers = sorted(str(k) for k in graph.metadata.get("layers", {}))
        if layers != sorted(layer_names):
            raise MpisError(
                f"{s.path} has neuron layers {', '.join(layers) or '(none recorded)'}; the checkpoint's rate graph "
                f"has {', '.join(layer_names)}: not the same network"
            )

    # the rate graphs: one for a plain v_init; one per T (horizon T) for a learned IMP
    horizons = sorted({t if s.learned else 0 for s in spiking for t in steps})
    onnx_paths: dict[int, Path] = {}
    # parity sample of the export: 32 inputs (in a loop that is not a contraction for every input, rounding
    # can grow with K past the export's 1e-5 on some inputs; the check measures ONNX Runtime against PyTorch
    # itself, on the first batch, and reports it)
    export_sample = sample_for(steps[0], range(min(count, opts.batch)))[0]
    if export_sample.dim() == 5:
        export_sample = export_sample.mean(1)
    for h in horizons:
        name = f"rates_K{iterations}" + (f"_h{h}" if h else "") + ".onnx"
        params = {"kind": "onnx", "K": iterations, "horizon": h or None, "with_rates": True}
        if not cache.fresh(name, params):
            export_onnx(net, cache.claim(name), iterations, True, export_sample[:32], True, horizon=h or None)
            cache.record(name, params)
        onnx_paths[h] = folder / name
    import onnxruntime as ort

    sessions = {}
    options = ort.SessionOptions()
    options.intra_op_num_threads = opts.threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for h, path in onnx_paths.items():
        sessions[h] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        missing = {f"rate_{n}" for n in layer_names} - set(_onnx_outputs(path))
        if missing:
            raise MpisError(f"{path} has no output(s) {', '.join(sorted(missing))}; export it with rates")

    h = max(horizons)
    reference = _reference_quality(net, sessions[h], export_sample, iterations, h or None, layer_names)

    # the runs: batches x v_init x T
    acc = {
        (s.v_init.label, t): {"abs": {}, "max": {}, "n": {}, "shape": {}, "agree": 0, "spike": 0, "rate": 0, "ops": 0.0}
        for s in spiking
        for t in steps
    }
    seconds = {key: 0.0 for key in acc}
    onnx_preds: dict[int, list[torch.Tensor]] = {}  # ONNX argmax per T, for the toolchains' rows
    from tqdm import tqdm

    batches = [range(i, min(i + opts.batch, count)) for i in range(0, count, opts.batch)]
    bar = tqdm(total=len(batches) * len(steps) * len(spiking), desc="simulating", unit="run", disable=not opts.progress)
    from mpis.runtime.simulate import layer_counts, synaptic_ops

    try:
        for index in batches:
            references: dict[tuple[int, int], dict[str, np.ndarray]] = {}
            for t in steps:
                x, y = sample_for(t, index)
                rate_input = (x.mean(1) if x.dim() == 5 else x).numpy().astype(np.float32)
                for s in spiking:
                    h = t if s.learned else 0
                    key = (t if dataset == "nmnist" else 0, h)
                    if key not in references:
                        session = sessions[h]
                        names = [o.name for o in session.get_outputs()]
                        references[key] = dict(zip(names, session.run(None, {INPUT_NAME: rate_input}), strict=True))
                    ref = references[key]
                    tick = time.perf_counter()
                    result = s.program.run(x, t, opts.burn_in)
                    a = acc[(s.v_init.label, t)]
                    if tuple(result.scores.shape[1:]) != (first.classes,):
                        raise MpisError(
                            f"{s.path} outputs {tuple(result.scores.shape[1:])} per input, {dataset} has "
                            f"{first.classes} classes"
                        )
                    spike_pred = result.scores.argmax(1).cpu()
                    rate_pred = torch.from_numpy(ref[LOGITS_NAME]).argmax(1)
                    if s is spiking[0]:
                        onnx_preds.setdefault(t, []).append(rate_pred)
                    a["agree"] += int((spike_pred == rate_pred).sum())
                    a["spike"] += int((spike_pred == y).sum())
                    a["rate"] += int((rate_pred == y).sum())
                    a["ops"] += float(synaptic_ops(s.program, result.spike_counts).sum())
                    counts = layer_counts(s.program.graph, result.spike_counts)
                    for layer in layer_names:
                        rate = counts[layer].double().cpu() / t
                        want = torch.from_numpy(ref[f"rate_{layer}"]).double()
                        if rate.shape != want.shape:
                            raise MpisError(
                                f"layer {layer!r}: {s.path} gives {tuple(rate.shape[1:])}, the rate graph "
                                f"{tuple(want.shape[1:])}: not the same network"
                            )
                        diff = (rate - want).abs()
                        a["abs"][layer] = a["abs"].get(layer, 0.0) + float(diff.sum())
                        a["max"][layer] = max(a["max"].get(layer, 0.0), float(diff.max()))
                        a["n"][layer] = a["n"].get(layer, 0) + diff.numel()
                        a["shape"][layer] = tuple(want.shape[1:])
                    seconds[(s.v_init.label, t)] += time.perf_counter() - tick
                    bar.update()
    finally:
        bar.close()

    from mpis.runtime.simulate import dense_macs

    rows = []
    for s in spiking:
        macs = dense_macs(s.program)
        for t in steps:
            a = acc[(s.v_init.label, t)]
            layers = {n: LayerError(a["shape"][n], a["abs"][n] / a["n"][n], a["max"][n], t) for n in layer_names}
            total_n = sum(a["n"].values())
            layers["all"] = LayerError((total_n // count,), sum(a["abs"].values()) / total_n, max(a["max"].values()), t)
            rows.append(
                Row(
                    s.v_init.label,
                    t,
                    layers,
                    a["agree"] / count,
                    a["spike"] / count,
                    a["rate"] / count,
                    a["ops"] / count,
                    macs,
                    seconds[(s.v_init.label, t)],
                )
            )
    toolchain_rows = []
    if toolchains:
        preds = {t: torch.cat(p) for t, p in onnx_preds.items()}
        toolchain_rows = _run_toolchains(toolchains, ckpt, v_inits, steps, sample_for, count, opts.batch, cache, preds)
    artifacts = {
        "folder": str(folder),
        "onnx": {str(h or "none"): str(p) for h, p in onnx_paths.items()},
        "nir": nir_paths,
    }
    if toolchain_rows:
        artifacts["toolchains"] = sorted({r.file for r in toolchain_rows if r.file})
    return CheckReport(
        str(checkpoint),
        sha,
        dataset,
        count,
        steps,
        v_inits,
        vth,
        iterations,
        reference,
        rows,
        artifacts,
        opts.min_agreement,
        time.perf_counter() - start,
        burn_in=opts.burn_in,
        layout=opts.layout,
        toolchains=toolchain_rows,
    )


def _run_toolchains(toolchains, ckpt, v_inits, steps, sample_for, count: int, batch: int, cache, onnx_preds):
    """Each toolchain's own importer on its file (exported here, one per numeric v_init) at every T,
    against mpis's spikes of the same dyadic net (simulated once for all toolchains) and ONNX's argmax."""
    from mpis.export import DEFAULT_WEIGHT_BITS
    from mpis.export.fixed_point import dyadic_copy
    from mpis.export.toolchains import export_toolchain_nir
    from mpis.spike.toolchains import missing, run_toolchain

    rows: list[ToolchainRow] = []
    numeric = [v for v in v_inits if v.value is not None]
    reference = dyadic_copy(ckpt.net, DEFAULT_WEIGHT_BITS)[0]
    ready = []
    for toolchain in toolchains:
        reason = missing(toolchain)
        if reason:
            rows += [ToolchainRow(toolchain.name, v.label, t, reason) for v in numeric for t in steps]
        else:
            ready.append(toolchain)
    for v in numeric:
        paths = {}
        for toolchain in ready:
            name = f"toolchain_{toolchain.name}_v{v.label}.nir"
            params = {"kind": "toolchain", "target": toolchain.name, "v_init": v.value, "bits": DEFAULT_WEIGHT_BITS}
            if not cache.fresh(name, params):
                export_toolchain_nir(
                    ckpt.net, cache.claim(name), toolchain.name, v.value, ckpt.solver_cfg.T, overwrite=True
                )
                cache.record(name, params)
            paths[toolchain] = cache.folder / name
        reference.v_init = v.value
        for t in steps:
            x, _ = sample_for(t, range(count))
            runs = {toolchain: run_toolchain(toolchain, paths[toolchain], x, t, batch) for toolchain in ready}
            same, agree, total = dict.fromkeys(runs, 0), dict.fromkeys(runs, 0), 0
            for start in range(0, count, batch):
                part = slice(start, start + batch)
                record = reference.simulate(x[part], t)
                mpis_pred = reference.classify(record.state_rates).argmax(1)
                total += sum(c.numel() for c in record.spike_counts.values())
                for toolchain, run in runs.items():
                    same[toolchain] += sum(
                        int((run.counts[k][part] == c).sum()) for k, c in record.spike_counts.items()
                    )
                    agree[toolchain] += int((run.logits[part].argmax(1) == mpis_pred).sum())
            for toolchain, run in runs.items():
                onnx = float((run.logits.argmax(1) == onnx_preds[t]).float().mean())
                identical, agreement = same[toolchain] / total, agree[toolchain] / count
                row = ToolchainRow(toolchain.name, v.label, t, "ran", run.version, str(paths[toolchain]), identical)
                row.agreement_mpis, row.agreement_onnx, row.seconds = agreement, onnx, run.seconds
                rows.append(row)
    return rows


def _reference_quality(net, session, x: torch.Tensor, iterations: int, horizon: int | None, layers) -> dict:
    """On `x`: |r_K − r_{K−1}| (how far K iterations are from a fixed point; PyTorch, the same map) and
    max |ONNX Runtime − PyTorch| of the rates after K iterations."""
    from mpis.export.onnx import INPUT_NAME

    folded = net.folded_copy()
    with torch.no_grad():
        last = folded.rate_iterations(x, iterations, horizon)
        before = folded.rate_iterations(x, iterations - 1, horizon)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {INPUT_NAME: x.numpy()}), strict=True))
    residual = torch.cat([(last[n] - before[n]).abs().flatten() for n in layers])
    onnx_delta = max(float((torch.from_numpy(got[f"rate_{n}"]) - last[n]).abs().max()) for n in layers)
    return {
        "inputs": len(x),
        "residual_mean_abs": float(residual.mean()),
        "residual_max_abs": float(residual.max()),
        "residual_what": "|r_K - r_(K-1)| over every neuron of the first inputs, PyTorch (same map)",
        "onnx_vs_torch_max_abs": onnx_delta,
    }


# ---- report files ---------------------------------------------------------------------------------
def write_report(report: CheckReport, folder: Path) -> dict[str, Path]:
    """report.json (every number of the table, and the inputs) and check.png (mean |Δrate| vs T)."""
    from mpis.train.checkpoint import atomic_write

    cache = Artifacts(folder, report.checkpoint_sha256)
    json_path, png_path = cache.claim(REPORT), cache.claim(PLOT)
    data = report.as_dict()
    data["artifacts"]["report"] = str(json_path)
    data["artifacts"]["plot"] = str(png_path)
    text = json.dumps(data, indent=1, allow_nan=True)
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(text + "\n"))
    cache.record(REPORT, {"kind": "report"})
    atomic_write(png_path, lambda tmp: _plot(report, Path(tmp)))
    cache.record(PLOT, {"kind": "plot"})
    report.files = {"report": str(json_path), "plot": str(png_path)}
    return {"report": json_path, "plot": png_path}


def _plot(report: CheckReport, path: Path) -> None:
    """One panel per v_init: mean |Δrate| vs T of every layer (labelled, one colour each) and of all
    neurons together (thick), against the 1/T and 0.5/T lines; the x ticks are the T values measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    steps = np.array(report.steps, dtype=float)
    panels = len(report.v_inits)
    ran = [r for r in report.toolchains if r.status == "ran"]
    fig, axes = plt.subplots(1, panels + bool(ran), figsize=(5.2 * (panels + bool(ran)), 4.4), dpi=100, squeeze=False)
    if ran:
        _toolchain_panel(axes[0][-1], ran)
        axes = axes[:, :-1]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    grid = np.geomspace(steps.min(), steps.max(), 50) if len(steps) > 1 else steps
    for ax, v in zip(axes[0], report.v_inits, strict=True):
        rows = [report.row(v.label, t) for t in report.steps]
        slopes = report.slopes()[v.label]
        layers = [name for name in rows[0].layers if name != "all"]
        for i, name in enumerate(layers):
            slope = slopes[name]
            ax.plot(
                steps,
                [r.layers[name].mean_abs for r in rows],
                "o-",
                color=colours[i % len(colours)],
                lw=1,
                ms=3,
                label=f"{name} (slope {'n/a' if slope is None else f'{slope:.2f}'})",
            )
        slope = slopes["all"]
        ax.plot(
            steps,
            [r.layers["all"].mean_abs for r in rows],
            "s-",
            color="black",
            lw=2.2,
            label=f"all neurons (slope {'n/a' if slope is None else f'{slope:.2f}'})",
        )
        ax.plot(grid, 1.0 / grid, "k--", lw=1, label="1/T")
        ax.plot(grid, 0.5 / grid, "k:", lw=1, label="0.5/T")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(steps))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(t) for t in report.steps])
        ax.set_xlabel("T (time steps)")
        ax.set_title(f"v_init {v.label}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("mean |spike rate − ONNX rate|")
    for ax in axes[0][1:]:
        ax.sharey(axes[0][0])
    fig.suptitle(
        f"{Path(report.checkpoint).name}: {report.dataset}, {report.inputs} inputs, K = {report.iterations}",
        fontsize=10,
    )
    fig.tight_layout()
    with open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def _toolchain_panel(ax, rows: list[ToolchainRow]) -> None:
    """Per toolchain and v_init: identical spike counts and argmax agreement with ONNX, against T."""
    from matplotlib.ticker import FixedLocator, NullLocator

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    series = sorted({(r.toolchain, r.v_init) for r in rows})
    for i, (name, v_init) in enumerate(series):
        mine = sorted((r for r in rows if (r.toolchain, r.v_init) == (name, v_init)), key=lambda r: r.steps)
        t = [r.steps for r in mine]
        colour = colours[i % len(colours)]
        ax.plot(t, [r.identical for r in mine], "o-", color=colour, label=f"{name}, v_init {v_init}: identical counts")
        ax.plot(
            t, [r.agreement_onnx for r in mine], "s--", color=colour, label=f"{name}, v_init {v_init}: argmax = ONNX"
        )
    all_t = sorted({r.steps for r in rows})
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(all_t))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(t) for t in all_t])
    ax.set_ylim(min(0.9, min(min(r.identical, r.agreement_onnx) for r in rows) - 0.01), 1.005)
    ax.set_xlabel("T (time steps)")
    ax.set_title("toolchains' own importers (mpis export --target)", fontsize=10)
    ax.set_ylabel("share (spike counts / test inputs)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def check(opts: CheckOptions) -> CheckReport:
    """run_check, write the report files; the caller prints `report.lines()` and tests `failures()`."""
    report = run_check(opts)
    write_report(report, Path(report.artifacts["folder"]))
    return report


def cli_check(args) -> int:
    """`mpis check` (mpis/cli.py): print the table, write the report, fail below --min-agreement."""
    opts = CheckOptions(
        checkpoint=Path(args.checkpoint),
        steps=parse_steps(args.T),
        v_inits=args.v_init,
        nir_files=tuple(Path(p) for p in args.nir or ()),
        report_dir=Path(args.report) if args.report else None,
        iterations=args.iters,
        dataset=args.dataset,
        data_dir=args.data_dir,
        limit=args.limit,
        batch=args.batch,
        device=args.device,
        min_agreement=args.min_agreement,
        max_param_growth=args.max_param_growth,
        progress=not args.quiet,
        threads=args.threads,
        burn_in=args.burn_in,
        layout=args.layout,
        toolchains=args.toolchain,
    )
    report = check(opts)
    for line in report.lines():
        print(line)
    print(f"wrote {report.files['report']} and {report.files['plot']} ({report.seconds:.0f} s)")
    print(verdict(report))
    return 0


def verdict(report: CheckReport) -> str:
    """The PASS line to print; MpisError (the FAIL line) when the argmax agreement at the largest T is
    below the report's min_agreement."""
    failures = report.failures()
    if failures:
        raise MpisError(
            f"FAIL: argmax agreement spike vs ONNX at T = {report.steps[-1]} is {', '.join(failures)}, "
            f"below --min-agreement {report.min_agreement:g}"
        )
    broken = report.toolchain_failures()
    if broken:
        raise MpisError(f"FAIL: identical spike counts {', '.join(broken)}, below {MIN_TOOLCHAIN_IDENTITY:g} of mpis's")
    last = report.steps[-1]
    agreements = ", ".join(f"{report.row(v.label, last).agreement:.4f} (v_init {v.label})" for v in report.v_inits)
    return (
        f"PASS: argmax agreement spike vs ONNX at T = {last} is {agreements}, "
        f"at least --min-agreement {report.min_agreement:g}"
    )
