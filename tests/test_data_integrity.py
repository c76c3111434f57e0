"""Shards checked against their index and manifest; foreign output folders, unsafe domain names; no
shard document stored twice (so none in both train and val)."""

import json
from pathlib import Path

import numpy as np
import pytest

from smoe.data.build import build_corpus
from smoe.data.shards import Corpus, CorpusError
from smoe.data.sources import parse_domain_spec, user_source
from smoe.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture
def corpus(tmp_path, tok) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(10):
        (src / f"{i}.txt").write_text(f"document number {i}: some words to tokenize")
    build_corpus(tmp_path / "c", domains=[], user_domains={"u": str(src / "*")}, tokenizer=tok,
                 progress=False, max_tokens_per_domain=None, val_fraction=0.0)  # fmt: skip
    return tmp_path / "c"


@pytest.mark.parametrize("cut", [1, 2, 10])  # half a token, one token, five tokens
def test_truncated_bin_is_refused_by_every_reader(corpus, cut):
    f = corpus / "u" / "train.bin"
    f.write_bytes(f.read_bytes()[:-cut])
    c = Corpus(corpus)
    # ``tokens`` is what training reads: it used to return the short shard (or numpy's
    # "not a multiple of the data-type size") without looking at the index.
    for read in (c.tokens, c.offsets, lambda d: list(c.documents(d))):
        with pytest.raises(CorpusError, match="train"):
            read("u")


@pytest.mark.parametrize("cut", [3, 8])
def test_truncated_or_missing_idx_is_refused(corpus, cut):
    f = corpus / "u" / "train.idx"
    f.write_bytes(f.read_bytes()[:-cut])
    with pytest.raises(CorpusError, match="train.idx"):
        Corpus(corpus).tokens("u")
    f.unlink()
    with pytest.raises(CorpusError, match="missing"):
        Corpus(corpus).tokens("u")


def test_shards_that_disagree_with_the_manifest_are_refused(corpus):
    # A consistent .bin/.idx pair with one document fewer than the manifest records (e.g. shards
    # copied from another build): every document check passes, only the manifest can tell.
    d = corpus / "u"
    idx = np.fromfile(d / "train.idx", dtype=np.int64)
    toks = np.fromfile(d / "train.bin", dtype=np.uint16)
    idx[:-1].tofile(d / "train.idx")
    toks[: idx[-2]].tofile(d / "train.bin")
    with pytest.raises(CorpusError, match="manifest"):
        Corpus(corpus).tokens("u")


def test_intact_corpus_reads_as_the_manifest_says(corpus):
    c = Corpus(corpus)
    m = json.loads((corpus / "manifest.json").read_text())["domains"]["u"]
    for split in ("train", "val"):
        assert len(c.tokens("u", split)) == c.num_tokens("u", split) == m[split]["tokens"]
        assert len(list(c.documents("u", split))) == m[split]["documents"]


@pytest.mark.parametrize("content", ['{"name": "my web app", "icons": []}', "not json", "[1, 2]"])
def test_foreign_manifest_json_is_not_overwritten(tmp_path, tok, content):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a document")
    out = tmp_path / "site"
    out.mkdir()
    (out / "manifest.json").write_text(content)
    with pytest.raises(CorpusError, match="not a corpus manifest"):
        build_corpus(out, domains=[], user_domains={"u": str(tmp_path / "in" / "*")}, tokenizer=tok,
                     progress=False)  # fmt: skip
    assert (out / "manifest.json").read_text() == content
    assert [p.name for p in out.iterdir()] == ["manifest.json"]


@pytest.mark.parametrize("name", ["notes\n", "../x", "a/b", ".hidden", ""])
def test_unsafe_domain_names_are_refused(tmp_path, tok, name):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a document")
    with pytest.raises(ValueError, match="must match"):
        parse_domain_spec(f"{name}={tmp_path / 'in' / '*'}")
    with pytest.raises(ValueError, match="must match"):
        user_source(name, str(tmp_path / "in" / "*"))
    with pytest.raises(ValueError, match="must match"):
        build_corpus(tmp_path / "c", domains=[], user_domains={name: str(tmp_path / "in" / "*")},
                     tokenizer=tok, progress=False)  # fmt: skip
    assert not (tmp_path / "c").exists()


def test_a_piece_shared_by_two_documents_is_stored_once(tmp_path, tok):
    # 40 versions of one file: a common ~1.5k-char head, then a line of their own. With
    # max_doc_chars=1000 each is cut into [head part, rest]; the head part is the same shard
    # document every time and used to be stored 40 times, in train and in val alike.
    src = tmp_path / "in"
    src.mkdir()
    head = "\n".join(f"shared line {i} of a long common header" for i in range(40))
    for i in range(40):
        (src / f"{i:02d}.txt").write_text(f"{head}\ntail {i} with words of its own")
    m = build_corpus(tmp_path / "c", domains=[], user_domains={"u": str(src / "*")}, tokenizer=tok,
                     progress=False, max_tokens_per_domain=None, max_doc_chars=1000, val_fraction=0.25)  # fmt: skip
    c = Corpus(tmp_path / "c")
    train = [tuple(d.tolist()) for d in c.documents("u", "train")]
    val = [tuple(d.tolist()) for d in c.documents("u", "val")]
    assert not set(train) & set(val)
    assert len(set(train + val)) == len(train + val)  # exact dedup of what the shards hold
    d = m["domains"]["u"]
    assert d["documents_kept"] == 40 and d["pieces_duplicate"] == 39 and d["pieces_stored"] == 41
    assert d["train"]["documents"] + d["val"]["documents"] == d["pieces_stored"]


def test_utf8_byte_order_mark_is_not_content(tmp_path, tok):
    # A BOM made the first .jsonl line invalid JSON (json.loads refuses it) and kept b.txt
    # apart from its exact copy c.txt.
    src = tmp_path / "in"
    src.mkdir()
    bom = b"\xef\xbb\xbf"
    (src / "a.jsonl").write_bytes(bom + b'{"text": "first line"}\n{"text": "second line"}\n')
    (src / "b.txt").write_bytes(bom + b"same words")
    (src / "c.txt").write_bytes(b"same words")
    m = build_corpus(tmp_path / "c", domains=[], user_domains={"u": str(src / "*")}, tokenizer=tok,
                     progress=False, max_tokens_per_domain=None, val_fraction=0.0)  # fmt: skip
    assert m["domains"]["u"]["skipped"] == {"duplicate": 1}
    docs = sorted(tok.decode(d.tolist()) for d in Corpus(tmp_path / "c").documents("u"))
    assert docs == ["first line", "same words", "second line"]


def test_a_file_saved_inside_an_old_domain_folder_is_not_deleted(corpus, tok, tmp_path):
    # The swap removes the old domain folders whole: notes kept beside the shards went with them.
    (corpus / "u" / "notes.txt").write_text("mine")
    with pytest.raises(CorpusError, match="u/notes.txt"):
        build_corpus(corpus, domains=[], user_domains={"v": str(tmp_path / "in" / "*")}, tokenizer=tok,
                     progress=False)  # fmt: skip
    assert (corpus / "u" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (corpus / "u").iterdir()) == [
        "notes.txt", "train.bin", "train.idx", "val.bin", "val.idx"]  # fmt: skip
