"""All outputs of one `mpis export`, committed together.

Each writer writes to a staging path beside its target (`.NAME.*.tmp`, a folder for a Triton model). Only
when every target is built and checked are they renamed into place, one rename each, so a failure or a
kill before the commit leaves every file the user had as it was, and a kill during the commit (a few
renames) leaves each file whole, old or new. Staging names left by a killed export are removed by the next
export to the same targets.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mpis.errors import MpisError
from mpis.train.checkpoint import fsync_path, remove_leftovers


class ExportOutputs:
    def __init__(self) -> None:
        self._files: list[tuple[Path, Path]] = []  # (staging, target)
        self._folders: list[Path] = []  # staged folders, removed on discard
        self._actions: list[Callable[[], None]] = []  # run in order by commit, after the file renames

    def file(self, target: Path) -> Path:
        """A staging path for `target`, tried now so that an unwritable folder is refused before any work."""
        target = Path(target)
        remove_leftovers(target)
        try:
            fd, staging = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        except FileNotFoundError:
            raise MpisError(f"cannot write {target}: folder {target.parent} does not exist") from None
        except OSError as err:
            raise MpisError(f"cannot write {target}: {err.strerror}") from None
        os.close(fd)
        os.unlink(staging)  # the writers create it (atomically, themselves); the name is ours
        self._files.append((Path(staging), target))
        return Path(staging)

    def check_folder(self, folder: Path, what: str) -> None:
        """Refuse now, before any work, a folder that will be written later and cannot be: a probe folder is
        made and removed in it, or in its nearest existing parent when it does not exist yet."""
        existing = Path(folder).absolute()
        while not existing.exists():
            existing = existing.parent
        try:
            Path(tempfile.mkdtemp(dir=existing, prefix=".mpis-probe.")).rmdir()
        except OSError as err:
            raise MpisError(f"cannot write {what} {folder}: {err.strerror}") from None

    def folder(self, parent: Path, name: str) -> Path:
        """A staging folder in `parent` for what will become `parent/name` (removed on discard)."""
        for stale in parent.glob(f".{name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp"))
        self._folders.append(staging)
        return staging

    def on_commit(self, action: Callable[[], None]) -> None:
        self._actions.append(action)

    def commit(self) -> None:
        for staging, target in self._files:
            if not staging.exists():
                raise MpisError(f"internal error: {target} was staged but never written")
        for staging, target in self._files:
            os.replace(staging, target)
            fsync_path(target.parent)
        for action in self._actions:
            action()
        self._files, self._folders, self._actions = [], [], []

    def discard(self) -> None:
        for staging, _ in self._files:
            staging.unlink(missing_ok=True)
        for folder in self._folders:
            shutil.rmtree(folder, ignore_errors=True)
        self._files, self._folders, self._actions = [], [], []

    def __enter__(self) -> ExportOutputs:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()
