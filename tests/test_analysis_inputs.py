"""What `run_analysis` and `smoe analyze` accept: option ranges, empty documents, input files."""

from __future__ import annotations

import json
import os

import pytest

import smoe
from smoe.analysis import run_analysis
from smoe.cli.analyze_cmds import summary_table, text_files
from smoe.cli.main import main


def small_model() -> smoe.Transformer:
    cfg = smoe.ModelConfig(
        dim=16, n_layers=2, head_dim=8, hidden_dim=16, n_heads=2, n_kv_heads=1, vocab_size=32000,
        max_seq_len=32, num_experts=4, top_k=2,
    )  # fmt: skip
    return smoe.build_model(cfg, seed=0)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"max_tokens": -5}, "max_tokens must be a positive integer"),
        ({"max_tokens": 1}, "less than one token for each of the 2 domains"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"seq_len": 0}, "seq_len must be a positive integer"),
        ({"seq_len": 8, "overlap": 8}, "overlap"),
    ],
)
def test_run_analysis_refuses_bad_sizes_before_running(tmp_path, kw, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        run_analysis(small_model(), None, {"a": [[5, 6]], "b": [[7]]}, out, progress=False, plots=False, **kw)
    assert not out.exists()


@pytest.mark.parametrize("flag,value", [("--max-tokens", "0"), ("--max-tokens", "-3"), ("--batch-size", "0")])
def test_cli_refuses_non_positive_sizes(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--model", "m", "--data", "x=y.txt", "--out", "o", flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: must be a positive integer, got {value}" in capsys.readouterr().err


def test_empty_documents_are_skipped_and_counted(tmp_path):
    tok = smoe.load_tokenizer()
    domains = {"text": ["", "hello world", "", "bye"], "ids": [[], [5, 6, 7]]}
    s = run_analysis(small_model(), tok, domains, tmp_path, progress=False, plots=False)
    t, i = s["domains"]["text"], s["domains"]["ids"]
    assert (t["documents"], t["empty_documents_skipped"]) == (2, 2)
    assert t["tokens"] == len(tok.encode("hello world")) + len(tok.encode("bye"))
    assert (i["documents"], i["empty_documents_skipped"], i["tokens"]) == (1, 1, 3)
    assert "empty documents skipped: text 2, ids 1" in summary_table(s, [0, 1])
    assert "empty documents skipped" in (tmp_path / "report.html").read_text()


def test_text_files_reads_only_regular_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    os.mkfifo(tmp_path / "pipe.txt")  # reading it would block forever
    assert text_files(str(tmp_path)) == [tmp_path / "a.txt"]
    assert text_files(f"{tmp_path}/*.txt") == [tmp_path / "a.txt"]
    with pytest.raises(ValueError, match="not a regular file"):
        text_files(str(tmp_path / "pipe.txt"))


def test_cli_names_a_non_utf8_file_before_loading_the_model(tmp_path, capsys):
    moe = tmp_path / "moe"  # a config and no weights: loading the model would fail
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps(smoe.ModelConfig.preset("tiny").to_hf()))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("fine")
    (tmp_path / "t" / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    rc = main(["analyze", "--model", str(moe), "--data", f"x={tmp_path / 't'}", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{tmp_path / 't' / 'latin.txt'}: not UTF-8 text" in err
