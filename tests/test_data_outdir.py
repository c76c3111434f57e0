"""A failed build keeps the previous corpus byte for byte; the output directory's guarantees hold."""

import json
from pathlib import Path

import pytest

import smoe.data.build as build
from smoe.data.outdir import INCOMPLETE, STAGING
from smoe.data.shards import Corpus, CorpusError
from smoe.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


class _BigVocab:
    """The real tokenizer claiming a vocabulary that does not fit uint16 shards."""

    vocab_size = 70_000

    def __init__(self, tok):
        self.tok = tok

    def __getattr__(self, name):
        return getattr(self.tok, name)


def _build(out, tok, src: Path, name: str = "u"):
    return build.build_corpus(out, domains=[], user_domains={name: str(src / "*")}, tokenizer=tok,
                              progress=False, max_tokens_per_domain=None)  # fmt: skip


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def corpus(tmp_path, tok):
    """An input folder and a corpus built from it."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.txt").write_text(f"document {i}")
    _build(tmp_path / "c", tok, src)
    return src, tmp_path / "c"


def test_check_before_output_keeps_old_corpus(corpus, tok):
    src, out = corpus
    before = _snapshot(out)
    with pytest.raises(CorpusError, match="70000 does not fit uint16"):
        _build(out, _BigVocab(tok), src)
    assert _snapshot(out) == before


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_mid_build_keeps_old_corpus(corpus, tok, tmp_path, monkeypatch, error):
    src, out = corpus
    before = _snapshot(out)

    def fail(*args):
        raise error("tokenizer failed")

    monkeypatch.setattr(build, "_encode_many", fail)
    with pytest.raises(error):
        _build(out, tok, src, name="other")
    assert _snapshot(out) == before and not (out / STAGING).exists()
    with pytest.raises(error):  # a directory the build created is removed again
        _build(tmp_path / "new" / "c", tok, src)
    assert not (tmp_path / "new" / "c").exists()


def test_foreign_file_beside_a_corpus_is_refused_before_deleting_anything(corpus, tok):
    src, out = corpus
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    with pytest.raises(CorpusError, match="not empty"):
        _build(out, tok, src, name="other")
    assert _snapshot(out) == before


def test_leftovers_of_a_killed_build_are_cleared(corpus, tok):
    src, out = corpus
    (out / STAGING / "u").mkdir(parents=True)  # killed while building
    (out / INCOMPLETE).write_text(json.dumps(["half", "..", "/etc"]))  # killed while swapping
    (out / "half").mkdir()
    m = _build(out, tok, src, name="new")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "new"]
    assert Corpus(out).domains == ["new"] and m["domains"]["new"]["documents_in"] == 3
    assert (out.parent / "in").is_dir()


def test_symlinked_output_directory_stays_a_symlink(corpus, tok, tmp_path):
    src, out = corpus
    (tmp_path / "link").symlink_to(out)
    _build(tmp_path / "link", tok, src, name="new")
    assert (tmp_path / "link").is_symlink() and Corpus(out).domains == ["new"]
