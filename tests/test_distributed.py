import subprocess
import sys

import torch

from mpis.train.checkpoint import load_checkpoint

ARGS = ["--arch", "4C3-2F1*(6C3S2-8C3)-FC10", "--T", "3", "--epochs", "1", "--dropout", "0", "--optimizer", "sgd",
        "--lr", "0.05", "--device", "cpu", "--quiet"]  # fmt: skip


def test_two_gloo_processes_train_the_same_weights_as_one_process_with_the_total_batch(tmp_path):
    # One optimizer step (1437 digits, drop_last, total batch 1024): a single step is where both runs must
    # agree to float rounding; later steps amplify rounding differences in the BN statistics.
    single = subprocess.run(
        [sys.executable, "-m", "mpis", "train", *ARGS, "--batch-size", "1024", "--out", str(tmp_path / "one")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "mpis", "train", *ARGS, "--batch-size", "512", "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr
    one = load_checkpoint(tmp_path / "one" / "model.pt")
    two = load_checkpoint(tmp_path / "two" / "model.pt")
    a, b = one.net.state_dict(), two.net.state_dict()
    assert a.keys() == b.keys()
    changed = False
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5, rtol=1e-4), key
        changed |= "weight" in key
    assert changed
    assert (tmp_path / "two" / "metrics.jsonl").read_text().count("\n") == 1  # rank 0 alone wrote it
