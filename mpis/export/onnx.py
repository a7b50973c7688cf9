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
import copy
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
OPSET = 17  # what the common converters take (onnx2torch has no Shape-19); ONNX Runtime, OpenVINO and TensorRT too
RTOL = 1e-4  # parity: ONNX Runtime's logits within this fraction of the logits' scale of the float64 truth
FP32_MARGIN = 4.0  # ... or within this many times PyTorch fp32's own error, when the graph amplifies rounding


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
    """ONNX Runtime and PyTorch fp32, each against a float64 evaluation of the same graph (the truth both
    approximate: K unrolled fp32 iterations amplify rounding, so PyTorch fp32 is not the reference)."""

    batch: int
    logits_scale: float  # max |logit| of the float64 evaluation
    onnx_logits: float  # max |ONNX Runtime − float64| of the logits
    torch_logits: float  # max |PyTorch fp32 − float64| of the logits
    onnx_rates: float | None  # max |ONNX Runtime − float64| of the rates; None when none were exported
    torch_rates: float | None
    argmax_agreement: float  # ONNX Runtime vs float64

    @property
    def tolerance(self) -> float:
        return max(RTOL * self.logits_scale, FP32_MARGIN * self.torch_logits)

    @property
    def passed(self) -> bool:
        return self.onnx_logits <= self.tolerance

    def summary(self) -> str:
        rates = ""
        if self.onnx_rates is not None:
            rates = f", rates {self.onnx_rates:.1e} (PyTorch fp32 {self.torch_rates:.1e})"
        return (
            f"parity vs float64 on {self.batch} inputs: max |Δlogits| ONNX Runtime {self.onnx_logits:.1e}, "
            f"PyTorch fp32 {self.torch_logits:.1e} (logits up to {self.logits_scale:.2g}, tolerance "
            f"{self.tolerance:.1e}){rates}; argmax agreement {self.argmax_agreement:.4f}"
        )


def check_parity(module: RateGraph, path: Path, inputs: Tensor, providers: list[str] | None = None) -> ParityReport:
    """Run ONNX Runtime, PyTorch fp32 and PyTorch float64 on `inputs`; compare the first two with the third."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    got = [g.astype(np.float64) for g in session.run(None, {INPUT_NAME: inputs.float().numpy()})]
    exact = copy.deepcopy(module).double()
    with torch.no_grad():
        fp32, truth = module(inputs.float()), exact(inputs.double())
    fp32, truth = ([t] if isinstance(t, Tensor) else list(t) for t in (fp32, truth))
    fp32 = [t.double().numpy() for t in fp32]
    truth = [t.numpy() for t in truth]

    def error(outputs: list[np.ndarray], index: slice) -> float | None:
        deltas = [float(np.max(np.abs(a - b))) for a, b in zip(outputs[index], truth[index], strict=True)]
        return max(deltas) if deltas else None

    return ParityReport(
        batch=len(inputs),
        logits_scale=float(np.max(np.abs(truth[0]))),
        onnx_logits=error(got, slice(0, 1)),
        torch_logits=error(fp32, slice(0, 1)),
        onnx_rates=error(got, slice(1, None)),
        torch_rates=error(fp32, slice(1, None)),
        argmax_agreement=float(np.mean(got[0].argmax(1) == truth[0].argmax(1))),
    )


def compatible_reshapes(model) -> None:
    """Set allowzero=0 on Reshape nodes whose target shape cannot hold a 0 (the batch dimension, declared
    >= 1, and nonzero constants): the same result, and converters such as onnx2torch refuse allowzero=1."""
    from onnx import numpy_helper

    producers = {out: node for node in model.graph.node for out in node.output}
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def batch_dim(name: str) -> bool:
        node = producers.get(name)
        if node is None or node.op_type != "Shape" or node.input[0] != INPUT_NAME:
            return False
        attrs = {a.name: a.i for a in node.attribute}
        return attrs.get("start", 0) == 0 and attrs.get("end") == 1

    def never_zero(name: str) -> bool:
        if name in constants:
            return bool(np.all(constants[name] != 0))
        node = producers.get(name)
        if node is not None and node.op_type == "Concat":
            return all(never_zero(part) for part in node.input)
        return batch_dim(name)

    for node in model.graph.node:
        if node.op_type == "Reshape" and never_zero(node.input[1]):
            for attribute in node.attribute:
                if attribute.name == "allowzero":
                    attribute.i = 0


def export_onnx(
    net: MPISNet,
    path: str | Path,
    iterations: int,
    with_rates: bool,
    sample: Tensor,
    overwrite: bool = False,
    horizon: int | None = None,
    say=None,
) -> ParityReport:
    """Write the ONNX file atomically; it appears at `path` only if it passes the checker and the parity
    rule on `sample`: ONNX Runtime's logits within RTOL of the logits' scale of a float64 evaluation of the
    same graph (or within FP32_MARGIN times PyTorch fp32's own error, where the graph amplifies rounding
    past that). Rate and argmax differences are reported, not enforced: near a tie or a threshold,
    rounding can move an argmax or a rate without the graph being wrong. `say` gets progress lines."""
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
    say = say or (lambda _line: None)
    module = RateGraph(net, iterations, with_rates, horizon).eval()
    reports: list[ParityReport] = []

    def write(tmp: str) -> None:
        batch = torch.export.Dim("batch", min=1, max=65536)
        say(f"  tracing {iterations} unrolled iterations (torch.onnx dynamo exporter, opset {OPSET})")
        with torch.no_grad(), quiet_exporter():
            program = torch.onnx.export(
                module,
                (sample[:2],),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=module.output_names,
                dynamic_shapes={"x": {0: batch}},
                optimize=True,
                opset_version=OPSET,
                verbose=False,
            )
        model = program.model_proto
        compatible_reshapes(model)
        onnx.save_model(model, tmp)
        onnx.checker.check_model(tmp, full_check=True)
        say(f"  checking ONNX Runtime against a float64 evaluation on {len(sample)} inputs")
        report = check_parity(module, Path(tmp), sample)
        if not report.passed:
            raise MpisError(f"ONNX Runtime disagrees with the graph: {report.summary()}; nothing written")
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
