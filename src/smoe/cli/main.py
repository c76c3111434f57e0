"""``smoe <command>``: thin wrappers over the library.

Each command lives in its own module under ``smoe.cli`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (args -> exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from smoe.malloc import keep_freed_memory

# One module per command family; add a line here when a new one lands.
COMMAND_MODULES = [
    "smoe.cli.model_cmds",
    "smoe.cli.generate_cmds",
    "smoe.cli.data_cmds",
    "smoe.cli.analyze_cmds",
    "smoe.cli.train_cmds",
    "smoe.cli.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoe", description="Sparse mixture-of-experts (Mixtral-family) toolkit"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("SMOE_KEEP_FREED_MEMORY", "1") != "0":
        keep_freed_memory()  # large CPU tensors without fresh page faults each step (smoe/malloc.py)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except ValueError as e:  # our errors say what and where
        print(f"smoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --out below a file, a full disk: the path and the reason, no traceback
        print(f"smoe {args.command}: error: {_os_message(e)}", file=sys.stderr)
        return 2


def _os_message(e: OSError) -> str:
    """``path: reason`` for errors raised by the OS (their str is "[Errno 20] Not a directory: 'x'");
    our own FileNotFoundError messages, which carry no errno, as they are."""
    if e.strerror and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    return str(e)


if __name__ == "__main__":
    raise SystemExit(main())
