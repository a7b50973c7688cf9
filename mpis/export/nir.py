"""The spiking network as a NIR graph of standard nodes (docs/nir-mapping.md).

The exporter walks the same graph (`MPISNet.graph`) as training and ONNX export. Every map of the
equilibrium loop lives on the loop's coarsest grid; a map at `factor` f > 1 is split by phase into f²
nodes of shape (C, G, G) (phase (a, b) holds pixels (f·i + a, f·j + b)). Each linear op (conv, Trans,
fusion) becomes one small stride-1 `Conv2d` per pair of (input phase, output phase) with a nonzero
kernel block, found by probing the op with impulses (`polyphase.polyphase_conv`), so stored weights
stay close to the nonzero taps. Each block's metadata names its op ({"op", "in_phase", "out_phase",
"in_factor", "out_factor"}), so a runtime can reassemble the op in native layout (`spike.native_layout`).
Conv ops are composed into edges: op(a + b) = op(a) + op(b), the bias
added once per output phase, and the NIR rule "incoming edges are summed" does the adding.

Neurons (exact flavour): `I` + `Threshold` + `Scale(−Vth)` self-loop per phase (reset by subtraction),
initial potential as the threshold shift. The Trans feedback's conv chain is placed after every other
node of the loop, so the integrators of each stream's first layer read it from the previous step.
Node names start with their execution index: `nir.read` sorts nodes by name, and nirtorch's
interpreter walks them in that order, reading inputs it has not reached yet from the previous step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpis.errors import MpisError
from mpis.export import DEFAULT_MAX_PARAM_GROWTH
from mpis.export.nir_nodes import subtract_reset_if
from mpis.export.polyphase import polyphase_conv
from mpis.model.layers import NearestUp
from mpis.model.network import MPISNet

FLAVOURS = ("exact", "compact")
Phase = tuple[int, int]


@dataclass(frozen=True)
class Layout:
    """Where a map's pixels live: `factor`² phase nodes on a `grid`-sized storage grid."""

    grid: tuple[int, int]
    factor: int

    @property
    def phases(self) -> list[Phase]:
        return [(a, b) for a in range(self.factor) for b in range(self.factor)]


@dataclass
class NirExport:
    """The exported graph plus what the CLI reports: parameter counts and every layer's layout."""

    graph: object  # nir.NIRGraph (nir is an optional dependency)
    nir_params: int
    source_params: int
    layouts: dict[str, Layout]

    @property
    def growth(self) -> float:
        return self.nir_params / self.source_params


@dataclass
class _LinearOp:
    """One linear op, split into where each kernel tap lands and what it weighs.

    `tap_probe` is the op on a single channel with one output channel per kernel tap (one-hot kernels):
    probing it on the polyphase grid costs the same for any channel count, and every grid-kernel block
    is then `taps` (C_out, C_in, taps) contracted with that block's 0/1 tap pattern: exact weights."""

    tap_probe: Callable[[Tensor], Tensor]
    taps: Tensor
    bias: Tensor
    kernel: int  # spatial size: bounds how far (in grid cells) the probe has to look
    weights: int  # parameters of the original op (0 for nearest up-sampling)
    conv: nn.Conv2d | None = None

    @property
    def in_channels(self) -> int:
        return self.taps.shape[1]


def _one_hot_taps(kernel: int) -> Tensor:
    return torch.eye(kernel * kernel).reshape(kernel * kernel, 1, kernel, kernel)


def _linear_ops(module: nn.Module, channels: int) -> list[_LinearOp]:
    """Split a module into its chain of linear ops (never merged: merging breaks the zero borders);
    `channels` is the input's channel count, needed for parameter-free ops."""
    if isinstance(module, nn.Sequential):
        return [op for child in module for op in _linear_ops(child, channels)]
    bias = getattr(module, "bias", None)
    if isinstance(module, nn.ConvTranspose2d):
        k, weight = module.kernel_size[0], module.weight.detach()
        one_hot = _one_hot_taps(k).transpose(0, 1)

        def probe(x: Tensor, m: nn.ConvTranspose2d = module) -> Tensor:
            return F.conv_transpose2d(x, one_hot, None, m.stride, m.padding, m.output_padding)

        taps = weight.transpose(0, 1).reshape(module.out_channels, module.in_channels, k * k)
        bias = bias.detach() if bias is not None else torch.zeros(module.out_channels)
        return [_LinearOp(probe, taps, bias, k, weight.numel())]
    if isinstance(module, nn.Conv2d):
        k, weight = module.kernel_size[0], module.weight.detach()
        one_hot = _one_hot_taps(k)

        def probe(x: Tensor, m: nn.Conv2d = module) -> Tensor:
            return F.conv2d(x, one_hot, None, m.stride, m.padding)

        taps = weight.reshape(module.out_channels, module.in_channels, k * k)
        bias = bias.detach() if bias is not None else torch.zeros(module.out_channels)
        return [_LinearOp(probe, taps, bias, k, weight.numel(), module)]
    if isinstance(module, NearestUp):
        factor = module.factor

        def probe(x: Tensor) -> Tensor:
            return x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)

        return [_LinearOp(probe, torch.eye(channels)[:, :, None], torch.zeros(channels), 1, 0)]
    raise MpisError(f"NIR export does not support the layer {type(module).__name__}")


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _crop(kernel: Tensor) -> Tensor:
    """Drop all-zero outer rings of a (C_out, C_in, k, k) kernel, keeping it centred (odd k)."""
    nonzero = kernel.abs().amax(dim=(0, 1)) > 0
    rows, cols = torch.nonzero(nonzero, as_tuple=True)
    centre = kernel.shape[-1] // 2
    if not len(rows):
        return kernel[:, :, centre : centre + 1, centre : centre + 1]
    radius = int(max((rows - centre).abs().max(), (cols - centre).abs().max()))
    return kernel[:, :, centre - radius : centre + radius + 1, centre - radius : centre + radius + 1]


def _strided_native(block: Tensor, stride: int) -> tuple[Tensor, int]:
    """A grid kernel over the polyphase channels of a native map (c·s² + a·s + b) as one stride-s conv on
    the native map: W[o, c, s·u + a, s·v + b] = K[o, c·s² + a·s + b, u, v], padding s·radius, with
    all-zero border rings cropped (square: nir 1.0.8 infers output shapes from weight.shape[2] alone)."""
    c_out, channels, k, _ = block.shape
    c_in = channels // stride**2
    native = block.reshape(c_out, c_in, stride, stride, k, k).permute(0, 1, 4, 2, 5, 3)
    native = native.reshape(c_out, c_in, k * stride, k * stride)
    padding, size = stride * (k // 2), k * stride
    trim = padding
    for dim in (2, 3):
        profile = native.abs().amax(dim=tuple(d for d in range(4) if d != dim)) > 0
        idx = torch.nonzero(profile).flatten()
        if len(idx):
            trim = min(trim, int(idx[0]), size - 1 - int(idx[-1]))
    native = native[:, :, trim : size - trim, trim : size - trim]
    return native.contiguous(), padding - trim


def _phase(array: np.ndarray, layout: Layout, phase: Phase) -> np.ndarray:
    f = layout.factor
    return np.ascontiguousarray(array[:, phase[0] :: f, phase[1] :: f])


def native_layer(phases: dict[Phase, Tensor], factor: int) -> Tensor:
    """Reassemble a layer's native (B, C, H, W) map from its phase tensors (B, C, G, G)."""
    first = next(iter(phases.values()))
    batch, channels, h, w = first.shape
    out = first.new_zeros(batch, channels, h * factor, w * factor)
    for (a, b), value in phases.items():
        out[:, :, a::factor, b::factor] = value
    return out


class _Exporter:
    """Walks `net.graph` once and emits NIR nodes in execution order (see the module docstring)."""

    def __init__(self, net: MPISNet, flavour: str, v_init: float | None):
        import nir

        self.nir = nir
        self.net = net
        self.flavour = flavour
        self.v_init = v_init
        self.nodes: list[tuple[str, object]] = []
        self.late_nodes: list[tuple[str, object]] = []  # the Trans chain: runs after the rest of the loop
        self.edges: list[tuple[str, str]] = []
        self.layouts: dict[str, Layout] = {}
        self.sources: dict[str, dict[Phase, list[str]]] = {}  # per map and phase: NIR nodes summing to it
        self.late_maps: set[str] = set()
        self.with_bias: dict[str, set[Phase]] = {}  # output phases of a map that already carry its bias
        self.fan_in = {n.name: len(n.inputs) + len(n.delayed) for n in net.graph.nodes}
        # (map, phase, neuron node): connected at the end, when the Trans chain into layer 1 exists too
        self.pending: list[tuple[str, Phase, str]] = []
        self.shiftable: dict[str, object] = {}  # a neuron phase's input node -> the node holding its θ / v_init
        self.loop = {n.name for n in net.loop_nodes}
        self.loop_grid = min(n.shape[1:] for n in net.loop_nodes)

    def add(self, name: str, node: object, late: bool = False) -> str:
        (self.late_nodes if late else self.nodes).append((name, node))
        return name

    def connect(self, sources: list[str], target: str) -> None:
        self.edges.extend((source, target) for source in sources)

    def layout(self, name: str, shape: tuple[int, ...]) -> Layout:
        size = tuple(shape[1:])
        if name.split(".")[0] not in self.loop:
            return Layout(size, 1)
        grid = self.loop_grid
        factor = size[0] // grid[0]
        if (factor * grid[0], factor * grid[1]) != size:
            raise MpisError(
                f"NIR export needs every map of the equilibrium loop to be a whole multiple of the coarsest "
                f"({grid[0]}x{grid[1]}), but {name.split('.')[0]} is {size[0]}x{size[1]}; use an input size "
                f"divisible by the network's total stride"
            )
        return Layout(grid, factor)

    # ---- linear maps -------------------------------------------------------------------------
    def emit_linear(self, target: str, shape: tuple[int, ...], module: nn.Module, source: str, late: bool) -> None:
        """Add the op `module` applied to the map `source` to the map `target` (op(a + b) = op(a) + op(b),
        so a node with several inputs is emitted one input at a time); a chain of ops gets one
        intermediate map per link."""
        ops = _linear_ops(module, self.net.graph.node(source).shape[0])
        for k, op in enumerate(ops):
            last = k == len(ops) - 1
            name = target if last else f"{target}.{k}"
            src = self.layouts[source]
            size = (src.grid[0] * src.factor, src.grid[1] * src.factor)
            out_size = op.tap_probe(torch.zeros(1, 1, *size)).shape[2:]
            out_shape = shape if last else (op.taps.shape[0], *out_size)
            self.emit_op(name, out_shape, op, source, late)
            source = name

    def emit_op(self, target: str, shape: tuple[int, ...], op: _LinearOp, source: str, late: bool) -> None:
        if target not in self.layouts:
            self.layouts[target] = self.layout(target, shape)
            self.sources[target] = {p: [] for p in self.layouts[target].phases}
            self.with_bias[target] = set()
        out, src, with_bias = self.layouts[target], self.layouts[source], self.with_bias[target]
        late = late or source in self.late_maps
        if late:
            self.late_maps.add(target)
        prefix = target if self.fan_in.get(target, 1) == 1 else f"{target}.from_{source}"
        for phase_out, phase_in, weight, stride, padding in self.blocks(op, src, out):
            phases = (
                "" if out.factor == src.factor == 1 else f".q{phase_in[0]}{phase_in[1]}p{phase_out[0]}{phase_out[1]}"
            )
            bias = torch.zeros(weight.shape[0])
            if phase_out not in with_bias:
                bias = op.bias
                with_bias.add(phase_out)
            node = self.nir.Conv2d(
                input_shape=src.grid,
                weight=_np(weight),
                stride=stride,
                padding=padding,
                dilation=1,
                groups=1,
                bias=_np(bias),
                metadata={
                    "op": prefix,
                    "in_phase": np.array(phase_in),
                    "out_phase": np.array(phase_out),
                    "in_factor": src.factor,
                    "out_factor": out.factor,
                },
            )
            name = self.add(prefix + phases, node, late)
            self.connect(self.sources[source][phase_in], name)
            self.sources[target][phase_out].append(name)

    def blocks(self, op: _LinearOp, src: Layout, out: Layout):
        """(output phase, input phase, weight, stride, padding) of every nonzero block of the op."""
        stride = src.grid[0] // out.grid[0]
        if (stride * out.grid[0], stride * out.grid[1]) != src.grid or (stride > 1 and src.factor > 1):
            raise MpisError(f"cannot write a map on grid {src.grid} (factor {src.factor}) onto grid {out.grid}")
        conv = op.conv
        if conv is not None and src.factor == out.factor == 1 and tuple(conv.stride) == (stride, stride):
            # copied as is: the same sums in the same order as the PyTorch model, so identical spikes
            yield (0, 0), (0, 0), conv.weight.detach(), stride, tuple(conv.padding)
            return
        fo2, fi2 = out.factor**2, (src.factor * stride) ** 2
        pattern, _ = polyphase_conv(op.tap_probe, 1, src.factor * stride, out.factor, max(1, op.kernel // 2))
        pattern = pattern.reshape(-1, fo2, fi2, *pattern.shape[-2:])  # (taps, out phase, in phase, k, k)
        for p_index, phase_out in enumerate(out.phases):
            if stride > 1:  # native input, polyphase output: one strided conv per output phase
                block = torch.einsum("oit,tqyx->oiqyx", op.taps, pattern[:, p_index])
                weight, padding = _strided_native(block.flatten(1, 2), stride)
                yield phase_out, (0, 0), weight, stride, padding
                continue
            empty = bool(pattern[:, p_index].abs().max() == 0)  # still one block, to carry the bias
            for q_index, phase_in in enumerate(src.phases):
                taps = pattern[:, p_index, q_index]
                if taps.abs().max() > 0 or (empty and q_index == 0):
                    taps = _crop(taps[None])[0]
                    yield phase_out, phase_in, torch.einsum("oit,tyx->oiyx", op.taps, taps), 1, taps.shape[-1] // 2

    # ---- neurons, head -----------------------------------------------------------------------
    def initial_potential(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if self.v_init is not None:
            return np.full(shape, self.v_init, dtype=np.float32)
        if name in self.net.imp:
            return _np(self.net.imp[name].expand(shape))
        return np.full(shape, self.net.v_init, dtype=np.float32)

    def emit_neuron(self, node) -> None:
        nir, params = self.nir, self.net.neuron
        layout = self.layouts[node.name] = self.layout(node.name, node.shape)
        self.sources[node.name] = {}
        v0 = self.initial_potential(node.name, node.shape)
        for phase in layout.phases:
            base = node.name if layout.factor == 1 else f"{node.name}.p{phase[0]}{phase[1]}"
            v0_phase = _phase(v0, layout, phase)
            ones = np.ones_like(v0_phase)
            meta = {
                "layer": node.name,
                "layout": "native" if layout.factor == 1 else "polyphase",
                "factor": layout.factor,
                "phase": list(phase),
            }
            if self.flavour == "compact":
                v_init = float(v0_phase.flat[0]) if np.all(v0_phase == v0_phase.flat[0]) else v0_phase
                neuron = nir.IF(
                    r=ones,
                    v_threshold=params.vth * ones,
                    v_reset=0 * ones,
                    metadata={**meta, "reset": "subtract", "v_init": v_init},
                )
                spikes = inlet = self.add(base, neuron)
            else:
                nodes, edges = subtract_reset_if(base, v0_phase.shape, params.vth, v0_phase, params.leak, meta)
                for name, nir_node in nodes.items():
                    self.add(name, nir_node)
                self.edges += edges
                inlet, spikes = f"{base}.i", f"{base}.spikes"
                neuron = nodes[spikes]
            self.pending.append((node.inputs[0], phase, inlet))
            self.shiftable[inlet] = neuron
            self.sources[node.name][phase] = [spikes]

    def emit_sum(self, node) -> None:
        layout = self.layouts[node.name] = self.layout(node.name, node.shape)
        self.sources[node.name] = {p: [s for i in node.inputs for s in self.sources[i][p]] for p in layout.phases}
        if any(i in self.late_maps for i in node.inputs):
            self.late_maps.add(node.name)

    def emit_head(self, node) -> None:
        nir = self.nir
        state = node.inputs[0]
        features = self.net.graph.node(state).shape
        if self.layouts[state].factor != 1:
            raise MpisError(f"the classifier reads {state}, which is not at the loop's coarsest resolution")
        fc = self.net.ops["head"].fc
        flat = self.add("head.flatten", nir.Flatten(input_type={"input": np.array(features)}, start_dim=0))
        affine = self.add("head.affine", nir.Affine(weight=_np(fc.weight), bias=_np(fc.bias)))
        logits = self.add("head.logits", nir.I(r=np.ones(fc.out_features, dtype=np.float32)))
        self.connect(self.sources[state][(0, 0)], flat)
        self.edges += [(flat, affine), (affine, logits)]

    def minimum_params(self) -> int:
        """A lower bound on the NIR parameter count from the layouts alone (no probing): an op between
        maps at factors f_in, f_out has at least min(f_in, f_out)² times its weights as nonzero taps."""
        total = sum(p.numel() for p in self.net.ops["head"].parameters())
        for node in self.net.graph.nodes:
            if node.kind not in ("conv", "linear"):
                continue
            out = self.layout(node.name, node.shape)
            for source in (*node.inputs, *node.delayed):
                src = self.layout(source, self.net.graph.node(source).shape)
                factor = min(src.factor * src.grid[0] // out.grid[0], out.factor)
                total += sum(op.weights for op in _linear_ops(self.net.ops[node.name], 0)) * factor**2
        return total

    def run(self) -> None:
        deferred: list[tuple[object, str]] = []  # (node, input) whose input is emitted later (Trans chain)
        for node in self.net.graph.nodes:
            if node.kind == "input":
                self.add("input", self.nir.Input(input_type={"input": np.array(node.shape)}))
                self.layouts["input"] = Layout(tuple(node.shape[1:]), 1)
                self.sources["input"] = {(0, 0): ["input"]}
            elif node.kind in ("conv", "linear"):
                for source in [*node.inputs, *node.delayed]:
                    if source in self.layouts:
                        self.emit_linear(node.name, node.shape, self.net.ops[node.name], source, False)
                    else:
                        deferred.append((node, source))
            elif node.kind == "neuron":
                self.emit_neuron(node)
            elif node.kind == "sum":
                self.emit_sum(node)
            else:
                self.emit_head(node)
        while deferred:  # the Trans maps read the previous step's state: they run after the loop
            node, source = deferred.pop(0)
            if source not in self.layouts:
                deferred.append((node, source))
                continue
            self.emit_linear(node.name, node.shape, self.net.ops[node.name], source, late=True)
        for current, phase, target in self.pending:
            self.connect(self.sources[current][phase], target)
        self.shift_for_first_step()

    def shift_for_first_step(self) -> None:
        """The Trans chain reaches the first layers one step late, so at t = 0 they read zeros where the
        model has the chain's response to the zero state (its biases, through the conv borders). A missing
        constant in an integrator is an offset for all t: fold it into the threshold (exact) or the
        initial potential (compact)."""
        inputs: dict[str, list[str]] = {}
        for source, target in self.edges:
            inputs.setdefault(target, []).append(source)
        response: dict[str, Tensor] = {}
        for name, node in self.late_nodes:
            current = sum((response[s] for s in inputs[name] if s in response), torch.zeros(*node.input_type["input"]))
            weight, bias = torch.from_numpy(node.weight), torch.from_numpy(node.bias)
            response[name] = F.conv2d(current[None], weight, bias, tuple(node.stride), tuple(node.padding))[0]
        for current, phase, target in self.pending:
            missed = sum(response[s] for s in self.sources[current][phase] if s in response)
            if not isinstance(missed, Tensor) or self.net.neuron.leak != 1.0:
                continue  # with a leak the deficit decays (λ^t): no exact fix, it only touches the first steps
            node = self.shiftable[target]
            if self.flavour == "compact":
                node.metadata["v_init"] = (node.metadata["v_init"] + _np(missed)).astype(np.float32)
            else:
                node.threshold = (node.threshold - _np(missed)).astype(np.float32)


def _param_count(nodes: dict) -> int:
    return sum(n.weight.size + n.bias.size for n in nodes.values() if hasattr(n, "weight") and hasattr(n, "bias"))


def build_nir(
    net: MPISNet,
    flavour: str = "exact",
    v_init: float | None = None,
    steps: int | None = None,
    dataset: str = "",
    max_param_growth: float | None = None,
) -> NirExport:
    """The NIR graph of `net` (BN folded here); `v_init` overrides the net's initial potential, `steps` is
    the T recorded in the metadata (the T used in training). Above `max_param_growth` times the model's
    parameters it refuses, before probing when the layouts alone show it (wide nets at high factors
    would not even fit in memory)."""
    import nir

    if flavour not in FLAVOURS:
        raise MpisError(f"unknown NIR flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}")
    params = net.neuron
    if params.reset != "soft":
        raise MpisError(
            "NIR export needs reset by subtraction (--reset soft); a reset-to-zero network is not an MPIS "
            "equilibrium model and its rates would not match"
        )
    if params.leak != 1.0 and flavour == "compact":
        raise MpisError("the compact NIR flavour writes IF neurons only; export an LIF network with --flavour exact")
    initial = net.v_init if v_init is None else v_init
    if params.leak != 1.0 and (initial != 0.0 or (v_init is None and len(net.imp))):
        raise MpisError("an initial membrane potential is a threshold shift only for IF neurons; use --v-init 0")
    if not polyphase_fits(net):
        return _ghost_export(net, flavour, v_init, steps, dataset)
    folded = net.folded_copy()
    exporter = _Exporter(folded, flavour, v_init)
    source = sum(p.numel() for name in folded.ops for p in folded.ops[name].parameters())
    if max_param_growth is not None:
        _check_growth(exporter.minimum_params(), source, max_param_growth, "at least ")
    with torch.no_grad():
        exporter.run()
    ordered = exporter.nodes + exporter.late_nodes
    # Execution index as a name prefix: `nir.read` sorts nodes by name; Input/Output keep their names.
    names = {name: name if name == "input" else f"{i:04d}_{name}" for i, (name, _) in enumerate(ordered)}
    nodes = {names[name]: node for name, node in ordered}
    nodes["output"] = nir.Output(output_type={"output": np.array([net.arch.classes])})
    edges = [(names[a], names[b]) for a, b in exporter.edges] + [(names["head.logits"], "output")]
    layers = {n.name: {"shape": list(n.shape), "factor": exporter.layouts[n.name].factor} for n in folded.neurons}
    metadata = {
        "source": "mpis",
        "arch": str(net.arch),
        "vth": params.vth,
        "leak": params.leak,
        "T": int(steps or 0),
        "flavour": flavour,
        "v_init": float(initial) if v_init is not None or not len(net.imp) else "learned",
        "input_shape": list(net.input_shape),
        "dataset": dataset,
        "classes": net.arch.classes,
        "layers": layers,
    }
    graph = nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata)
    result = NirExport(graph, _param_count(nodes), source, {n: exporter.layouts[n] for n in layers})
    if max_param_growth is not None:
        _check_growth(result.nir_params, source, max_param_growth)
    return result


def polyphase_fits(net: MPISNet) -> bool:
    """Whether every map of the loop is a whole multiple of the coarsest (34, 17, 9 is not)."""
    loop = [n.shape[1:] for n in net.loop_nodes]
    grid = min(loop)
    return all(h % grid[0] == 0 and w % grid[1] == 0 and h // grid[0] == w // grid[1] for h, w in loop)


def _ghost_export(net: MPISNet, flavour: str, v_init: float | None, steps: int | None, dataset: str) -> NirExport:
    """Odd map sizes: the ghost layout of `export.toolchains` (every map on the finest grid, dilated convs)
    with the standard I / Threshold / Scale neurons, float weights; the nirtorch and mpis semantics alike."""
    from mpis.export.toolchains import build_toolchain_nir

    if flavour != "exact":
        raise MpisError(f"odd map sizes ({net.input_shape[1]}x{net.input_shape[2]} input) need --flavour exact")
    result = build_toolchain_nir(net, "nirtorch", v_init, steps, weight_bits=None)
    result.graph.metadata.update({"flavour": "exact", "layout": "ghost", "dataset": dataset, "leak": net.neuron.leak})
    return NirExport(result.graph, result.nir_params, result.source_params, {})


def _check_growth(count: int, source: int, limit: float, qualifier: str = "") -> None:
    if count > limit * source:
        raise MpisError(
            f"the NIR graph would hold {qualifier}{count:,} parameters, {count / source:.1f}x the model's "
            f"{source:,} (polyphase layout of the loop's finer maps); above --max-param-growth {limit:g}. "
            f"Raise the limit if the target can hold it"
        )


def export_nir(
    net: MPISNet,
    path: Path,
    flavour: str = "exact",
    v_init: float | None = None,
    steps: int | None = None,
    dataset: str = "",
    overwrite: bool = False,
    max_param_growth: float = DEFAULT_MAX_PARAM_GROWTH,
) -> NirExport:
    """Build, refuse above `max_param_growth`, write atomically and read back with type checking."""
    from mpis.export.nir_nodes import writable_nir_path, write_nir

    path = writable_nir_path(path, overwrite)
    result = build_nir(net, flavour, v_init, steps, dataset, max_param_growth)
    write_nir(path, result.graph)
    return result
