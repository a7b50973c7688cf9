"""What `mpis check` is asked: the T and v_init lists as the command line gives them, and the options."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mpis.errors import MpisError

DEFAULT_STEPS = (10, 30, 100, 300)
DEFAULT_MIN_AGREEMENT = 0.99
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
    overwrite: bool = False  # replace an earlier check's report.json and check.png


DEFAULT_V_INITS = "0,0.5vth"
