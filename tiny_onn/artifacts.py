"""Atomic artifact folders and the provenance stamp every artifact carries.

A stage writes into a temporary sibling folder and renames it into place only when everything is written, so an
interrupted stage never leaves a folder that a later stage would take for complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tiny_onn import __version__
from tiny_onn.errors import TinyOnnError


def versions() -> dict[str, str]:
    """Versions of the packages that shape an artifact's numbers."""
    import transformers

    return {
        "tiny_onn": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _process_umask() -> int:
    umask = os.umask(0)  # reading the umask means setting it: done once, at import
    os.umask(umask)
    return umask


_UMASK = _process_umask()


def umask_mode(path: str | os.PathLike) -> None:
    """Give a file or folder (and, for a folder, everything in it) the permissions a plain `open` or `mkdir` would
    have under the umask: `tempfile` makes them private to their owner (0600 / 0700), and so does safetensors for
    weight files, so a published artifact would not be readable by a colleague or a web server."""
    path = Path(path)
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_UMASK)


def _check_writable(folder: Path, final: str | os.PathLike, option: str) -> None:
    """One clear error unless `folder` takes a new folder (one is made and removed: a read-only place, or /proc, would
    otherwise fail only when the output is written, after the work)."""
    try:
        probe = tempfile.mkdtemp(prefix=".tiny-onn-write-check-", dir=folder)
    except OSError as e:
        raise TinyOnnError(f"{option} {final}: nothing can be written under {folder} ({e.strerror}); give another "
                           f"{option}") from e
    with contextlib.suppress(OSError):
        os.rmdir(probe)


def check_folder_can_be_made(final: str | os.PathLike, option: str = "--out", probe_parent: bool = True) -> Path:
    """`final` as an absolute path, once no file stands where it or one of its parent folders would be made and
    (`probe_parent`) its nearest existing parent folder takes a new folder, as `atomic_dir` needs."""
    path = Path(final).expanduser().absolute()
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TinyOnnError(f"{option} {final}: {parent} is a file, not a folder, so nothing can be written "
                                   f"under it; give another {option}")
            if probe_parent:
                _check_writable(parent, final, option)
            break
    return path


def check_output_folder(final: str | os.PathLike, option: str = "--out") -> Path:
    """`check_folder_can_be_made`, and `final` itself is no file: where a folder of outputs can go. The outputs are
    written inside it, so an existing folder must take new files itself (its parent need not)."""
    existing_folder = Path(final).expanduser().absolute().is_dir()
    path = check_folder_can_be_made(final, option, probe_parent=not existing_folder)
    if (path.exists() or path.is_symlink()) and (not path.is_dir() or path.is_symlink()):
        raise TinyOnnError(f"output folder {final} exists and is not a folder; give another {option} or remove it")
    if existing_folder:
        _check_writable(path, final, option)
    return path


def check_replaceable(final: str | os.PathLike, marker: str, option: str = "--out") -> Path:
    """`final` as an absolute path, once it is safe to replace: it does not exist, or it is an empty folder, or an earlier
    output of the same kind (a folder holding `marker`, e.g. scan.json for a scan). Anything else — a file, a folder of
    other things (an input model, a user's folder), the working folder or one above it, a path under a file — is one
    clear error, raised before any work is done, so that an output path given by mistake never deletes what it points
    to. `option`: the command-line option that named `final`, for the message."""
    path = check_folder_can_be_made(final, option)
    cwd = Path.cwd().absolute()
    if path == cwd or path in cwd.parents or path.parent == path:
        raise TinyOnnError(f"output folder {final}: is the working folder or one above it, which an output would replace; "
                           f"give a new folder, e.g. {option} runs/mine")
    check_output_folder(final, option)
    if not path.exists():
        return path
    entries = list(path.iterdir())
    if entries and not (path / marker).is_file():
        shown = ", ".join(sorted(e.name for e in entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise TinyOnnError(f"output folder {final} already holds other things ({shown}) and no {marker}, so it is not an "
                           f"earlier output of this step, which alone would be replaced; give another {option} or remove "
                           "it")
    return path


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, marker: str) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `final`, on any error it is removed. `final` must not exist, be
    empty, or be an earlier output holding the file `marker` (`check_replaceable`; call it up front as well, to fail
    before the work)."""
    final = check_replaceable(final, marker)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if not (tmp / marker).is_file():
            raise RuntimeError(f"bug: the output written to {final} lacks its marker file {marker}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    umask_mode(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_FILE_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: a file is hashed once per version


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def content_hash(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, or of a folder's files (their relative names and bytes, in sorted order; hidden entries
    such as the temporary folders of `atomic_dir` are left out): the identity of an artifact, whatever its timestamps."""
    path = Path(path)
    if path.is_file():
        return _file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts):
            h.update(f"{rel.as_posix()}\0{_file_sha256(f)}\n".encode())
    return h.hexdigest()


def figure_text(text: str) -> str:
    """Text shown as it is in a matplotlib figure (a category or model name as a tick or legend label): matplotlib
    reads text between two `$` as math, so a name like "price_$_a_$" would fail to draw or come out garbled."""
    return text.replace("$", r"\$")


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None, so that it is standard JSON (Python writes NaN and
    Infinity, which other JSON readers refuse): an undefined value, e.g. the retention of a source that knows no fact."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write standard JSON (non-finite floats as null: `json_safe`) atomically (temp file in the same folder, then
    rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(json_safe(obj), f, indent=2, sort_keys=False, default=str, allow_nan=False)
            f.write("\n")
        umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: str | os.PathLike, what: str) -> dict:
    """Read a JSON artifact file, with a clear error when it is missing or unreadable."""
    path = Path(path)
    from tiny_onn.errors import TinyOnnError

    if not path.is_file():
        raise TinyOnnError(f"{what} not found: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinyOnnError(f"{what} {path} is not valid JSON ({e}); re-run the stage that writes it") from e
