"""The output directory of ``smoe data build``: a failed build leaves the previous corpus intact.

A build writes everything into ``OUT/.smoe-build-staging/`` and only then swaps it in
(``with replacing(OUT) as staging: ...``):

1. ``check_out`` (before any write): ``OUT`` must be absent, empty, or an earlier corpus, i.e.
   hold nothing but a corpus ``manifest.json``, the in-progress marker, the staging folder and
   the domain folders that the manifest or marker lists, each holding only shard files. Anything
   else means the directory is not ours.
2. ``stage``: create ``OUT`` if needed and an empty staging folder in it (a stale one from a
   killed build is removed). Staging inside ``OUT`` rather than beside it needs no write access
   to the parent, keeps a symlinked or mounted ``OUT`` in place, and makes the swap a rename.
3. ``swap``: write the marker ``.smoe-build-incomplete`` listing the old and new domains, move
   the old domain folders into staging, the new ones into ``OUT``, then ``manifest.json``; drop
   the marker and staging. A crash inside this short step leaves the marker, and the next build
   clears every folder it lists.

Only names that are valid domain names are ever removed, so a doctored manifest or marker
cannot point outside ``OUT``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from smoe.data.shards import FORMAT, SPLITS, CorpusError
from smoe.data.sources import DOMAIN_NAME

INCOMPLETE = ".smoe-build-incomplete"  # lists the domains of a swap in progress
STAGING = ".smoe-build-staging"
_SHARD_FILES = {f"{split}.{ext}" for split in SPLITS for ext in ("bin", "idx")}
_OLD = ".old"  # inside staging: the previous corpus's folders, deleted after the swap


def _listed(out: Path) -> list[str]:
    """Domain folders that an earlier manifest or marker in ``out`` lists and that exist."""
    names: set[str] = set()
    for listing in (out / "manifest.json", out / INCOMPLETE):
        if not listing.is_file():
            continue
        try:
            old = json.loads(listing.read_text())
            old = old.get("domains", {}) if isinstance(old, dict) else old
        except (ValueError, OSError):
            old = []
        if isinstance(old, (dict, list)):
            names |= {
                n for n in old if isinstance(n, str) and DOMAIN_NAME.fullmatch(n) and (out / n).is_dir()
            }
    return sorted(names)


@contextlib.contextmanager
def replacing(out: Path) -> Iterator[Path]:
    """Yield a staging folder to build in; on success it replaces the corpus in ``out``, on any
    failure (Ctrl-C included) it is removed and ``out`` is as it was."""
    old = check_out(out)
    created = not out.exists()
    staging = stage(out)
    try:
        yield staging
    except BaseException:
        discard(out, created)
        raise
    swap(out, old)


def check_out(out: Path) -> list[str]:
    """Refuse an ``out`` that is not ours (reads only); returns the earlier corpus's domains."""
    if out.exists() and not out.is_dir():
        raise CorpusError(f"{out}: exists and is not a directory")
    if not out.exists():
        return []
    _check_manifest(out / "manifest.json")
    old = _listed(out)
    foreign = sorted(
        p.name for p in out.iterdir() if p.name not in {"manifest.json", INCOMPLETE, STAGING, *old}
    )
    # The swap deletes the old domain folders whole, so they too must hold only shards.
    foreign += sorted(f"{n}/{p.name}" for n in old for p in (out / n).iterdir() if p.name not in _SHARD_FILES)
    if foreign:
        raise CorpusError(
            f"{out}: directory is not empty and holds {', '.join(foreign[:3])}"
            f"{' ...' if len(foreign) > 3 else ''}, which no corpus manifest lists; refusing to write into it"
        )
    return old


def _check_manifest(path: Path) -> None:
    """Refuse a manifest.json that is not a corpus manifest: the swap replaces it, and a web app's
    or another tool's manifest.json in ``out`` used to be overwritten without a word."""
    if not path.exists():
        return
    try:
        m = json.loads(path.read_text())
    except (ValueError, OSError):
        m = None
    if not (isinstance(m, dict) and (m.get("format") == FORMAT or isinstance(m.get("domains"), dict))):
        raise CorpusError(
            f"{path}: not a corpus manifest (no {FORMAT!r} format or domains); refusing to replace it"
        )


def stage(out: Path) -> Path:
    """A fresh, empty staging folder inside ``out`` (created if absent)."""
    out.mkdir(parents=True, exist_ok=True)
    staging = out / STAGING
    if staging.is_symlink() or staging.is_file():
        staging.unlink()
    elif staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def discard(out: Path, created: bool) -> None:
    """After a failed build: remove staging, and ``out`` itself if this build created it."""
    shutil.rmtree(out / STAGING, ignore_errors=True)
    if created:
        try:
            out.rmdir()
        except OSError:  # not empty after all: leave it
            pass


def swap(out: Path, old: list[str]) -> None:
    """Replace the corpus in ``out`` (domains ``old``) by the one in its staging folder."""
    staging = out / STAGING
    new = list(json.loads((staging / "manifest.json").read_text())["domains"])
    (out / INCOMPLETE).write_text(json.dumps(sorted(set(old) | set(new))))
    (out / "manifest.json").unlink(missing_ok=True)
    (staging / _OLD).mkdir()
    for name in old:
        os.replace(out / name, staging / _OLD / name)
    for name in new:
        os.replace(staging / name, out / name)
    os.replace(staging / "manifest.json", out / "manifest.json")
    (out / INCOMPLETE).unlink()
    shutil.rmtree(staging)
