"""smoe.malloc: glibc keeps freed memory after keep_freed_memory; the smoe command asks for it."""

from __future__ import annotations

import subprocess
import sys

import pytest

import smoe.cli.main as cli_main
from smoe import malloc
from smoe.malloc import _glibc_mallopt, keep_freed_memory

needs_glibc = pytest.mark.skipif(_glibc_mallopt() is None, reason="glibc only")

# A fresh interpreter: mallopt changes the whole process. It mallocs 64 MB and reports how much
# more glibc holds in mmap'd blocks (mallinfo2().hblkhd) while the block is live.
_PROBE = """
import ctypes, sys
sys.path.insert(0, {src!r})
from smoe.malloc import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd
p = libc.malloc(64 << 20)
print((libc.mallinfo2().hblkhd - before) >> 20)
libc.free(p)
"""


@needs_glibc
@pytest.mark.parametrize("mode, mapped_mb", [("default", 64), ("keep", 0)])
def test_large_blocks_come_from_the_heap(mode, mapped_mb):
    src = str(__import__("pathlib").Path(cli_main.__file__).resolve().parents[2])
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(src=src), mode], capture_output=True, text=True, check=True
    ).stdout
    assert int(out) == mapped_mb  # by default the 64 MB block is its own mapping


def test_bad_threshold_raises():
    with pytest.raises(ValueError, match="threshold_bytes"):
        keep_freed_memory(0)
    with pytest.raises(ValueError, match="threshold_bytes"):
        keep_freed_memory(1 << 31)


@pytest.mark.parametrize("env, calls", [(None, 1), ("0", 0), ("1", 1)])
def test_the_command_keeps_freed_memory_unless_told_not_to(monkeypatch, tmp_path, env, calls):
    seen = []
    monkeypatch.setattr(cli_main, "keep_freed_memory", lambda: seen.append(1))
    if env is None:
        monkeypatch.delenv("SMOE_KEEP_FREED_MEMORY", raising=False)
    else:
        monkeypatch.setenv("SMOE_KEEP_FREED_MEMORY", env)
    # any command does; this one fails fast
    assert cli_main.main(["info", "--model", str(tmp_path / "missing")]) != 0
    assert len(seen) == calls


def _fake_mallopt(max_mmap_threshold, calls):
    def mallopt(param, value):
        calls.append((param, value))
        return int(param != malloc.M_MMAP_THRESHOLD or value <= max_mmap_threshold)

    return mallopt


def test_a_glibc_that_caps_the_threshold_gets_32_mb(monkeypatch):
    calls = []
    monkeypatch.setattr(malloc, "_glibc_mallopt", lambda: _fake_mallopt(32 << 20, calls))
    assert keep_freed_memory()
    assert calls == [
        (malloc.M_MMAP_THRESHOLD, 1 << 30),  # refused
        (malloc.M_MMAP_THRESHOLD, 32 << 20),
        (malloc.M_TRIM_THRESHOLD, (1 << 31) - 1),
    ]


def test_a_refused_threshold_changes_nothing_more(monkeypatch):
    calls = []
    monkeypatch.setattr(malloc, "_glibc_mallopt", lambda: _fake_mallopt(0, calls))
    assert not keep_freed_memory()
    assert [p for p, _ in calls] == [malloc.M_MMAP_THRESHOLD, malloc.M_MMAP_THRESHOLD]
