"""`mpis demo`: the whole pipeline on the embedded digits set, in a few minutes on 2 CPU cores.

Train (mpis train's defaults on digits: T = 30, 15 epochs, the Jacobian penalty that makes the loop contract
so that the rate graph, the spiking network and the trained model agree) -> export the ONNX rate graph with
every layer's rates, the NIR spiking graph and a Triton model repository -> `mpis check` at T = 10, 30, 100
with v_init 0 and Vth/2 -> print where every artifact is. An existing --out is refused unless --overwrite is
given (and then only the files the demo writes are replaced).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mpis.config import TrainConfig
from mpis.errors import MpisError

DEMO_STEPS = (10, 30, 100)
DEMO_V_INITS = "0,0.5vth"
DEMO_EPOCHS = TrainConfig.epochs  # mpis train's defaults: what the demo shows is what a user gets
DEMO_MINUTES = "4-8"  # 4.0 min idle, 7.5 min beside two other trainings, 2 cores (README)


def run_demo(*args, threads: int = 1, **kwargs) -> tuple[list[str], object]:
    """`_run_demo` with `threads` intra-op threads (1 by default: about as fast on two idle cores, far faster
    on a busy machine; measured 8 s vs 80 s per digits epoch with the machine's load at 5)."""
    from mpis.threads import torch_threads

    with torch_threads(threads):
        return _run_demo(*args, threads=threads, **kwargs)


def _run_demo(
    out: Path,
    epochs: int = DEMO_EPOCHS,
    jac_reg: float | None = None,
    overwrite: bool = False,
    arch: str | None = None,
    limit: int | None = None,
    min_agreement: float | None = None,
    progress: bool = True,
    steps: int = 30,
    check_steps: tuple[int, ...] = DEMO_STEPS,
    threads: int = 1,
    seed: int = 0,
) -> tuple[list[str], object]:
    """Run every stage; return the lines to print (check table, artifact paths) and the check report."""
    from mpis.check.options import DEFAULT_MIN_AGREEMENT, CheckOptions
    from mpis.check.run import check
    from mpis.config import ModelConfig, SolverConfig
    from mpis.export import DEFAULT_MAX_PARAM_GROWTH
    from mpis.export.nir import export_nir
    from mpis.export.onnx import INPUT_NAME, LOGITS_NAME, export_onnx
    from mpis.export.outputs import ExportOutputs
    from mpis.export.toolchains import export_toolchain_nir, universal_refusal
    from mpis.export.triton import write_triton_repo
    from mpis.model.deployed import default_nir_v_init
    from mpis.train.checkpoint import load_checkpoint
    from mpis.train.data import load_dataset
    from mpis.train.loop import train

    start = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MpisError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MpisError(f"--out {out} already exists and is not empty; choose another folder or pass --overwrite")
    if steps < 1:
        raise MpisError(f"--T must be >= 1, got {steps}")
    if epochs < 1:
        raise MpisError(f"--epochs must be >= 1, got {epochs}")
    if limit is not None and limit < 1:
        raise MpisError(f"--limit must be >= 1, got {limit}")
    model_cfg = ModelConfig() if arch is None else ModelConfig(arch=arch)
    solver_cfg = SolverConfig(T=steps) if jac_reg is None else SolverConfig(T=steps, jac_reg=jac_reg)
    train_cfg = TrainConfig(dataset="digits", epochs=epochs, device="cpu", seed=seed)
    say = print if progress else (lambda *_: None)
    say(
        f"[1/4] training {model_cfg.arch} on digits, T = {steps}, --jac-reg {solver_cfg.jac_reg:g} "
        f"--jac-radius {solver_cfg.jac_radius:g}, {epochs} epochs, "
        f"seed {seed} -> {out} (the whole demo: about {DEMO_MINUTES} minutes on 2 idle cores)"
    )
    metrics = train(model_cfg, solver_cfg, train_cfg, out, overwrite, progress)
    trained = time.perf_counter()

    checkpoint = out / "model.pt"
    ckpt = load_checkpoint(checkpoint)
    test = load_dataset("digits").test
    sample = torch.stack([test[i][0] for i in range(min(256, len(test)))])
    onnx_path, nir_path, repo = out / "model.onnx", out / "model.nir", out / "triton"
    say(
        f"[2/4] exporting ONNX (K = {solver_cfg.T} iterations, with rates), NIR and a Triton repository "
        f"({_clock(trained - start)} so far)"
    )
    parity = export_onnx(ckpt.net, onnx_path, solver_cfg.T, True, sample, overwrite, horizon=solver_cfg.T, say=say)
    v0 = default_nir_v_init(ckpt.net)  # what mpis export --nir writes: Vth/2 for IF neurons
    if universal_refusal(ckpt.net, v0) is None:  # the file mpis export --nir writes by default
        nir = export_toolchain_nir(
            ckpt.net, nir_path, "universal", v0, solver_cfg.T, overwrite=overwrite, dataset="digits"
        )
    else:
        nir = export_nir(ckpt.net, nir_path, "exact", v0, solver_cfg.T, "digits", overwrite, DEFAULT_MAX_PARAM_GROWTH)
    outputs = [(LOGITS_NAME, (ckpt.net.arch.classes,)), *((f"rate_{n.name}", n.shape) for n in ckpt.net.neurons)]
    with ExportOutputs() as staged:
        triton = write_triton_repo(
            repo, "mpis", onnx_path, [(INPUT_NAME, ckpt.input_shape)], outputs, 256, None, overwrite, staged
        )
    exported = time.perf_counter()

    say(
        f"[3/4] checking the spiking graph against the rate graph at T = {', '.join(map(str, check_steps))} "
        f"({_clock(exported - start)} so far)"
    )
    opts = CheckOptions(
        checkpoint,
        tuple(check_steps),
        DEMO_V_INITS,
        report_dir=out / "check",
        limit=limit,
        min_agreement=DEFAULT_MIN_AGREEMENT if min_agreement is None else min_agreement,
        progress=progress,
        threads=threads,
        overwrite=overwrite,  # an existing --out was refused above without it
    )
    report = check(opts)
    done = time.perf_counter()

    lines = [*report.lines(), "", f"[4/4] artifacts ({done - start:.0f} s in all: train {trained - start:.0f} s, "]
    lines[-1] += f"export {exported - trained:.0f} s, check {done - exported:.0f} s)"
    v_init = nir.graph.metadata.get("v_init")
    lines += [
        f"  checkpoint      {checkpoint}  (test accuracy {metrics.get('test_acc', float('nan')):.4f})",
        f"  metrics         {out / 'metrics.jsonl'}",
        f"  ONNX            {onnx_path}  ({parity.summary()})",
        f"  NIR             {nir_path}  ({nir.graph.metadata.get('target', 'nirtorch')} file, v_init {v_init}, "
        f"{len(nir.graph.nodes)} nodes)",
        *(f"  Triton model    {p}" for p in triton),
        f"  check report    {report.files['report']}",
        f"  check plot      {report.files['plot']}",
        f"  check artifacts {out / 'check'}  (the ONNX/NIR files the check ran)",
        "next: mpis serve "
        + str(repo)
        + f"  |  mpis simulate {nir_path}  |  mpis check {checkpoint} --T 10,30,100,300 --overwrite",
    ]
    return lines, report


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def cli_demo(args) -> int:
    """`mpis demo` (mpis/cli.py)."""
    from mpis.check.options import parse_steps
    from mpis.check.report import verdict

    lines, report = run_demo(
        Path(args.out),
        epochs=args.epochs,
        jac_reg=args.jac_reg,
        overwrite=args.overwrite,
        arch=args.arch,
        limit=args.limit,
        min_agreement=args.min_agreement,
        progress=not args.quiet,
        steps=args.T,
        check_steps=parse_steps(args.check_T, "--check-T"),
        threads=args.threads,
        seed=args.seed,
    )
    for line in lines:
        print(line)
    print(verdict(report))
    return 0
