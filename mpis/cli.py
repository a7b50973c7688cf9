"""The `mpis` command line. Flags come from the config dataclasses; every user error is one line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import typing
from dataclasses import fields
from pathlib import Path

from mpis.config import CONFIG_CLASSES, EVENT_DATASETS, EVENT_PLAYBACK, ModelConfig, SolverConfig, TrainConfig
from mpis.errors import MpisError
from mpis.export import DEFAULT_MAX_PARAM_GROWTH, DEFAULT_WEIGHT_BITS, TOOLCHAIN_TARGETS
from mpis.threads import torch_threads, usable_cores


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `mpis: error: …` line (naming the subcommand) and
    exit status 2, as every other user error is reported."""

    def error(self, message: str) -> typing.NoReturn:
        command = self.prog.removeprefix("mpis").strip()
        self.exit(2, f"mpis: error: {command + ': ' if command else ''}{message}\n")


LAYOUT_HELP = (
    "graph: run every node as written (any NIR file; inputs summed in name order, so the same spikes in "
    "every process); native: run an mpis exact "
    "export layer by layer in native layout, with the model's FLOPs, 4-46x faster (float32 spikes differ only by "
    "rounding) (default graph)"
)
THREADS_HELP = (
    "torch / ONNX Runtime intra-op threads (default 1: the per-step ops are small, and on a busy machine more "
    "threads stall)"
)
CORES_HELP = "torch intra-op threads (default {}: the cores this process may use; never more, or threads stall)"


def _flag_type(annotation: str):
    return {"int": int, "float": float}.get(annotation.split("|")[0].strip(), str)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for cls in CONFIG_CLASSES:
        group = parser.add_argument_group(cls.__name__)
        for f in fields(cls):
            flag = "--T" if f.name == "T" else "--" + f.name.replace("_", "-")
            if str(f.type) == "bool":
                group.add_argument(flag, dest=f.name, action="store_true", help=f.metadata["help"])
                continue
            group.add_argument(
                flag,
                dest=f.name,
                type=_flag_type(str(f.type)),
                default=f.default,
                choices=f.metadata.get("choices"),
                help=f"{f.metadata['help']} (default: {f.default})",
            )


def _configs(args: argparse.Namespace) -> tuple[ModelConfig, SolverConfig, TrainConfig]:
    return tuple(cls(**{f.name: getattr(args, f.name) for f in fields(cls)}) for cls in CONFIG_CLASSES)


def _train(args: argparse.Namespace) -> int:
    import time

    from mpis.train.loop import resume_configs, train
    from mpis.train.presets import beside_paper

    if args.resume and args.overwrite:
        raise MpisError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if args.resume:
        model_cfg, solver_cfg, train_cfg = resume_configs(Path(args.out), args.given)
    else:
        model_cfg, solver_cfg, train_cfg = _configs(args)
    start = time.perf_counter()
    metrics = train(
        model_cfg, solver_cfg, train_cfg, Path(args.out), args.overwrite, progress=not args.quiet, resume=args.resume
    )
    if metrics:  # only rank 0 of a torchrun job evaluates and writes
        print(f"test accuracy {metrics['test_acc']:.4f}; checkpoint {Path(args.out) / 'model.pt'}")
        if args.preset:
            print(beside_paper(args.preset, metrics["test_acc"], train_cfg.epochs, time.perf_counter() - start))
    return 0


def _input_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W (three positive integers), got {text!r}")
    return shape


def _arch(args: argparse.Namespace) -> int:
    from mpis.model.network import MPISNet

    net = MPISNet(args.arch, args.input, upsample=args.upsample)
    print(f"{net.arch}  input {','.join(map(str, args.input))}  upsample={args.upsample}")
    for node in net.graph.nodes:
        count = sum(p.numel() for p in net.ops[node.name].parameters()) if node.name in net.ops else 0
        sources = ", ".join([*node.inputs, *(f"{d} (previous step)" for d in node.delayed)])
        print(f"  {node.name:<12} {node.kind:<7} {'x'.join(map(str, node.shape)):<12} {count:>10,}  <- {sources}")
    print(f"parameters: {sum(p.numel() for p in net.parameters()):,}")
    return 0


def _export(args: argparse.Namespace) -> int:
    """Every target is staged beside its path and renamed into place only when all are built
    (mpis.export.outputs): one command's files are all written or none."""
    import tempfile

    import torch

    from mpis.export.faithful import check_faithful
    from mpis.export.onnx import INPUT_NAME, LOGITS_NAME, export_onnx
    from mpis.export.outputs import ExportOutputs
    from mpis.train.checkpoint import atomic_write, load_checkpoint
    from mpis.train.data import load_dataset

    if args.onnx is None and args.triton_repo is None and args.trt is None and args.nir is None:
        raise MpisError(
            "nothing to export: pass --onnx OUT.onnx, --trt OUT.plan, --triton-repo REPO and/or --nir OUT.nir"
        )
    if args.batch < 1:
        raise MpisError(f"--batch must be >= 1, got {args.batch}")
    if args.trt:
        from mpis.export.tensorrt import require_tensorrt

        require_tensorrt()  # fail before the slow ONNX export, not after
    if args.iters is not None and args.iters < 1:
        raise MpisError(f"--iters must be >= 1, got {args.iters}")
    _refuse_before_work(args)
    wrote: list[str] = []
    with ExportOutputs() as staged, tempfile.TemporaryDirectory() as scratch:
        # staged first: a folder that cannot be written is refused before the scoring and tracing
        nir_path = staged.file(Path(args.nir)) if args.nir else None
        onnx_path = staged.file(Path(args.onnx)) if args.onnx else Path(scratch) / "model.onnx"
        plan = staged.file(Path(args.trt)) if args.trt else None
        if args.triton_repo:
            staged.check_folder(Path(args.triton_repo), "Triton repository")
        ckpt = load_checkpoint(args.checkpoint)
        iterations = ckpt.solver_cfg.T if args.iters is None else args.iters
        try:  # checked on real test images when the dataset is at hand, else on random inputs
            cfg = ckpt.train_cfg
            test = load_dataset(cfg.dataset, cfg.data_dir, frames=ckpt.solver_cfg.T, events=cfg.events).test
            count = min(args.batch, len(test))
            inputs = torch.stack([test[i][0] for i in range(count)])
            labels = torch.tensor([int(test[i][1]) for i in range(count)])
        except MpisError:
            inputs = torch.rand(args.batch, *ckpt.input_shape, generator=torch.Generator().manual_seed(0))
            labels = None
        check_faithful(
            ckpt,
            inputs,
            labels,
            iterations,
            _spiking_v_init(ckpt, args) if args.nir else False,
            args.allow_unsettled,
            say=lambda line: print(line, flush=True),
        )
        if nir_path is not None:
            wrote += _export_nir(ckpt, args, nir_path, staged, inputs)
        if args.onnx is None and args.triton_repo is None and args.trt is None:
            return _wrote(wrote)
        sample = inputs.mean(1) if inputs.dim() == 5 else inputs  # event frames drive the rate graph by their mean
        target = args.onnx or "a temporary file (no --onnx given)"
        print(f"exporting the ONNX rate graph to {target} ...", flush=True)
        report = export_onnx(
            ckpt.net,
            onnx_path,
            iterations,
            args.with_rates,
            sample,
            args.overwrite,
            horizon=ckpt.solver_cfg.T,
            say=lambda line: print(line, flush=True),
        )
        wrote.append(f"{args.onnx or 'the ONNX graph'}: {iterations} iterations; {report.summary()}")
        if plan is not None:
            from mpis.export.tensorrt import build_engine

            shape = ckpt.input_shape
            atomic_write(
                plan,
                lambda tmp: build_engine(onnx_path, Path(tmp), shape, args.max_batch_size, 32, args.fp16),
            )
            wrote.append(
                f"{args.trt} ({'fp16' if args.fp16 else 'fp32'} TensorRT engine, batch 1-{args.max_batch_size})"
            )
        if args.triton_repo:
            from mpis.export.triton import write_triton_repo

            outputs = [(LOGITS_NAME, (ckpt.net.arch.classes,))]
            if args.with_rates:
                outputs += [(f"rate_{n.name}", n.shape) for n in ckpt.net.neurons]
            inputs = [(INPUT_NAME, ckpt.input_shape)]
            models = write_triton_repo(
                Path(args.triton_repo),
                args.name,
                onnx_path,
                inputs,
                outputs,
                args.max_batch_size,
                plan,
                args.overwrite,
                staged,
            )
            wrote.append("Triton model(s) " + ", ".join(str(p) for p in models))
    return _wrote(wrote)


def _wrote(lines: list[str]) -> int:
    """Said once the export's files are in place, not while they are still staged."""
    for line in lines:
        print(f"wrote {line}")
    return 0


def _refuse_before_work(args: argparse.Namespace) -> None:
    """The refusals that need no model: an output that exists without --overwrite, a flavour the target has
    no use for. They come before the seconds of scoring and the minutes of ONNX tracing."""
    if args.nir and args.flavour is not None and args.target not in (None, "nirtorch"):
        raise MpisError(
            f"--flavour {args.flavour} is for --target nirtorch; --target {args.target} has its own neurons"
        )
    if args.triton_repo:
        from mpis.export.triton import check_model_settings

        check_model_settings(args.name, args.max_batch_size)
    if args.overwrite:
        return
    outputs = [(Path(p), "path") for p in (args.onnx, args.nir, args.trt) if p]
    if args.triton_repo:
        names = (args.name, *([f"{args.name}_trt"] if args.trt else []))
        outputs += [(Path(args.triton_repo) / name, "--name") for name in names]
    for path, what in outputs:
        if path.exists():
            raise MpisError(f"{path} already exists; choose another {what} or pass --overwrite")


def _spiking_v_init(ckpt, args: argparse.Namespace) -> float | None:
    """The initial potential the NIR file will hold: --v-init, else the default (Vth/2 for IF neurons)."""
    from mpis.model.deployed import default_nir_v_init

    return default_nir_v_init(ckpt.net) if args.v_init is None else args.v_init


def _export_nir(ckpt, args: argparse.Namespace, path: Path, staged, inputs) -> list[str]:
    """Write the spiking graph to `path` (the staging file of --nir); returns what was written."""
    from mpis.export.nir import export_nir
    from mpis.export.toolchains import universal_refusal

    notes = []
    if args.target is None and args.flavour is None:  # the default: one file for every toolchain, if it fits
        reason = universal_refusal(ckpt.net, _spiking_v_init(ckpt, args), args.weight_bits)
        if reason is None:
            args.target = "universal"
        else:
            notes.append(
                f"note: the universal NIR file cannot hold this net ({reason}); wrote the standard one instead "
                "(--target nirtorch: mpis simulate and nirtorch run it, the toolchains' importers do not)"
            )
    if args.target not in (None, "nirtorch"):
        return _export_toolchain_nir(ckpt, args, path, staged, inputs)
    args.flavour = args.flavour or "exact"
    if args.max_param_growth <= 0:
        raise MpisError(f"--max-param-growth must be > 0, got {args.max_param_growth}")
    print(f"exporting the spiking graph to {args.nir} ({args.flavour}; probing the polyphase blocks) ...", flush=True)
    result = export_nir(
        ckpt.net,
        path,
        args.flavour,
        _spiking_v_init(ckpt, args),
        ckpt.solver_cfg.T,
        ckpt.train_cfg.dataset,
        args.overwrite,
        args.max_param_growth,
    )
    layouts = ", ".join(f"{name} x{layout.factor}" for name, layout in result.layouts.items() if layout.factor > 1)
    if ckpt.net.neuron.leak != 1.0:
        print(
            "note: with leaky neurons the Trans feedback's first-step response cannot be folded into the "
            "thresholds, so the loop's spike counts drift from the model's (IF neurons are exact)"
        )
    return notes + [
        f"{args.nir} ({args.flavour}): {len(result.graph.nodes)} nodes, {len(result.graph.edges)} edges; "
        f"parameters {result.nir_params:,} vs the model's {result.source_params:,} ({result.growth:.2f}x)"
        + (f"; polyphase layers: {layouts}" if layouts else "")
    ]


def _export_toolchain_nir(ckpt, args: argparse.Namespace, path: Path, staged, inputs) -> list[str]:
    """The toolchain file, and beside it the reference recordings of its first test inputs."""
    from mpis.export.reference import REFERENCE_INPUTS, on_input_grid, reference_data, reference_path_for
    from mpis.export.toolchains import NEURON_RECIPES, export_toolchain_nir

    v_init = _spiking_v_init(ckpt, args)
    print(f"exporting the spiking graph for {args.target}'s importer to {args.nir} ...", flush=True)
    result = export_toolchain_nir(
        ckpt.net, path, args.target, v_init, ckpt.solver_cfg.T, args.weight_bits, args.overwrite, ckpt.train_cfg.dataset
    )
    reference = reference_path_for(args.nir)
    x = on_input_grid(inputs[:REFERENCE_INPUTS])
    data = reference_data(result, x, ckpt.solver_cfg.T)
    staged_reference = staged.file(Path(reference))
    staged_reference.write_bytes(data)
    return [
        f"{args.nir} (--target {args.target}: {NEURON_RECIPES[args.target].about}): "
        f"{len(result.graph.nodes)} nodes, {len(result.graph.edges)} edges, {result.sequencing} sequencing convs; "
        f"parameters {result.nir_params:,} vs the model's {result.source_params:,} ({result.growth:.2f}x); "
        f"weights dyadic, {args.weight_bits} significant bits per layer"
        + (
            f" ({result.fewest_bits} where an op reads another's output)"
            if result.fewest_bits < args.weight_bits
            else ""
        )
        + " (mpis check --toolchain compares the spikes)",
        f"{reference} (reference recordings: {len(x)} test inputs at T = {ckpt.solver_cfg.T}, every neuron layer's "
        "spikes and the output at every step; nir.read_data)",
    ]


def _infer(args: argparse.Namespace) -> int:
    import numpy as np

    from mpis.export.tensorrt import check_engine

    if args.batch < 1:
        raise MpisError(f"--batch must be >= 1, got {args.batch}")
    if not Path(args.onnx).is_file():
        raise MpisError(f"ONNX file {args.onnx} does not exist")
    import onnx

    dims = [d.dim_value for d in onnx.load(args.onnx).graph.input[0].type.tensor_type.shape.dim[1:]]
    inputs = np.random.default_rng(0).random((args.batch, *dims), dtype=np.float32)
    delta = check_engine(Path(args.engine), Path(args.onnx), inputs)
    print(f"engine {args.engine} vs ONNX Runtime on {args.batch} inputs: max |Δlogits| {delta:.2e}")
    if delta > args.tolerance:
        raise MpisError(f"engine differs from ONNX Runtime by {delta:.2e} > --tolerance {args.tolerance:g}")
    return 0


SERVE_LIMITS = ("max_body_mb", "max_json_mb", "max_connections", "header_timeout", "body_timeout", "keep_alive_timeout")


def _serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise MpisError(f"--port must be 0..65535, got {args.port}")
    limits = {name: getattr(args, name) for name in SERVE_LIMITS if getattr(args, name) is not None}
    for name, value in limits.items():
        if not value > 0:
            raise MpisError(f"--{name.replace('_', '-')} must be positive, got {value:g}")
    from mpis.serve.server import Limits, serve

    for size in ("max_body", "max_json"):  # MiB here, bytes there
        if f"{size}_mb" in limits:
            limits[f"{size}_bytes"] = int(limits.pop(f"{size}_mb") * 2**20)
    serve(Path(args.repo), args.host, args.port, args.backend, not args.no_batching, Limits(**limits))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from torch.utils.data import Subset

    from mpis.export.nir_nodes import read_nir
    from mpis.spike.simulate import RUNS_AS, compile_graph, evaluate
    from mpis.train.data import load_dataset, playback_frames

    for flag, value in (("--T", args.T), ("--batch", args.batch), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise MpisError(f"{flag} must be >= 1, got {value}")
    if args.burn_in < 0:
        raise MpisError(f"--burn-in must be >= 0, got {args.burn_in}")
    graph = read_nir(args.nir)
    steps = args.T or int(graph.metadata.get("T", 0))
    if steps < 1:
        raise MpisError(f"{args.nir} records no time steps T; pass --T")
    program = compile_graph(graph, args.device, args.reset, layout=args.layout)
    dataset = args.dataset or str(graph.metadata.get("dataset") or "digits")
    frames = playback_frames(args.events, steps, int(graph.metadata.get("T") or steps))
    split = load_dataset(dataset, args.data_dir, frames=frames, events=args.events)
    if tuple(split.input_shape) != program.input_shape:
        shape, expected = ("x".join(map(str, s)) for s in (split.input_shape, program.input_shape))
        raise MpisError(f"{dataset} inputs are {shape}, but the graph's Input takes {expected}")
    test = split.test if args.limit is None else Subset(split.test, range(min(args.limit, len(split.test))))
    resets = ", ".join(sorted(set(program.resets.values())))
    norse_dt = RUNS_AS.get(str(graph.metadata.get("target", "nirtorch")))
    how = f"; IF/LIF reset: {resets}" * bool(resets)
    if norse_dt is not None:  # the universal and Norse files
        how = f"; its LIF nodes run as norse.torch.from_nir runs them (dt = {norse_dt:g})"
    played = f" ({'mean frame' if args.events == 'mean' else 'frames in order'})" * (dataset in EVENT_DATASETS)
    print(f"{args.nir}: {dataset} test set{played}, T = {steps}, {program.device}{how}")
    evaluation = evaluate(program, test, steps, args.batch, split.classes, args.burn_in, progress=not args.quiet)
    for line in evaluation.lines():
        print(line)
    return 0


def _check(args: argparse.Namespace) -> int:
    from mpis.check.run import cli_check

    return cli_check(args)


def _demo(args: argparse.Namespace) -> int:
    from mpis.demo import cli_demo

    return cli_demo(args)


def build_parser(train_defaults: dict | None = None) -> argparse.ArgumentParser:
    """The parser; `train_defaults` (a preset's settings) replace the train command's defaults, so that flags
    given on the command line still win."""
    from mpis import __version__
    from mpis.train.presets import PRESETS

    parser = _Parser(prog="mpis", description="Train MPIS equilibrium spiking networks and export them.")
    parser.add_argument("--version", action="version", version=f"mpis {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser("train", help="train a network on a dataset and write DIR/model.pt")
    train.add_argument("--out", required=True, help="run folder for model.pt and metrics.jsonl")
    train.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last complete epoch (its own settings; weights, optimizer, "
        "schedule, random state and metrics are restored)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    train.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="the paper's settings for a benchmark (architecture, dataset, T, batch size, optimizer; our epochs "
        "and lr); flags given here override it, and the paper's accuracy is printed beside ours",
    )
    _add_config_flags(train)
    train.set_defaults(run=_train, **(train_defaults or {}))

    export = commands.add_parser("export", help="export a trained checkpoint (ONNX, TensorRT, Triton repository, NIR)")
    export.add_argument("checkpoint", help="DIR/model.pt written by mpis train")
    export.add_argument("--onnx", help="write the single-step DBReLU graph, unrolled K iterations, to this file")
    export.add_argument("--iters", type=int, help="equilibrium iterations K (default: the checkpoint's T)")
    export.add_argument("--with-rates", action="store_true", help="also output the rates of every neuron layer")
    export.add_argument("--batch", type=int, default=256, help="inputs used for the parity check (default 256)")
    export.add_argument("--trt", help="also build a TensorRT engine (needs tensorrt and CUDA) into this file")
    export.add_argument("--fp16", action="store_true", help="build the TensorRT engine in fp16")
    export.add_argument("--triton-repo", help="write a Triton model repository into this folder")
    export.add_argument("--name", default="mpis", help="model name in the Triton repository (default mpis)")
    export.add_argument("--max-batch-size", type=int, default=256, help="Triton/TensorRT max batch (default 256)")
    export.add_argument("--nir", help="write the spiking graph (integrate-and-fire, feedback loop) to this NIR file")
    export.add_argument(
        "--flavour",
        choices=("exact", "compact"),
        help="--target nirtorch's neuron encoding (implies that target): exact = standard I/Threshold/Scale "
        "nodes with subtract reset (its default); compact = one IF per layer",
    )
    export.add_argument(
        "--target",
        choices=("universal", "nirtorch", *TOOLCHAIN_TARGETS),
        help="whose NIR importer the file is written for. Default: universal, one file that Norse, Sinabs and "
        "snnTorch each run with their own importer and mpis's spikes, and mpis simulate runs too (read it with "
        "nir.read(f, type_check=False); docs/one-nir-file.md), or, for a net it cannot hold (leaky or hard-reset "
        "neurons, a learned IMP without --v-init), nirtorch, said so. "
        "nirtorch = standard nodes, exact for nirtorch 2.6 with mpis's node map and mpis simulate (--flavour); "
        "norse, sinabs, snntorch = a smaller file for that toolchain's importer alone",
    )
    export.add_argument(
        "--weight-bits",
        type=int,
        default=DEFAULT_WEIGHT_BITS,
        help="toolchain targets: significant bits of every layer's weights (dyadic, so that every importer's "
        "sums are exact and its spikes are mpis's; default %(default)s)",
    )
    export.add_argument(
        "--v-init",
        type=float,
        help="initial membrane potential in the NIR graph (default: Vth/2 for IF neurons, which halves the rate "
        "error, see mpis check; the model's own for a learned IMP or LIF neurons)",
    )
    export.add_argument(
        "--max-param-growth",
        type=float,
        default=DEFAULT_MAX_PARAM_GROWTH,
        help="refuse a NIR graph with more than this many times the model's parameters (default %(default)g)",
    )
    export.add_argument(
        "--allow-unsettled",
        action="store_true",
        help="export even when the rate graph has not settled after K iterations or the spiking network "
        "disagrees with it (refused by default: the files would not be the model that was trained)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace existing output files")
    export.set_defaults(run=_export)

    infer = commands.add_parser("infer", help="check a TensorRT engine against ONNX Runtime")
    infer.add_argument("--engine", required=True, help="OUT.plan from mpis export --trt")
    infer.add_argument("--onnx", required=True, help="the ONNX file the engine was built from")
    infer.add_argument("--batch", type=int, default=16)
    infer.add_argument("--tolerance", type=float, default=1e-3, help="max |Δlogits| accepted (default 1e-3)")
    infer.set_defaults(run=_infer)

    arch = commands.add_parser("arch", help="parse an architecture string and list its graph and parameter count")
    arch.add_argument("arch", help="architecture in the paper's notation, e.g. '16C3S1-2F1*(32C3S2-48C3S1)-FC10'")
    arch.add_argument("--input", type=_input_shape, default=(1, 28, 28), help="input shape C,H,W (default 1,28,28)")
    arch.add_argument("--upsample", default="transpose", choices=("transpose", "nearest"))
    arch.set_defaults(run=_arch)

    serve = commands.add_parser("serve", help="serve a Triton model repository over Triton's HTTP protocol")
    serve.add_argument("repo", help="model repository written by mpis export --triton-repo")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000, as Triton's)")
    serve.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "onnxruntime", "tensorrt"),
        help="auto: the ONNX models, and the TensorRT engine models too when TensorRT and CUDA are present",
    )
    serve.add_argument("--no-batching", action="store_true", help="one execution per request (no dynamic batching)")
    serve.add_argument("--max-body-mb", type=float, help="request body size limit in MiB (default 64)")
    serve.add_argument("--max-json-mb", type=float, help="limit of a JSON body or header in MiB (default 8)")
    serve.add_argument(
        "--max-connections",
        type=int,
        help="open connections at once (default 1024, fewer if the open-files limit says so); over it, the oldest "
        "connection without a complete request is closed, or the newcomer gets 503",
    )
    serve.add_argument("--header-timeout", type=float, help="seconds for a request's head to arrive (default 10)")
    serve.add_argument(
        "--body-timeout", type=float, help="seconds for a body to arrive, +1 per 64 KiB received (default 30)"
    )
    serve.add_argument(
        "--keep-alive-timeout", type=float, help="seconds an idle connection is kept between requests (default 5)"
    )
    serve.set_defaults(run=_serve)

    simulate = commands.add_parser("simulate", help="run a NIR graph as a spiking network on a dataset's test set")
    simulate.add_argument("nir", help="a .nir file (mpis export --nir, or any graph of the supported nodes)")
    simulate.add_argument("--dataset", help="dataset whose test set is simulated (default: the file's, else digits)")
    simulate.add_argument("--data-dir", help="folder with the dataset's standard files (not needed for digits)")
    simulate.add_argument(
        "--events",
        choices=EVENT_PLAYBACK,
        default="mean",
        help="event recordings (nmnist): their mean frame as a constant current (what mpis train's default trains "
        "on), or their T frames in recording order",
    )
    simulate.add_argument("--T", type=int, help="time steps (default: the T recorded in the file)")
    simulate.add_argument(
        "--burn-in", type=int, default=0, help="steps simulated before spikes are counted (default 0)"
    )
    simulate.add_argument("--batch", type=int, default=256, help="inputs simulated at once (default 256)")
    simulate.add_argument("--limit", type=int, help="simulate only the first N test inputs")
    simulate.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    simulate.add_argument(
        "--reset",
        choices=("subtract", "zero"),
        help="reset of IF/LIF nodes (default: each node's metadata, else the NIR spec's reset to v_reset); "
        "zero shows what a toolchain that follows the NIR spec literally does with a compact file",
    )
    simulate.add_argument(
        "--layout",
        choices=("graph", "native"),
        default="graph",
        help=LAYOUT_HELP,
    )
    simulate.add_argument("--quiet", action="store_true", help="no progress bar")
    simulate.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    simulate.set_defaults(run=_simulate)

    check = commands.add_parser(
        "check",
        help="spiking graph (NIR, spike runtime) vs rate graph (ONNX Runtime) on the test set, at several T",
        description="Exports (or reuses) the ONNX rate graph with every layer's rates and one NIR file per v_init, "
        "runs both on the test set and prints per T and layer the mean and max |spike rate - ONNX rate| "
        "(rate = counts/T, per neuron, native layout), argmax agreement, accuracies and synaptic ops; writes "
        "report.json and check.png (mean |Δrate| vs T, log-log, with 1/T). Reference: the DBReLU rates after K "
        "iterations from zero, K = max(T list, the checkpoint's T) (--iters), its residual max |r_K - r_K-1| "
        "reported.",
    )
    check.add_argument("checkpoint", help="DIR/model.pt written by mpis train")
    check.add_argument("--T", default="10,30,100,300", help="time steps, comma-separated (default 10,30,100,300)")
    check.add_argument(
        "--burn-in",
        type=int,
        default=0,
        help="steps simulated before spikes are counted, so the loop settles from the zero state (default 0)",
    )
    check.add_argument(
        "--v-init",
        help="initial membrane potentials, one NIR file each: values, multiples of Vth (0.5vth) or 'model' "
        "(default 0,0.5vth)",
    )
    check.add_argument("--nir", action="append", help="check this NIR file instead of exporting (repeatable)")
    check.add_argument(
        "--report", help="folder for the artifacts and report (default: DIR/check next to the checkpoint)"
    )
    check.add_argument("--iters", type=int, help="DBReLU iterations K of the reference (default: max(T list, model T))")
    check.add_argument(
        "--min-agreement",
        type=float,
        default=0.99,
        help="exit 2 below this argmax agreement at the largest T (default 0.99)",
    )
    check.add_argument(
        "--toolchain",
        help="also run each toolchain's own NIR importer on its file (mpis export --target), comma-separated: "
        "norse, sinabs, snntorch, spyx; NAME=PYTHON runs it with another interpreter (its own venv)",
    )
    check.add_argument("--dataset", help="dataset whose test set is used (default: the checkpoint's)")
    check.add_argument("--data-dir", help="folder with the dataset's standard files (not needed for digits)")
    check.add_argument("--limit", type=int, help="use only the first N test inputs")
    check.add_argument("--batch", type=int, default=128, help="inputs run at once (default 128)")
    check.add_argument("--device", default="cpu", help="spike runtime device: cpu, cuda or cuda:N (default cpu)")
    check.add_argument(
        "--layout",
        choices=("graph", "native"),
        default="graph",
        help=LAYOUT_HELP,
    )
    check.add_argument("--max-param-growth", type=float, default=DEFAULT_MAX_PARAM_GROWTH, help="as mpis export --nir")
    check.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    check.add_argument(
        "--overwrite", action="store_true", help="replace an earlier check's report.json and check.png in --report"
    )
    check.add_argument(
        "--threads", type=int, default=1, help=THREADS_HELP + "; also the toolchains' importers' (--toolchain)"
    )
    check.set_defaults(run=_check)

    demo = commands.add_parser(
        "demo", help="train on digits, export ONNX + NIR + Triton repository, check at T = 10, 30, 100"
    )
    demo.add_argument("--out", default="runs/demo", help="folder for every artifact (default runs/demo)")
    demo.add_argument(
        "--epochs", type=int, default=TrainConfig.epochs, help=f"training epochs (default {TrainConfig.epochs})"
    )
    demo.add_argument(
        "--jac-reg", type=float, help="Jacobian penalty weight, as mpis train --jac-reg (default: mpis train's)"
    )
    demo.add_argument("--T", type=int, default=30, help="training time steps, also the ONNX export's K (default 30)")
    demo.add_argument("--check-T", default="10,30,100", help="T list of the check (default 10,30,100)")
    demo.add_argument("--arch", help="architecture (default: the project's default)")
    demo.add_argument("--limit", type=int, help="check only the first N test inputs")
    demo.add_argument("--min-agreement", type=float, default=0.99, help="as mpis check (default 0.99)")
    demo.add_argument("--overwrite", action="store_true", help="replace the demo's files in an existing --out")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    demo.add_argument("--seed", type=int, default=0, help="training seed (same seed, same numbers on one machine)")
    demo.set_defaults(run=_demo)
    cores = usable_cores()
    for command in commands.choices.values():
        if not any("--threads" in action.option_strings for action in command._actions):
            command.add_argument("--threads", type=int, default=cores, help=CORES_HELP.format(cores))
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, read twice when it names a preset: the preset's settings become the defaults."""
    args = build_parser().parse_args(argv)
    if getattr(args, "preset", None):
        from mpis.train.presets import PRESETS

        args = build_parser(PRESETS[args.preset].flags()).parse_args(argv)
    if args.command == "train":
        args.given = _given_settings(argv, args)
    return args


_UNSET = object()


def _given_settings(argv: list[str] | None, args: argparse.Namespace) -> dict[str, object]:
    """The config settings named on the command line (a preset's count as named), which --resume checks
    against the run's: parsed again with every default replaced by a marker."""
    from mpis.train.presets import PRESETS

    names = [f.name for cls in CONFIG_CLASSES for f in fields(cls)]
    marked = build_parser(dict.fromkeys(names, _UNSET)).parse_args(argv)
    preset = PRESETS[args.preset].flags() if args.preset else {}
    return {name: getattr(args, name) for name in names if getattr(marked, name) is not _UNSET or name in preset}


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that the cleanup of every
    half-written file runs (the default action would end the process on the spot)."""


def _terminate(signum: int, frame) -> typing.NoReturn:
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        with torch_threads(args.threads):
            status = args.run(args)
        sys.stdout.flush()  # here, so that a closed pipe is caught below and not at the interpreter's exit
        return status
    except MpisError as err:
        print(f"mpis: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mpis: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("mpis: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # `mpis … | head`: the reader has gone, which is not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not fail again
        return 0
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


if __name__ == "__main__":
    sys.exit(main())
