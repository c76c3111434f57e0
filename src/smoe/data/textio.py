"""Reading untrusted text files: every failure becomes a named skip reason, never an exception.

A source yields, per candidate, either document texts (``str``) or ``Skip`` records; the builder
counts skips by reason in the manifest. Reasons used across sources:

==================  =================================================================
binary              a NUL byte in the file, or a NUL character in a document's text (a JSON
                    ``\\u0000`` escape, a docstring's ``\\0``)
invalid_utf8        bytes that do not decode as UTF-8, or text that cannot be encoded as UTF-8
                    (a lone surrogate such as a JSON ``\\ud800`` escape)
empty               nothing but whitespace after normalisation
enormous_line       a line longer than ``MAX_LINE_CHARS`` characters
too_large           a file over ``MAX_FILE_BYTES`` (not read)
unreadable          open/read failed: permissions, broken symlink, vanished file
directory           a glob matched a directory
not_regular_file    a FIFO, socket or device (reading one could block forever)
unsupported_type    a user-glob match that is not .txt/.md/.rst/.jsonl
invalid_json        a .jsonl line that is not a JSON object with a string "text" (or nested
                    too deeply for the parser)
duplicate           same normalised content as an earlier document (any domain)
==================  =================================================================
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAX_LINE_CHARS = 100_000  # longer lines are minified data or binary blobs, not text
MAX_FILE_BYTES = 64 * 2**20
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")


@dataclass(frozen=True)
class Skip:
    reason: str
    where: str  # path or other locator, for the manifest's examples


def normalise(text: str) -> str:
    """NFC, ``\\n`` line ends, no trailing spaces, no leading/trailing blank lines. Stored as is."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def check_text(text: str, where: str) -> str | Skip:
    """``text``, or why it cannot be a document: a decoded escape can still hold a NUL or a lone
    surrogate, which valid UTF-8 bytes never do. A surrogate would crash hashing and tokenizing."""
    if "\x00" in text:
        return Skip("binary", where)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return Skip("invalid_utf8", where)
    return text


def content_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def longest_line(text: str) -> int:
    return max(map(len, text.split("\n")), default=0)


def read_bytes(path: Path, gz: bool = False) -> bytes | Skip:
    """The file's bytes, or why it could not be read."""
    where = str(path)
    try:
        st = os.stat(path)  # follows symlinks: a broken one raises FileNotFoundError
    except OSError:
        return Skip("unreadable", where)
    if stat.S_ISDIR(st.st_mode):
        return Skip("directory", where)
    if not stat.S_ISREG(st.st_mode):
        return Skip("not_regular_file", where)
    if st.st_size > MAX_FILE_BYTES:
        return Skip("too_large", where)
    try:
        with open(path, "rb") as f:
            data = f.read()
        if gz:
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile):
        return Skip("unreadable", where)
    return data


def decode(data: bytes, where: str) -> str | Skip:
    if b"\x00" in data:
        return Skip("binary", where)
    try:
        # "-sig": drop a leading byte order mark (Windows editors write one). Kept, it made a
        # .jsonl file's first line invalid JSON and hid a file's duplicate from dedup.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return Skip("invalid_utf8", where)


def read_text(path: Path, gz: bool = False) -> str | Skip:
    data = read_bytes(path, gz)
    return data if isinstance(data, Skip) else decode(data, str(path))


def read_jsonl(path: Path) -> Iterator[str | Skip]:
    """One document per line, from its "text" field; bad lines are skipped one by one."""
    data = read_bytes(path)
    if isinstance(data, Skip):
        yield data
        return
    for n, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{n}"
        if not raw.strip():
            continue  # blank lines separate nothing in JSON Lines; not a document
        if len(raw) > 4 * MAX_LINE_CHARS:  # > 4 bytes per character is impossible in UTF-8
            yield Skip("enormous_line", where)
            continue
        line = decode(raw, where)
        if isinstance(line, Skip):
            yield line
            continue
        if len(line) > MAX_LINE_CHARS:
            yield Skip("enormous_line", where)
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: "[[[[...]]]]" nested 20000 deep
            yield Skip("invalid_json", where)
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            yield Skip("invalid_json", where)
            continue
        yield check_text(obj["text"], where)


def read_user_file(path: Path) -> Iterator[str | Skip]:
    """A user-domain glob match: .jsonl (a document per line) or plain text (one document)."""
    if path.is_dir():
        yield Skip("directory", str(path))
    elif path.suffix.lower() == ".jsonl":
        yield from read_jsonl(path)
    elif path.suffix.lower() in TEXT_SUFFIXES:
        yield read_text(path)
    elif not path.exists():  # a broken symlink has no real suffix to judge by
        yield Skip("unreadable", str(path))
    else:
        yield Skip("unsupported_type", str(path))


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut a document into pieces of at most ``max_chars``, at line ends where possible.

    Long sources (a 200 kB module) would otherwise blow through a per-domain token cap in one
    step; the pieces stay in the same split (see build.py), so nothing leaks train -> val.
    """
    pieces = []
    while len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars + 1)
        if cut <= 0:
            cut = max_chars
        pieces.append(text[:cut])
        text = text[cut:].lstrip("\n")
    if text:
        pieces.append(text)
    return pieces
