"""User-domain globs that cannot loop: ``glob.glob(recursive=True)`` minus symlink descent under ``**``.

Python 3.11's ``glob`` follows symlinked directories while expanding ``**``, so one link back to
an ancestor repeats the tree until the path is too long to resolve, and two such links make the
walk exponential (``smoe data build`` hung). ``glob_files`` keeps glob's semantics otherwise
(``*``, ``?``, ``[seq]``, ``**`` for zero or more directories, names starting with a dot matched
only by a pattern starting with one, relative patterns giving relative paths), but ``**`` treats a
symlinked directory as a leaf: the link itself can match, nothing under it is reached through it.
A ``*`` component still goes through a link: it descends one level only, so it cannot loop.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterator


def glob_files(pattern: str) -> list[str]:
    """Sorted, distinct paths matching ``pattern`` (see the module docstring)."""
    return sorted({p for p in _iglob(pattern, dironly=False) if p})


def _iglob(pattern: str, dironly: bool) -> Iterator[str]:
    # The structure of glob._iglob: expand the directory part, then match the last component.
    dirname, basename = os.path.split(pattern)
    if not glob.has_magic(pattern):
        if os.path.lexists(pattern) if basename else os.path.isdir(dirname):
            yield pattern
        return
    if not dirname:
        yield from _in_dir("", basename, dironly)
        return
    dirs = _iglob(dirname, dironly=True) if dirname != pattern and glob.has_magic(dirname) else [dirname]
    for d in dirs:
        for name in _in_dir(d, basename, dironly):
            yield os.path.join(d, name)


def _in_dir(d: str, basename: str, dironly: bool) -> Iterator[str]:
    """Names in directory ``d`` ("" = the current one) that match one pattern component."""
    if basename == "**":
        yield ""  # zero directories
        yield from _walk(d, dironly)
    elif glob.has_magic(basename):
        names = [e.name for e in _entries(d) if not dironly or _is_dir(e, follow=True)]
        if not basename.startswith("."):
            names = [n for n in names if not n.startswith(".")]
        yield from fnmatch.filter(names, basename)
    elif os.path.lexists(os.path.join(d, basename)) if basename else os.path.isdir(d):
        yield basename


def _walk(d: str, dironly: bool) -> Iterator[str]:
    """Relative paths under ``d``, not hidden, descending only into real (non-link) directories."""
    for e in _entries(d):
        if e.name.startswith("."):
            continue
        real_dir = _is_dir(e, follow=False)
        if real_dir or not dironly:  # a linked directory is a leaf here, so not a place to search
            yield e.name
        if real_dir:
            yield from (os.path.join(e.name, sub) for sub in _walk(os.path.join(d, e.name), dironly))


def _entries(d: str) -> list[os.DirEntry]:
    try:
        with os.scandir(d or os.curdir) as it:
            return list(it)
    except OSError:  # unreadable or vanished directory: glob also yields nothing for it
        return []


def _is_dir(e: os.DirEntry, follow: bool) -> bool:
    try:
        return e.is_dir(follow_symlinks=follow)
    except OSError:
        return False
