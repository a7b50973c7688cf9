"""The same MPIS network rebuilt in snnTorch and trained the way snnTorch trains: BPTT through T steps of
`snn.Leaky` neurons (β = 1: integrate-and-fire, reset by subtraction, snnTorch's ATan surrogate), plain
`nn.Conv2d` + `nn.BatchNorm2d` per layer, the multi-stream loop's back-edges read from the previous step.
It is the peer baseline of bench/train_speed.py; `same_logits` checks, in float64, that it computes the
very network mpis trains. Optional dependency: `pip install --no-deps snntorch` (its requirements would
pull CUDA torch)."""

from __future__ import annotations

import copy

import snntorch as snn
import torch
from snntorch import surrogate
from torch import Tensor, nn

from mpis.model.network import MPISNet


class SnnTorchMPIS(nn.Module):
    """`forward(x)` → per-step logits (T, batch, classes), like mpis's BPTT model."""

    def __init__(self, net: MPISNet, steps: int):
        super().__init__()
        self.steps = steps
        self.nodes = [n for n in net.graph.nodes if n.kind != "input"]
        self.layers = nn.ModuleDict()
        for node in self.nodes:
            if node.kind == "conv":
                src = net.ops[node.name]
                conv, bn = copy.deepcopy(src.conv), copy.deepcopy(src.bn)
                self.layers[node.name] = nn.Sequential(conv, bn)
            elif node.kind == "neuron":
                self.layers[node.name] = snn.Leaky(
                    beta=1.0, threshold=net.neuron.vth, reset_mechanism="subtract", spike_grad=surrogate.atan()
                )
            elif node.kind != "sum":
                self.layers[node.name] = copy.deepcopy(net.ops[node.name])
        self.state_shapes = {n: net.graph.node(n).shape for n in net.graph.state}

    def forward(self, x: Tensor) -> Tensor:
        membranes = {n.name: self.layers[n.name].init_leaky() for n in self.nodes if n.kind == "neuron"}
        previous = {n: x.new_zeros(x.shape[0], *shape) for n, shape in self.state_shapes.items()}  # t = 0
        outputs = []
        for _ in range(self.steps):
            values = {"input": x}
            for node in self.nodes:
                terms = [values[s] for s in node.inputs] + [previous[s] for s in node.delayed]
                total = terms[0] if len(terms) == 1 else sum(terms[1:], terms[0])
                if node.kind == "neuron":
                    spikes, membranes[node.name] = self.layers[node.name](total, membranes[node.name])
                    values[node.name] = spikes.to(total.dtype)  # snnTorch returns float32 spikes
                elif node.kind == "sum":
                    values[node.name] = total
                else:
                    values[node.name] = self.layers[node.name](total)
            previous = {n: values[n] for n in self.state_shapes}
            outputs.append(values[self.nodes[-1].name])
        return torch.stack(outputs)


def same_logits(net: MPISNet, steps: int = 10) -> float:
    """Max |Δ logits| between snnTorch's rebuild and mpis's BPTT model, eval mode, float64."""
    from mpis.model.bptt import BPTTModel

    ours = BPTTModel(copy.deepcopy(net).double(), steps).eval()
    peer = SnnTorchMPIS(net, steps).double().eval()
    x = torch.rand(4, *net.input_shape, dtype=torch.float64)
    with torch.no_grad():
        return float((ours(x) - peer(x)).abs().max())
