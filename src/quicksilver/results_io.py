"""Atomic writes for results files: a reader never sees a half-written file."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import QuicksilverError

_FINGERPRINT: str | None = None


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    An interrupted write leaves any earlier file at ``path`` as it was.
    """
    path = Path(path)
    check_writable_target(path)
    parent = path.parent
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a results file is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Serialize ``obj`` as indented JSON and write it atomically."""
    return write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_writable_target(path: str | os.PathLike | None) -> None:
    """Fail before long work starts if the output file cannot be written later."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise QuicksilverError(f"output path {path} is a directory")
    if path.exists() and not path.is_file():  # os.replace would put a file in place of a device or pipe
        raise QuicksilverError(f"output path {path} is not a regular file")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise QuicksilverError(f"output folder {parent} does not exist")
    # Create and remove a file where write_atomic will: os.access says yes to root everywhere, /proc included.
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise QuicksilverError(f"cannot write in output folder {parent}: {e.strerror or e}") from e
    os.close(fd)
    os.unlink(probe)


def code_version(root: str | os.PathLike | None = None) -> str:
    """What code produced a result: the git commit of ``root`` (default: the checkout this package runs
    from), with ``+dirty`` when tracked files differ from it; outside a checkout the installed version
    (``quicksilver 0.1.0``) when ``root`` is not given, else ``unknown``. Changes under ``docs/`` (the
    results a run writes as it goes) do not make a checkout dirty."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    here = Path(__file__).resolve().parent
    git = lambda *a, cwd: subprocess.run(["git", *a], cwd=cwd, capture_output=True, text=True, timeout=10)  # noqa: E731
    try:
        top = git("rev-parse", "--show-toplevel", cwd=root or here)
        top_dir = Path(top.stdout.strip()).resolve() if top.returncode == 0 else None
        ours = top_dir is not None and (Path(root).resolve() == top_dir if root else (top_dir / "src" / "quicksilver").resolve() == here)
        if ours:
            head, dirty = git("rev-parse", "HEAD", cwd=top_dir), git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs", cwd=top_dir)
            if head.returncode == 0 and dirty.returncode == 0:
                return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    if root is not None:
        return "unknown"
    try:
        return f"quicksilver {version('quicksilver')}"
    except PackageNotFoundError:
        return "unknown"


def code_fingerprint() -> str:
    """A hash of this package's source (its .py and .c files): a journaled trial counts only for the
    code that measured it, so a rerun after a change re-measures instead of resuming older numbers."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        root = Path(__file__).resolve().parent
        h = hashlib.sha256()
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".c") and p.is_file()):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
        _FINGERPRINT = h.hexdigest()[:16]
    return _FINGERPRINT
