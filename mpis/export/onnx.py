"""`mpis export --onnx`: the trained network's inference graph in rate (DBReLU) form, as one ONNX file.

The graph is the stem, then K plain iterations of the equilibrium map from the zero state, then the
classifier, with BN folded into the convs. The iterations are unrolled rather than written as an ONNX
`Loop`: K is fixed at export, unrolled graphs are what TensorRT and ONNX Runtime optimise best (a Loop
body is a subgraph they fuse across poorly, and TensorRT runs Loop iterations sequentially without
cross-iteration fusion), and every intermediate rate stays addressable for `--with-rates`. The cost is
a file K times the loop's op count; the weights are shared initializers, so it does not grow K-fold.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mpis.errors import MpisError
from mpis.model.network import MPISNet
from mpis.train.checkpoint import atomic_write

INPUT_NAME = "input"
LOGITS_NAME = "logits"
ATOL = 1e-5


class RateGraph(nn.Module):
    """x -> logits (and the rate of every neuron layer after the last iteration)."""

    def __init__(self, net: MPISNet, iterations: int, with_rates: bool, horizon: int | None = None):
        super().__init__()
        self.net = net.folded_copy()
        self.iterations = iterations
        self.with_rates = with_rates
        self.horizon = horizon

    @property
    def output_names(self) -> list[str]:
        rates = [f"rate_{n.name}" for n in self.net.neurons] if self.with_rates else []
        return [LOGITS_NAME, *rates]

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        values = self.net.rate_iterations(x, self.iterations, self.horizon)
        logits = self.net.classify(values)
        if not self.with_rates:
            return logits
        return (logits, *(values[n.name] for n in self.net.neurons))


@dataclass
class ParityReport:
    max_abs_logits: float
    max_abs_rates: float
    argmax_equal: bool
    batch: int


def check_parity(module: RateGraph, path: Path, inputs: Tensor, providers: list[str] | None = None) -> ParityReport:
    """Run ONNX Runtime and PyTorch on `inputs` and compare every output."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: inputs.numpy()})
    with torch.no_grad():
        want = module(inputs)
    want = [want] if isinstance(want, Tensor) else list(want)
    deltas = [float(np.max(np.abs(g - w.numpy()))) for g, w in zip(got, want, strict=True)]
    return ParityReport(
        max_abs_logits=deltas[0],
        max_abs_rates=max(deltas[1:], default=0.0),
        argmax_equal=bool((got[0].argmax(1) == want[0].numpy().argmax(1)).all()),
        batch=len(inputs),
    )


def export_onnx(
    net: MPISNet,
    path: str | Path,
    iterations: int,
    with_rates: bool,
    sample: Tensor,
    overwrite: bool = False,
    horizon: int | None = None,
) -> ParityReport:
    """Write the ONNX file atomically; it appears at `path` only if it passes the checker and the parity
    check (fp32, |Δlogits| ≤ 1e-5) on `sample`. Rate and argmax differences are reported, not enforced:
    rounding in a loop with high BN gain can move a rate by more than the logits tolerance."""
    try:
        import onnx
        import onnxruntime  # noqa: F401  (the parity check needs it)
    except ImportError as err:
        raise MpisError(f"ONNX export needs the onnx extra ({err.name} is missing): pip install 'mpis[onnx]'") from None
    if iterations < 1:
        raise MpisError(f"--iters must be >= 1, got {iterations}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise MpisError(f"{path} already exists; choose another path or pass --overwrite")
    if not path.parent.is_dir():
        raise MpisError(f"cannot write {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise MpisError(f"cannot write {path}: folder {path.parent} is not writable")
    module = RateGraph(net, iterations, with_rates, horizon).eval()
    reports: list[ParityReport] = []

    def write(tmp: str) -> None:
        batch = torch.export.Dim("batch", min=1, max=65536)
        with torch.no_grad(), quiet_exporter():
            program = torch.onnx.export(
                module,
                (sample[:2],),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=module.output_names,
                dynamic_shapes={"x": {0: batch}},
                optimize=True,
                verbose=False,
            )
        program.save(tmp, external_data=False)
        onnx.checker.check_model(tmp, full_check=True)
        report = check_parity(module, Path(tmp), sample)
        if not report.max_abs_logits <= ATOL:
            raise MpisError(
                f"ONNX Runtime disagrees with PyTorch: max |Δlogits| {report.max_abs_logits:.2e}, "
                f"max |Δrates| {report.max_abs_rates:.2e} (tolerance {ATOL:.0e}); nothing written"
            )
        reports.append(report)

    atomic_write(path, write)
    return reports[0]


@contextlib.contextmanager
def quiet_exporter():
    """The dynamo exporter logs progress and warnings about optional packages; a CLI user needs none."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
