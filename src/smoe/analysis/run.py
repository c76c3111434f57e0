"""``run_analysis``: record a model's routing over named domains, then write routing.json,
the plots and report.html. This is the Python API behind ``smoe analyze`` (and ``smoe demo``).

Legend: N tokens, L analysed layers, K experts chosen per token, E experts.
"""

from __future__ import annotations

import json
import math
import numbers
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from smoe.analysis.record import RecordWriter, load_records, moe_layer_indices, route_documents, windows
from smoe.analysis.stats import (
    DomainStats,
    TokenExpertCounts,
    chance_any,
    chance_first,
    merge,
    router_entropy,
)

Document = str | list[int] | np.ndarray


def detail_layers(layers: list[int]) -> list[int]:
    """First, middle and last of the analysed layers (fewer if there are fewer layers)."""
    return sorted({layers[0], layers[len(layers) // 2], layers[-1]})


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _token_ids(doc: Document, tokenizer: Any, domain: str) -> np.ndarray:
    if isinstance(doc, str):
        if not doc:
            return np.zeros(0, np.int64)  # not [BOS]: an empty text is an empty document
        if tokenizer is None:
            raise ValueError(f"domain {domain!r}: documents are texts but no tokenizer was given")
        return np.asarray(tokenizer.encode(doc, bos=True, eos=False), dtype=np.int64)
    return np.asarray(doc, dtype=np.int64)


def _capped(
    docs: Iterable[Document], tokenizer: Any, domain: str, cap: int | None, info: dict, vocab_size: int
) -> Iterator[np.ndarray]:
    """Token arrays for a domain; once ``cap`` tokens are reached the document there is cut, the
    rest skipped, and ``info["capped"]`` set (only if something was actually left out). Empty
    documents (a text of no characters, which would be BOS alone, or no token ids) are skipped
    and counted in ``info["empty_skipped"]``."""
    used = 0
    for i, doc in enumerate(docs):
        toks = _token_ids(doc, tokenizer, domain)
        if len(toks) == 0:
            info["empty_skipped"] += 1
            continue
        if toks.min() < 0 or toks.max() >= vocab_size:
            raise ValueError(
                f"domain {domain!r}, document {i}: token ids span [{toks.min()}, {toks.max()}] but the model's "
                f"vocabulary has {vocab_size} entries (wrong tokenizer or corpus for this model?)"
            )
        if cap is not None and used + len(toks) > cap:
            info["capped"] = True
            toks = toks[: cap - used]
            if len(toks):
                yield toks
            return
        used += len(toks)
        yield toks


def run_analysis(
    model: torch.nn.Module,
    tokenizer: Any,
    domains: Mapping[str, Iterable[Document]],
    out_dir: str | Path,
    layers: list[int] | None = None,
    max_tokens: int | None = None,
    seq_len: int | None = None,
    overlap: int = 0,
    batch_size: int = 8,
    record_probs: bool = False,
    keep_records: bool = True,
    model_name: str = "model",
    corpus_name: str = "corpus",
    view_layers: list[int] | None = None,
    view_docs: int = 2,
    view_tokens: int = 160,
    top_n: int = 12,
    min_count: int = 5,
    progress: bool = True,
    expected_tokens: int | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Record the routing of ``model`` over ``domains`` and write the report to ``out_dir``.

    domains: name -> documents; each document is a text (encoded with BOS) or a sequence of
        token ids (used as given). Any iterable works (e.g. ``Corpus.documents(d, "val")``), and
        documents are consumed lazily, so memory stays bounded. Empty documents ("" or no ids)
        are skipped and counted (``empty_documents_skipped`` in routing.json); a domain left with
        no token at all is an error.
    layers: indices into ``model.layers`` (default: every MoE layer).
    max_tokens: cap on the total number of tokens, split evenly over the domains (at least one
        token each); the last document reached is cut there and routing.json / the report say so.
    seq_len, overlap: window length (default: model.config.max_seq_len) and context overlap for
        long documents; see ``smoe.analysis.record``.
    batch_size: windows per forward pass (a positive integer).
    keep_records: keep the per-token records in ``out_dir/records/<domain>/`` (else deleted).
    view_layers: layers shown side by side in the token view (default: first, middle, last).
    min_count: a token needs this many occurrences to enter the top-tokens tables.
    expected_tokens: total for the progress bar, when the caller knows it (else max_tokens).
    plots: draw the PNGs (a few seconds of matplotlib); without them the report has numbers only.

    Writes ``routing.json`` (schema in docs/routing.md; an undefined rate, such as the repeat rate
    of a domain without a consecutive pair, is null), ``*.png`` and ``report.html``; returns
    the routing.json content plus ``"paths"``. The routing recorded is the router's top-k choice
    per token, dropless: a capacity factor of the model is switched off for each forward pass and
    restored afterwards (``record.dropless``), so batching and padding cannot change it.
    """
    cfg = model.config
    E, K = cfg.num_experts, cfg.top_k
    if not cfg.is_moe:
        raise ValueError(f"{model_name}: a dense model (num_experts == 1) has no routing to analyse")
    moe = moe_layer_indices(model)
    layers = list(moe if layers is None else layers)
    bad = [i for i in layers if i not in moe]
    if not layers or bad:
        raise ValueError(f"layers {layers} must be a non-empty subset of the MoE layers {moe}")
    if not domains:
        raise ValueError("no domains to analyse")
    for name in domains:  # each domain's records go to out_dir/records/<name>/
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
            raise ValueError(
                f"domain name {name!r} must be usable as one folder name (no '/', not '.' or '..')"
            )
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    _positive("seq_len", seq_len)
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model context {cfg.max_seq_len}")
    windows(0, seq_len, overlap)  # checks 0 <= overlap < seq_len now, not at the first document
    _positive("batch_size", batch_size)
    if max_tokens is not None:
        _positive("max_tokens", max_tokens)
        if max_tokens < len(domains):
            raise ValueError(
                f"max_tokens {max_tokens} is less than one token for each of the {len(domains)} domains"
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cap = None if max_tokens is None else max_tokens // len(domains)
    details = detail_layers(layers)
    view_layers = details if view_layers is None else list(view_layers)
    if not view_layers or any(v not in layers for v in view_layers):
        raise ValueError(f"view_layers {view_layers} must be among the analysed layers {layers}")
    vocab = TokenExpertCounts(details, cfg.vocab_size, E)
    detail_pos = [layers.index(i) for i in details]

    was_training = model.training
    model.eval()
    stats: dict[str, DomainStats] = {}
    info: dict[str, dict] = {}
    t0 = time.perf_counter()
    bar = tqdm(total=expected_tokens or max_tokens, unit="tok", desc="routing", disable=not progress)
    try:
        for name, docs in domains.items():
            bar.set_postfix_str(name)
            info[name] = {"capped": False, "empty_skipped": 0}
            s = stats[name] = DomainStats(len(layers), E, K)
            writer = RecordWriter(out / "records" / name, layers, K, E, probs=record_probs)
            chunks = route_documents(
                model,
                _capped(docs, tokenizer, name, cap, info[name], cfg.vocab_size),
                layers,
                seq_len,
                batch_size,
                overlap,
            )
            for ch in chunks:
                N, L, E_ = ch.logits_NLE.shape
                entropy_NL = router_entropy(ch.logits_NLE.reshape(N * L, E_)).reshape(N, L)
                s.update(ch.doc_ids_N, ch.expert_ids_NLK, entropy_NL)
                vocab.update(ch.token_ids_N, ch.expert_ids_NLK[:, detail_pos, 0])
                writer.append(ch)
                bar.update(N)
            writer.close()
            if s.tokens == 0:  # every share, rate and plot of it would be 0/0
                raise ValueError(
                    f"domain {name!r}: no tokens to analyse ({info[name]['empty_skipped']} empty documents "
                    "skipped); give it a non-empty document or leave it out"
                )
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - t0

    summary = _summary(stats, info, layers, E, K, cap, max_tokens, seq_len, overlap, model_name, corpus_name)
    summary["routing"]["model_capacity_factor"] = cfg.capacity_factor
    summary["seconds"] = round(seconds, 3)
    (out / "routing.json").write_text(json.dumps(summary, indent=1, allow_nan=False))

    from smoe.analysis.plots import write_plots
    from smoe.analysis.report import token_view_docs, write_report

    pngs = write_plots(stats, layers, details, E, K, out) if plots else {}
    views = token_view_docs(out / "records", list(stats), layers, view_layers, view_docs, view_tokens)
    report = write_report(
        out / "report.html",
        summary,
        stats,
        layers,
        details,
        view_layers,
        pngs,
        views,
        vocab,
        tokenizer,
        top_n,
        min_count,
    )
    if not keep_records:
        shutil.rmtree(out / "records")
    summary["paths"] = {
        "report": str(report),
        "routing_json": str(out / "routing.json"),
        "plots": [str(p) for p in pngs.values()],
        "records": str(out / "records") if keep_records else None,
    }
    return summary


def _summary(stats, info, layers, E, K, cap, max_tokens, seq_len, overlap, model_name, corpus_name) -> dict:
    key = lambda a: {str(layer): _json_safe(v) for layer, v in zip(layers, a.tolist())}  # noqa: E731
    out: dict[str, Any] = {
        "model": model_name,
        "corpus": corpus_name,
        "num_experts": E,
        "top_k": K,
        "layers": layers,
        "chance": {"first": chance_first(E, K), "any": chance_any(E, K)},
        "routing": {"choice": "top_k", "dropless": True, "model_capacity_factor": None},
        "max_tokens": max_tokens,
        "max_tokens_per_domain": cap,
        "seq_len": seq_len,
        "overlap": overlap,
        "domains": {},
    }
    for name, s in stats.items():
        out["domains"][name] = {
            "tokens": s.tokens,
            "documents": s.documents,
            "pairs": s.pairs,
            "capped": info[name]["capped"],
            "empty_documents_skipped": info[name]["empty_skipped"],
            "expert_share": key(s.expert_share()),
            "first_choice_share": key(s.first_choice_share()),
            "repeat_first": key(s.repeat_first()),
            "repeat_any": key(s.repeat_any()),
            "repeat_first_independent": key(s.repeat_first_independent()),
            "tokens_per_expert": key(s.share_LE),
            "imbalance": key(s.imbalance()),
            "router_entropy": key(s.mean_entropy()),
            "coselection": key(s.cosel_LEE),
        }
    if stats:
        all_ = merge(list(stats.values()))
        out["all"] = {
            "tokens": all_.tokens,
            "tokens_per_expert": key(all_.share_LE),
            "imbalance": key(all_.imbalance()),
            "router_entropy": key(all_.mean_entropy()),
            "coselection": key(all_.cosel_LEE),
        }
    return out


def _json_safe(v: Any) -> Any:
    """NaN (an undefined rate, e.g. the repeat rate of a domain without a consecutive pair) as None:
    NaN and Infinity are not JSON, and JSON.parse, jq and strict parsers reject a file holding them."""
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v


def load_domain_records(out_dir: str | Path, domain: str) -> dict:
    """The per-token records ``run_analysis`` kept for ``domain`` (memory-mapped)."""
    return load_records(Path(out_dir) / "records" / domain)
