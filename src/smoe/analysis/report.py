"""The self-contained ``report.html``: numbers, embedded PNGs (base64 data URIs), the token view
(paper Figure 8) and the top tokens per expert. It opens offline; nothing is fetched.

Legend: N tokens, L analysed layers, K experts chosen per token, E experts.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import matplotlib.colors as mcolors
import numpy as np

from smoe.analysis.record import load_records
from smoe.analysis.stats import DomainStats, TokenExpertCounts, merge

CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%}
.tv{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12px;line-height:1.7;vertical-align:top;
text-align:left;max-width:380px}.tv span{border-radius:2px}.note{color:#555;font-size:90%}
.legend span{display:inline-block;padding:0 6px;margin-right:4px;border-radius:2px}
"""


def expert_colors(E: int) -> list[str]:
    """One hex colour per expert: tab10 up to 10 experts, tab20 up to 20, then a sampled rainbow."""
    import matplotlib

    if E <= 20:
        cm = matplotlib.colormaps["tab10" if E <= 10 else "tab20"]
        return [mcolors.to_hex(cm(i)) for i in range(E)]
    cm = matplotlib.colormaps["hsv"]
    return [mcolors.to_hex(cm(i / E)) for i in range(E)]


def piece_text(tokenizer: Any, token_id: int) -> str:
    """A vocabulary piece as text: SentencePiece's '▁' is a space, byte piece <0x0A> a newline."""
    if tokenizer is None:
        return f"<{token_id}>"
    p = tokenizer.id_to_piece(int(token_id))
    if p == "<0x0A>":
        return "\n"
    return p.replace("▁", " ")


def token_view_docs(
    records_dir: Path, domains: list[str], layers: list[int], show: list[int], n_docs: int, n_tokens: int
) -> dict[str, list[dict]]:
    """The first ``n_tokens`` tokens of the first ``n_docs`` documents of each domain, with their
    first-choice experts at layers ``show``: {domain: [{"doc", "tokens", "first": {layer: ids}}]}."""
    out: dict[str, list[dict]] = {}
    for name in domains:
        rec = load_records(records_dir / name)
        doc_ids = np.asarray(rec["doc_ids"])
        starts = np.concatenate([[0], np.flatnonzero(np.diff(doc_ids)) + 1])[:n_docs] if len(doc_ids) else []
        docs = []
        for s in starts:
            e = s + int(np.searchsorted(doc_ids[s : s + n_tokens], doc_ids[s], side="right"))
            first = {layer: np.asarray(rec["expert_ids"][s:e, layers.index(layer), 0]) for layer in show}
            docs.append({"doc": int(doc_ids[s]), "tokens": np.asarray(rec["token_ids"][s:e]), "first": first})
        out[name] = docs
    return out


def _img(path: Path | None, alt: str) -> str:
    if path is None:  # plots were turned off
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list[Any]], left: int = 1) -> str:
    th = "".join(
        f'<th class="{"l" if i < left else ""}">{html.escape(str(h))}</th>' for i, h in enumerate(header)
    )
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{th}</tr>{body}</table>"


def _token_view(views: dict[str, list[dict]], show: list[int], E: int, tokenizer: Any) -> str:
    colors = expert_colors(E)
    legend = "".join(f'<span style="background:{c}80">expert {e}</span>' for e, c in enumerate(colors))
    parts = [f'<p class="legend">{legend}</p>']
    for name, docs in views.items():
        for d in docs:
            cells = []
            for layer in show:
                spans = "".join(
                    f'<span style="background:{colors[int(e)]}80" title="token {int(t)}, expert {int(e)}">'
                    f"{html.escape(piece_text(tokenizer, t))}</span>"
                    for t, e in zip(d["tokens"], d["first"][layer])
                )
                cells.append(f'<td class="tv">{spans}</td>')
            head = "".join(f"<th>layer {layer}</th>" for layer in show)
            title = f"{html.escape(name)}, document {d['doc']} (first {len(d['tokens'])} tokens)"
            parts.append(f"<h4>{title}</h4><table><tr>{head}</tr><tr>{''.join(cells)}</tr></table>")
    return "".join(parts)


def _top_tokens(vocab: TokenExpertCounts, E: int, tokenizer: Any, top_n: int, min_count: int) -> str:
    parts = []
    for pos, layer in enumerate(vocab.layers):
        rows = []
        for e in range(E):
            items = vocab.top(pos, e, top_n, min_count)
            cell = ", ".join(
                f"<code>{html.escape(repr(piece_text(tokenizer, t))[1:-1])}</code>&nbsp;{100 * p:.0f}%&nbsp;({c}/{n})"
                for t, p, c, n in items
            )
            rows.append([f"expert {e}", cell or "<i>none with enough occurrences</i>"])
        parts.append(
            f"<h4>layer {layer}</h4>"
            + _table(["expert", "tokens: P(expert | token) (routed / seen)"], rows, 2)
        )
    return "".join(parts)


def write_report(
    path: Path,
    summary: dict,
    stats: dict[str, DomainStats],
    layers: list[int],
    details: list[int],
    view_layers: list[int],
    plots: dict[str, Path],
    views: dict[str, list[dict]],
    vocab: TokenExpertCounts,
    tokenizer: Any,
    top_n: int,
    min_count: int,
) -> Path:
    E, K = summary["num_experts"], summary["top_k"]
    ch = summary["chance"]
    esc = html.escape
    doms = summary["domains"]
    total = sum(d["tokens"] for d in doms.values())
    cap = summary["max_tokens"]
    cap_note = (
        "No token cap: every token of every document was analysed."
        if cap is None
        else f"Token cap --max-tokens {cap} ({summary['max_tokens_per_domain']} per domain); "
        + (
            "capped domains (later tokens not analysed): "
            + ", ".join(n for n, d in doms.items() if d["capped"])
            if any(d["capped"] for d in doms.values())
            else "no domain reached it."
        )
    )
    ov = summary["overlap"]
    window_note = (
        f"Documents longer than {summary['seq_len']} tokens were processed in consecutive windows of "
        f"{summary['seq_len']} tokens"
        + (f" with {ov} tokens of earlier context" if ov else " without overlap")
        + "; every token is counted once. Two consecutive tokens of one document form a pair even when a "
        "window edge falls between them (without overlap the second was routed without the first in its "
        "context); pairs never span two documents."
    )
    cf = summary["routing"]["model_capacity_factor"]
    routing_note = "Routing is the router's top-k choice for each token, recorded dropless" + (
        f" (the model's capacity factor {cf} was switched off while recording)." if cf is not None else "."
    )
    h = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Routing report: {esc(summary['model'])}</title>"
    ]
    h.append(f"<style>{CSS}</style></head><body>")
    h.append(f"<h1>Routing report</h1><p>Model: <b>{esc(summary['model'])}</b> ({E} experts, top-{K}, "
             f"layers {esc(str(layers))}). Corpus: <b>{esc(summary['corpus'])}</b>. "
             f"Tokens analysed: <b>{total}</b> in {len(doms)} domain(s).</p>")  # fmt: skip
    h.append(f'<p class="note">{esc(cap_note)} {esc(window_note)} {esc(routing_note)}</p>')
    rows = [
        [
            esc(n),
            d["documents"],
            d["tokens"],
            d["pairs"],
            "yes" if d["capped"] else "no",
            d["empty_documents_skipped"],
        ]
        for n, d in doms.items()
    ]
    header = ["domain", "documents", "tokens", "consecutive pairs", "capped", "empty documents skipped"]
    h.append(_table(header, rows))

    h.append("<h2>Repeat rates (paper Table 5)</h2>")
    h.append("<p>Fraction of consecutive token pairs within a document whose first-choice expert is the same "
             "(<i>first</i>), or whose top-k sets share an expert (<i>any</i>). Pairs never cross documents. "
             f"Chance for E={E}, k={K}: first = 1/E = {_pct(ch['first'])}, any = 1 − C(E−k,k)/C(E,k) = "
             f"{_pct(ch['any'])}.</p>")  # fmt: skip
    header = ["domain"] + [f"layer {x} {w}" for x in details for w in ("first", "any")]
    rows = [
        [esc(n)] + [_pct(d[f"repeat_{w}"][str(x)]) for x in details for w in ("first", "any")]
        for n, d in doms.items()
    ]
    rows.append(["<i>chance</i>"] + [_pct(ch[w]) for _ in details for w in ("first", "any")])
    h.append(_table(header, rows))
    h.append(_img(plots.get("repeat_rates"), "repeat rates per layer"))
    kinds = ("first", "first_independent", "any")
    header = ["layer"] + [f"{n} {w.replace('_', ' ')}" for n in doms for w in kinds]
    rows = [[x] + [_pct(d[f"repeat_{w}"][str(x)]) for d in doms.values() for w in kinds] for x in layers]
    h.append(
        "<details open><summary>all layers</summary>" + _table(header, rows) + '<p class="note"><i>first '
        "independent</i> = Σ<sub>e</sub> (first-choice share of e)²: the first-choice repeat rate if consecutive "
        "tokens drew experts independently from the domain's own (possibly unbalanced) distribution. A repeat "
        "rate above it means consecutive tokens stick together; one at it means only that few experts are used."
        "</p></details>"
    )

    h.append("<h2>Expert share per domain (paper Figure 7)</h2>")
    h.append("<p>Proportion of assignments to each expert, counting every one of the top-k choices (each "
             "token contributes k assignments), then counting first choices only. Dashed line: 1/E.</p>")  # fmt: skip
    for key in (
        "expert_share",
        "first_choice_share",
        "expert_share_all_layers",
        "first_choice_share_all_layers",
    ):
        h.append(_img(plots.get(key), key.replace("_", " ")))

    h.append("<h2>Token view (paper Figure 8)</h2>")
    h.append("<p>Each token coloured by its first-choice expert; hover for the token id.</p>")
    h.append(_token_view(views, view_layers, E, tokenizer))

    h.append("<h2>Load and router health</h2>")
    h.append(_img(plots.get("health"), "load and entropy"))
    all_ = merge(list(stats.values()))
    rows = [
        [x]
        + [int(v) for v in all_.share_LE[i]]
        + [f"{all_.imbalance()[i]:.3f}", f"{all_.mean_entropy()[i]:.3f}"]
        for i, x in enumerate(layers)
    ]
    h.append(_table(["layer"] + [f"e{e}" for e in range(E)] + ["max/mean", "entropy (nats)"], rows))
    h.append(f'<p class="note">Tokens per expert count all top-k assignments over all domains. Entropy of the '
             f"softmax over all E router logits; uniform = log E = {math.log(E):.3f}.</p>")  # fmt: skip
    h.append(_img(plots.get("coselection"), "co-selection matrices"))

    h.append("<h2>Top tokens per expert</h2>")
    h.append(f"<p>Vocabulary items ranked by P(expert | token) = (times the token's first choice was the expert) / "
             f"(times the token occurred), over all domains, among tokens seen at least {min_count} times. "
             "Raw counts would rank the most frequent tokens first for every expert; normalising by frequency shows "
             "what an expert specialises in.</p>")  # fmt: skip
    h.append(_top_tokens(vocab, E, tokenizer, top_n, min_count))
    h.append("</body></html>")
    path.write_text("\n".join(h), encoding="utf-8")
    return path
