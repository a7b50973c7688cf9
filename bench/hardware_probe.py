"""Probe which neuromorphic-hardware toolchains accept small NIR graphs (docs/toolchain-importers.md).

Runs one toolchain's probes in a subprocess with that toolchain's own interpreter and prints one line
per test graph: `OK ...` or the first line of the error. Nothing here runs on hardware; vendor
runtimes that are not installable (samna, py-spinnaker2) are named in the output.

    python bench/hardware_probe.py --toolchain speck --python .venv-sinabs/bin/python \
        [--mpis-nir /tmp/hw/mpis_universal.nir] [--nir-lava NIR/paper/nir_to_lava.py]

The mpis file is an `export_toolchain_nir(..., "universal", 0.5)` export (docs/one-nir-file.md) of the
test net `16C3S1-2F1*(32C3S2-48C3S1)-FC10` on a 1x16x16 input (tests/conftest.py).

Venvs used on 2026-12-05 (Linux x86_64, no GPU, `OMP_NUM_THREADS=1`; torch==2.13.0 is the CPU build
that this machine serves offline, so install it first):

    speck (Sinabs DynapCNN): the project's .venv-sinabs (Python 3.11, sinabs 3.1.3, nir 1.0.4,
        nirtorch 2.0.2, torch 2.13.0+cpu). samna is not installed: PyPI's samna 0.48.6 is a 15 kB shim
        whose import runs `pip install` against a GitLab index.
    xylo (Rockpool), Python 3.11:
        python3.11 -m venv /tmp/hw/xylo && /tmp/hw/xylo/bin/pip install torch==2.13.0
        /tmp/hw/xylo/bin/pip install 'rockpool[nir]==3.1.0'    # nir 1.0.4, nirtorch 2.0.2
        /tmp/hw/xylo/bin/pip install --no-deps xylosim
    lava (Loihi 2), two venvs: lava-nc 0.10.0 and lava-dl 0.6.0 require Python < 3.11 and lava-dl pins
    torch < 2.4, but the only CPU torch here is 2.13 for Python 3.11:
        python3.10 -m venv /tmp/hw/lava && /tmp/hw/lava/bin/pip install lava-nc==0.10.0 nir
        /tmp/hw/lava/bin/pip install --no-deps lava-dl==0.6.0 nirtorch           # no torch
        python3.11 -m venv /tmp/hw/lava311 && /tmp/hw/lava311/bin/pip install torch==2.13.0
        /tmp/hw/lava311/bin/pip install --ignore-requires-python --no-deps lava-nc==0.10.0 lava-dl==0.6.0
        /tmp/hw/lava311/bin/pip install 'numpy<2' scipy h5py networkx asteval cloudpickle scikit-learn \
            nir matplotlib && /tmp/hw/lava311/bin/pip install --no-deps nirtorch opencv-python-headless
    spinnaker2: any interpreter; the probe runs `pip download py-spinnaker2 --no-deps`.

NIR's own Lava converter is a script in the NIR repository (paper/nir_to_lava.py); pass its path with
--nir-lava. Modules that a code path does not use but that cannot be imported (samna, torchvision, and
for lava the half that does not import in that venv) are replaced by empty stand-ins; every such
replacement is printed as a `stub:` line.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

COMMON = r'''
import sys, importlib, importlib.abc, importlib.machinery, importlib.util, importlib.metadata as md
from unittest import mock
import numpy as np

class _Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Stand-in modules for packages that cannot be installed here and that the probed path does not run."""
    def __init__(self): self.roots = []
    def find_spec(self, name, path, target=None):
        hit = any(name == r or name.startswith(r + ".") for r in self.roots)
        return importlib.machinery.ModuleSpec(name, self, is_package=True) if hit else None
    def create_module(self, spec): return mock.MagicMock(__path__=[], __name__=spec.name)
    def exec_module(self, module): pass
STUB = _Stub(); sys.meta_path.insert(0, STUB)

def stub(*names):
    STUB.roots += names
    print("stub:", ", ".join(names))

def versions(*dists):
    out = []
    for d in dists:
        try: out.append(f"{d} {md.version(d)}")
        except md.PackageNotFoundError: out.append(f"{d} (not installed)")
    print("versions: python", sys.version.split()[0] + ", " + ", ".join(out))

def first_line(e):
    text = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    line = " ".join(text[:2]) if text and text[0].endswith(":") else (text[0] if text else "")
    return f"{type(e).__name__}: {line}"

def probe(label, fn, *args):
    try: print(f"{label}: OK {fn(*args) or ''}".rstrip())
    except BaseException as e:  # noqa: BLE001 - report everything, including assertions and SystemExit
        print(f"{label}: {first_line(e)}")

def graphs(nir):
    """The test graphs, built with the venv's own nir (1.0.4 and 1.0.8 share these signatures)."""
    rng = np.random.default_rng(0)
    f = lambda *s: np.asarray(rng.normal(0, 0.3, s), dtype=np.float32)
    one = lambda s, v: np.full(s, v, "f4")
    # `s1`: parameters of shape (1,), one value per population (what DynapCNN discretisation accepts)
    IF = lambda s, s1=False: nir.IF(r=one((1,) if s1 else s, 1), v_threshold=one((1,) if s1 else s, 1))
    LIF = lambda s, s1=False: nir.LIF(tau=one((1,) if s1 else s, 10), r=one((1,) if s1 else s, 1),
                                      v_leak=one((1,) if s1 else s, 0), v_threshold=one((1,) if s1 else s, 1))
    conv = lambda ci, co: nir.Conv2d(input_shape=(8, 8), weight=f(co, ci, 3, 3), stride=1, padding=1,
                                     dilation=1, groups=1, bias=np.zeros(co, "f4"))
    inp = lambda *s: nir.Input({"input": np.array(s)})
    out = lambda n: nir.Output({"output": np.array([n])})
    flat = lambda: nir.Flatten({"input": np.array([2, 8, 8])}, 0, -1)
    aff = lambda i, o: nir.Affine(f(o, i), np.zeros(o, "f4"))
    def G(nodes, edges):
        try: return nir.NIRGraph(nodes=nodes, edges=edges, type_check=False)  # nir 1.0.8 checks shapes
        except TypeError: return nir.NIRGraph(nodes=nodes, edges=edges)  # nir 1.0.4 has no type_check
    chain = lambda *k: list(zip(k[:-1], k[1:]))
    ff = lambda neuron: G({"input": inp(1, 8, 8), "conv": conv(1, 2), "spk": neuron((2, 8, 8)), "flat": flat(),
                          "fc": aff(128, 3), "output": out(3)}, chain("input", "conv", "spk", "flat", "fc", "output"))
    cyc = ff(IF); cyc.nodes["rec"] = conv(2, 1); cyc.edges += [("spk", "rec"), ("rec", "conv")]
    def head(neuron, loop=False):  # every weight layer followed by a neuron layer, shape-(1,) parameters
        n = lambda s: neuron(s, True)
        nodes = {"input": inp(2, 8, 8), "conv1": conv(2, 2), "spk1": n((2, 8, 8)), "flat": flat(),
                 "fc": aff(128, 3), "spk_out": n((3,)), "output": out(3)}
        if not loop:
            return G(nodes, chain("input", "conv1", "spk1", "flat", "fc", "spk_out", "output"))
        nodes.update(conv2=conv(2, 2), spk2=n((2, 8, 8)))
        return G(nodes, chain("input", "conv1", "spk1", "conv2", "spk2", "flat", "fc", "spk_out", "output")
                 + [("spk2", "conv1")])
    dense = lambda neuron: G({"input": inp(4), "fc1": aff(4, 8), "spk1": neuron((8,)), "fc2": aff(8, 3),
                             "spk2": neuron((3,)), "output": out(3)},
                            chain("input", "fc1", "spk1", "fc2", "spk2", "output"))
    CUBA = lambda s: nir.CubaLIF(tau_syn=one(s, 0.02), tau_mem=one(s, 0.02), r=one(s, 1), v_leak=one(s, 0),
                                 v_threshold=one(s, 1))
    def recurrent(neuron):
        g = dense(neuron); g.nodes["rec"] = aff(8, 8); g.edges += [("spk1", "rec"), ("rec", "spk1")]
        return g
    return {
        "a ff conv IF (Conv2d-IF-Flatten-Affine)": (ff(IF), (1, 8, 8)),
        "b ff conv LIF": (ff(LIF), (1, 8, 8)),
        "c cycle conv IF (IF-Conv2d back into Conv2d)": (cyc, (1, 8, 8)),
        "a' conv IF, spiking head, (1,) params": (head(IF), (2, 8, 8)),
        "b' conv LIF, spiking head, (1,) params": (head(LIF), (2, 8, 8)),
        "c' two-layer IF loop (IF2 back into Conv2d 1), as a'": (head(IF, loop=True), (2, 8, 8)),
        "d dense LIF (Affine-LIF-Affine-LIF)": (dense(LIF), (4,)),
        "d' dense IF": (dense(IF), (4,)),
        "e dense LIF + recurrent Affine (LIF-Affine-LIF)": (recurrent(LIF), (4,)),
        "f dense CubaLIF": (dense(CUBA), (4,)),
        "g dense CubaLIF + recurrent Affine": (recurrent(CUBA), (4,)),
    }

def read_mpis(nir, path):
    try: return nir.read(path, type_check=False)
    except TypeError: return nir.read(path)  # nir <= 1.0.4 has no type_check
'''

SPECK = r"""
versions("sinabs", "nir", "nirtorch", "torch", "samna")
stub("samna", "samnagui")  # PyPI samna 0.48.6 is a 15 kB shim whose import pip-installs from a GitLab index
import nir, sinabs
from sinabs.backend.dynapcnn import DynapcnnNetwork
from sinabs.backend.dynapcnn.chip_factory import ChipFactory

def speck(g, shape):
    m = sinabs.from_nir(g, batch_size=1)
    net = DynapcnnNetwork(m, input_shape=shape, discretize=True)
    cores = ChipFactory("speck2fmodule").get_config_builder().map_layers_to_cores(net.dynapcnn_layers)
    return (f"{len(net.dynapcnn_layers)} DynapCNN layers, layer destinations {net.layer_destination_map}, "
            f"speck2f cores {cores} (config/upload need samna: not run)")

for label, (g, shape) in graphs(nir).items():
    if len(shape) == 3: probe(label, speck, g, shape)
    else: print(f"{label}: skipped (DynapCNN input is (C, H, W); the dense graphs are for Xylo)")
if MPIS:
    probe("mpis " + MPIS, lambda: speck(read_mpis(nir, MPIS), (1, 16, 16)))
"""

XYLO = r"""
versions("rockpool", "nir", "nirtorch", "torch", "xylosim", "samna")
stub("samna")  # rockpool.devices.xylo imports samna (Xylo Audio 3 support) unguarded
import nir
from rockpool.nn.modules import from_nir
from rockpool.devices.xylo.syns61201 import mapper  # Xylo Audio 2; the same DRC family as Audio 3 / IMU

def xylo(g):
    net = from_nir(g)
    spec = mapper(net.as_graph(), weight_dtype="float", threshold_dtype="float", dash_dtype="float")
    return f"mapped: weights_in {spec['weights_in'].shape}, weights_rec {spec['weights_rec'].shape}"

for label, (g, _) in graphs(nir).items():
    probe(label, xylo, g)
if MPIS:
    probe("mpis " + MPIS, lambda: xylo(read_mpis(nir, MPIS)))
"""

LAVA = r"""
versions("lava-nc", "lava-dl", "nir", "nirtorch", "torch")
import nir
probe("import lava.proc.lif.process (lava-nc)", lambda: importlib.import_module("lava.proc.lif.process") and None)
probe("import lava.lib.dl.netx", lambda: importlib.import_module("lava.lib.dl.netx") and None)
def nir_readers():
    hits = [str(f) for f in md.files("lava-dl") or () if f.suffix == ".py" and "import nir" in f.read_text()]
    return f"files of lava-dl that import nir: {hits}"
probe("lava-dl NIR reader", nir_readers)
if NIR_LAVA:
    have = {}
    for mod in ("torch", "nirtorch", "lava.proc.lif.process", "lava.proc.dense.process"):
        try: importlib.import_module(mod); have[mod] = True
        except BaseException: have[mod] = False
    stub("torchvision", "cv2")  # only lava.lib.dl.slayer.object_detection imports them
    try: importlib.import_module("lava.lib.dl.slayer"); have["slayer"] = True
    except BaseException: have["slayer"] = False
    missing = [m for m, ok in have.items() if not ok]
    if missing: stub(*["lava.lib.dl.slayer" if m == "slayer" else m for m in missing])
    spec = importlib.util.spec_from_file_location("nir_to_lava", NIR_LAVA)
    n2l = importlib.util.module_from_spec(spec); spec.loader.exec_module(n2l)
    libs = []
    if have["lava.proc.lif.process"]: libs.append(n2l.LavaLibrary.Lava)
    if have["torch"] and have["slayer"]: libs.append(n2l.LavaLibrary.LavaDl)
    for lib in libs:
        conf = n2l.ImportConfig(library_preference=lib)
        for label, (g, _) in graphs(nir).items():
            probe(f"nir_to_lava {lib.name}: {label}", lambda g=g: type(n2l.import_from_nir(g, conf)).__name__)
        if MPIS:
            mpis = read_mpis(nir, MPIS)
            probe(f"nir_to_lava {lib.name}: mpis", lambda: type(n2l.import_from_nir(mpis, conf)).__name__)
"""

SPINNAKER2 = r"""
import subprocess, tempfile
for dist, mod in (("py-spinnaker2", "spinnaker2"),):
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-m", "pip", "download", dist, "--no-deps", "-d", d],
                           capture_output=True, text=True)
    err = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("ERROR")]
    print(f"pip download {dist}: " + ("OK" if r.returncode == 0 else (err[0] if err else f"rc {r.returncode}")))
    probe(f"import {mod}", lambda: importlib.import_module(mod) and None)
"""

PROBES = {"speck": SPECK, "xylo": XYLO, "lava": LAVA, "spinnaker2": SPINNAKER2}


def child_source(toolchain: str, mpis_nir: str | None, nir_lava: str | None) -> str:
    """The program that the toolchain's interpreter runs."""
    return f"MPIS = {mpis_nir!r}\nNIR_LAVA = {nir_lava!r}\n{COMMON}\n{PROBES[toolchain]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toolchain", required=True, choices=sorted(PROBES))
    parser.add_argument("--python", default=sys.executable, help="the toolchain venv's interpreter")
    parser.add_argument("--mpis-nir", help="also probe this mpis NIR file (e.g. an --target universal export)")
    parser.add_argument("--nir-lava", help="path to NIR's paper/nir_to_lava.py (lava only)")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    source = child_source(args.toolchain, args.mpis_nir, args.nir_lava)
    result = subprocess.run([args.python, "-c", source], env=env, capture_output=True, text=True, timeout=args.timeout)
    print(result.stdout, end="")
    if result.returncode:
        tail = result.stderr.strip().splitlines()
        print(f"probe process exited {result.returncode}: {tail[-1] if tail else ''}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
