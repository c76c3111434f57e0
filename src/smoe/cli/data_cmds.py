"""``smoe data build``: assemble the offline multi-domain token corpus (see smoe.data.build)."""

from __future__ import annotations

import argparse
import time

from smoe.data.build import (
    BUILTIN_DOMAINS,
    DEFAULT_MAX_DOC_CHARS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MIN_VAL_DOCS,
    DEFAULT_VAL_FRACTION,
    SYSTEM_DOMAINS,
    build_corpus,
    format_summary,
)
from smoe.data.sources import parse_domain_spec


def _cap(text: str) -> int | None:
    """A positive integer, or 0/none for no cap."""
    if text.lower() in ("0", "none"):
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"cap must be >= 0 (0 = none), got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build token corpora")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    b = data_sub.add_parser(
        "build",
        help="build the offline multi-domain corpus",
        description="Build a multi-domain corpus from text available offline: the Python standard "
        "library (code), generated DeepMind-Mathematics-style problems (math), installed package "
        "documentation (prose), system text when installed (bible-kjv, dict-gcide, man pages) and "
        "your own files. Each domain is deduplicated, capped, split train/val and tokenized with "
        "the Mixtral tokenizer into uint16 shards.",
    )
    b.add_argument(
        "--out",
        required=True,
        help="output directory (empty, or an earlier corpus to replace; a failed build keeps it)",
    )
    b.add_argument("--seed", type=int, default=0, help="selects and splits documents (default 0)")
    b.add_argument(
        "--domain",
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME=GLOB",
        help="add a user domain from .txt/.md/.rst files (one document each) or .jsonl (a 'text' "
        "field per line); repeatable; quote the glob, ** recurses",
    )
    b.add_argument(
        "--builtin",
        default="default",
        metavar="LIST",
        help=f"comma list of built-in domains from {','.join(BUILTIN_DOMAINS + SYSTEM_DOMAINS)}; "
        "'default' = all built-in plus the system ones present; 'none' = user domains only",
    )
    b.add_argument(
        "--max-tokens",
        type=_cap,
        default=DEFAULT_MAX_TOKENS,
        help=f"per-domain token cap incl. BOS/EOS, 0 = none (default {DEFAULT_MAX_TOKENS:,})",
    )
    b.add_argument(
        "--max-docs", type=_cap, default=None, help="per-domain document cap, 0 = none (default none)"
    )
    b.add_argument(
        "--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, help="share of documents for val"
    )
    b.add_argument(
        "--min-val-docs",
        type=int,
        default=DEFAULT_MIN_VAL_DOCS,
        help=f"but at least this many val documents, up to a fifth of the domain (default {DEFAULT_MIN_VAL_DOCS})",
    )
    b.add_argument(
        "--max-doc-chars",
        type=int,
        default=DEFAULT_MAX_DOC_CHARS,
        help="longer documents are cut into pieces at line ends (pieces stay in one split)",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    users = dict(parse_domain_spec(s) for s in args.domain)
    if len(users) != len(args.domain):
        raise ValueError("--domain: the same NAME is given more than once")
    if args.builtin == "default":
        domains = None
    elif args.builtin == "none":
        domains = []
    else:
        domains = [d.strip() for d in args.builtin.split(",") if d.strip()]
    t0 = time.perf_counter()
    manifest = build_corpus(
        args.out,
        seed=args.seed,
        domains=domains,
        user_domains=users,
        max_tokens_per_domain=args.max_tokens,
        max_docs_per_domain=args.max_docs,
        val_fraction=args.val_fraction,
        min_val_docs=args.min_val_docs,
        max_doc_chars=args.max_doc_chars,
        progress=not args.no_progress,
    )
    print(format_summary(manifest))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0
