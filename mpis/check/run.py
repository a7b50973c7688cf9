"""`mpis check`: the spiking network (NIR file, spike runtime) against its rate graph (ONNX Runtime).

For every initial membrane potential v_init asked for, the checkpoint's spiking graph is exported to NIR
(one file per v_init; the file records it in its metadata) and simulated by `mpis.spike.simulate` for
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
the manifest does not list is never overwritten. An earlier check's report.json and check.png are outputs, not
cache: as `mpis export` does, they are replaced only with --overwrite, and refused before any work.

The steps, in order: `validated` options (before anything is written), the `check_data`, the `spiking_graphs`
and `rate_graphs` (artifacts), `reference_quality`, the `spike_runs`, the `toolchain_runs`, the report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mpis.check.artifacts import Artifacts, file_sha256
from mpis.check.options import DEFAULT_V_INITS, CheckOptions, VInit, parse_steps, parse_v_inits
from mpis.check.report import PLOT, REPORT, CheckReport, LayerError, Row, ToolchainRow, verdict, write_report
from mpis.errors import MpisError
from mpis.export import DEFAULT_MAX_PARAM_GROWTH, DEFAULT_WEIGHT_BITS
from mpis.export.fixed_point import dyadic_copy
from mpis.export.nir import export_nir
from mpis.export.nir_nodes import read_nir
from mpis.export.onnx import INPUT_NAME, LOGITS_NAME, export_onnx
from mpis.export.reference import on_input_grid
from mpis.export.toolchains import export_toolchain_nir
from mpis.spike.graph_layout import Program, counts_model_synapses, dense_macs, synaptic_ops
from mpis.spike.simulate import compile_graph, layer_counts
from mpis.spike.toolchains import Toolchain, missing, parse_toolchains, run_toolchain
from mpis.threads import torch_threads
from mpis.train.checkpoint import Checkpoint, load_checkpoint
from mpis.train.data import load_dataset, playback_frames
from mpis.train.loop import resolve_device


@dataclass
class _Spiking:
    """One spiking graph to check: its v_init, file, compiled program and the reference horizon."""

    v_init: VInit
    path: Path
    learned: bool  # the graph starts from a learned IMP: the reference carries its v0/T share
    graph: object = None
    program: Program | None = None


@dataclass
class CheckData:
    """The test set as both graphs see it: event data as T frames for the spike graph (one split per T),
    their mean for the rate graph; `count` inputs of it are checked."""

    dataset: str
    splits: dict[int, object]
    count: int
    classes: int
    input_shape: tuple[int, ...]

    def sample(self, steps: int, index: range) -> tuple[torch.Tensor, torch.Tensor]:
        test = self.splits[steps if steps in self.splits else min(self.splits)].test
        items = [test[i] for i in index]
        return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


@dataclass
class _Plan:
    """The options checked and resolved, before anything is written."""

    steps: tuple[int, ...]
    toolchains: tuple[Toolchain, ...]
    growth: float
    folder: Path  # the report folder


def validated(opts: CheckOptions) -> _Plan:
    for flag, value in (("--iters", opts.iterations), ("--batch", opts.batch), ("--limit", opts.limit)):
        if value is not None and value < 1:
            raise MpisError(f"{flag} must be >= 1, got {value}")
    if opts.burn_in < 0:
        raise MpisError(f"--burn-in must be >= 0, got {opts.burn_in}")
    if not (math.isfinite(opts.min_agreement) and opts.min_agreement >= 0):
        raise MpisError(f"--min-agreement must be a fraction >= 0 (e.g. 0.99), got {opts.min_agreement:g}")
    toolchains = parse_toolchains(opts.toolchains) if opts.toolchains is not None else ()  # before minutes of work
    if opts.nir_files and opts.v_inits is not None:
        raise MpisError("pass either --v-init (exported here) or --nir files (their own v_init), not both")
    steps = tuple(sorted(set(opts.steps)))
    if not steps or min(steps) < 1:
        raise MpisError(f"every T must be >= 1, got {','.join(map(str, opts.steps))}")
    growth = DEFAULT_MAX_PARAM_GROWTH if opts.max_param_growth is None else opts.max_param_growth
    if growth <= 0:
        raise MpisError(f"--max-param-growth must be > 0, got {growth:g}")
    resolve_device(opts.device)
    folder = Path(opts.report_dir).resolve() if opts.report_dir else Path(opts.checkpoint).resolve().parent / "check"
    for name in (REPORT, PLOT):
        if (folder / name).exists() and not opts.overwrite:
            raise MpisError(
                f"{folder / name} already exists (an earlier check's); choose another --report or pass --overwrite"
            )
    return _Plan(steps, toolchains, growth, folder)


def check_data(opts: CheckOptions, ckpt: Checkpoint, checkpoint: Path, steps: tuple[int, ...]) -> CheckData:
    dataset = opts.dataset or ckpt.train_cfg.dataset
    data_dir = opts.data_dir if opts.dataset else (opts.data_dir or ckpt.train_cfg.data_dir)
    events = ckpt.train_cfg.events
    per_t = steps if dataset == "nmnist" else steps[:1]
    frames = {t: playback_frames(events, t, ckpt.solver_cfg.T) for t in per_t}
    splits = {t: load_dataset(dataset, data_dir, frames=frames[t], events=events) for t in per_t}
    first = splits[steps[0]]
    if tuple(first.input_shape) != tuple(ckpt.input_shape):
        shape, expected = ("x".join(map(str, s)) for s in (first.input_shape, ckpt.input_shape))
        raise MpisError(f"{dataset} inputs are {shape}, but {checkpoint} takes {expected}")
    if first.classes != ckpt.net.arch.classes:
        raise MpisError(f"{dataset} has {first.classes} classes, the net {ckpt.net.arch.classes}")
    count = len(first.test) if opts.limit is None else min(opts.limit, len(first.test))
    if count == 0:
        raise MpisError(f"the {dataset} test set is empty")
    return CheckData(dataset, splits, count, first.classes, tuple(first.input_shape))


def spiking_graphs(
    opts: CheckOptions, ckpt: Checkpoint, v_inits: tuple[VInit, ...], cache: Artifacts, data: CheckData, growth: float
) -> list[_Spiking]:
    """The NIR graphs to simulate, compiled: exported here (one per v_init) or given with --nir."""
    net = ckpt.net
    spiking: list[_Spiking] = []
    for v in v_inits:
        name = f"spikes_v{v.label}.nir"
        params = {"kind": "nir", "flavour": "exact", "v_init": v.value, "T": ckpt.solver_cfg.T}
        if not cache.fresh(name, params):
            export_nir(
                net, cache.claim(name), "exact", v.value, ckpt.solver_cfg.T, ckpt.train_cfg.dataset, True, growth
            )
            cache.record(name, params)
        spiking.append(_Spiking(v, cache.folder / name, v.value is None and len(net.imp) > 0))
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
    layer_names = [n.name for n in net.neurons]
    for s in spiking:
        graph = s.graph if s.graph is not None else read_nir(s.path)
        s.program = compile_graph(graph, opts.device, layout=opts.layout)
        if tuple(s.program.input_shape) != data.input_shape:
            shape, expected = ("x".join(map(str, x)) for x in (data.input_shape, s.program.input_shape))
            raise MpisError(f"{data.dataset} inputs are {shape}, but the graph's Input in {s.path} takes {expected}")
        layers = sorted(str(k) for k in graph.metadata.get("layers", {}))
        if layers != sorted(layer_names):
            raise MpisError(
                f"{s.path} has neuron layers {', '.join(layers) or '(none recorded)'}; the checkpoint's rate graph "
                f"has {', '.join(layer_names)}: not the same network"
            )
    return spiking


def rate_graphs(ckpt: Checkpoint, spiking, steps, iterations: int, cache: Artifacts, sample, threads: int):
    """The ONNX rate graphs with every layer's rates, one for a plain v_init and one per T (horizon T) for a
    learned IMP, and their ONNX Runtime sessions: ({horizon: path}, {horizon: session})."""
    import onnx
    import onnxruntime as ort

    paths: dict[int, Path] = {}
    for h in sorted({t if s.learned else 0 for s in spiking for t in steps}):
        name = f"rates_K{iterations}" + (f"_h{h}" if h else "") + ".onnx"
        params = {"kind": "onnx", "K": iterations, "horizon": h or None, "with_rates": True}
        if not cache.fresh(name, params):
            export_onnx(ckpt.net, cache.claim(name), iterations, True, sample[:32], True, horizon=h or None)
            cache.record(name, params)
        paths[h] = cache.folder / name
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {}
    for h, path in paths.items():
        sessions[h] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outputs = {o.name for o in onnx.load(str(path), load_external_data=False).graph.output}
        missing_rates = {f"rate_{n.name}" for n in ckpt.net.neurons} - outputs
        if missing_rates:
            raise MpisError(f"{path} has no output(s) {', '.join(sorted(missing_rates))}; export it with rates")
    return paths, sessions


def spike_runs(opts: CheckOptions, spiking, sessions, data: CheckData, steps, layer_names) -> tuple[list[Row], dict]:
    """Every batch x v_init x T through the spike runtime, against ONNX's rates and argmax: the rows, and
    ONNX's argmax per T (for the toolchains' rows)."""
    from tqdm import tqdm

    acc = {
        (s.v_init.label, t): {"abs": {}, "max": {}, "n": {}, "shape": {}, "agree": 0, "spike": 0, "rate": 0, "ops": 0.0}
        for s in spiking
        for t in steps
    }
    seconds = dict.fromkeys(acc, 0.0)
    onnx_preds: dict[int, list[torch.Tensor]] = {}
    batches = [range(i, min(i + opts.batch, data.count)) for i in range(0, data.count, opts.batch)]
    bar = tqdm(total=len(batches) * len(steps) * len(spiking), desc="simulating", unit="run", disable=not opts.progress)
    try:
        for index in batches:
            references: dict[tuple[int, int], dict[str, np.ndarray]] = {}
            for t in steps:
                x, y = data.sample(t, index)
                rate_input = (x.mean(1) if x.dim() == 5 else x).numpy().astype(np.float32)
                for s in spiking:
                    h = t if s.learned else 0
                    key = (t if data.dataset == "nmnist" else 0, h)
                    if key not in references:
                        session = sessions[h]
                        names = [o.name for o in session.get_outputs()]
                        references[key] = dict(zip(names, session.run(None, {INPUT_NAME: rate_input}), strict=True))
                    ref = references[key]
                    tick = time.perf_counter()
                    result = s.program.run(x, t, opts.burn_in)
                    a = acc[(s.v_init.label, t)]
                    if tuple(result.scores.shape[1:]) != (data.classes,):
                        raise MpisError(
                            f"{s.path} outputs {tuple(result.scores.shape[1:])} per input, {data.dataset} has "
                            f"{data.classes} classes"
                        )
                    spike_pred = result.scores.argmax(1).cpu()
                    rate_pred = torch.from_numpy(ref[LOGITS_NAME]).argmax(1)
                    if s is spiking[0]:
                        onnx_preds.setdefault(t, []).append(rate_pred)
                    a["agree"] += int((spike_pred == rate_pred).sum())
                    a["spike"] += int((spike_pred == y).sum())
                    a["rate"] += int((rate_pred == y).sum())
                    if counts_model_synapses(s.program):
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
    rows, count = [], data.count
    for s in spiking:
        macs = dense_macs(s.program) if counts_model_synapses(s.program) else 0  # 0: not counted
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
    return rows, {t: torch.cat(p) for t, p in onnx_preds.items()}


def run_check(opts: CheckOptions) -> CheckReport:
    """Export (or reuse) the artifacts, run both graphs on the test set, return the measurements."""
    with torch_threads(opts.threads):
        start = time.perf_counter()
        plan = validated(opts)
        checkpoint = Path(opts.checkpoint).resolve()  # the report names files wherever it is read from
        ckpt = load_checkpoint(checkpoint)
        if ckpt.train_cfg.method != "mpis":
            raise MpisError(
                f"{checkpoint} was trained with --method {ckpt.train_cfg.method}; mpis check needs an MPIS net"
            )
        steps, layer_names = plan.steps, [n.name for n in ckpt.net.neurons]
        v_inits = () if opts.nir_files else parse_v_inits(opts.v_inits or DEFAULT_V_INITS, ckpt.net.neuron.vth)
        iterations = opts.iterations or max(steps[-1], ckpt.solver_cfg.T)
        sha = file_sha256(checkpoint)
        cache = Artifacts(plan.folder, sha)
        data = check_data(opts, ckpt, checkpoint, steps)
        spiking = spiking_graphs(opts, ckpt, v_inits, cache, data, plan.growth)
        # parity sample of the export: the first inputs (in a loop that is not a contraction for every input,
        # rounding can grow with K past the export's 1e-5 on some; the check measures ONNX Runtime against
        # PyTorch itself and reports it)
        sample = data.sample(steps[0], range(min(data.count, opts.batch)))[0]
        sample = sample.mean(1) if sample.dim() == 5 else sample
        onnx_paths, sessions = rate_graphs(ckpt, spiking, steps, iterations, cache, sample, opts.threads)
        h = max(sessions)
        reference = reference_quality(ckpt.net, sessions[h], sample, iterations, h or None, layer_names)
        rows, onnx_preds = spike_runs(opts, spiking, sessions, data, steps, layer_names)
        v_inits = tuple(s.v_init for s in spiking)
        say = (lambda line: print(line, flush=True)) if opts.progress else (lambda _line: None)
        toolchain_rows = toolchain_runs(
            plan.toolchains, ckpt, v_inits, steps, data, opts.batch, cache, onnx_preds, opts.threads, say
        )
        artifacts = {
            "folder": str(cache.folder),
            "onnx": {str(h or "none"): str(p) for h, p in onnx_paths.items()},
            "nir": {s.v_init.label: str(s.path) for s in spiking},
        }
        if toolchain_rows:
            artifacts["toolchains"] = sorted({r.file for r in toolchain_rows if r.file})
        return CheckReport(
            str(checkpoint),
            sha,
            data.dataset,
            data.count,
            steps,
            v_inits,
            ckpt.net.neuron.vth,
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


def toolchain_runs(
    toolchains,
    ckpt,
    v_inits,
    steps,
    data: CheckData,
    batch: int,
    cache: Artifacts,
    onnx_preds,
    threads: int,
    say: Callable[[str], None],
) -> list[ToolchainRow]:
    """Each toolchain's own importer on the universal file (exported here, one per numeric v_init) at every
    T, on the test inputs rounded to the file's 2^-8 input grid, with `threads` threads, against mpis's
    spikes of the same dyadic net (simulated once for all toolchains) and ONNX's argmax. An importer may
    take many minutes: `say` gets a line as each run starts and ends."""
    if not toolchains:
        return []
    rows: list[ToolchainRow] = []
    numeric = [v for v in v_inits if v.value is not None]
    reference = dyadic_copy(ckpt.net, DEFAULT_WEIGHT_BITS)[0]
    float_net = ckpt.net.folded_copy()  # what the dyadic weights approximate: the quantisation's cost
    ready = []
    for toolchain in toolchains:
        reason = missing(toolchain)
        if reason:
            say(f"toolchain {toolchain.name}: skipped, {reason}")
            rows += [ToolchainRow(toolchain.name, v.label, t, reason) for v in numeric for t in steps]
        else:
            ready.append(toolchain)
    for v in numeric:
        name = f"toolchain_universal_v{v.label}.nir"  # one file for every toolchain (mpis export --target universal)
        params = {"kind": "toolchain", "target": "universal", "v_init": v.value, "bits": DEFAULT_WEIGHT_BITS}
        if ready and not cache.fresh(name, params):
            export_toolchain_nir(ckpt.net, cache.claim(name), "universal", v.value, ckpt.solver_cfg.T, overwrite=True)
            cache.record(name, params)
        paths = dict.fromkeys(ready, cache.folder / name)
        reference.v_init = float_net.v_init = v.value
        for t in steps:
            # on the 2^-8 grid the dyadic weights are exact on (8-bit pixels): normalised CIFAR pixels are not,
            # and then each importer's summation order rounds differently (0.966 identical on a CIFAR-10 model)
            x = on_input_grid(data.sample(t, range(data.count))[0])
            runs = {}
            for toolchain in ready:
                name = paths[toolchain].name
                say(f"toolchain {toolchain.name}: {name} at T = {t} on {data.count} inputs, {threads} thread(s) ...")
                runs[toolchain] = run = run_toolchain(toolchain, paths[toolchain], x, t, batch, threads)
                say(f"toolchain {toolchain.name} {run.version}: {name} at T = {t} ran in {run.seconds:.1f} s")
            same, agree, total = dict.fromkeys(runs, 0), dict.fromkeys(runs, 0), 0
            quantised = Quantisation()
            for start in range(0, data.count, batch):
                part = slice(start, start + batch)
                record = reference.simulate(x[part], t)
                mpis_pred = reference.classify(record.state_rates).argmax(1)
                total += sum(c.numel() for c in record.spike_counts.values())
                if runs:
                    quantised.add(record, mpis_pred, float_net.simulate(x[part], t), float_net, t)
                for toolchain, run in runs.items():
                    same[toolchain] += sum(
                        int((run.counts[k][part] == c).sum()) for k, c in record.spike_counts.items()
                    )
                    agree[toolchain] += int((run.logits[part].argmax(1) == mpis_pred).sum())
            for toolchain, run in runs.items():
                onnx = float((run.logits.argmax(1) == onnx_preds[t]).float().mean())
                identical, agreement = same[toolchain] / total, agree[toolchain] / data.count
                row = ToolchainRow(toolchain.name, v.label, t, "ran", run.version, str(paths[toolchain]), identical)
                row.agreement_mpis, row.agreement_onnx, row.seconds = agreement, onnx, run.seconds
                row.threads = run.threads
                row.float_agreement, row.float_identical, row.float_rate_error = quantised.result()
                rows.append(row)
    return rows


@dataclass
class Quantisation:
    """The toolchain files' dyadic net against the float model it was made from, on the same inputs:
    argmax agreement, share of identical spike counts, mean |Δrate| (counts / T)."""

    agree: int = 0
    inputs: int = 0
    same: int = 0
    neurons: int = 0
    rate_error: float = 0.0

    def add(self, record, prediction: torch.Tensor, float_record, float_net, steps: int) -> None:
        self.agree += int((float_net.classify(float_record.state_rates).argmax(1) == prediction).sum())
        self.inputs += len(prediction)
        for name, counts in record.spike_counts.items():
            other = float_record.spike_counts[name]
            self.same += int((counts == other).sum())
            self.neurons += counts.numel()
            self.rate_error += float((counts - other).abs().sum()) / steps

    def result(self) -> tuple[float, float, float]:
        return self.agree / self.inputs, self.same / self.neurons, self.rate_error / self.neurons


def reference_quality(net, session, x: torch.Tensor, iterations: int, horizon: int | None, layers) -> dict:
    """On `x`: |r_K − r_{K−1}| (how far K iterations are from a fixed point; PyTorch, the same map) and
    max |ONNX Runtime − PyTorch| of the rates after K iterations."""
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
        overwrite=args.overwrite,
    )
    report = check(opts)
    for line in report.lines():
        print(line)
    print(f"wrote {report.files['report']} and {report.files['plot']} ({report.seconds:.0f} s)")
    print(verdict(report))
    return 0
