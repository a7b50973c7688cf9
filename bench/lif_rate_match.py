"""How far the spike forward's rates are from the DBReLU fixed point, for IF (λ = 1) and LIF (λ < 1).

The rate map of a leaky neuron is still DBReLU on λ-weighted flows (SSF supplement Eq. S5); it is exact
only as T → ∞ and for λ = 1. This prints, for a trained checkpoint with its neurons given each leak λ,
the mean |Δrate| between the λ-weighted spike rates of the stream outputs and the DBReLU fixed point on
the digits test set, and the argmax agreement of the two.

    python bench/lif_rate_match.py runs/digits/model.pt
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch


def main() -> None:
    from mpis.model.equilibrium import EquilibriumModel
    from mpis.model.neurons import NeuronParams
    from mpis.train.checkpoint import load_checkpoint
    from mpis.train.data import load_dataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--leaks", type=float, nargs="+", default=[1.0, 0.95, 0.9, 0.8, 0.5])
    parser.add_argument("--T", type=int, nargs="+", default=[30, 100, 300])
    parser.add_argument("--samples", type=int, default=360)
    args = parser.parse_args()

    ckpt = load_checkpoint(args.checkpoint)
    net = ckpt.net
    x = torch.stack([load_dataset("digits").test[i][0] for i in range(args.samples)])
    solver = replace(ckpt.solver_cfg, forward="rate", solver="anderson", T=300, tol=1e-7)
    with torch.no_grad():
        fixed, _ = EquilibriumModel(net, solver).eval().solve(x, {})
        rate_pred = net.classify(fixed).argmax(1)
    print(f"{ckpt.model_cfg.arch} ({args.checkpoint}), {args.samples} digits test images")
    print(f"{'leak λ':>7} {'T':>5} {'mean |Δrate|':>13} {'× T':>7} {'argmax agreement':>17}")
    for leak in args.leaks:
        net.neuron = NeuronParams(net.neuron.vth, leak, net.neuron.reset)
        for steps in args.T:
            spiking = net.simulate(x, steps).state_rates
            delta = torch.cat([(spiking[k] - fixed[k]).abs().flatten() for k in fixed]).mean().item()
            agree = (net.classify(spiking).argmax(1) == rate_pred).float().mean().item()
            print(f"{leak:>7.2f} {steps:>5} {delta:>13.5f} {delta * steps:>7.2f} {agree:>17.3f}")


if __name__ == "__main__":
    main()
