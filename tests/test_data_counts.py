"""Manifest counts reconcile per source document, and a lone document is never sent to val."""

import json

import pytest

from smoe.data.build import build_corpus, format_summary
from smoe.tokenizer import load_tokenizer

LONG = "\n".join(
    f"line {i} of a long document, cut into pieces at line ends" for i in range(45)
)  # ~2.6k chars


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _build(tmp_path, tok, users, **kw):
    kw = {"max_tokens_per_domain": None, "val_fraction": 0.0, "max_doc_chars": 1000, **kw}
    return build_corpus(tmp_path / "c", domains=[], user_domains=users, tokenizer=tok, progress=False, **kw)


def _reconciles(d: dict) -> bool:
    stored = d["train"]["documents"] + d["val"]["documents"]
    total = d["documents_kept"] + sum(d["skipped"].values()) + d["documents_dropped_at_cap"]
    return d["documents_in"] == total and d["pieces_stored"] == stored


def test_counts_reconcile_with_a_cap_inside_a_jsonl_file(tmp_path, tok):
    src = tmp_path / "in"
    src.mkdir()
    lines = [json.dumps({"text": "first document"}), json.dumps({"text": "first document"}), "{bad json",
             json.dumps({"text": LONG}),  # 3 pieces; the cap of 3 pieces is reached at its second
             json.dumps({"text": "after the cap"}), "{bad after the cap", "", json.dumps({"text": "last"})]  # fmt: skip
    (src / "a.jsonl").write_text("\n".join(lines) + "\n")
    d = _build(tmp_path, tok, {"u": str(src / "*")}, max_docs_per_domain=3)["domains"]["u"]
    assert d["capped"] and _reconciles(d)
    assert d["documents_in"] == 7  # the blank line separates nothing and is no document
    assert d["documents_kept"] == 2 and d["skipped"] == {"duplicate": 1, "invalid_json": 1}
    assert d["documents_dropped_at_cap"] == 3  # good or bad, the rest of the file is not judged
    assert d["pieces_stored"] == 3 and d["pieces_dropped_at_cap"] == 1


def test_counts_reconcile_on_mixed_files_and_domains(tmp_path, tok):
    src = tmp_path / "in"
    src.mkdir()
    for name, text in {
        "a.txt": "alpha",
        "b.txt": "beta",
        "dup.txt": "alpha",
        "empty.txt": "",
        "long.md": LONG,
    }.items():
        (src / name).write_text(text)
    (src / "bin.txt").write_bytes(b"\x00")
    (src / "c.jsonl").write_text(
        json.dumps({"text": "gamma"}) + "\n{no\n" + json.dumps({"text": "beta"}) + "\n"
    )
    m = _build(tmp_path, tok, {"u": str(src / "*"), "v": str(src / "*.jsonl")}, max_tokens_per_domain=10_000)
    u, v = m["domains"]["u"], m["domains"]["v"]
    assert _reconciles(u) and _reconciles(v)
    assert (u["documents_in"], u["documents_kept"], u["pieces_stored"]) == (9, 4, 6)
    assert u["skipped"] == {"binary": 1, "duplicate": 2, "empty": 1, "invalid_json": 1}
    assert (v["documents_in"], v["documents_kept"]) == (3, 0)  # domain u kept all three first
    summary = format_summary(m)
    assert "| docs in | kept |" in summary and "train pieces" in summary
    assert "docs in = kept + skipped + at cap" in summary


@pytest.mark.parametrize(
    ("n_docs", "val_fraction", "want_val"), [(1, 0.6, 0), (1, 0.95, 0), (2, 0.95, 1), (3, 0.6, 2)]
)
def test_train_always_keeps_a_document(tmp_path, tok, n_docs, val_fraction, want_val):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(n_docs):
        (src / f"{i}.txt").write_text(f"document {i}")
    d = _build(tmp_path, tok, {"u": str(src / "*")}, val_fraction=val_fraction)["domains"]["u"]
    assert (d["train"]["documents"], d["val"]["documents"]) == (n_docs - want_val, want_val)
