"""Atomic file writes and schema-validated JSON loading, shared by every file format."""

from __future__ import annotations

import json
import os
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "lists_to_tuples",
    "load_json",
    "schema",
    "validate",
]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename.

    A crash or error leaves either the old file or none, never a half-written one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


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
        raise error(f"{what}: invalid at {where}: {problem.message}")


def load_json(path: str | os.PathLike[str], error: type[Exception], what: str) -> Any:
    """Read a JSON file, turning a missing, unreadable or truncated file into ``error``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {p} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {p}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(
            f"{what} {p} is not valid JSON (line {exc.lineno}: {exc.msg}); "
            "is it truncated? regenerate it"
        ) from None


def lists_to_tuples(doc: dict[str, Any]) -> dict[str, Any]:
    """A parsed JSON object's lists as tuples, for the frozen dataclasses the formats load into."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()}
