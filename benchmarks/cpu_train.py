"""CPU training throughput: smoe's train_step against transformers' MixtralForCausalLM on the
same config, batch and optimizer, and the SMoE step against a dense model with the same active
parameters (hidden_dim = top_k * expert hidden), measured interleaved in one run.

    python benchmarks/cpu_train.py                # `small` preset, fp32, batch 8x256
    python benchmarks/cpu_train.py --tiny         # seconds; checks that the script runs

Every step is forward + loss (with the 0.02 load-balancing loss on both sides) + backward +
AdamW, with the same optimizer groups on both sides; transformers runs on smoe's weights (same
routing). Two more rows time only the step's unavoidable matrix products
(``matmul_floor_stepper``), with the experts' products as a loop of ``mm`` and as one ``bmm``;
the faster is the floor: an estimate of the least time any step needs here (other product
forms might still be faster). The steppers alternate, so machine noise hits them alike; the
table gives median tokens/s and the ratios of medians. Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from smoe.config import ModelConfig  # noqa: E402
from smoe.malloc import keep_freed_memory  # noqa: E402
from smoe.model.transformer import build_model  # noqa: E402
from smoe.train.config import TrainConfig  # noqa: E402
from smoe.train.data import Batch  # noqa: E402
from smoe.train.optim import build_optimizer, build_scheduler  # noqa: E402
from smoe.train.precision import wrap_engines_for_autocast  # noqa: E402
from smoe.train.step import train_step  # noqa: E402


def smoe_stepper(cfg: ModelConfig, tcfg: TrainConfig, batch: Batch):
    model = build_model(cfg, seed=0)
    if tcfg.dtype == "bf16":
        wrap_engines_for_autocast(model)
    opt = build_optimizer(model, tcfg)
    sched = build_scheduler(opt, tcfg)
    return lambda: train_step(model, opt, sched, [batch], tcfg)


def unfused_head_loss(stepper):
    """The same step with the output head and cross-entropy unfused (F.linear, then
    F.cross_entropy on the (N, V) logits): what ``smoe.model.head_loss`` replaced."""
    import smoe.model.transformer as transformer

    def unfused(h_ND, w_VD, targets_N):
        return F.cross_entropy(F.linear(h_ND, w_VD).float(), targets_N, ignore_index=-100)

    def step():
        fused, transformer.linear_cross_entropy = transformer.linear_cross_entropy, unfused
        try:
            stepper()
        finally:
            transformer.linear_cross_entropy = fused

    return step


def hf_stepper(cfg: ModelConfig, tcfg: TrainConfig, batch: Batch):
    """transformers' model on smoe's seed-0 weights (saved, then ``from_pretrained``: the same
    routing, so the same per-expert work), with smoe's optimizer groups."""
    import tempfile

    import transformers

    from smoe.checkpoint import save_model

    with tempfile.TemporaryDirectory() as d:
        save_model(build_model(cfg, seed=0), d)
        model = transformers.MixtralForCausalLM.from_pretrained(
            d, dtype=torch.float32, attn_implementation="sdpa", output_router_logits=True,
            router_aux_loss_coef=0.02,
        ).train()  # fmt: skip
    opt = build_optimizer(model, tcfg)
    inputs = batch.inputs_BT  # the same B x T tokens through the model; HF shifts the labels itself

    def step():
        out = model(input_ids=inputs, labels=inputs, use_cache=False)  # no KV cache in training
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def matmul_floor_stepper(cfg: ModelConfig, tokens: int, batched_experts: bool):
    """Only the matrix products a training step cannot avoid, back to back: for every weight
    (attention, router, each expert on exactly its share T*k/E of the rows, output head) the
    forward product and the two backward ones (input and weight gradient), in F.linear's
    layouts. No attention scores, norms, activations, loss or optimizer. The experts' products
    run either one ``mm`` per expert or one ``bmm`` over all experts (``batched_experts``);
    ``main`` takes the faster of the two as the floor, since an implementation may use either."""
    g = torch.Generator().manual_seed(0)
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    E, per_expert = cfg.num_experts, tokens * cfg.top_k // cfg.num_experts
    shapes = [(tokens, cfg.dim, cfg.vocab_size)]  # (rows, in, out), one weight each
    expert_shapes = []  # (rows per expert, in, out) for E experts at once
    for _ in range(cfg.n_layers):
        shapes += [(tokens, cfg.dim, q), (tokens, cfg.dim, kv), (tokens, cfg.dim, kv), (tokens, q, cfg.dim)]
        shapes += [(tokens, cfg.dim, E)]
        expert_shapes += [(per_expert, cfg.dim, cfg.hidden_dim)] * 2 + [(per_expert, cfg.hidden_dim, cfg.dim)]
    ops = []
    for n, i, o in shapes:
        x, w, gy = (
            torch.randn(n, i, generator=g),
            torch.randn(o, i, generator=g),
            torch.randn(n, o, generator=g),
        )
        ops += [
            (torch.mm, x, w.T),
            (torch.mm, gy, w),
            (torch.mm, gy.T, x),
        ]  # forward, grad input, grad weight
    for n, i, o in expert_shapes:
        x, w, gy = (
            torch.randn(E, n, i, generator=g), torch.randn(E, o, i, generator=g), torch.randn(E, n, o, generator=g)
        )  # fmt: skip
        triples = [(x, w.transpose(1, 2)), (gy, w), (gy.transpose(1, 2), x)]
        if batched_experts:
            ops += [(torch.bmm, a, b) for a, b in triples]
        else:
            ops += [(torch.mm, a[e], b[e]) for a, b in triples for e in range(E)]

    def step():
        for f, a, b in ops:
            f(a, b)

    return step


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per model (after one warmup step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dispatch", default="auto")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument(
        "--bf16", action="store_true", help="also time smoe with bf16 autocast (fp32 master weights)"
    )
    p.add_argument(
        "--unfused", action="store_true", help="also time smoe with the head and cross-entropy unfused"
    )
    p.add_argument("--tiny", action="store_true", help="a tiny model and batch (smoke test)")
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory for every model (smoe.malloc; what the smoe command does)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kept = args.keep_freed_memory and keep_freed_memory()
    if args.keep_freed_memory and not kept:
        raise SystemExit("--keep-freed-memory: this C library does not take glibc's malloc settings")
    if args.tiny:
        cfg = ModelConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, vocab_size=128,
                          max_seq_len=64, num_experts=4, top_k=2)  # fmt: skip
        args.batch, args.seq, args.steps = 2, 16, 2
    else:
        cfg = ModelConfig.preset(args.preset)
    cfg = cfg.replace(dispatch=args.dispatch)
    dense = cfg.replace(num_experts=1, top_k=1, hidden_dim=cfg.top_k * cfg.hidden_dim)
    tcfg = TrainConfig(steps=1000, warmup_steps=1, lr=1e-4)
    x = torch.randint(
        0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0)
    )
    batch = Batch(x[:, :-1].contiguous(), x[:, 1:].contiguous())
    steppers = {
        "smoe": smoe_stepper(cfg, tcfg, batch),
        "smoe dense (equal active)": smoe_stepper(dense, tcfg, batch),
    }
    if args.unfused:
        steppers["smoe, head + loss unfused"] = unfused_head_loss(smoe_stepper(cfg, tcfg, batch))
    if args.bf16:
        steppers["smoe bf16 autocast"] = smoe_stepper(cfg, dataclasses.replace(tcfg, dtype="bf16"), batch)
    if not args.no_hf:
        steppers["transformers Mixtral"] = hf_stepper(cfg, tcfg, batch)
    steppers["matrix products alone, experts by mm"] = matmul_floor_stepper(cfg, args.batch * args.seq, False)
    steppers["matrix products alone, experts by bmm"] = matmul_floor_stepper(cfg, args.batch * args.seq, True)
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for step in steppers.values():
        step()  # warmup: allocator, oneDNN primitives
    for _ in range(args.steps):
        for k, step in steppers.items():
            t0 = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"model": k, "tokens_per_s": tokens / med[k], "step_s": med[k]} for k in steppers]
    print(
        f"\nconfig: {args.preset if not args.tiny else 'tiny-test'} ({cfg.num_params() / 1e6:.1f}M params, "
        f"{cfg.num_params(active=True) / 1e6:.1f}M active), dense twin hidden_dim={dense.hidden_dim} "
        f"({dense.num_params() / 1e6:.1f}M), batch {args.batch}x{args.seq}, fp32, {args.threads} threads, "
        f"dispatch={args.dispatch}, {args.steps} timed steps each, interleaved, "
        f"{'glibc keeps freed memory (--keep-freed-memory)' if kept else 'default allocator settings'}\n"
    )
    dense_key = "smoe dense (equal active)"
    print("| model | median step (s) | tokens/s |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} |")
    ratios = {"smoe step time / dense (equal active) step time (target <= 1.3)": med["smoe"] / med[dense_key]}
    if "smoe, head + loss unfused" in med:
        ratios["smoe tokens/s / smoe with head + loss unfused"] = (
            med["smoe, head + loss unfused"] / med["smoe"]
        )
    if "smoe bf16 autocast" in med:
        ratios["smoe bf16 autocast tokens/s / smoe fp32 tokens/s"] = med["smoe"] / med["smoe bf16 autocast"]
    if "transformers Mixtral" in med:
        ratios["smoe tokens/s / transformers tokens/s (target >= 2)"] = (
            med["transformers Mixtral"] / med["smoe"]
        )
    floor = min(med["matrix products alone, experts by mm"], med["matrix products alone, experts by bmm"])
    ratios["smoe step time / matrix-product floor"] = med["smoe"] / floor
    if "transformers Mixtral" in med:
        ratios["highest reachable tokens/s / transformers tokens/s (floor / transformers)"] = (
            med["transformers Mixtral"] / floor
        )
    print("\n| ratio (medians, same run) | value |")
    print("|---|---|")
    for k, v in ratios.items():
        print(f"| {k} | {v:.2f} |")
    return rows


if __name__ == "__main__":
    main()
