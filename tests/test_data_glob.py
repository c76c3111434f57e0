"""User-domain globs: the same matches as ``glob.glob(recursive=True)`` on an ordinary tree, and
no endless walk through symlink cycles (3.11's glob follows symlinked directories under ``**``)."""

import glob
import time

import pytest

from smoe.data.build import build_corpus
from smoe.data.globwalk import glob_files
from smoe.data.sources import user_source
from smoe.tokenizer import load_tokenizer

PATTERNS = ["t/*", "t/*.txt", "t/**/*.txt", "t/**", "**", "**/*.md", "t/?/*", "t/[ac]/*.txt", "t/**/b/*.md",
            "t/x.txt", "t/none.txt", "t/.*", "t/.hid/*", "t/", "t/*/", "t/**/", "*/**/*.txt", "t/**/**/*.txt"]  # fmt: skip


def _tree(root):
    for f in ["x.txt", "a/y.txt", "a/b/z.txt", "a/b/w.md", ".h.txt", ".hid/q.txt", "c/1.txt", "c/2.md"]:
        (root / "t" / f).parent.mkdir(parents=True, exist_ok=True)
        (root / "t" / f).write_text(f)
    (root / "t" / "c" / "link.txt").symlink_to("../x.txt")  # a link to a file is matched like a file


@pytest.mark.parametrize("absolute", [False, True])
def test_same_matches_as_glob(tmp_path, monkeypatch, absolute):
    _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    for p in PATTERNS:
        p = str(tmp_path / p) if absolute else p
        assert glob_files(p) == sorted(set(glob.glob(p, recursive=True))), p


def test_symlink_cycles_end_and_count_each_file_once(tmp_path):
    _tree(tmp_path)
    t = tmp_path / "t"
    real = sorted(glob.glob(str(t / "**" / "*.txt"), recursive=True))  # before any cycle exists
    (t / "a" / "up").symlink_to("..")  # t/a/up -> t
    assert user_source("u", str(t / "**" / "*.txt")).candidates() == real
    (t / "a" / "b" / "up2").symlink_to("../..")  # two back-links: 3.11's glob is exponential here
    start = time.perf_counter()
    assert glob_files(str(t / "**" / "*.txt")) == real
    assert time.perf_counter() - start < 2
    m = build_corpus(tmp_path / "c", domains=[], user_domains={"u": str(t / "**" / "*.txt")},
                     tokenizer=load_tokenizer(), progress=False, max_tokens_per_domain=None)  # fmt: skip
    assert m["domains"]["u"]["documents_in"] == len(real)
