"""What `mpis check` measured: per v_init and T the rate error per layer and the argmax agreement, the
toolchains' rows, the table it prints, report.json and check.png, and the PASS / FAIL verdict."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpis.check.artifacts import Artifacts
from mpis.check.options import VInit
from mpis.errors import MpisError
from mpis.train.checkpoint import atomic_write

REPORT = "report.json"
PLOT = "check.png"


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
    def synop_ratio(self) -> float | None:
        """None where synapses are not counted (a toolchain file given with --nir)."""
        dense = self.steps * self.dense_macs
        return self.synaptic_ops / dense if dense else None

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
    """One toolchain's importer on the universal file (`mpis export --target universal`), one v_init and T:
    the share of spike counts (per neuron and input) equal to mpis's, and argmax agreement with mpis and
    with ONNX."""

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
    threads: int = 0  # torch's threads in the importer's process (its seconds depend on them)
    float_agreement: float | None = None  # the file's dyadic net vs the float model: argmax agreement,
    float_identical: float | None = None  # share of identical spike counts,
    float_rate_error: float | None = None  # and mean |Δrate|

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
    reference: dict  # how good the reference is: see `check.run.reference_quality`
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
            "toolchains_what": "each toolchain's own importer on the mpis export --target universal file "
            "(dyadic weights): "
            "share of spike counts equal to mpis's (every neuron and input), argmax agreement with mpis's spikes "
            "and with the ONNX rate graph; float_*: the file's dyadic net against the float model (argmax agreement, "
            "identical spike counts, mean |delta rate|), what the quantisation costs",
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
                f"  {'synaptic ops / dense':<{width}} {'':<11}"
                + "".join(
                    f"{r.synop_ratio:>{col}.2%}" if r.synop_ratio is not None else f"{'n/a':>{col}}" for r in rows
                )
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
        "toolchains (their own NIR importers on one mpis export --target universal file, dyadic weights, "
        "inputs on its 2^-8 grid):",
        f"  {'toolchain':<20} {'v_init':<8} {'T':>5} {'identical spike counts':>23} {'argmax = mpis':>14} "
        f"{'argmax = ONNX':>14} {'seconds':>8}   8-bit net vs float model: argmax, identical counts, mean |Δr|",
    ]
    for r in rows:
        name = f"{r.toolchain} {r.version}".strip()
        if r.status != "ran":
            out.append(f"  {name:<20} {r.v_init:<8} {r.steps:>5} {r.status}")
            continue
        out.append(
            f"  {name:<20} {r.v_init:<8} {r.steps:>5} {r.identical:>23.6f} {r.agreement_mpis:>14.4f} "
            f"{r.agreement_onnx:>14.4f} {r.seconds:>8.1f}   {r.float_agreement:.4f}, {r.float_identical:.4f}, "
            f"{r.float_rate_error:.5f}"
        )
    return out


# ---- report files ---------------------------------------------------------------------------------
def write_report(report: CheckReport, folder: Path) -> dict[str, Path]:
    """report.json (every number of the table, and the inputs) and check.png (mean |Δrate| vs T)."""
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
