"""The report folder of `mpis check`: each exported file is reused only when written from the same checkpoint
with the same parameters and untouched since; a file the manifest does not list is never overwritten."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mpis.errors import MpisError
from mpis.train.checkpoint import atomic_write

MANIFEST = "artifacts.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Artifacts:
    """The report folder's files, each reused only when written from the same checkpoint with the same
    parameters and untouched since (size and mtime as recorded)."""

    def __init__(self, folder: Path, checkpoint_sha256: str):
        self.folder, self.sha = folder, checkpoint_sha256
        if folder.exists() and not folder.is_dir():
            raise MpisError(f"--report {folder} is not a folder")
        if not folder.parent.is_dir():
            raise MpisError(f"cannot create the report folder {folder}: {folder.parent} does not exist")
        try:
            folder.mkdir(exist_ok=True)
        except OSError as err:
            raise MpisError(f"cannot create the report folder {folder}: {err.strerror}") from None
        try:
            entries = json.loads((folder / MANIFEST).read_text()).get("files")
        except FileNotFoundError:
            entries = {}
        except (ValueError, AttributeError, OSError):
            entries = None
        if not isinstance(entries, dict):
            raise MpisError(
                f"{folder / MANIFEST} is damaged; remove it (and the files it lists) or use another --report"
            )
        self.entries: dict[str, dict] = entries

    def fresh(self, name: str, params: dict) -> bool:
        path, entry = self.folder / name, self.entries.get(name)
        if not entry or not path.is_file():
            return False
        stat = path.stat()
        return (
            entry.get("checkpoint_sha256") == self.sha
            and entry.get("params") == params
            and entry.get("size") == stat.st_size
            and entry.get("mtime_ns") == stat.st_mtime_ns
        )

    def claim(self, name: str) -> Path:
        """The path to (re)write: refused when a file is there that this cache did not write."""
        path = self.folder / name
        if path.exists() and name not in self.entries:
            raise MpisError(f"{path} exists and was not written by mpis check; move it or choose another --report")
        return path

    def record(self, name: str, params: dict) -> None:
        stat = (self.folder / name).stat()
        self.entries[name] = {
            "checkpoint_sha256": self.sha,
            "params": params,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        }

        text = json.dumps({"files": self.entries}, indent=1)
        atomic_write(self.folder / MANIFEST, lambda tmp: Path(tmp).write_text(text))
