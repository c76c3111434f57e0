"""Corpus builder: bad input skipped and counted, dedup, caps, splits, determinism, round trip."""

import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest

from smoe.data.build import build_corpus
from smoe.data.shards import Corpus, CorpusError
from smoe.data.textio import MAX_LINE_CHARS, normalise, split_long
from smoe.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _docs(n: int, prefix: str = "doc") -> list[str]:
    return [
        f"{prefix} {i}: the quick brown fox number {i} jumps over {i * 7 % 13} lazy dogs.\nline two."
        for i in range(n)
    ]


def _write(d: Path, texts: list[str], suffix: str = ".txt") -> None:
    d.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        (d / f"f{i:03d}{suffix}").write_text(t)


def _build(out, tok, users, **kw):
    kw.setdefault("domains", [])
    kw.setdefault("max_tokens_per_domain", None)
    return build_corpus(out, user_domains=users, tokenizer=tok, progress=False, **kw)


def _texts(corpus: Corpus, tok, domain: str, split: str) -> list[str]:
    out = []
    for d in corpus.documents(domain, split):
        assert d[0] == tok.bos_id and d[-1] == tok.eos_id  # BOS + tokens + EOS, as shards.py says
        out.append(tok.decode(d.tolist()))
    return out


def test_bad_inputs_are_skipped_and_counted(tmp_path, tok):
    src = tmp_path / "in"
    good = _docs(3)
    _write(src, good)
    (src / "binary.txt").write_bytes(b"abc\x00\x01\x02def")
    (src / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (src / "empty.txt").write_text("")
    (src / "blank.md").write_text("  \n\t\n")
    (src / "huge_line.txt").write_text("ok\n" + "x" * (MAX_LINE_CHARS + 1) + "\n")
    (src / "broken.txt").symlink_to(src / "does-not-exist.txt")
    (src / "dir.txt").mkdir()
    os.mkfifo(src / "fifo.txt")  # reading it would block forever
    (src / "table.csv").write_text("a,b\n1,2\n")
    lines = [json.dumps({"text": "jsonl document one, fine."}), "{not json", json.dumps({"body": "no text"}),
             json.dumps([1, 2]), "", json.dumps({"text": "y" * (MAX_LINE_CHARS + 5)}),
             json.dumps({"text": "jsonl document two, fine."})]  # fmt: skip
    (src / "lines.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe bad bytes\n")
    m = _build(tmp_path / "c", tok, {"u": str(src / "*")}, val_fraction=0.0)
    d = m["domains"]["u"]
    assert d["skipped"] == {
        "binary": 1,
        "invalid_utf8": 2,  # latin1.txt and the last .jsonl line
        "empty": 2,
        "enormous_line": 2,  # huge_line.txt and the long .jsonl line
        "unreadable": 1,
        "directory": 1,
        "not_regular_file": 1,
        "unsupported_type": 1,
        "invalid_json": 3,
    }
    assert d["train"]["documents"] == 5 and d["val"]["documents"] == 0
    assert d["candidates"] == 13 and d["examined"] == 13 and d["never_read"] == 0
    got = sorted(_texts(Corpus(tmp_path / "c"), tok, "u", "train"))
    assert got == sorted(good + ["jsonl document one, fine.", "jsonl document two, fine."])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_permission_denied_is_skipped(tmp_path, tok):
    src = tmp_path / "in"
    _write(src, _docs(2))
    (src / "secret.txt").write_text("private")
    (src / "secret.txt").chmod(0)
    m = _build(tmp_path / "c", tok, {"u": str(src / "*.txt")})
    assert m["domains"]["u"]["skipped"] == {"unreadable": 1}


def test_exact_dedup_after_normalisation(tmp_path, tok):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, ["same text\nsecond line", "unique to a"])
    (a / "crlf.txt").write_bytes(b"same text  \r\nsecond line\r\n\r\n")  # same after normalising
    _write(b, ["same text\nsecond line", "unique to b"])
    m = _build(tmp_path / "c", tok, {"a": str(a / "*"), "b": str(b / "*")}, val_fraction=0.0)
    assert m["domains"]["a"]["skipped"] == {"duplicate": 1}
    assert m["domains"]["b"]["skipped"] == {"duplicate": 1}  # across domains too, first domain keeps it
    c = Corpus(tmp_path / "c")
    assert sorted(_texts(c, tok, "a", "train")) == ["same text\nsecond line", "unique to a"]
    assert _texts(c, tok, "b", "train") == ["unique to b"]


def test_reader_round_trips_documents(tmp_path, tok):
    texts = _docs(20) + [
        "Unicode: na\u00efve caf\u00e9 \u65e5\u672c\u8a9e \u2014 done",
        "  indented\n\tcode()",
    ]
    _write(tmp_path / "in", texts)
    m = _build(tmp_path / "c", tok, {"u": str(tmp_path / "in" / "*.txt")}, val_fraction=0.25)
    c = Corpus(tmp_path / "c")
    got = _texts(c, tok, "u", "train") + _texts(c, tok, "u", "val")
    assert sorted(got) == sorted(normalise(t) for t in texts)
    assert m["domains"]["u"]["val"]["documents"] == round(22 * 0.25)
    for split in ("train", "val"):  # token counts in the manifest match the shards and an independent encode
        assert c.num_tokens("u", split) == m["domains"]["u"][split]["tokens"]
    assert (
        sum(len(tok.encode(normalise(t), bos=True, eos=True)) for t in texts)
        == m["overall"]["train"]["tokens"] + m["overall"]["val"]["tokens"]
    )


def test_same_seed_is_byte_identical_and_seed_changes_split(tmp_path, tok):
    _write(tmp_path / "in", _docs(40))
    users = {"u": str(tmp_path / "in" / "*.txt")}
    kw = dict(domains=["math"], max_docs_per_domain=30, val_fraction=0.2)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        _build(tmp_path / name, tok, users, seed=seed, **kw)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert {str(f) for f in files} >= {"manifest.json", "u/train.bin", "u/val.idx", "math/train.bin"}
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    val = {s: set(_texts(Corpus(tmp_path / s), tok, "u", "val")) for s in ("a", "c")}
    assert len(val["a"]) == len(val["c"]) == 6 and val["a"] != val["c"]
    math_a = (tmp_path / "a" / "math" / "train.bin").read_bytes()
    assert math_a != (tmp_path / "c" / "math" / "train.bin").read_bytes()  # math is seeded too


def test_token_cap_and_long_documents_stay_in_one_split(tmp_path, tok):
    long_doc = "\n".join(f"line {i} of a long document with several words in it" for i in range(400))
    _write(tmp_path / "in", [long_doc] + _docs(30))
    users = {"u": str(tmp_path / "in" / "*.txt")}
    m = _build(tmp_path / "c", tok, users, max_doc_chars=1000, val_fraction=0.5)
    d = m["domains"]["u"]
    assert d["documents_split_in_pieces"] == 1 and not d["capped"]
    assert all(len(p) <= 1000 for p in split_long(normalise(long_doc), 1000))
    n_pieces = len(split_long(normalise(long_doc), 1000))
    c = Corpus(tmp_path / "c")
    for split in ("train", "val"):
        pieces = [t for t in _texts(c, tok, "u", split) if "of a long document" in t]
        assert len(pieces) in (0, n_pieces)  # all pieces of the long document on one side
    # A token cap stops right after the piece that crosses it.
    m = _build(tmp_path / "c", tok, users, max_tokens_per_domain=300, max_doc_chars=1000, val_fraction=0.0)
    d = m["domains"]["u"]
    lengths = [len(x) for x in Corpus(tmp_path / "c").documents("u")]
    assert d["capped"] and d["train"]["tokens"] >= 300 > d["train"]["tokens"] - lengths[-1]
    assert d["never_read"] > 0


def test_entropy_matches_independent_count(tmp_path, tok):
    _write(tmp_path / "in", _docs(12))
    m = _build(
        tmp_path / "c", tok, {"u": str(tmp_path / "in" / "*.txt")}, domains=["math"], max_docs_per_domain=5
    )
    c = Corpus(tmp_path / "c")
    for name in ("u", "math", None):
        counts = Counter()
        for dom in [name] if name else c.domains:
            counts.update(t for t in c.tokens(dom, "train").tolist() if t != tok.bos_id)
        n = sum(counts.values())
        h = -sum(k / n * math.log(k / n) for k in counts.values())
        entry = m["domains"][name] if name else m["overall"]
        assert entry["unigram_entropy_nats"] == pytest.approx(h, abs=1e-5)
        assert entry["unigram_entropy_bits"] == pytest.approx(h / math.log(2), abs=1e-5)


def test_refuses_foreign_directory_and_replaces_old_corpus(tmp_path, tok):
    _write(tmp_path / "in", _docs(3))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "precious.txt").write_text("keep me")
    with pytest.raises(CorpusError, match="not empty"):
        _build(tmp_path / "c", tok, {"u": str(tmp_path / "in" / "*")})
    assert (tmp_path / "c" / "precious.txt").read_text() == "keep me"
    _build(tmp_path / "d", tok, {"old": str(tmp_path / "in" / "*")})
    _build(tmp_path / "d", tok, {"new": str(tmp_path / "in" / "*")})
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["manifest.json", "new"]
    # An interrupted build (no manifest yet) is cleared by the next one; nothing outside is touched.
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({"domains": {"new": {}, "..": {}}}))
    with pytest.raises(FileNotFoundError):
        _build(tmp_path / "d", tok, {"u": str(tmp_path / "missing" / "*")})  # fails before writing
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / ".smoe-build-incomplete").write_text(json.dumps(["half"]))
    (tmp_path / "e" / "half").mkdir()
    _build(tmp_path / "e", tok, {"u": str(tmp_path / "in" / "*")})
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["manifest.json", "u"]
    _build(tmp_path / "d", tok, {"u": str(tmp_path / "in" / "*")})
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["manifest.json", "u"]
    assert (tmp_path / "in").is_dir() and (tmp_path / "c" / "precious.txt").is_file()


def test_loud_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="matched no files"):
        _build(tmp_path / "c", tok, {"u": str(tmp_path / "nothing" / "*.txt")})
    with pytest.raises(ValueError, match="needs? .*max_tokens|without end"):
        _build(tmp_path / "c", tok, {}, domains=["math"])
    with pytest.raises(ValueError, match="unknown built-in"):
        _build(tmp_path / "c", tok, {}, domains=["poetry"])


def test_batched_encode_equals_per_text_encode(tok):
    from smoe.data.build import _encode_many

    texts = ["def f(x):\n    return x", "Question: What is 2 + 2?\nAnswer: 4", "caf\u00e9 \u65e5\u672c"]
    assert _encode_many(tok, texts) == [tok.encode(t, bos=False) for t in texts]


@pytest.mark.parametrize(
    ("n_docs", "min_val_docs", "want_val"),
    [(100, 16, 16), (40, 16, 8), (40, 0, 2), (400, 16, 20)],  # max(round(5 %), min(min, n // 5))
)
def test_val_split_has_enough_documents(tmp_path, tok, n_docs, min_val_docs, want_val):
    _write(tmp_path / "in", _docs(n_docs))
    m = _build(tmp_path / "c", tok, {"u": str(tmp_path / "in" / "*.txt")}, min_val_docs=min_val_docs)
    assert m["min_val_docs"] == min_val_docs
    assert m["domains"]["u"]["val"]["documents"] == want_val
    assert m["domains"]["u"]["train"]["documents"] == n_docs - want_val
