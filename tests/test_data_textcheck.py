"""Text that is valid JSON and valid UTF-8 on disk but still no document: escaped NULs, lone
surrogates, nesting deeper than the JSON parser's recursion limit. Each is skipped and counted."""

import pytest

from smoe.data.build import _prepare, build_corpus
from smoe.data.shards import Corpus
from smoe.data.sources import Source, _load_prose
from smoe.data.textio import Skip, read_jsonl
from smoe.tokenizer import load_tokenizer

BAD_LINES = [
    '{"text": "hello \\ud800 world"}',  # lone surrogate: cannot be encoded as UTF-8
    "[" * 20000 + "]" * 20000,  # RecursionError inside json.loads
    '{"text": "\\u0000\\u0001 nul doc"}',  # a NUL, escaped
    '{"text": "fine doc"}',
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.mark.parametrize(
    ("line", "reason"),
    zip(BAD_LINES[:3], ["invalid_utf8", "invalid_json", "binary"]),
    ids=["surrogate", "nested", "nul"],
)
def test_jsonl_lines_with_escaped_bad_text_are_skipped(tmp_path, line, reason):
    path = tmp_path / "a.jsonl"
    path.write_text(f"{line}\n{BAD_LINES[3]}\n")
    assert list(read_jsonl(path)) == [Skip(reason, f"{path}:1"), "fine doc"]


def test_build_counts_them_instead_of_crashing(tmp_path, tok):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(BAD_LINES) + "\n")
    m = build_corpus(tmp_path / "c", domains=[], user_domains={"u": str(src / "*")}, tokenizer=tok,
                     progress=False, max_tokens_per_domain=None, val_fraction=0)  # fmt: skip
    assert m["domains"]["u"]["skipped"] == {"binary": 1, "invalid_json": 1, "invalid_utf8": 1}
    docs = [tok.decode(d.tolist()) for d in Corpus(tmp_path / "c").documents("u")]
    assert docs == ["fine doc"]


def test_every_source_gets_the_same_text_check(tmp_path):
    # Not only .jsonl: a docstring's "\ud800" or "\0" escape reaches the builder as text too.
    py = tmp_path / "mod.py"
    py.write_text('"""' + "Words of a module docstring. " * 12 + '\\ud800"""\n')
    texts = {"k1": ["ok text", "a\x00b", "x\ud800y"], "k2": None}
    src = Source(
        "t", "test", "user", lambda: list(texts), lambda k: texts[k] or _load_prose(f"docstrings:{py}")
    )
    events, pieces = _prepare(src, "k1", 1000)
    assert pieces == ["ok text"] and events[1:] == [Skip("binary", "k1"), Skip("invalid_utf8", "k1")]
    events, pieces = _prepare(src, "k2", 1000)
    assert pieces == [] and events == [Skip("invalid_utf8", "k2")]
