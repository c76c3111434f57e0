"""The report opens offline: the HTML parses, every image is an embedded, decodable, non-empty PNG,
and it states the model, the corpus and the token counts; routing.json follows docs/routing.md."""

from __future__ import annotations

import base64
import json
from collections import Counter
from html import escape as html_escape
from html.parser import HTMLParser

import numpy as np
import pytest

import smoe
from smoe.analysis import run_analysis
from smoe.analysis.report import piece_text
from test_analysis_known import routed_model


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tags, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    tok = smoe.load_tokenizer()
    domains = {
        "code": ["def add(a, b):\n    return a + b\n" * 6, "for i in range(10):\n    print(i)\n" * 4],
        "prose": ["The river ran quietly past the old mill. " * 8],
    }
    summary = run_analysis(
        routed_model(), tok, domains, out, model_name="hand-routed-4e", corpus_name="toy-corpus", min_count=2,
        progress=False,
    )  # fmt: skip
    return out, summary, tok, domains


def test_report_html_parses_and_embeds_pngs(report):
    out, summary, _, _ = report
    html = (out / "report.html").read_text(encoding="utf-8")
    p = _Collect()
    p.feed(html)
    p.close()
    assert p.tags[0] == "html" and "table" in p.tags
    assert len(p.imgs) == 7
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,"), src[:40]  # nothing to fetch: opens offline
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert "http://" not in html and "https://" not in html
    text = " ".join("".join(p.text).split())
    total = sum(d["tokens"] for d in summary["domains"].values())
    assert "hand-routed-4e" in text and "toy-corpus" in text
    assert f"Tokens analysed: {total}" in text
    for name, d in summary["domains"].items():
        assert f"{name} {d['documents']} {d['tokens']}" in " ".join(" ".join(p.text).split())  # counts table
    for path in summary["paths"]["plots"]:  # the PNGs are also kept next to the report
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_token_view_shows_the_documents_text_coloured_by_expert(report):
    out, summary, tok, domains = report
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count('class="tv"') == 3 * 3  # 3 documents x (first, middle, last layer)
    # Token 'def' of the first code document is token 2 after BOS; at layer 0 its expert is t % 4.
    ids = tok.encode(domains["code"][0])
    piece = tok.id_to_piece(ids[1]).replace("▁", " ")
    assert f'title="token {ids[1]}, expert {ids[1] % 4}">{piece}</span>' in html
    assert "expert 3</span>" in html  # the legend


def test_routing_json_schema(report):
    out, summary, _, _ = report
    j = json.loads((out / "routing.json").read_text())
    assert j["num_experts"] == 4 and j["top_k"] == 2 and j["layers"] == [0, 1, 2]
    assert j["chance"] == {"first": 0.25, "any": pytest.approx(5 / 6)}
    for d in j["domains"].values():
        assert d["tokens"] > 0
        for layer in map(str, j["layers"]):
            assert len(d["expert_share"][layer]) == 4 and sum(d["expert_share"][layer]) == pytest.approx(1)
            assert sum(d["first_choice_share"][layer]) == pytest.approx(1)
            assert 0 <= d["repeat_first"][layer] <= d["repeat_any"][layer] <= 1
            assert sum(d["tokens_per_expert"][layer]) == 2 * d["tokens"]
            assert np.array(d["coselection"][layer]).shape == (4, 4)


def test_top_tokens_are_normalised_by_frequency(report):
    out, _, tok, domains = report
    html = (out / "report.html").read_text(encoding="utf-8")
    # Layer 0 sends every token t to expert t % 4 first, so every listed token has P = 100%.
    section = html.split("<h2>Top tokens per expert</h2>")[1].split("<h4>layer 1</h4>")[0]
    assert section.count("&nbsp;100%") > 5 and "&nbsp;50%" not in section
    counts = Counter(t for docs in domains.values() for doc in docs for t in tok.encode(doc))
    top, n = counts.most_common(1)[0]  # ranked first of the 100% tokens of its expert
    shown = html_escape(repr(piece_text(tok, top))[1:-1])
    expert_row = section.split(f"expert {top % 4}</td>")[1].split("</tr>")[0]
    assert expert_row.startswith(f'<td class="l"><code>{shown}</code>&nbsp;100%&nbsp;({n}/{n})')
