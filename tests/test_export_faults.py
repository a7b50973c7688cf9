"""An export's files are all written or none: a failure or a kill leaves the user's files as they were, a
Triton model is replaced without a moment with no model, and a full disk is one line, not a crash."""

import shutil
import subprocess

from conftest import faulty_mpis

from mpis.cli import main
from mpis.errors import MpisError


def test_an_export_that_fails_after_its_first_target_writes_none(checkpoint, tmp_path, monkeypatch, capsys):
    def failed(*args, **kwargs):
        raise MpisError("the ONNX export failed")

    (tmp_path / "model.nir").write_text("the user's own file")
    monkeypatch.setattr("mpis.export.onnx.export_onnx", failed)
    args = ["export", str(checkpoint), "--allow-unsettled", "--overwrite", "--nir", str(tmp_path / "model.nir")]
    assert main([*args, "--onnx", str(tmp_path / "model.onnx"), "--triton-repo", str(tmp_path / "repo")]) == 2
    assert "the ONNX export failed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.nir"]  # no staging file, no repository
    assert (tmp_path / "model.nir").read_text() == "the user's own file"


def test_an_unwritable_folder_is_refused_before_any_scoring(checkpoint, tmp_path, small_disk, monkeypatch, capsys):
    def scored(*args, **kwargs):
        raise AssertionError("the model was scored before the folder was checked")

    monkeypatch.setattr("mpis.export.faithful.check_faithful", scored)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)  # root writes anywhere else
    for flag, folder in [("--nir", small_disk), ("--onnx", small_disk), ("--nir", tmp_path / "missing")]:
        assert main(["export", str(checkpoint), flag, str(folder / "model.x")]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"mpis: error: cannot write {folder / 'model.x'}: "), line
        assert "Read-only file system" in line or "does not exist" in line
    repo = small_disk / "models" / "repo"
    assert main(["export", str(checkpoint), "--triton-repo", str(repo)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"mpis: error: cannot write Triton repository {repo}: Read-only file system"


def test_triton_overwrite_adds_version_two_then_removes_version_one(checkpoint, tmp_path):
    repo = tmp_path / "repo"
    base = ["export", str(checkpoint), "--allow-unsettled", "--triton-repo", str(repo)]
    assert main(base) == 0 and main([*base, "--overwrite"]) == 0
    assert sorted(p.name for p in (repo / "mpis").iterdir()) == ["2", "config.pbtxt"]
    (served,) = served_models(repo)
    assert served.spec.version == "2"


def test_triton_overwrite_killed_at_any_commit_step_leaves_a_model_to_serve(checkpoint, tmp_path):
    repo = tmp_path / "repo"
    base = ["export", str(checkpoint), "--allow-unsettled", "--triton-repo", str(repo)]
    assert main(base) == 0
    # renames: 1 the ONNX file, 2 version N+1 into place, 3 the new config.pbtxt (old versions removed after)
    for kill_at, versions in ((2, ["1"]), (3, ["1", "2"])):
        assert faulty_mpis(*base, "--overwrite", kill_at=kill_at).returncode == -9
        assert sorted(p.name for p in (repo / "mpis").iterdir() if p.name.isdigit()) == versions
        (served,) = served_models(repo)  # the old version or the new one, never none
        assert served.spec.path.is_file() and served.spec.version == versions[-1]
    again = faulty_mpis(*base, "--overwrite")  # the next export clears what the killed ones left
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in repo.iterdir()) == ["mpis"]
    assert sorted(p.name for p in (repo / "mpis").iterdir()) == ["3", "config.pbtxt"]


def test_nir_export_on_a_full_disk_is_one_line_and_leaves_nothing(checkpoint, small_disk):
    (small_disk / "filler").write_bytes(bytes(shutil.disk_usage(small_disk).free))
    target = small_disk / "model.nir"
    result = faulty_mpis("export", str(checkpoint), "--allow-unsettled", "--nir", str(target))
    assert result.returncode == 2, result.stderr  # not 139: libhdf5 never meets the full disk
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("mpis: error: no space left on the device for"), result.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def served_models(repo):
    from mpis.serve.server import load_repository

    return load_repository(repo).models.values()
