"""File boundaries shared by every command: safe reads, finite JSON, checked and atomic writes.

- Reading: :func:`read_input_bytes` opens only regular files (a folder, ``/dev/zero`` or a FIFO is
  refused before anything is read, without blocking) and caps the size; :func:`load_json` adds
  UTF-8, JSON and finite numbers (``NaN``, ``Infinity`` and overflowing literals are refused with
  the field's path).
- Writing: :func:`check_outputs` refuses, before any work, an output that is one of the inputs
  (after resolving links), a folder, a file standing where a folder must be, or a folder that
  cannot be written; it returns an :class:`Outputs` that says afterwards which files were written
  and which replaced. :func:`atomic_write_bytes` writes via a temporary file and a rename.
- Printing: :func:`printable` strips control characters from names read from files.

Example:
    >>> outs = check_outputs([("-o", "plan.json")], inputs=[("--profile", "p.json")],
    ...                      error=PlannerError)                      # doctest: +SKIP
    >>> print(outs.announce("plan.json"))                              # doctest: +SKIP
    wrote plan.json
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import socket
import stat
import tempfile
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from planner.errors import PlannerError

__all__ = [
    "MAX_INPUT_BYTES",
    "Outputs",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_input_file",
    "check_output_folder",
    "check_outputs",
    "lists_to_tuples",
    "load_json",
    "parse_json",
    "printable",
    "read_input_bytes",
    "remove_stale_temporaries",
    "schema",
    "validate",
]

MAX_INPUT_BYTES = 512 * 1024**2
"""The largest file any command reads (profiles of the largest models are a few MB)."""

PathLike = str | os.PathLike[str]


# --- writing -----------------------------------------------------------------------------------


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename.

    A crash or error leaves either the old file or none, never a half-written one. The temporary
    name (``.NAME.HOST-PID.XXXX.tmp``) says which process made it, so the next write of ``path``
    removes one left by a process that was killed (:func:`remove_stale_temporaries`).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(target), suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}.{_host_tag()}-{os.getpid()}."


def remove_stale_temporaries(target: PathLike) -> list[Path]:
    """Remove the temporary files of writes of ``target`` whose process has died on this host.

    Only names made by :func:`atomic_write_bytes` or :func:`check_outputs` on this host are
    considered, and only when their process no longer exists (a SIGKILL between creating and
    renaming leaves them). Files of live processes and of other hosts are left alone.

    Returns:
        The files removed.
    """
    path = Path(target)
    pattern = re.compile(re.escape(f".{path.name}.{_host_tag()}-") + r"(\d+)\.[^/]*\.(tmp|probe)$")
    removed: list[Path] = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if match is None or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.parent / name)
            removed.append(path.parent / name)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


@dataclass(frozen=True, kw_only=True)
class Outputs:
    """The files a command will write, checked; which of them existed before it wrote.

    Attributes:
        paths: The checked output paths, as given.
        existing: Those that were files before the command ran (they will be replaced).
    """

    paths: tuple[Path, ...]
    existing: frozenset[Path]

    def announce(self, *paths: PathLike) -> str:
        """``"wrote a.json, b.png; replaced c.json"`` for the files a command has written."""
        new = [str(p) for p in paths if Path(p) not in self.existing]
        old = [str(p) for p in paths if Path(p) in self.existing]
        parts = ([f"wrote {', '.join(new)}"] if new else []) + (
            [f"replaced {', '.join(old)}"] if old else []
        )
        return "; ".join(parts)


def check_outputs(
    outputs: Sequence[tuple[str, PathLike]],
    *,
    inputs: Sequence[tuple[str, PathLike]],
    error: type[PlannerError] = PlannerError,
) -> Outputs:
    """Refuse, before any work, outputs that would destroy an input or cannot be written.

    Args:
        outputs: ``(option, path)`` pairs for every file the command will write, derived ones
            included (e.g. ``("-o (its profile)", "x.profile.json")``).
        inputs: ``(what, path)`` pairs for every file the command reads.
        error: The error type to raise.

    Raises:
        error: An output is one of the inputs or another output (same file after resolving
            links), is a folder or not a regular file, has a file where its folder should be, or
            lies in a folder this process cannot create files in.
    """
    seen: list[tuple[str, Path]] = []
    existing: set[Path] = set()
    for option, given in outputs:
        path = Path(given)
        where = f"{option} {path}"
        if str(given) == "" or path.name in ("", ".", ".."):
            raise error(f"{where} is not a file name; give one, e.g. {option} out.json")
        try:
            info = os.stat(path)
        except FileNotFoundError:
            info = None
        except NotADirectoryError:
            raise error(
                f"{where}: {_file_ancestor(path)} is a file, not a folder; choose another path"
            ) from None
        except OSError as exc:
            raise error(f"{where}: cannot check it ({exc.strerror}); choose another path") from None
        if info is not None:
            if stat.S_ISDIR(info.st_mode):
                raise error(f"{where} is a folder; give a file name inside it")
            if not stat.S_ISREG(info.st_mode):
                raise error(
                    f"{where} is not a regular file (a device, FIFO or socket); give a file name"
                )
            existing.add(path)
        for what, source in inputs:
            if _same_file(path, Path(source)):
                fix = (
                    f"give {option.split()[0]} another file"
                    if option.startswith("-")
                    else "choose another file name"
                )
                raise error(
                    f"{where} is the {what} {source}: writing it would destroy the input; {fix}"
                )
        for other_option, other in seen:
            if _same_file(path, other):
                raise error(f"{where} is also {other_option} {other}; give them different names")
        _check_folder(path, where, error)
        seen.append((option, path))
    return Outputs(paths=tuple(p for _, p in seen), existing=frozenset(existing))


def check_output_folder(
    option: str,
    path: PathLike,
    *,
    inputs: Sequence[tuple[str, PathLike]] = (),
    error: type[PlannerError] = PlannerError,
) -> None:
    """Refuse, before any work, a folder the command will write into that cannot be one.

    Raises:
        error: ``path`` is a file (or one of ``inputs``), has a file where a parent folder should
            be, or cannot take new files.
    """
    folder = Path(path)
    where = f"{option} {folder}"
    for what, source in inputs:
        if _same_file(folder, Path(source)):
            raise error(f"{where} is the {what} {source}; give a folder of its own")
    try:
        info = os.stat(folder)
    except FileNotFoundError:
        info = None
    except NotADirectoryError:
        raise error(
            f"{where}: {_file_ancestor(folder)} is a file, not a folder; choose another path"
        ) from None
    except OSError as exc:
        raise error(f"{where}: cannot check it ({exc.strerror}); choose another path") from None
    if info is not None and not stat.S_ISDIR(info.st_mode):
        raise error(f"{where} is a file, not a folder; give a folder (it is created if missing)")
    _check_folder(folder / "x", where, error)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet): compare where the names lead
        return os.path.realpath(a) == os.path.realpath(b)


def _file_ancestor(path: Path) -> Path:
    """The first ancestor of ``path`` that exists and is not a folder."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return path.parent


def _check_folder(path: Path, where: str, error: type[PlannerError]) -> None:
    """The folder of ``path`` (or its nearest existing ancestor) can take a new file."""
    folder = path.parent
    while not folder.exists():
        if folder == folder.parent:
            break
        folder = folder.parent
    if folder.exists() and not folder.is_dir():
        raise error(f"{where}: {folder} is a file, not a folder; choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise error(f"{where}: cannot write in the folder {folder}; choose a writable folder")
    # Permission bits do not bind root, and read-only mounts or /proc refuse anyway: the only
    # sure test is to create (and remove) a file there, as the real write will.
    try:
        fd, probe = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".probe", dir=folder)
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        raise error(
            f"{where}: cannot write in the folder {folder} ({reason}); choose a writable folder"
        ) from None
    os.close(fd)
    os.unlink(probe)


# --- reading -----------------------------------------------------------------------------------


def check_input_file(
    path: PathLike, error: type[PlannerError], what: str, *, max_bytes: int = MAX_INPUT_BYTES
) -> Path:
    """``path`` as a Path if it is a regular file of at most ``max_bytes``; else ``error``."""
    p = Path(path)
    try:
        info = os.stat(p)
    except FileNotFoundError:
        raise error(f"{what} {p} does not exist; check the path") from None
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror}; check the path") from None
    _check_regular(p, info, error, what, max_bytes)
    return p


def _check_regular(
    p: Path, info: os.stat_result, error: type[PlannerError], what: str, max_bytes: int
) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{what} {p} is a folder; give the file inside it")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {p} is not a regular file (a device, FIFO or socket); give a file")
    if info.st_size > max_bytes:
        raise error(
            f"{what} {p} is {info.st_size / 1024**2:.0f} MiB, more than the "
            f"{max_bytes / 1024**2:.0f} MiB a {what} can be; is it the right file?"
        )


def read_input_bytes(
    path: PathLike, error: type[PlannerError], what: str, *, max_bytes: int = MAX_INPUT_BYTES
) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; anything else raises ``error``.

    The file is opened without blocking and checked on the open descriptor, so a FIFO or device
    is refused without reading from it, and a file swapped in after a check cannot slip past.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} {p} does not exist; check the path") from None
    except IsADirectoryError:
        raise error(f"{what} {p} is a folder; give the file inside it") from None
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror}; check the path") from None
    try:
        _check_regular(p, os.fstat(fd), error, what, max_bytes)
        chunks = []
        size = 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:  # it grew while we read
                _check_regular(p, os.fstat(fd), error, what, max_bytes)
                raise error(f"{what} {p} grew past {max_bytes} bytes while being read")
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror}; check the path") from None
    finally:
        os.close(fd)


class _NonFinite:
    """A JSON number that is not finite (or too large), kept in place so its path can be named."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _parse_float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


_LARGEST_INT = 2**63


def _parse_int(text: str) -> int | _NonFinite:
    value = int(text)
    return (
        value
        if abs(value) < _LARGEST_INT
        else _NonFinite(text[:20] + ("…" if len(text) > 20 else ""))
    )


def _find_nonfinite(value: Any, path: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """``(path, text)`` of the first non-finite number in a parsed document, or None."""
    if isinstance(value, _NonFinite):
        return "/".join(path) or "(top level)", value.text
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _find_nonfinite(item, (*path, str(key)))
        if found is not None:
            return found
    return None


def load_json(path: PathLike, error: type[PlannerError], what: str) -> Any:
    """Read a JSON file whose numbers are all finite; anything else raises ``error``.

    Refuses (one line each, naming the file): a missing file, a folder, a device or FIFO, a file
    over :data:`MAX_INPUT_BYTES`, bytes that are not UTF-8, invalid or truncated JSON, and
    ``NaN``/``Infinity`` or a number too large for a float, with the field's path.
    """
    p = Path(path)
    data = read_input_bytes(p, error, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{what} {p} is not UTF-8 text (byte {exc.start}); is it the right file?"
        ) from None
    return parse_json(text, error, f"{what} {p}")


def parse_json(text: str, error: type[PlannerError], what: str) -> Any:
    """Parse JSON text whose numbers are all finite; see :func:`load_json`."""
    try:
        doc = json.loads(
            text, parse_constant=_NonFinite, parse_float=_parse_float, parse_int=_parse_int
        )
    except json.JSONDecodeError as exc:
        raise error(
            f"{what} is not valid JSON (line {exc.lineno}: {exc.msg}); "
            "is it truncated? regenerate it"
        ) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise error(f"{what} holds a number that cannot be read ({exc}); fix the file") from None
    except RecursionError:
        raise error(f"{what} is nested too deeply; is it the right file?") from None
    found = _find_nonfinite(doc)
    if found is not None:
        where, text_value = found
        raise error(
            f"{what}: {where} is {text_value}; every number must be finite and below 2**63; "
            "fix the value or regenerate the file"
        )
    return doc


# --- schemas -----------------------------------------------------------------------------------


@cache
def schema(name: str) -> dict[str, Any]:
    """The JSON schema ``planner/schemas/<name>.schema.json`` shipped with the package."""
    text = (
        resources.files("planner").joinpath("schemas").joinpath(f"{name}.schema.json").read_text()
    )
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def validate(document: Any, schema_name: str, error: type[Exception], what: str) -> None:
    """Validate ``document`` against a shipped schema, raising ``error`` with a one-line reason."""
    validator = jsonschema.Draft202012Validator(schema(schema_name))
    problem = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if problem is not None:
        where = "/".join(str(p) for p in problem.absolute_path) or "(top level)"
        raise error(f"{what}: invalid at {where}: {printable(problem.message, limit=200)}")


def lists_to_tuples(doc: dict[str, Any]) -> dict[str, Any]:
    """A parsed JSON object's lists as tuples, for the frozen dataclasses the formats load into."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()}


# --- printing ----------------------------------------------------------------------------------


def printable(text: object, *, limit: int | None = None) -> str:
    """``text`` with control and format characters (terminal escapes, newlines, bidi overrides)
    replaced by ``?``, clipped to ``limit`` characters; for names read from files.

    Example:
        >>> printable("resnet\\x1b[2J50\\n")
        'resnet?[2J50?'
    """
    cleaned = "".join(
        "?" if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp") else c
        for c in str(text)
    )
    if limit is not None and len(cleaned) > limit:
        return cleaned[: limit - 1] + "…"
    return cleaned
