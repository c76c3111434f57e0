"""``smoe analyze``: the Mixtral paper's routing analysis on any checkpoint, as routing.json,
PNG plots and a self-contained report.html (see docs/routing.md)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from smoe.cli.types import device, non_negative_int, positive_int
from smoe.data.globwalk import glob_files
from smoe.data.shards import Corpus

GLOB_CHARS = set("*?[")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="record expert routing over named domains and write a routing report",
        description="Each --data NAME=PATH_OR_GLOB is one domain whose matching text files are one document "
        "each (a directory means its *.txt files; only regular files are read). Every file must be UTF-8: "
        "one that is not stops the command, naming the file, before the model is loaded. Empty files are "
        "skipped and counted. --data [NAME=]CORPUS_DIR (a folder with manifest.json from `smoe data build`) "
        "adds every domain of that corpus, from the --split split (default: val).",
    )
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face or Mistral format)")
    p.add_argument(
        "--data", required=True, action="append", metavar="NAME=PATH_OR_GLOB", help="a domain (repeat)"
    )
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--split", default="val", choices=["train", "val"], help="split of corpus directories")
    p.add_argument("--layers", default="all", help="comma-separated layer indices, or 'all' (default)")
    p.add_argument(
        "--max-tokens", type=positive_int, default=None, help="cap on total tokens, split evenly over domains"
    )
    p.add_argument(
        "--seq-len", type=positive_int, default=None, help="window length (default: min(model context, 2048))"
    )
    p.add_argument(
        "--overlap",
        type=non_negative_int,
        default=0,
        help="context tokens repeated between windows (default 0)",
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--device", default="cpu", type=device)
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer file (default: the checkpoint's, else Mixtral's)"
    )
    p.add_argument("--probs", action="store_true", help="also record the full router probabilities (float16)")
    p.add_argument("--no-records", action="store_true", help="delete the per-token records after the report")
    p.add_argument("--no-plots", action="store_true", help="numbers only: skip the PNGs (faster)")
    p.add_argument(
        "--view-docs", type=non_negative_int, default=2, help="documents per domain in the token view"
    )
    p.add_argument(
        "--view-layers", default=None, help="token-view layers, comma-separated (default first,middle,last)"
    )
    p.add_argument(
        "--min-count",
        type=non_negative_int,
        default=5,
        help="occurrences a token needs for the top-tokens tables",
    )
    p.set_defaults(func=_analyze)


def parse_data(spec: str) -> tuple[str | None, str]:
    """'NAME=PATH' -> (NAME, PATH); a bare path -> (None, PATH)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and not (GLOB_CHARS & set(name)):
        return name, path
    return None, spec


def text_files(path: str) -> list[Path]:
    """The regular files a --data path names (is_file: a FIFO or device would block or never end)."""
    if GLOB_CHARS & set(path):
        files = sorted(Path(f) for f in glob_files(path) if Path(f).is_file())  # no symlink loops
    elif Path(path).is_dir():
        files = sorted(f for f in Path(path).glob("*.txt") if f.is_file())
    elif Path(path).is_file():
        files = [Path(path)]
    elif Path(path).exists():
        raise ValueError(f"--data {path}: not a regular file or directory")
    else:
        raise FileNotFoundError(f"--data {path}: no such file, directory or glob")
    if not files:
        raise FileNotFoundError(f"--data {path}: matched no text files")
    return files


def _read_text(f: Path) -> str:
    # Bytes decoded as they are, as `smoe data build` reads text (smoe.data.textio): read_text's
    # newline translation would drop every "\r" of a Windows file; a leading byte order mark goes.
    try:
        return f.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{f}: not UTF-8 text ({e}); analysis input must be UTF-8") from None


def check_utf8(files: list[Path]) -> None:
    """Fail before the model is loaded, not minutes into the run, if a file is not UTF-8."""
    for f in files:
        _read_text(f)


def read_texts(files: list[Path]) -> Iterator[str]:
    for f in files:
        yield _read_text(f)


def collect_domains(specs: list[str], split: str) -> tuple[dict, list[str], int | None]:
    """{domain: lazy documents}, corpus labels, and the token total when it is known up front."""
    domains: dict = {}
    labels: list[str] = []
    known_total: int | None = 0
    for spec in specs:
        name, path = parse_data(spec)
        if Path(path).is_dir() and (Path(path) / "manifest.json").is_file():
            corpus = Corpus(path)
            labels.append(f"{name or Path(path).name} ({path}, {split} split)")
            for d in corpus.domains:
                if d in domains:
                    raise ValueError(f"--data {spec}: domain {d!r} is given twice")
                n = corpus.num_tokens(d, split)
                if n == 0:  # e.g. a one-document domain, whose document `smoe data build` puts in train
                    raise ValueError(
                        f"--data {spec}: domain {d!r} has no tokens in the {split} split"
                        + (" (try --split train)" if split == "val" else "")
                    )
                domains[d] = corpus.documents(d, split)
                known_total = None if known_total is None else known_total + n
            continue
        if name is None:
            raise ValueError(f"--data {spec}: text domains need a name, as NAME={path}")
        if name in domains:
            raise ValueError(f"--data {spec}: domain {name!r} is given twice")
        files = text_files(path)
        check_utf8(files)
        if all(f.stat().st_size == 0 for f in files):  # run_analysis would refuse it after loading
            raise ValueError(f"--data {spec}: all {len(files)} file(s) are empty; the domain has no text")
        domains[name] = read_texts(files)
        labels.append(f"{name}: {len(files)} file(s) from {path}")
        known_total = None
    return domains, labels, known_total


def _analyze(args: argparse.Namespace) -> int:

    import smoe
    from smoe.analysis import run_analysis
    from smoe.analysis.run import detail_layers

    cfg = smoe.load_config(args.model)
    if not cfg.is_moe:
        raise ValueError(f"{args.model}: a dense checkpoint (num_experts == 1) has no router to analyse")
    layers = None if args.layers == "all" else _int_list(args.layers)
    domains, labels, total = collect_domains(args.data, args.split)
    model = smoe.load_model(args.model, dtype=args.dtype, device=args.device)
    tokenizer = smoe.load_tokenizer(args.tokenizer or args.model)
    if total is not None and args.max_tokens is not None:
        total = min(total, args.max_tokens)
    summary = run_analysis(
        model,
        tokenizer,
        domains,
        args.out,
        layers=layers,
        max_tokens=args.max_tokens,
        seq_len=args.seq_len or min(cfg.max_seq_len, 2048),
        overlap=args.overlap,
        batch_size=args.batch_size,
        record_probs=args.probs,
        keep_records=not args.no_records,
        model_name=str(args.model),
        corpus_name="; ".join(labels),
        view_docs=args.view_docs,
        view_layers=_int_list(args.view_layers) if args.view_layers else None,
        min_count=args.min_count,
        expected_tokens=total or args.max_tokens,
        plots=not args.no_plots,
    )
    print(summary_table(summary, detail_layers(summary["layers"])))
    for key in ("report", "routing_json", "records"):
        if summary["paths"][key]:
            print(f"{key:>13}: {summary['paths'][key]}")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated layer indices, got {text!r}") from None


def summary_table(summary: dict, show: list[int]) -> str:
    """The paper's Table 5 analogue: repeat rates per domain at the first/middle/last layers."""
    pct = lambda x: "n/a" if x is None else f"{100 * x:5.1f}%"  # noqa: E731  (None: no pair)
    head = f"{'domain':<16}{'tokens':>10}" + "".join(f"{f'L{x} first':>11}{f'L{x} any':>11}" for x in show)
    lines = [head, "-" * len(head)]
    for name, d in summary["domains"].items():
        cells = "".join(
            f"{pct(d['repeat_first'][str(x)]):>11}{pct(d['repeat_any'][str(x)]):>11}" for x in show
        )
        lines.append(f"{name[:15]:<16}{d['tokens']:>10}{cells}")
    ch = summary["chance"]
    lines.append(f"{'chance':<16}{'':>10}" + f"{pct(ch['first']):>11}{pct(ch['any']):>11}" * len(show))
    capped = [n for n, d in summary["domains"].items() if d["capped"]]
    if capped:
        lines.append(f"capped at {summary['max_tokens_per_domain']} tokens per domain: {', '.join(capped)}")
    empty = [
        f"{n} {d['empty_documents_skipped']}"
        for n, d in summary["domains"].items()
        if d["empty_documents_skipped"]
    ]
    if empty:
        lines.append(f"empty documents skipped: {', '.join(empty)}")
    return "\n".join(lines)
