import json
import subprocess
import sys

import pytest
import torch

import mpis
from mpis.cli import main
from mpis.errors import MpisError
from mpis.train.checkpoint import load_checkpoint

TINY = ["--arch", "4C3-2F1*(6C3S2-8C3)-FC10", "--T", "4", "--epochs", "1", "--batch-size", "128", "--quiet"]


def train_tiny(out, *extra) -> int:
    return main(["train", *TINY, "--out", str(out), *extra])


def test_train_writes_metrics_and_a_checkpoint_that_rebuilds_the_model(tmp_path):
    assert train_tiny(tmp_path / "run") == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    metrics = json.loads(lines[-1])
    assert len(lines) == 1
    assert set(metrics) >= {"loss", "train_acc", "test_acc", "seconds", "peak_memory_mb"}

    ckpt = load_checkpoint(tmp_path / "run" / "model.pt")
    assert ckpt.model_cfg.arch == "4C3-2F1*(6C3S2-8C3)-FC10" and ckpt.solver_cfg.T == 4
    assert ckpt.input_shape == (1, 16, 16)
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        logits, _ = ckpt.model(x)
        again, _ = load_checkpoint(tmp_path / "run" / "model.pt").model(x)
    assert logits.shape == (5, 10) and torch.equal(logits, again)


def test_train_penalises_the_loop_jacobian_by_default_and_not_with_jac_reg_0(tmp_path):
    assert train_tiny(tmp_path / "plain", "--jac-reg", "0") == 0 and train_tiny(tmp_path / "reg") == 0
    plain, reg = (json.loads((tmp_path / r / "metrics.jsonl").read_text()) for r in ("plain", "reg"))
    assert plain["jacobian"] is None and plain["loop_gain"] is None
    assert reg["jacobian"] > 0 and reg["loop_gain"] > 0  # the radius term is on by default, with the penalty
    solver = load_checkpoint(tmp_path / "reg" / "model.pt").solver_cfg
    assert solver.jac_reg == 1.0 and solver.jac_radius == 0.5


def test_jac_reg_warmup_ramps_the_penalty_weight_in_linearly(tmp_path):
    args = ("--jac-reg", "2", "--jac-reg-warmup", "4", "--epochs", "2")
    assert train_tiny(tmp_path / "ramp", *args) == 0
    epochs = [json.loads(line) for line in (tmp_path / "ramp" / "metrics.jsonl").read_text().splitlines()]
    assert [e["jac_reg_weight"] for e in epochs] == [0.5, 1.0]
    assert train_tiny(tmp_path / "flat", "--jac-reg", "2", "--jac-reg-warmup", "0") == 0
    assert json.loads((tmp_path / "flat" / "metrics.jsonl").read_text())["jac_reg_weight"] == 2.0


def test_the_penalty_is_ramped_in_only_when_it_outweighs_the_task_loss_at_the_first_batch():
    from mpis.config import SolverConfig
    from mpis.train.loop import Distributed, jac_reg_weight, needs_warm_up

    one = Distributed(0, 1, 0)
    cfg = SolverConfig(jac_reg=1.0, jac_reg_warmup=2.0)
    assert needs_warm_up(cfg, torch.tensor(2.3), torch.tensor(233.0), one)  # digits at initialisation
    assert not needs_warm_up(cfg, torch.tensor(2.3), torch.tensor(0.02), one)  # N-MNIST with its BN epsilon
    assert jac_reg_weight(cfg, 0.5, warm_up=True) == 0.25 and jac_reg_weight(cfg, 0.5, warm_up=False) == 1.0


def test_same_seed_gives_the_same_weights_on_cpu(tmp_path):
    train_tiny(tmp_path / "a", "--device", "cpu")
    train_tiny(tmp_path / "b", "--device", "cpu")
    a = load_checkpoint(tmp_path / "a" / "model.pt").model.state_dict()
    b = load_checkpoint(tmp_path / "b" / "model.pt").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_refuses_to_overwrite_an_earlier_run(tmp_path, capsys):
    train_tiny(tmp_path / "run")
    before = (tmp_path / "run" / "model.pt").read_bytes()
    assert train_tiny(tmp_path / "run") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run" / "model.pt").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--arch", "16C3-2F5*(32C3S2)-FC10"], "fusion layer 5 > FEB depth 1"),
        (["--arch", "4C3-1F1*(4C3)-FC7"], "FC7"),
        (["--dataset", "imagenet"], "invalid choice"),
        (["--dataset", "mnist"], "--data-dir"),
        (["--T", "0"], "--T must be >= 1"),
        (["--T", "ten"], "invalid int value"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--jac-reg", "-0.5"], "--jac-reg must be >= 0"),
        (["--jac-reg-warmup", "-1"], "--jac-reg-warmup must be >= 0 epochs"),
        (["--spike-tol", "-0.1"], "--spike-tol must be >= 0"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--bogus-flag"], "unrecognized arguments"),
        (["--preset", "imagenet"], "invalid choice: 'imagenet'"),
    ],
)
def test_bad_command_line_is_one_line_and_exit_2(tmp_path, args, words):
    cmd = [sys.executable, "-m", "mpis", "train", "--out", str(tmp_path / "run"), "--epochs", "1", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("mpis: error: "), result.stderr
    assert not (tmp_path / "run").exists()  # not even an empty folder is left behind


def test_version_and_argparse_errors_speak_as_mpis(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"mpis {mpis.__version__}"
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("mpis: error: simulate: the following arguments are required: nir")


def test_output_into_a_closed_pipe_ends_quietly():
    command = [sys.executable, "-m", "mpis", "arch", "128C3S1-2F3*(256C3S1-512C3S1-1024C3S2)-FC10"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # as `| head` does once it has its lines: every write now fails with EPIPE
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0 and "Traceback" not in stderr and "BrokenPipe" not in stderr


def test_truncated_checkpoint_says_it_is_truncated(tmp_path):
    whole = tmp_path / "model.pt"
    torch.save({"format": "mpis-checkpoint", "state_dict": {"w": torch.zeros(1000)}}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(MpisError, match="truncated"):
        load_checkpoint(cut)
    with pytest.raises(MpisError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_corrupt_or_foreign_checkpoint_is_refused(tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00garbage")
    with pytest.raises(MpisError, match="not a readable mpis checkpoint"):
        load_checkpoint(broken)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(MpisError, match="not an mpis checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(MpisError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_arch_command_lists_the_graph_and_counts_parameters(capsys):
    assert main(["arch", "16C3S1-2F1*(32C3S2-48C3S1)-FC10", "--input", "1,28,28"]) == 0
    out = capsys.readouterr().out
    assert "s1_trans" in out and "s2_l2 (previous step)" in out
    assert out.strip().endswith("parameters: 93,242")


def test_a_preset_sets_the_papers_settings_and_flags_given_win():
    from mpis.cli import parse_args
    from mpis.train.presets import PRESETS

    args = parse_args(["train", "--preset", "fashion-mnist", "--out", "x"])
    preset = PRESETS["fashion-mnist"]
    assert (args.arch, args.dataset, args.T, args.batch_size, args.optimizer) == (
        "16C3S1-2F1*(32C3S2-48C3S1)-FC10",
        "fashion-mnist",
        30,
        128,
        "adamw",
    )
    assert args.epochs == preset.settings["epochs"] and args.jac_reg_warmup == 3.0
    assert (args.spike_tol, args.phantom_steps, args.jac_reg_every) == (0.15, 3, 4)  # the measured speed levers
    args = parse_args(["train", "--preset", "fashion-mnist", "--out", "x", "--T", "100", "--optimizer", "sgd"])
    assert (args.T, args.optimizer, args.batch_size) == (100, "sgd", 128)
    assert parse_args(["train", "--out", "x"]).T == 30 and parse_args(["train", "--out", "x"]).batch_size == 64


def test_the_paper_figure_is_printed_beside_ours():
    from mpis.train.presets import beside_paper

    line = beside_paper("fashion-mnist", 0.9123, 7, 3600)
    assert "paper 93.14 % at T = 30" in line and "ours 91.23% after 7 epochs in 60.0 min (-1.91 points)" in line
    assert "no MNIST row" in beside_paper("mnist", 0.99, 1, 60)


def test_usable_cores_honour_a_cgroup_quota_and_the_torchrun_ranks(tmp_path, monkeypatch):
    from mpis.threads import usable_cores

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    assert usable_cores(quota) == 4
    quota.write_text("250000 100000\n")  # 2.5 CPUs of quota: two whole threads
    assert usable_cores(quota) == 2
    assert usable_cores(tmp_path / "absent") == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert usable_cores(tmp_path / "absent") == 1


@pytest.mark.parametrize("command", ["train", "export", "infer", "serve", "arch", "simulate", "check", "demo"])
def test_every_command_runs_with_an_explicit_thread_count(monkeypatch, command):
    import mpis.cli
    from mpis.threads import usable_cores

    seen = []
    runner = {"simulate": "_simulate", "check": "_check", "demo": "_demo"}.get(command, "_" + command)
    monkeypatch.setattr(mpis.cli, runner, lambda args: seen.append(torch.get_num_threads()) or 0)
    argv = {
        "train": ["train", "--out", "x"],
        "export": ["export", "m.pt", "--onnx", "m.onnx"],
        "infer": ["infer", "--engine", "m.plan", "--onnx", "m.onnx"],
        "serve": ["serve", "repo"],
        "arch": ["arch", "FC10"],
        "simulate": ["simulate", "m.nir"],
        "check": ["check", "m.pt"],
        "demo": ["demo"],
    }[command]
    before = torch.get_num_threads()
    torch.set_num_threads(7)  # torch's own default counts the machine's cores, not ours
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(before)
    spike_runtime = command in ("simulate", "check", "demo")  # measured: one thread is fastest for them
    assert seen == [1 if spike_runtime else usable_cores()]


def test_sigterm_mid_training_ends_with_one_line_143_and_leaves_only_whole_files(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mpis", "train", "--arch", "4C3-2F1*(6C3S2-8C3)-FC10", "--T", "5", "--epochs", "500"]
    proc = subprocess.Popen([*cmd, "--out", str(out), "--quiet", "--threads", "1"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "model.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert (out / "model.pt").exists(), "no epoch finished"
    time.sleep(0.3)  # somewhere inside a later epoch (or its save)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err.strip().splitlines() == ["mpis: terminated"]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "model.pt"]  # no temporary file left
    load_checkpoint(out / "model.pt")
