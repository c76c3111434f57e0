"""``smoe generate`` (stream a completion of one prompt) and ``smoe chat`` (interactive,
multi-turn, Mixtral-Instruct format). Both are thin wrappers over ``smoe.generate.Generator``."""

from __future__ import annotations

import argparse
import sys
import time

from smoe.checkpoint import load_model
from smoe.cli.types import device
from smoe.generate import Completion, GenerationConfig, Generator
from smoe.tokenizer import load_tokenizer


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="checkpoint directory (smoe, Hugging Face or Mistral format)"
    )
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", type=device)
    p.add_argument(
        "--dispatch", default=None, help="MoE dispatch engine (default: the config's, usually auto)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="1 = off")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after EOS (benchmarks)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start)")
    p.add_argument(
        "--no-cuda-graph", action="store_true", help="on CUDA, launch the decode step's kernels one by one"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream a completion of --prompt to stdout")
    _common(p)
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS to the prompt")
    p.add_argument("--truncate", action="store_true", help="drop the oldest prompt tokens to fit the context")
    p.set_defaults(func=_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat (Mixtral-Instruct format)")
    _common(p)
    p.add_argument(
        "--system",
        default=None,
        help="system prompt, joined to a user turn as the tokenizer's chat format does (v1: the first, v3: the last)",
    )
    p.set_defaults(func=_chat)


def _setup(args: argparse.Namespace) -> tuple[Generator, GenerationConfig]:
    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        stop_at_eos=not args.ignore_eos,
        truncate=getattr(args, "truncate", False),
    )  # validates the sampling values before the (slow) load
    model = load_model(args.model, dtype=args.dtype, device=args.device, dispatch=args.dispatch)
    cpu_layout = model.tok_embeddings.weight.device.type == "cpu"  # faster single-token matmuls there
    graph_step = False if args.no_cuda_graph else None  # None: a CUDA graph on CUDA
    gen = Generator(
        model, load_tokenizer(args.model), compile=args.compile, cpu_layout=cpu_layout, graph_step=graph_step
    )
    return gen, cfg


def _stats(res: Completion, seconds: float) -> str:
    n = len(res.token_ids)
    return f"[{n} tokens in {seconds:.2f}s, {n / max(seconds, 1e-9):.1f} tok/s, finish: {res.finish_reason}]"


def _generate(args: argparse.Namespace) -> int:
    gen, cfg = _setup(args)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    prompt = gen.tokenizer.encode(text, bos=not args.no_bos)
    results: list[Completion] = []
    t0 = time.perf_counter()
    for delta in gen.stream(prompt, cfg, results):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if results[0].truncated:
        print(f"[prompt truncated: dropped the oldest {results[0].truncated} tokens]", file=sys.stderr)
    print(_stats(results[0], time.perf_counter() - t0), file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    gen, cfg = _setup(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict] = list(system)
    print("chat: /reset clears the conversation, /exit or Ctrl-D ends it", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = gen.tokenizer.encode_chat(messages)
        ctx = gen.config.max_seq_len
        if len(prompt) + cfg.max_new_tokens > ctx:  # chat never truncates: say so, keep going
            print(
                f"smoe chat: with this message the conversation is {len(prompt)} tokens; with "
                f"--max-new-tokens {cfg.max_new_tokens} that exceeds the model's context of {ctx} tokens. "
                "Nothing was sent: send a shorter message, /reset to start over, or lower --max-new-tokens",
                file=sys.stderr,
            )
            messages.pop()
            continue
        results: list[Completion] = []
        t0 = time.perf_counter()
        try:
            started = False
            for delta in gen.stream(prompt, cfg, results):
                if not started:  # the reply's first piece carries a leading space
                    delta = delta.lstrip()
                    started = bool(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write("\n")  # end the partial reply's line, so the next prompt starts afresh
            sys.stdout.flush()
            print("[reply interrupted; turn dropped]", file=sys.stderr)
            messages.pop()
            continue
        except ValueError as e:
            print(f"\nsmoe chat: {e}\n(use /reset to start over)", file=sys.stderr)
            messages.pop()
            continue
        print()
        print(_stats(results[0], time.perf_counter() - t0), file=sys.stderr)
        messages.append({"role": "assistant", "content": results[0].text.strip()})
