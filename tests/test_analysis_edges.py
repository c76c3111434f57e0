"""Edge cases of `run_analysis` and `smoe analyze`: domains with no consecutive pair or no token
at all, top-1 routing, and HTML-like token text in the report."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

import smoe
from smoe.analysis import run_analysis
from smoe.cli.analyze_cmds import read_texts, summary_table
from smoe.cli.main import main
from smoe.data.shards import FORMAT, write_split
from test_analysis_known import routed_model


def _strict_json(text: str):
    """json.loads that refuses NaN / Infinity, which are not JSON (RFC 8259) and break JSON.parse, jq."""

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_routing_json_is_strict_json_when_a_domain_has_no_pair(tmp_path):
    # Single-token documents: no consecutive pair, so the repeat rates are undefined (null).
    s = run_analysis(
        routed_model(), None, {"single": [[100], [101]], "ok": [[100, 101, 105]]}, tmp_path,
        progress=False, plots=False,
    )  # fmt: skip
    j = _strict_json((tmp_path / "routing.json").read_text())
    single = j["domains"]["single"]
    assert single["pairs"] == 0
    assert single["repeat_first"] == {"0": None, "1": None, "2": None}
    assert single["repeat_any"] == {"0": None, "1": None, "2": None}
    assert j["domains"]["ok"]["repeat_first"]["0"] == pytest.approx(1 / 2)  # 0 1 1: one repeat of two
    assert s["domains"]["single"]["repeat_first"]["0"] is None  # the returned summary is the same
    table = summary_table(s, [0, 2])
    assert "n/a" in table.splitlines()[2] and "nan" not in table


def test_a_domain_without_tokens_is_an_error(tmp_path):
    with pytest.raises(
        ValueError, match=r"domain 'empty': no tokens to analyse \(2 empty documents skipped\)"
    ):
        run_analysis(
            routed_model(), None, {"ok": [[100, 101]], "empty": [[], []]}, tmp_path, progress=False,
            plots=False,
        )  # fmt: skip


def test_cli_refuses_a_domain_of_empty_files_before_loading_the_model(tmp_path, capsys):
    moe = tmp_path / "moe"  # a config and no weights: loading the model would fail
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps(smoe.ModelConfig.preset("tiny").to_hf()))
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    rc = main(["analyze", "--model", str(moe), "--data", f"x={tmp_path}/*.txt", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "all 2 file(s) are empty" in err and "x=" in err


def test_top1_model_repeat_any_equals_first_and_chance_is_1_over_e(tmp_path):
    cfg = smoe.ModelConfig(
        dim=16, n_layers=2, head_dim=8, hidden_dim=16, n_heads=2, n_kv_heads=1, vocab_size=32000,
        max_seq_len=32, num_experts=4, top_k=1,
    )  # fmt: skip
    s = run_analysis(smoe.build_model(cfg, seed=0), None, {"x": [[5, 6, 7, 8, 9]]}, tmp_path, progress=False)
    assert s["chance"] == {"first": 0.25, "any": 0.25}
    d = s["domains"]["x"]
    assert d["repeat_any"] == d["repeat_first"]
    assert all(sum(v) == pytest.approx(1) for v in d["expert_share"].values())
    assert (tmp_path / "report.html").is_file()


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def test_html_like_tokens_and_domain_names_are_escaped(tmp_path):
    tok = smoe.load_tokenizer()
    text = "<script>alert('x & y')</script> a < b && c > d"
    run_analysis(routed_model(), tok, {"<u>dom&": [text] * 3}, tmp_path, progress=False, plots=False)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    p = _Tags()
    p.feed(page)
    assert "script" not in p.tags and "u" not in p.tags
    assert "&lt;u&gt;dom&amp;" in page


def test_cli_refuses_a_corpus_domain_with_an_empty_split_before_loading_the_model(tmp_path, capsys):
    # `smoe data build` leaves val empty for a one-document domain; its analysis would be all 0/0.
    corpus = tmp_path / "corpus"
    manifest = {"format": FORMAT, "vocab_size": 32000, "domains": {}}
    for name, val in (("web", [[1, 300, 301, 2]]), ("tiny", [])):
        manifest["domains"][name] = {
            "train": write_split(corpus / name, "train", [[1, 400, 401, 2]]),
            "val": write_split(corpus / name, "val", val),
        }
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    moe = tmp_path / "moe"  # a config and no weights: loading the model would fail
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps(smoe.ModelConfig.preset("tiny").to_hf()))
    rc = main(["analyze", "--model", str(moe), "--data", str(corpus), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "domain 'tiny' has no tokens in the val split" in err and "--split train" in err


@pytest.mark.parametrize("name", ["_misc", r"cost $\frac$"])
def test_every_domain_name_reaches_the_plot_legends(tmp_path, monkeypatch, name):
    # matplotlib leaves labels starting with "_" out of legends and parses "$...$" as mathtext.
    from smoe.analysis import plots

    save, legends = plots._save, []

    def capture(fig, path):
        legends.extend(
            t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()
        )
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    run_analysis(routed_model(), None, {name: [[100, 101]], "b": [[5, 6]]}, tmp_path, progress=False)
    shown = [t.lstrip().replace("\\$", "$") for t in legends]  # as drawn: " _misc", "cost \\$..."
    assert shown.count("b") == 6 and shown.count(name) == 6  # 4 share plots, repeat rates, health


def test_text_files_are_read_byte_for_byte_like_smoe_data_build(tmp_path):
    # Path.read_text turned "\r\n" into "\n" (dropping every "\r" of a Windows file); the corpus
    # builder decodes the bytes as they are, dropping only a UTF-8 byte order mark.
    f = tmp_path / "a.txt"
    f.write_bytes("\ufeffline one\r\nline two\rend\r\n".encode())
    assert list(read_texts([f])) == ["line one\r\nline two\rend\r\n"]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_domain_names_that_are_not_one_folder_name_are_refused(tmp_path, name):
    # records/<domain>/ is a folder: ".." wrote the records into the report folder itself, where
    # --no-records did not delete them, and "" put them in records/ next to the other domains'.
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="domain name"):
        run_analysis(routed_model(), None, {name: [[100, 101]]}, out, progress=False, plots=False)
    assert not out.exists()
