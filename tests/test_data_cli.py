"""`smoe data build` end to end, and the built-in/system sources on their own."""

import json
import shutil

import pytest

from smoe.cli.main import main
from smoe.data import sources, system_sources
from smoe.data.shards import Corpus
from smoe.data.textio import Skip


def test_cli_builds_user_and_capped_default_domains(tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.md").write_text("# Notes\n\nMixture-of-experts layers route each token to two experts.")
    (notes / "b.jsonl").write_text(
        json.dumps({"text": "A second note."}) + "\n" + json.dumps({"text": "Third."})
    )
    (notes / "c.bin").write_bytes(b"\x00\x01")
    out = tmp_path / "corpus"
    rc = main(["data", "build", "--out", str(out), "--seed", "3", "--domain", f"notes={notes}/*",
               "--builtin", "code,math,prose", "--max-tokens", "2000", "--val-fraction", "0.1", "--no-progress"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| notes" in printed and "unsupported_type 1" in printed and "TOTAL" in printed
    c = Corpus(out)
    assert c.domains == ["code", "math", "notes", "prose"]
    m = c.manifest
    assert m["seed"] == 3 and m["caps"]["max_tokens_per_domain"] == 2000
    for name in ("code", "math", "prose"):
        d = m["domains"][name]
        assert d["capped"] and d["train"]["tokens"] + d["val"]["tokens"] >= 2000
        assert d["val"]["documents"] >= 1 and c.num_tokens(name, "val") == d["val"]["tokens"]
        assert d["unigram_entropy_nats"] > 0 and d["val_unigram_xent_nats"] > 0
    assert m["domains"]["notes"]["train"]["documents"] + m["domains"]["notes"]["val"]["documents"] == 3
    assert "Question: " in _first_doc(c, "math")


def _first_doc(c: Corpus, domain: str) -> str:
    from smoe.tokenizer import load_tokenizer

    return load_tokenizer().decode(next(c.documents(domain)).tolist())


def test_cli_rejects_bad_domain_spec(tmp_path, capsys):
    assert main(["data", "build", "--out", str(tmp_path / "c"), "--domain", "Bad Name=*.txt"]) == 2
    assert "must match" in capsys.readouterr().err
    assert (
        main(["data", "build", "--out", str(tmp_path / "c"), "--domain", "x=" + str(tmp_path / "none*")]) == 2
    )
    assert "matched no files" in capsys.readouterr().err
    assert main(["data", "build", "--out", str(tmp_path / "c"), "--domain", "manifest.json=*.txt"]) == 2
    assert "must match" in capsys.readouterr().err
    assert (
        main(["data", "build", "--out", str(tmp_path / "c"), "--domain", "a=x.md", "b.md"]) == 2
    )  # shell-expanded
    assert "quote the glob" in capsys.readouterr().err


def test_code_candidates_skip_tests_and_site_packages():
    keys = sources.code_source().candidates()
    assert any(k.endswith("/json/decoder.py") for k in keys)
    assert not any(
        ("/test/" in k or "/tests/" in k or "site-packages" in k or "pydoc_data" in k) for k in keys
    )


def test_docstrings_are_read_without_importing(tmp_path):
    f = tmp_path / "mod.py"
    f.write_text('"""Module doc."""\nraise SystemExit("imported!")\nclass A:\n    """Class doc."""\n'
                 '    def f(self):\n        """Method doc."""\n')  # fmt: skip
    assert sources.module_docstrings(f.read_text()) == "Module doc.\n\nClass doc.\n\nMethod doc."


def test_troff_stripping():
    src = '.\\" comment\n.TH LS 1 "2022" "GNU"\n.SH NAME\nls \\- list directory contents\n.SH DESCRIPTION\n.PP\n' \
          "List \\fBinformation\\fR about the FILEs.\n.TP\n\\fB\\-a\\fR, \\fB\\-\\-all\\fR\n.B bold words\n"  # fmt: skip
    assert system_sources.strip_troff(src) == (
        "\nNAME\nls - list directory contents\n\nDESCRIPTION\nList information about the FILEs.\n-a, --all\nbold words\n"
    )


def test_gcide_pages_skip_only_bad_bytes(monkeypatch):
    data = b'00-database-info\n   x\n\nApple \\Ap"ple\\, n. A fruit.\n\nBad \\Bad\\ it\x92s\n\nCat \\Cat\\, n. An animal.'
    pages = system_sources._gcide_pages(data)
    assert pages == [b'Apple \\Ap"ple\\, n. A fruit.\n\nBad \\Bad\\ it\x92s\n\nCat \\Cat\\, n. An animal.']
    monkeypatch.setattr(system_sources, "GCIDE_PAGE_CHARS", 10)
    pages = system_sources._gcide_pages(data)
    assert len(pages) == 3 and pages[1].startswith(b"Bad")


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian bible-kjv not installed")
def test_bible_chapters():
    chapters = system_sources._bible_chapters()
    assert len(chapters) == 1189  # chapters in the KJV
    assert chapters["Ge1"].startswith("1 In the beginning God created the heaven and the earth.")


def test_absent_system_sources_are_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(system_sources, "GCIDE", tmp_path / "nope.dict.dz")
    monkeypatch.setattr(system_sources, "MAN_ROOT", tmp_path / "man")
    monkeypatch.setattr(system_sources.shutil, "which", lambda name: None)
    found, absent = system_sources.system_sources()
    assert found == [] and [a.split(":")[0] for a in absent] == [
        "bible",
        "dictionary",
        "manpages",
        "multilingual",
    ]


def test_man_alias_pages_are_skipped(tmp_path):
    import gzip

    (tmp_path / "alias.1.gz").write_bytes(gzip.compress(b".so man1/real.1\n"))
    (tmp_path / "real.1").write_bytes(b".SH NAME\nreal \\- a page\n")
    assert list(system_sources._load_man(str(tmp_path / "alias.1.gz"))) == [
        Skip("man_alias", str(tmp_path / "alias.1.gz"))
    ]
    assert list(system_sources._load_man(str(tmp_path / "real.1"))) == ["\nNAME\nreal - a page\n"]


def test_default_domains_without_system_text(monkeypatch, tmp_path):
    from smoe.data.build import resolve_sources

    monkeypatch.setattr(system_sources, "GCIDE", tmp_path / "nope.dict.dz")
    monkeypatch.setattr(system_sources, "MAN_ROOT", tmp_path / "man")
    monkeypatch.setattr(system_sources.shutil, "which", lambda name: None)
    found, notes = resolve_sources(None, {}, seed=0)
    assert [s.name for s in found] == ["code", "math", "prose"] and len(notes) == 4
    with pytest.raises(FileNotFoundError, match="bible-kjv"):
        resolve_sources(["code", "bible"], {}, seed=0)
