"""``format_summary``: the table ``smoe data build`` prints from a corpus manifest.

Counts per domain reconcile: ``docs in = kept + skipped + at cap``, where a source document is
one file or one .jsonl line. A kept document longer than ``max_doc_chars`` is stored as several
pieces, so the train/val columns count pieces (the documents of the shards), not source documents.
"""

from __future__ import annotations

from typing import Any


def format_summary(manifest: dict[str, Any]) -> str:
    """A table of documents, tokens, skips and entropy per domain, then each domain's source."""
    head = ["domain", "docs in", "kept", "skipped", "at cap", "train pieces", "train tokens",
            "val pieces", "val tokens", "H1 nats", "capped"]  # fmt: skip
    rows = []
    for name, d in manifest["domains"].items():
        skipped = ", ".join(f"{k} {v}" for k, v in d["skipped"].items()) or "-"
        h = d["unigram_entropy_nats"]
        counts = [d.get(k, "?") for k in ("documents_in", "documents_kept")]  # "?": a manifest from before
        rows.append([name, *counts, skipped, d.get("documents_dropped_at_cap", "?"),
                     d["train"]["documents"], d["train"]["tokens"], d["val"]["documents"], d["val"]["tokens"],
                     "-" if h is None else f"{h:.3f}", "yes" if d["capped"] else "no"])  # fmt: skip
    o = manifest["overall"]
    h = o["unigram_entropy_nats"]
    total = [
        sum(d.get(k, 0) for d in manifest["domains"].values()) for k in ("documents_in", "documents_kept")
    ]
    rows.append(["TOTAL", *total, "", "", o["train"]["documents"], o["train"]["tokens"], o["val"]["documents"],
                 o["val"]["tokens"], "-" if h is None else f"{h:.3f}", ""])  # fmt: skip
    cells = [head] + [[f"{c:,}" if isinstance(c, int) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.append("")
    lines += [f"{name}: {d['source']}" for name, d in manifest["domains"].items()]
    lines += [f"not built: {n}" for n in manifest["absent_sources"]]
    lines.append("docs in = kept + skipped + at cap (source documents: a file, or a .jsonl line).")
    lines.append("H1 = unigram entropy of the train tokens (nats; compare with validation loss).")
    return "\n".join(lines)
