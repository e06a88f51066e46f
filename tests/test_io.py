"""planner._io: checked outputs, regular-file and finite-only reads, printable names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from planner._io import (
    check_input_file,
    check_output_folder,
    check_outputs,
    load_json,
    parse_json,
    printable,
    read_input_bytes,
)
from planner.errors import PlannerError


class _Err(PlannerError):
    pass


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_outputs_that_are_inputs_are_refused_through_links(tmp_path: Path) -> None:
    source = tmp_path / "in.json"
    source.write_text("{}")
    (tmp_path / "soft.json").symlink_to(source)
    os.link(source, tmp_path / "hard.json")
    (tmp_path / "sub").mkdir()
    for given in ("in.json", "soft.json", "hard.json", "sub/../in.json", "./in.json"):
        with pytest.raises(_Err, match=r"is the profile .* would destroy the input"):
            check_outputs([("-o", tmp_path / given)], inputs=[("profile", str(source))], error=_Err)


def test_two_outputs_on_one_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(_Err, match=r"--png .*a\.png is also -o"):
        check_outputs(
            [("-o", tmp_path / "a.png"), ("--png", tmp_path / "a.png")], inputs=[], error=_Err
        )


def test_output_folder_problems_are_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    cases = {
        tmp_path / "file" / "x.json": "is a file, not a folder",
        tmp_path / "file" / "deeper" / "x.json": "is a file, not a folder",
        tmp_path / "dir": "is a folder",
        Path("/proc/planner-test.json"): "cannot write in the folder /proc",
        Path("/dev/null"): "not a regular file",
    }
    for path, message in cases.items():
        with pytest.raises(_Err, match=message):
            check_outputs([("-o", path)], inputs=[], error=_Err)
    with pytest.raises(_Err, match="not a file name"):
        check_outputs([("-o", "")], inputs=[], error=_Err)
    assert _files(tmp_path) == {"file": b"x"}  # the probes leave nothing behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_read_only_folder_is_refused(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(_Err, match="cannot write in the folder"):
            check_outputs([("-o", ro / "x.json")], inputs=[], error=_Err)
    finally:
        ro.chmod(0o755)


def test_outputs_say_what_they_replace(tmp_path: Path) -> None:
    (tmp_path / "old.json").write_text("{}")
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    outputs = check_outputs([("-o", new), ("--png", old)], inputs=[], error=_Err)
    assert outputs.announce(new) == f"wrote {new}"
    assert outputs.announce(new, old) == f"wrote {new}; replaced {old}"
    assert outputs.announce(old) == f"replaced {old}"


def test_missing_folders_below_a_writable_one_are_fine(tmp_path: Path) -> None:
    check_outputs([("-o", tmp_path / "a" / "b" / "x.json")], inputs=[], error=_Err)
    check_output_folder("--checkpoint-dir", tmp_path / "ckpt" / "new", error=_Err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "ckpt").exists()


def test_output_folder_that_is_a_file_or_input_is_refused(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    with pytest.raises(_Err, match="is a file, not a folder"):
        check_output_folder("--checkpoint-dir", plan, error=_Err)
    with pytest.raises(_Err, match="is the plan"):
        check_output_folder("--checkpoint-dir", plan, inputs=[("plan", plan)], error=_Err)
    with pytest.raises(_Err, match="cannot write"):
        check_output_folder("--checkpoint-dir", "/proc/ckpt", error=_Err)


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = {
        "/dev/zero": "not a regular file",
        str(fifo): "not a regular file",  # refused without blocking on the open
        str(tmp_path): "is a folder",
        str(tmp_path / "missing.json"): "does not exist",
    }
    for path, message in cases.items():
        with pytest.raises(_Err, match=message):
            read_input_bytes(path, _Err, "plan")
        with pytest.raises(_Err, match=message):
            check_input_file(path, _Err, "plan")


def test_size_is_capped(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 2000)
    with pytest.raises(_Err, match="more than"):
        read_input_bytes(big, _Err, "plan", max_bytes=1000)
    assert read_input_bytes(big, _Err, "plan", max_bytes=2000) == b" " * 2000


@pytest.mark.parametrize(
    ("text", "where", "shown"),
    [
        ('{"a": NaN}', "a", "NaN"),
        ('{"a": [1, Infinity]}', "a/1", "Infinity"),
        ('{"a": {"b": -Infinity}}', "a/b", "-Infinity"),
        ('{"a": 1e999}', "a", "1e999"),
        ('{"layers": [{"forward_ms": -1e400}]}', "layers/0/forward_ms", "-1e400"),
        ('{"n": 123456789012345678901234567890}', "n", "12345678901234567890…"),
        ("NaN", "(top level)", "NaN"),
    ],
)
def test_non_finite_numbers_are_refused_with_their_path(text: str, where: str, shown: str) -> None:
    with pytest.raises(_Err) as caught:
        parse_json(text, _Err, "profile p.json")
    message = str(caught.value)
    assert f"{where} is {shown};" in message and "finite" in message and "\n" not in message


def test_finite_json_loads_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "ok.json"
    path.write_text('{"a": [1, 2.5, -3e10, null, true], "b": "NaN"}')
    assert load_json(path, _Err, "plan") == {"a": [1, 2.5, -3e10, None, True], "b": "NaN"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not valid JSON"),
        (b'{"a": 1', "not valid JSON"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (b"[" * 100_000, "nested too deeply|not valid JSON"),
        (b'{"n": ' + b"9" * 5000 + b"}", "cannot be read|finite"),
    ],
)
def test_damaged_json_is_one_line(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(data)
    with pytest.raises(_Err, match=message) as caught:
        load_json(path, _Err, "plan")
    assert "\n" not in str(caught.value)


def test_printable_strips_control_and_format_characters() -> None:
    assert printable("resnet50") == "resnet50"
    assert printable("a\x1b[31mred\x07\n\r\tz") == "a?[31mred????z"
    assert printable("x\u202ey\u200bz") == "x?y?z"  # bidi override, zero-width space
    assert printable("é ü 模型") == "é ü 模型"
    assert printable("x" * 10, limit=5) == "xxxx…"


def test_temporaries_of_killed_writers_are_removed_on_the_next_write(tmp_path: Path) -> None:
    import subprocess
    import sys

    from planner._io import _temporary_prefix, atomic_write_text

    target = tmp_path / "plan.json"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    live_prefix = _temporary_prefix(target)  # this process: alive
    dead_prefix = live_prefix.replace(f"-{os.getpid()}.", f"-{dead_pid}.")
    stale = tmp_path / f"{dead_prefix}abc123.tmp"
    stale_probe = tmp_path / f"{dead_prefix}xyz.probe"
    mine = tmp_path / f"{live_prefix}def456.tmp"
    other_host = tmp_path / f".plan.json.otherhost-{dead_pid}.ghi789.tmp"
    other_file = tmp_path / f".other.json.{dead_prefix[len('.plan.json.') :]}jkl.tmp"
    for path in (stale, stale_probe, mine, other_host, other_file):
        path.write_text("partial")
    atomic_write_text(target, "{}\n")
    assert target.read_text() == "{}\n"
    assert not stale.exists() and not stale_probe.exists()
    assert mine.exists() and other_host.exists() and other_file.exists()
