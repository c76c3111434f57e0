"""Optional system text, used when the machine has it and skipped cleanly when it does not.

- **bible**: the King James Version from Debian's ``bible-kjv`` (``bible -f "Gen1:1-Rev22:21"``),
  one document per chapter.
- **dictionary**: Webster's 1913 from ``dict-gcide`` (``/usr/share/dictd/gcide.dict.dz``), cut into
  "pages" of consecutive entries (about ``GCIDE_PAGE_CHARS`` characters each).
- **manpages** / **multilingual**: troff man pages under ``/usr/share/man``, English ones
  (``man1``..``man9``) and translated ones (``/usr/share/man/<lang>/``), one document per page,
  with troff markup stripped by a small converter (good enough for language modelling, not a
  faithful renderer).

``system_sources()`` returns the available sources plus a line per absent one saying why.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from smoe.data.sources import Source
from smoe.data.textio import Skip, decode, read_bytes

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
MAN_ROOT = Path("/usr/share/man")
GCIDE_PAGE_CHARS = 4000
BIBLE_RANGE = "Gen1:1-Rev22:21"


# ---------------------------------------------------------------- bible


def _bible_chapters() -> dict[str, str]:
    """``{"Ge1": "1 In the beginning ...\\n2 ...", ...}`` in canonical order."""
    out = subprocess.run(["bible", "-f", BIBLE_RANGE], capture_output=True, timeout=120, check=True).stdout
    chapters: dict[str, list[str]] = {}
    for line in out.decode("utf-8", "replace").splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$", line)
        if m:
            chapters.setdefault(f"{m[1]}{m[2]}", []).append(f"{m[3]} {m[4]}")
        elif line.strip() and chapters:  # a wrapped verse continues the previous line
            last = chapters[next(reversed(chapters))]
            last[-1] += " " + line.strip()
    return {k: "\n".join(v) for k, v in chapters.items()}


def bible_source() -> Source | str:
    if shutil.which("bible") is None:
        return "bible: absent (Debian package bible-kjv provides the `bible` command)"
    try:
        chapters = _bible_chapters()
    except (OSError, subprocess.SubprocessError) as e:
        return f"bible: `bible -f {BIBLE_RANGE}` failed ({e})"
    if not chapters:
        return f"bible: `bible -f {BIBLE_RANGE}` printed no verses"
    desc = f"King James Bible via `bible -f {BIBLE_RANGE}` (Debian bible-kjv), one document per chapter"
    return Source("bible", desc, "system", lambda: list(chapters), lambda k: [chapters[k]])


# ---------------------------------------------------------------- dictionary


def _gcide_pages(data: bytes) -> list[bytes]:
    """Entries start at column 0 ("Abuse \\A*buse\\, n. ..."); group consecutive ones into pages.

    Split as bytes: a few entries hold stray cp1252 bytes, and only their pages should be
    skipped (as invalid_utf8), not the whole dictionary.
    """
    entries = [e for e in re.split(rb"\n\n(?=\S)", data) if not e.startswith(b"00-database")]
    pages, cur, size = [], [], 0
    for e in entries:
        cur.append(e)
        size += len(e)
        if size >= GCIDE_PAGE_CHARS:
            pages.append(b"\n\n".join(cur))
            cur, size = [], 0
    if cur:
        pages.append(b"\n\n".join(cur))
    return pages


def dictionary_source() -> Source | str:
    if not GCIDE.is_file():
        return f"dictionary: absent ({GCIDE}; Debian package dict-gcide)"
    cache: list[list[bytes]] = []

    def pages() -> list[bytes]:  # decompressing 40 MB takes ~1 s, so only when the domain is built
        if not cache:
            data = read_bytes(GCIDE, gz=True)
            if isinstance(data, Skip):
                raise OSError(f"{GCIDE}: present but could not be read or decompressed ({data.reason})")
            cache.append(_gcide_pages(data))
        return cache[0]

    def load(key: str) -> list[str | Skip]:
        return [decode(pages()[int(key)], f"{GCIDE} page {key}")]

    desc = (
        f"Webster's Revised Unabridged Dictionary (1913) via GCIDE, {GCIDE}, ~{GCIDE_PAGE_CHARS}-char pages"
    )
    return Source("dictionary", desc, "system", lambda: [str(i) for i in range(len(pages()))], load)


# ---------------------------------------------------------------- man pages

_ESCAPES = {
    r"\-": "-", r"\(em": "\u2014", r"\(en": "\u2013", r"\(aq": "'", r"\(dq": '"', r"\(bu": "\u2022",
    r"\(co": "\u00a9", r"\(lq": "\u201c", r"\(rq": "\u201d", r"\(oq": "\u2018", r"\(cq": "\u2019",
    r"\(mu": "\u00d7", r"\(>=": "\u2265", r"\(<=": "\u2264", r"\(->": "\u2192", r"\*(lq": "\u201c",
    r"\*(rq": "\u201d", r"\e": "\\", r"\ ": " ", r"\~": " ", r"\&": "", r"\|": "", r"\^": "",
    r"\c": "", r"\:": "", r"\(ss": "\u00df", r"\(ae": "\u00e6", r"\(oe": "\u0153", r"\(Do": "$", r"\%": "", r"\/": "", r"\,": "", r"\0": " ", r"\(ga": "`", r"\(ti": "~",
}  # fmt: skip
_ESCAPE_RE = re.compile("|".join(re.escape(k) for k in sorted(_ESCAPES, key=len, reverse=True)))
_FONT_RE = re.compile(
    r"\\f(\[[^\]]*\]|\(..|.)|\\s[+-]?\d|\\\*\[[^\]]*\]|\\\*\(..|\\\*.|\\\[[^\]]*\]|\\\(..|\\[{}]"
)
_MOTION_RE = re.compile(r"\\[whvoxlLbDZNHS]'[^']*'|\\n\(..|\\n.|\\\$\d")
# troff accent escapes (French, German, ... pages use \('e for e-acute): accent -> combining mark.
_ACCENT_RE = re.compile(r"\\\(([`'^:,~])([A-Za-z])")
_COMBINING = {"'": "\u0301", "`": "\u0300", "^": "\u0302", ":": "\u0308", ",": "\u0327", "~": "\u0303"}
# Requests whose arguments are formatting, not text.
_DROP = {"TH", "PP", "P", "LP", "sp", "br", "RS", "RE", "nf", "fi", "in", "ft", "ad", "na", "ne", "hy",
         "nh", "ds", "nr", "ie", "el", "if", "so", "ti", "ta", "ll", "bp", "Dd", "Os", "Dt", "Bl", "El",
         "Bd", "Ed", "UE", "ME", "TQ", "PD", "tr", "cs", "ss", "fam", "mso", "rm", "als", "EX", "EE",
         "IX", "HP", "Sp", "Vb", "Ve", "tm", "rr", "rn", "di", "da", "wh", "ch", "it", "ev", "cu", "ul", "lf", "pc", "lt", "hw", "ns", "rs"}  # fmt: skip


def strip_troff(src: str) -> str:
    """Man page source -> plain text: drop comments and layout requests, keep macro arguments."""
    out, in_def = [], False
    for line in src.split("\n"):
        if in_def:
            in_def = line.strip() != ".."
            continue
        if line.startswith(('.\\"', "'\\\"", ".\\#", "\\#")) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            request = line[1:].lstrip()
            name = re.split(r"[\s\\]", request, maxsplit=1)[0]
            args = request[len(name) :].strip()
            if name in ("de", "de1", "am", "ig"):
                in_def = True
                continue
            if name in _DROP or not args or name.startswith("\\"):
                continue
            line = " ".join(a.strip('"') for a in re.findall(r'"[^"]*"|\S+', args))
            if name in ("SH", "SS", "Sh", "Ss"):
                line = "\n" + line
        if "\\" not in line:  # most lines are plain text
            out.append(line)
            continue
        line = _ACCENT_RE.sub(lambda m: m[2] + _COMBINING[m[1]], line)
        line = _ESCAPE_RE.sub(lambda m: _ESCAPES[m[0]], _MOTION_RE.sub("", line))
        out.append(_FONT_RE.sub("", line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out))


def _man_pages(translated: bool) -> list[str]:
    pattern = str(MAN_ROOT / ("*/man*/*" if translated else "man*/*"))
    # Sorted as strings: sorting ~20k Path objects costs over a second.
    root = str(MAN_ROOT)
    return sorted(
        p for p in glob.glob(pattern) if (os.path.dirname(os.path.dirname(p)) != root) == translated
    )


def _load_man(key: str) -> Iterator[str | Skip]:
    data = read_bytes(Path(key), gz=key.endswith(".gz"))
    text = decode(data, key) if not isinstance(data, Skip) else data
    if isinstance(text, Skip):
        yield text
    elif text.lstrip().startswith(".so "):  # an alias page that only includes another
        yield Skip("man_alias", key)
    else:
        yield strip_troff(text)


def man_sources() -> list[Source | str]:
    out: list[Source | str] = []
    for name, translated in (("manpages", False), ("multilingual", True)):
        pages = _man_pages(translated) if MAN_ROOT.is_dir() else []
        what = "translated man pages (/usr/share/man/<lang>/)" if translated else "English man pages"
        if not pages:
            out.append(f"{name}: absent (no {what} under {MAN_ROOT})")
            continue
        langs = sorted({Path(p).parts[4] for p in pages}) if translated else []
        desc = f"{what} under {MAN_ROOT}, troff stripped" + (
            f"; languages: {' '.join(langs)}" if langs else ""
        )
        out.append(Source(name, desc, "system", lambda pages=pages: pages, _load_man))
    return out


def system_sources() -> tuple[list[Source], list[str]]:
    """(available sources, one line per absent source saying what is missing)."""
    found: list[Source] = []
    absent: list[str] = []
    for s in [bible_source(), dictionary_source(), *man_sources()]:
        (found if isinstance(s, Source) else absent).append(s)  # type: ignore[arg-type]
    return found, absent
