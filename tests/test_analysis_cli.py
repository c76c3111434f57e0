"""``smoe analyze`` end to end on a tiny saved checkpoint (32000-token vocabulary)."""

from __future__ import annotations

import json

import pytest

import smoe
from smoe.cli.analyze_cmds import parse_data
from smoe.cli.main import main
from smoe.data.shards import FORMAT, write_split


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    smoe.save_model(smoe.build_model(smoe.ModelConfig.preset("tiny"), seed=1), d)
    return d


@pytest.fixture
def texts(tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "prose").mkdir()
    for i in range(3):
        (tmp_path / "code" / f"f{i}.py.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * (5 + i))
        (tmp_path / "prose" / f"p{i}.txt").write_text(
            "The cat sat on the mat and watched the birds. " * (4 + i)
        )
    return tmp_path


@pytest.mark.slow
def test_cli_end_to_end_with_text_files(checkpoint, texts, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["analyze", "--model", str(checkpoint), "--data", f"code={texts}/code/*.txt",
               "--data", f"prose={texts / 'prose'}", "--out", str(out), "--seq-len", "32"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    j = json.loads((out / "routing.json").read_text())
    assert set(j["domains"]) == {"code", "prose"} and j["layers"] == [0, 1, 2, 3]
    tok = smoe.load_tokenizer()
    want = sum(len(tok.encode(f.read_text())) for f in sorted((texts / "code").glob("*.txt")))
    assert j["domains"]["code"]["tokens"] == want and j["domains"]["code"]["documents"] == 3  # nothing cut
    assert (out / "report.html").is_file() and str(out / "report.html") in printed
    # The Table 5 analogue: first / middle / last layers, with the chance row.
    assert "L0 first" in printed and "L2 any" in printed and "L3 any" in printed
    assert "12.5%" in printed and "46.4%" in printed
    code_row = next(line for line in printed.splitlines() if line.startswith("code"))
    assert f"{100 * j['domains']['code']['repeat_first']['0']:5.1f}%" in code_row


@pytest.mark.slow
def test_cli_reads_a_corpus_directory_val_split(checkpoint, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    manifest = {"format": FORMAT, "vocab_size": 32000, "domains": {}}
    for name, base in (("math", 300), ("web", 900)):
        docs = {
            s: [[1, *range(base + 7 * i, base + 7 * i + 20 + i), 2] for i in range(n)]
            for s, n in (("train", 2), ("val", 3))
        }
        manifest["domains"][name] = {s: write_split(corpus / name, s, d) for s, d in docs.items()}
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "r"
    rc = main(["analyze", "--model", str(checkpoint), "--data", str(corpus), "--out", str(out),
               "--layers", "0,3", "--max-tokens", "40", "--seq-len", "16", "--no-records", "--no-plots"])  # fmt: skip
    assert rc == 0
    j = json.loads((out / "routing.json").read_text())
    assert set(j["domains"]) == {"math", "web"} and j["layers"] == [0, 3]
    for d in j["domains"].values():
        assert d["tokens"] == 20 and d["capped"]  # 40 split over two domains; val has 3 x ~23 tokens
    assert "val split" in j["corpus"]
    assert not (out / "records").exists() and not list(out.glob("*.png"))
    assert "capped at 20 tokens per domain: math, web" in capsys.readouterr().out


def test_cli_rejects_dense_checkpoints_and_bad_data(tmp_path, capsys):
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps(smoe.ModelConfig.preset("tiny-dense").to_hf()))
    (tmp_path / "a.txt").write_text("hello")
    rc = main(
        ["analyze", "--model", str(dense), "--data", f"x={tmp_path}/a.txt", "--out", str(tmp_path / "o")]
    )
    assert rc == 2 and "dense checkpoint (num_experts == 1)" in capsys.readouterr().err
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps(smoe.ModelConfig.preset("tiny").to_hf()))
    rc = main(
        ["analyze", "--model", str(moe), "--data", f"x={tmp_path}/*.nothing", "--out", str(tmp_path / "o")]
    )
    assert rc == 2 and "matched no text files" in capsys.readouterr().err
    rc = main(["analyze", "--model", str(moe), "--data", f"{tmp_path}/a.txt", "--out", str(tmp_path / "o")])
    assert rc == 2 and "need a name" in capsys.readouterr().err


def test_parse_data():
    assert parse_data("code=data/*.py") == ("code", "data/*.py")
    assert parse_data("runs/corpus") == (None, "runs/corpus")
    assert parse_data("./a=b/c.txt") == (None, "./a=b/c.txt")
