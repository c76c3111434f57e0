"""``build_corpus``: sources -> dedup -> per-domain cap -> train/val split -> uint16 shards + manifest.

For each domain, in a fixed order (code, math, prose, the system domains, then user domains by
name):

1. list the source's candidate keys and shuffle them with ``Random("smoe-corpus:{seed}:{domain}")``
   (generated sources such as math are seed-dependent already and keep their order);
2. load candidates in that order; normalise each document (``textio.normalise``), skip and count
   bad ones, drop exact duplicates of anything kept earlier in *any* domain, and cut documents
   longer than ``max_doc_chars`` into pieces at line ends; a piece identical to one already kept
   is dropped too (``pieces_duplicate``), as pieces are the shards' documents and a shared piece
   could land in train and val;
3. tokenize in batches and keep pieces until the domain reaches ``max_tokens`` (counting BOS and
   EOS) or ``max_docs`` pieces: the piece that crosses the cap is kept, later ones are not, and
   the manifest records ``capped`` and how many candidates were never read. Per source document
   (a file, or a .jsonl line) it counts ``documents_in == documents_kept + sum(skipped) +
   documents_dropped_at_cap``: the rest of a .jsonl file after the cap is dropped unjudged;
   ``pieces_stored`` counts the pieces the kept documents became (the shards' documents);
4. split *source documents* (all pieces of a document together, so nothing leaks) into train and
   val with ``Random("smoe-corpus:{seed}:{domain}:split")``: ``round(n * val_fraction)`` of them,
   but at least ``min(min_val_docs, n // 5)`` (a val split of 3-5 documents cannot estimate a
   domain's loss: one multilingual val document alone ranged from 5.7 to 8.1 nats/token), and
   at least one when the domain has two or more, and never all of them: a domain with a single
   document puts it in train (val stays empty, its cross-entropy ``None``);
5. write ``DOMAIN/{train,val}.{bin,idx}`` with ``shards.write_split`` (BOS + tokens + EOS each).

Everything is written into a staging folder inside the output directory and swapped in at the end
(``outdir.py``), so a build that fails for any reason leaves the previous corpus as it was.

The manifest holds nothing time- or machine-load-dependent, so a rebuild with the same seed on the
same machine is byte-identical, shards and manifest alike.

Entropy fields are in **nats** (like the training loss): ``unigram_entropy_nats`` of the train
tokens (BOS excluded: it is never a prediction target; EOS included) and ``val_unigram_xent_nats``,
the cross-entropy of the val tokens under the add-one-smoothed train unigram distribution, i.e.
the validation loss of a model that ignores context.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from smoe.data import outdir
from smoe.data.shards import FORMAT, SPLITS, CorpusError, write_split
from smoe.data.sources import Source, code_source, math_source, prose_source, user_source
from smoe.data.summary import format_summary as format_summary  # re-exported: callers import it from here
from smoe.data.system_sources import system_sources
from smoe.data.textio import (
    MAX_LINE_CHARS,
    Skip,
    check_text,
    content_hash,
    longest_line,
    normalise,
    split_long,
)

BUILTIN_DOMAINS = ("code", "math", "prose")
SYSTEM_DOMAINS = ("bible", "dictionary", "manpages", "multilingual")
DEFAULT_MAX_TOKENS = 300_000
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_MIN_VAL_DOCS = 16
DEFAULT_MAX_DOC_CHARS = 32_000
_BATCH_CHARS = 1_000_000  # text encoded per sentencepiece call
MAX_SKIP_EXAMPLES = 3


def resolve_sources(
    domains: Sequence[str] | None, user_domains: dict[str, str], seed: int
) -> tuple[list[Source], list[str]]:
    """Sources to build, in build order, and notes on absent optional ones.

    ``domains=None`` means every built-in domain plus each system domain present on this machine;
    a list names exactly the built-in/system domains wanted (an absent system one is an error).
    """
    want = list(BUILTIN_DOMAINS + SYSTEM_DOMAINS) if domains is None else list(domains)
    unknown = [d for d in want if d not in BUILTIN_DOMAINS + SYSTEM_DOMAINS]
    if unknown:
        raise ValueError(
            f"unknown built-in domains {unknown}; choose from {BUILTIN_DOMAINS + SYSTEM_DOMAINS}"
        )
    for name in user_domains:
        if name in want:
            raise ValueError(f"user domain {name!r} clashes with the built-in domain of that name")
    sources = []
    factories = {"code": code_source, "math": lambda: math_source(seed), "prose": lambda: prose_source(seed)}
    sources += [factories[d]() for d in BUILTIN_DOMAINS if d in want]
    notes: list[str] = []
    if any(d in want for d in SYSTEM_DOMAINS):
        found, absent = system_sources()
        by_name = {s.name: s for s in found}
        for d in SYSTEM_DOMAINS:
            if d not in want:
                continue
            if d in by_name:
                sources.append(by_name[d])
            elif domains is not None:
                raise FileNotFoundError(next((a for a in absent if a.startswith(d + ":")), f"{d}: absent"))
        notes = [a for a in absent if a.split(":")[0] in want]
    sources += [user_source(name, user_domains[name]) for name in sorted(user_domains)]
    return sources, notes


def _encode_many(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # One native call for the whole list: 1.2-1.6x faster than a Python loop on the shared 2-core
    # VM (benchmarks/data_build.py); the ids are identical (tested).
    return tokenizer.encode_batch(texts)


class _Domain:
    """Collects one domain's kept documents (as token lists) and its counts."""

    def __init__(self, source: Source, max_tokens: int | None, max_docs: int | None, bar: tqdm):
        self.source, self.max_tokens, self.max_docs, self.bar = source, max_tokens, max_docs, bar
        self.groups: list[list[list[int]]] = []  # per source document, its pieces' token ids
        self.tokens = self.pieces = self.examined = self.split_docs = self.dropped_at_cap = 0
        self.duplicate_pieces = 0  # pieces of kept documents identical to a piece stored earlier
        # Source documents (a text or a Skip that a candidate yields; a .jsonl line, a file):
        # documents_in == len(groups) + sum(skipped) + docs_dropped_at_cap.
        self.documents_in = self.docs_dropped_at_cap = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.full = False

    def skip(self, s: Skip) -> None:
        self.skipped[s.reason] += 1
        ex = self.examples.setdefault(s.reason, [])
        if len(ex) < MAX_SKIP_EXAMPLES:
            ex.append(s.where)

    def add(self, key: str, events: list, ids: list[list[int]], seen: set[bytes]) -> None:
        """Apply one candidate's loaded events in order; ``ids`` holds its pieces' tokens."""
        self.examined += 1
        it = iter(ids)
        for ev in events:
            self.documents_in += 1
            toks = [] if isinstance(ev, Skip) else [next(it) for _ in ev[1]]
            if self.full:  # the rest of a capped candidate (a .jsonl file's later lines) is not judged
                self.docs_dropped_at_cap += 1
                continue
            if isinstance(ev, Skip):
                self.skip(ev)
                continue
            h, pieces, piece_hashes = ev
            # A piece is a shard document: two documents sharing a max_doc_chars-long stretch
            # (two versions of one file) would otherwise store it twice, once in train and once in
            # val. Drop pieces already stored; a document with nothing new is a duplicate.
            fresh, new = [], set()
            for n, ph in enumerate(piece_hashes):
                if ph not in seen and ph not in new:
                    fresh.append(n)
                    new.add(ph)
            if h in seen or not fresh:
                self.skip(Skip("duplicate", key))
                continue
            seen.add(h)
            self.duplicate_pieces += len(pieces) - len(fresh)
            toks = [toks[n] for n in fresh]
            self.split_docs += len(pieces) > 1
            group: list[list[int]] = []
            self.groups.append(group)
            for n, t in enumerate(toks):
                seen.add(piece_hashes[fresh[n]])
                group.append(t)
                self.pieces += 1
                self.tokens += len(t) + 2
                self.bar.update(len(t) + 2)
                if (self.max_tokens is not None and self.tokens >= self.max_tokens) or (
                    self.max_docs is not None and self.pieces >= self.max_docs
                ):
                    self.full = True
                    self.dropped_at_cap += len(toks) - n - 1
                    break


def _prepare(source: Source, key: str, max_doc_chars: int) -> tuple[list, list[str]]:
    """Load a candidate into events (Skip, or (hash, pieces)) and the list of texts to encode."""
    events, texts = [], []
    for item in source.load(key):
        item = item if isinstance(item, Skip) else check_text(item, key)  # every source, not only .jsonl
        if isinstance(item, Skip):
            events.append(item)
            continue
        text = normalise(item)
        if not text.strip():
            events.append(Skip("empty", key))
        elif longest_line(text) > MAX_LINE_CHARS:
            events.append(Skip("enormous_line", key))
        else:
            pieces = split_long(text, max_doc_chars)
            events.append((content_hash(text), pieces, [content_hash(p) for p in pieces]))
            texts += pieces
    return events, texts


def _collect(
    source: Source,
    seed: int,
    tokenizer: Any,
    seen: set[bytes],
    max_tokens: int | None,
    max_docs: int | None,
    max_doc_chars: int,
    progress: bool,
) -> tuple[_Domain, int | None]:
    keys = source.candidates()
    n_candidates = len(keys) if isinstance(keys, Sequence) else None
    if source.shuffle:
        keys = list(keys)
        random.Random(f"smoe-corpus:{seed}:{source.name}").shuffle(keys)
    bar = tqdm(total=max_tokens, desc=f"{source.name:>12}", unit="tok", unit_scale=True, disable=not progress)
    dom = _Domain(source, max_tokens, max_docs, bar)
    pending: list[tuple[str, list, list[str]]] = []
    pending_chars = pending_pieces = 0

    def flush() -> None:
        ids = _encode_many(tokenizer, [t for _, _, texts in pending for t in texts])
        start = 0
        for key, events, texts in pending:
            dom.add(key, events, ids[start : start + len(texts)], seen)
            start += len(texts)
            if dom.full:
                break
        pending.clear()

    def batch_full() -> bool:
        # Encode in large batches, but do not load far past what the caps can still take
        # (a token is rarely more than 6 characters).
        limit = _BATCH_CHARS
        if max_tokens is not None:
            limit = min(limit, max(4096, 6 * (max_tokens - dom.tokens)))
        return pending_chars >= limit or (max_docs is not None and pending_pieces >= max_docs - dom.pieces)

    for key in keys:
        events, texts = _prepare(source, key, max_doc_chars)
        pending.append((key, events, texts))
        pending_chars += sum(map(len, texts))
        pending_pieces += len(texts)
        if batch_full():
            flush()
            pending_chars = pending_pieces = 0
            if dom.full:
                break
    if pending and not dom.full:
        flush()
    bar.close()
    return dom, n_candidates


def _split(dom: _Domain, seed: int, val_fraction: float, min_val_docs: int) -> dict[str, list[list[int]]]:
    n = len(dom.groups)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, min(min_val_docs, n // 5), 1)
    # Train needs a document more than val does: a lone document goes to train (val_fraction
    # 0.6 used to send it to val and leave train empty).
    n_val = min(n_val, max(n - 1, 0))
    val = set(random.Random(f"smoe-corpus:{seed}:{dom.source.name}:split").sample(range(n), n_val))
    out: dict[str, list[list[int]]] = {"train": [], "val": []}
    for g, pieces in enumerate(dom.groups):
        out["val" if g in val else "train"] += pieces
    return out


def _unigram(counts_train: np.ndarray, counts_val: np.ndarray) -> dict[str, float | None]:
    """Train unigram entropy and val cross-entropy under the add-one-smoothed train unigram (nats)."""
    n = counts_train.sum()
    h = None
    if n:
        p = counts_train[counts_train > 0] / n
        h = float(-(p * np.log(p)).sum())
    xent = None
    if counts_val.sum():
        q = (counts_train + 1) / (n + counts_train.size)
        xent = float(-(counts_val * np.log(q)).sum() / counts_val.sum())
    return {
        "unigram_entropy_nats": None if h is None else round(h, 6),
        "unigram_entropy_bits": None if h is None else round(h / math.log(2), 6),
        "val_unigram_xent_nats": None if xent is None else round(xent, 6),
    }


def build_corpus(
    out_dir: str | Path,
    seed: int = 0,
    domains: Sequence[str] | None = None,
    user_domains: dict[str, str] | None = None,
    max_tokens_per_domain: int | None = DEFAULT_MAX_TOKENS,
    max_docs_per_domain: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    min_val_docs: int = DEFAULT_MIN_VAL_DOCS,
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS,
    tokenizer: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build a corpus in ``out_dir`` and return its manifest (also written as manifest.json).

    ``domains``: built-in/system domains (None = all available); ``user_domains``: name -> glob;
    caps of ``None`` mean no cap (the math domain needs one). See the module docstring.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if min_val_docs < 0:
        raise ValueError(f"min_val_docs must be >= 0, got {min_val_docs}")
    for name, cap in (
        ("max_tokens_per_domain", max_tokens_per_domain),
        ("max_docs_per_domain", max_docs_per_domain),
    ):
        if cap is not None and cap <= 0:
            raise ValueError(f"{name} must be positive or None, got {cap}")
    if max_doc_chars < 1000:
        raise ValueError(f"max_doc_chars must be at least 1000, got {max_doc_chars}")
    sources, notes = resolve_sources(domains, dict(user_domains or {}), seed)
    if not sources:
        raise ValueError("no domains selected: pass built-in domains and/or user domains")
    for s in sources:
        if not s.bounded and max_tokens_per_domain is None and max_docs_per_domain is None:
            raise ValueError(f"domain {s.name!r} is generated without end; set max_tokens or max_docs")
    if tokenizer is None:
        from smoe.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
    vocab = int(tokenizer.vocab_size)
    if vocab > 2**16:
        raise CorpusError(f"tokenizer vocabulary {vocab} does not fit uint16 shards")
    # Every check above leaves out_dir alone; from here on a failure keeps the old corpus there.
    with outdir.replacing(Path(out_dir)) as out:
        seen: set[bytes] = set()
        totals = {s: np.zeros(vocab, dtype=np.int64) for s in SPLITS}
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "vocab_size": vocab,
            "tokenizer": Path(getattr(tokenizer, "path", "unknown")).name,
            "bos_id": int(tokenizer.bos_id),
            "eos_id": int(tokenizer.eos_id),
            "seed": seed,
            "val_fraction": val_fraction,
            "min_val_docs": min_val_docs,
            "caps": {
                "max_tokens_per_domain": max_tokens_per_domain,
                "max_docs_per_domain": max_docs_per_domain,
                "max_doc_chars": max_doc_chars,
                "max_line_chars": MAX_LINE_CHARS,
            },
            "entropy_unit": "nats (natural log, like the training loss); *_bits = nats / ln 2",
            "absent_sources": notes,
            "domains": {},
        }
        for source in sources:
            dom, n_candidates = _collect(
                source,
                seed,
                tokenizer,
                seen,
                max_tokens_per_domain,
                max_docs_per_domain,
                max_doc_chars,
                progress,
            )
            entry: dict[str, Any] = {"source": source.description, "kind": source.kind}
            counts = {}
            for split, docs in _split(dom, seed, val_fraction, min_val_docs).items():
                docs = [[tokenizer.bos_id, *d, tokenizer.eos_id] for d in docs]
                entry[split] = write_split(out / source.name, split, docs)
                flat = np.fromiter(itertools.chain.from_iterable(docs), np.int64)
                c = np.bincount(flat, minlength=vocab)
                c[tokenizer.bos_id] -= len(docs)
                counts[split] = c
                totals[split] += c
            entry.update(_unigram(counts["train"], counts["val"]))
            entry.update(
                candidates=n_candidates,
                examined=dom.examined,
                never_read=None if n_candidates is None else n_candidates - dom.examined,
                capped=dom.full,
                documents_split_in_pieces=dom.split_docs,
                pieces_dropped_at_cap=dom.dropped_at_cap,
                pieces_duplicate=dom.duplicate_pieces,
                documents_in=dom.documents_in,
                documents_kept=len(dom.groups),
                documents_dropped_at_cap=dom.docs_dropped_at_cap,
                pieces_stored=dom.pieces,
                skipped=dict(sorted(dom.skipped.items())),
                skipped_examples=dict(sorted(dom.examples.items())),
            )
            manifest["domains"][source.name] = entry
        manifest["overall"] = {
            s: {k: sum(d[s][k] for d in manifest["domains"].values()) for k in ("documents", "tokens")}
            for s in SPLITS
        }
        manifest["overall"].update(_unigram(totals["train"], totals["val"]))
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
