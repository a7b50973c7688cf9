"""Which `--weight-bits` for the toolchain files: what each choice costs against the float model, and
whether the file's arithmetic stays exact, side by side in one run.

For a checkpoint and each number of significant bits: the dyadic net (`fixed_point.dyadic_copy`, what every
toolchain file holds) against the float model on the first N test inputs (on the 2^-8 input grid) at T:
argmax agreement, share of identical spike counts, mean |Δrate|; the fewest bits an op kept (chains of ops
get fewer so that sums stay exact); and the universal file run by mpis's runtime (as Norse's importer runs
it) against the dyadic net: identical spike counts, 1.000000 while every sum is exact.

    python bench/weight_bits.py DIR/model.pt [--bits 4 6 8 10 12] [--limit 200] [--T 30]
"""

from __future__ import annotations

import argparse

import torch

from mpis.check.run import Quantisation
from mpis.errors import MpisError
from mpis.export.reference import on_input_grid
from mpis.export.toolchains import build_toolchain_nir
from mpis.model.deployed import default_nir_v_init
from mpis.spike.graph_layout import compile_program
from mpis.spike.simulate import RUNS_AS, layer_counts
from mpis.train.checkpoint import load_checkpoint
from mpis.train.data import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 6, 8, 10, 12])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--T", type=int, default=30)
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.checkpoint)
    test = load_dataset(ckpt.train_cfg.dataset, args.data_dir or ckpt.train_cfg.data_dir, frames=args.T).test
    count = min(args.limit, len(test))
    x = on_input_grid(torch.stack([test[i][0] for i in range(count)]))
    v_init = default_nir_v_init(ckpt.net)
    float_net = ckpt.net.folded_copy()
    float_net.v_init = v_init
    float_record = float_net.simulate(x, args.T)
    print(f"{args.checkpoint}: {count} test inputs, T = {args.T}, v_init {v_init}")
    print("bits  fewest  argmax=float  identical counts  mean |Δrate|  universal file = dyadic net")
    for bits in args.bits:
        try:
            export = build_toolchain_nir(ckpt.net, "universal", v_init, args.T, bits)
        except MpisError as err:
            print(f"{bits:>4}  refused: {err}")
            continue
        dyadic = export.net
        dyadic.v_init = v_init
        record = dyadic.simulate(x, args.T)
        quantised = Quantisation()
        quantised.add(record, dyadic.classify(record.state_rates).argmax(1), float_record, float_net, args.T)
        agreement, identical, rate_error = quantised.result()
        program = compile_program(export.graph, norse_dt=RUNS_AS["universal"])
        counts = layer_counts(export.graph, program.run(x, args.T).spike_counts)
        same = sum(int((counts[k] == v).sum()) for k, v in record.spike_counts.items())
        total = sum(v.numel() for v in record.spike_counts.values())
        print(
            f"{bits:>4}  {export.fewest_bits:>6}  {agreement:>12.4f}  {identical:>16.4f}  {rate_error:>12.5f}  "
            f"{same / total:.6f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
