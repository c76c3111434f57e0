"""Where each domain's documents come from: always-available sources and user globs.

A ``Source`` lists candidate keys cheaply (paths, topic names, indices) and loads one key into
document texts and ``Skip`` records on demand, so a capped build reads only what it keeps.

- **code**: the Python standard library's ``.py`` files (found via ``sysconfig``), without
  site-packages, tests and ``pydoc_data`` (which is prose and goes to **prose**).
- **math**: ``smoe.data.math_gen`` documents, unbounded, so the domain needs a cap.
- **prose**: English technical prose from the installed Python: the language reference topics in
  ``pydoc_data/topics.py`` (read with ``ast.literal_eval``, not imported), package descriptions
  (``*.dist-info/METADATA``), ``.rst``/``.md``/``.txt`` files in site-packages, and per-module
  docstrings extracted with ``ast`` (modules are never imported). smoe's own package and its
  METADATA (which carries the README, and so the demo's own output) are left out: otherwise
  editing the README would change the corpus it describes.
- **user** domains: ``NAME=GLOB`` over .txt/.md/.rst (one document per file) and .jsonl (one per
  line, "text" field); ``**`` does not follow symlinked directories (``globwalk``).
"""

from __future__ import annotations

import ast
import email.parser
import functools
import itertools
import os
import random
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from smoe.data import math_gen
from smoe.data.globwalk import glob_files
from smoe.data.textio import Skip, read_text, read_user_file

# A directory name beside manifest.json. Test it with fullmatch: "$" also matches before a final
# "\n", so .match accepted "notes\n" and made a directory of that name.
DOMAIN_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
# Directory names never searched for code or prose: tests (and their data), caches, installed packages.
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"}
PROSE_MIN_DOCSTRING_CHARS = 300
OWN_DIST = re.compile(r"smoe-[^-]+\.dist-info$")  # this package's own, left out of prose
PROSE_EXCLUDED_NAMES = re.compile(
    r"^(licen[cs]e|copying|notice|authors|contributors|record|entry_points|top_level|requirements|"
    r"dependency_links|sources|cmakelists|namespace_packages|installer|requested|wheel)",
    re.IGNORECASE,
)


@dataclass
class Source:
    name: str
    description: str
    kind: str  # "builtin" | "system" | "user"
    candidates: Callable[[], Sequence[str] | Iterator[str]]  # keys in a stable order
    load: Callable[[str], Iterable[str | Skip]]
    shuffle: bool = True  # False for generated sources whose keys are already seed-dependent
    bounded: bool = True  # False: candidates never end, so the domain needs a cap


def _walk(root: Path, keep: Callable[[str], bool]) -> list[str]:
    """Sorted file paths under ``root`` (symlinked dirs not followed), minus EXCLUDED_DIRS."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.endswith(".egg-info"))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if keep(f)]
    return out


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_source() -> Source:
    root = stdlib_dir()

    def candidates() -> list[str]:
        return _walk(root, lambda f: f.endswith(".py") and not f.startswith("test_"))

    def load(key: str) -> Iterator[str | Skip]:
        yield read_text(Path(key))

    desc = f"Python {sys.version.split()[0]} standard library .py files under {root} (no tests, site-packages, pydoc_data)"
    return Source("code", desc, "builtin", candidates, load)


def math_source(seed: int) -> Source:
    def load(key: str) -> Iterator[str]:
        yield math_gen.document(seed, int(key))

    desc = (
        f"smoe.data.math_gen DeepMind-Mathematics-style Q/A, {math_gen.PROBLEMS_PER_DOC} problems "
        f"per document, {len(math_gen.GENERATORS)} modules, seed {seed}"
    )
    return Source(
        "math", desc, "builtin", lambda: map(str, itertools.count()), load, shuffle=False, bounded=False
    )


# ---------------------------------------------------------------- prose


def site_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    return sorted({Path(paths["purelib"]), Path(paths["platlib"])})


@functools.lru_cache(maxsize=4)
def _pydoc_topics(path: str) -> dict[str, str]:
    """``pydoc_data.topics.topics`` read as a literal, without importing anything."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def module_docstrings(source: str) -> str:
    """Module, class and function docstrings in source order, blank-line separated."""
    tree = ast.parse(source)
    parts: list[str] = []

    def visit(node: ast.AST) -> None:
        doc = ast.get_docstring(node)  # type: ignore[arg-type]
        if doc:
            parts.append(doc)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child)

    visit(tree)
    return "\n\n".join(parts)


def looks_like_prose(text: str) -> bool:
    """Word lists, tables and data files shipped as .txt fail this; sentences pass."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if not lines:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    words = sum(len(ln.split()) for ln in lines)
    return letters / len(text) >= 0.8 and words / len(lines) >= 5


def _load_prose(key: str) -> Iterator[str | Skip]:
    kind, _, where = key.partition(":")
    if kind == "topic":
        path, _, topic = where.rpartition(":")
        yield _pydoc_topics(path).get(topic, "")
        return
    text = read_text(Path(where))
    if isinstance(text, Skip):
        yield text
    elif kind == "metadata":  # RFC 822 headers, then the package's long description
        yield email.parser.Parser().parsestr(text).get_payload() or ""
    elif kind == "doc":
        yield text if not where.endswith(".txt") or looks_like_prose(text) else Skip("not_prose", where)
    else:  # docstrings
        try:
            docs = module_docstrings(text)
        except (SyntaxError, ValueError, RecursionError):
            yield Skip("syntax_error", where)
            return
        yield docs if len(docs) >= PROSE_MIN_DOCSTRING_CHARS else Skip("few_docstrings", where)


def prose_source(seed: int) -> Source:
    """Candidates of the four kinds, each shuffled by ``seed``, interleaved round-robin: there
    are ~100 times more modules than reference topics or package descriptions, and a uniform
    shuffle would make the domain almost all docstrings (and spend its time in ``ast.parse``)."""
    topics = stdlib_dir() / "pydoc_data" / "topics.py"
    sites = site_dirs()

    def candidates() -> list[str]:
        kinds: dict[str, list[str]] = {"topic": [], "metadata": [], "doc": [], "docstrings": []}
        if topics.is_file():
            kinds["topic"] = [f"topic:{topics}:{t}" for t in sorted(_pydoc_topics(str(topics)))]
        for site in sites:
            own = str(site / "smoe") + os.sep
            for dist in sorted(site.glob("*.dist-info")):
                if (dist / "METADATA").is_file() and not OWN_DIST.match(dist.name):
                    kinds["metadata"].append(f"metadata:{dist / 'METADATA'}")
            for path in _walk(site, lambda f: not PROSE_EXCLUDED_NAMES.match(f)):
                if ".dist-info" in path or path.startswith(own):
                    continue
                if path.endswith(".py"):
                    kinds["docstrings"].append(f"docstrings:{path}")
                elif path.lower().endswith((".rst", ".md", ".txt")):
                    kinds["doc"].append(f"doc:{path}")
        for kind, keys in kinds.items():
            random.Random(f"smoe-corpus:{seed}:prose:{kind}").shuffle(keys)
        rounds = itertools.zip_longest(*kinds.values())
        return [k for r in rounds for k in r if k is not None]

    desc = (
        f"English technical prose, interleaved: Python reference topics ({topics}), package METADATA, "
        f".rst/.md/.txt docs and module docstrings (via ast) under {', '.join(map(str, sites))}"
    )
    return Source("prose", desc, "builtin", candidates, _load_prose, shuffle=False)


# ---------------------------------------------------------------- user domains


def parse_domain_spec(spec: str) -> tuple[str, str]:
    """``NAME=GLOB`` -> (name, glob); the name becomes a directory, so it is restricted."""
    name, sep, pattern = spec.partition("=")
    if not sep or not pattern:
        raise ValueError(
            f"--domain {spec!r}: expected NAME=GLOB, e.g. notes='docs/**/*.md' "
            "(quote the glob so that the shell does not expand it)"
        )
    if not DOMAIN_NAME.fullmatch(name):
        raise ValueError(f"--domain {spec!r}: name {name!r} must match {DOMAIN_NAME.pattern}")
    return name, pattern


def user_source(name: str, pattern: str) -> Source:
    if not DOMAIN_NAME.fullmatch(name):
        raise ValueError(f"user domain name {name!r} must match {DOMAIN_NAME.pattern}")
    matches = glob_files(os.path.expanduser(pattern))
    if not matches:
        raise FileNotFoundError(f"domain {name!r}: glob {pattern!r} matched no files")

    def load(key: str) -> Iterator[str | Skip]:
        yield from read_user_file(Path(key))

    desc = (
        f"user files matching {pattern!r} ({len(matches)} matches; .txt/.md/.rst per file, .jsonl per line)"
    )
    return Source(name, desc, "user", lambda: matches, load)
