"""Generation: chunked prefill and token-by-token decode over an explicit KV cache, batched,
streamed, and stopped by EOS, stop strings or a token budget.

Legend: B batch rows, T tokens, V vocabulary.

Batching left-pads prompts to the longest. Padding gets position -1, which the cache writes
to a junk slot that nothing attends to, and real tokens get positions 0..len-1 of their own
row. Each row therefore computes what it would compute alone::

    tokens   [pad pad  a0  a1  a2]     positions  [-1 -1  0  1  2]
             [ b0  b1  b2  b3  b4]                [ 0  1  2  3  4]

Then every decode step feeds one token per row at that row's next position. A row that has
finished keeps stepping (its tokens are discarded) so that shapes stay static.

Limits are checked on the host before any compute: a prompt plus ``max_new_tokens`` longer
than the model's ``max_seq_len`` is an error unless ``truncate=True``, which keeps the newest
prompt tokens and says so in ``Completion.truncated``.
"""

from __future__ import annotations

import numbers
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from smoe import fast_decode
from smoe.cache import KVCache
from smoe.decode_layout import apply_decode_layout
from smoe.graph_step import GraphedDecodeStep
from smoe.sampling import SamplingConfig, make_generators, sample
from smoe.textstream import TextStream

PAD_ID = 0  # what padding feeds the embedding; its outputs are never used
DEFAULT_EOS_ID = 2  # Mixtral's </s>, used when the Generator has no tokenizer


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # row b samples with seed + b (mod 2**64); None draws a fresh seed
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer); not part of the output text
    stop_at_eos: bool = True
    prefill_chunk: int = 512  # prompt tokens per forward while prefilling
    truncate: bool = False  # drop the oldest prompt tokens to fit the context instead of failing

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 0
        ):
            raise ValueError(
                f"generation: max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}"
            )
        if (
            isinstance(self.prefill_chunk, bool)
            or not isinstance(self.prefill_chunk, int)
            or self.prefill_chunk <= 0
        ):
            raise ValueError(
                f"generation: prefill_chunk must be a positive integer, got {self.prefill_chunk!r}"
            )
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"generation: stop strings must be non-empty strings, got {self.stop!r}")
        SamplingConfig(self.temperature, self.top_k, self.top_p)  # validates them
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64
        ):
            raise ValueError(f"generation: seed must be an integer in [-2**63, 2**64), got {self.seed!r}")

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated ids, including a final EOS if there was one
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int  # after any truncation
    truncated: int = 0  # prompt tokens dropped by truncate=True


@dataclass
class TokenStep:
    """One decode step: each row's new token (None once the row has finished) and, for rows
    that finished at this step, why ("eos", "stop" or "length")."""

    tokens: list[int | None]
    finished: list[str | None] = field(default_factory=list)


class Generator:
    """A model, an optional tokenizer (for text in and out), and its decode step.

    ``cpu_layout=True`` (what ``smoe generate``/``chat`` use on CPU) lays the weights out for CPU
    decoding, in place and with the same values (``smoe.decode_layout``), and decodes with the
    lean single-token step (``smoe.fast_decode``) where that supports the model; prefill stays
    the model's own forward. The lean step equals the model up to float rounding and is several
    times faster at batch 1 (docs/benchmarks.md). ``compile=True`` instead wraps the model's
    single-token step in ``torch.compile`` (static shapes, the cache is reused between calls of
    the same batch size and length). On CPU it does not pay today: the gather engine reads
    expert ids on the host, so dynamo recompiles per expert id. On CUDA the decode step is
    replayed from a CUDA graph by default (``smoe.graph_step``; ``graph_step=False`` turns it
    off); ``graph_step=True`` on CPU runs the same protocol without a graph (tests).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer=None,
        compile: bool = False,
        cpu_layout: bool = False,
        graph_step: bool | None = None,
    ):
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer
        if tokenizer is not None and tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'path', '')} has {tokenizer.vocab_size} pieces but the model's "
                f"vocab_size is {self.config.vocab_size}: its ids would not fit the embedding. Use the "
                "tokenizer the model was trained with (put its tokenizer.model or tokenizer.json in the "
                "checkpoint directory)"
            )
        # Ids the model may emit. A vocabulary padded past the tokenizer's (e.g. to a multiple of
        # 128 for faster matmuls) has rows no text maps to: with a tokenizer they are never
        # sampled (the logits are cut to the tokenizer's ids), since no text could show them.
        self.n_ids = self.config.vocab_size if tokenizer is None else tokenizer.vocab_size
        self._decode_step: Callable[[torch.Tensor, torch.Tensor, KVCache], torch.Tensor] = self._forward
        on_cuda = model.tok_embeddings.weight.device.type == "cuda"
        if compile:
            self._decode_step = torch.compile(self._forward, dynamic=False)
        elif cpu_layout and fast_decode.supports(model) is None:
            self._decode_step = fast_decode.FastDecodeStep(model)
        elif on_cuda if graph_step is None else graph_step:
            self._decode_step = GraphedDecodeStep(self._forward, cuda_graph=on_cuda)
        if cpu_layout and not isinstance(self._decode_step, fast_decode.FastDecodeStep):
            apply_decode_layout(model)  # the fast step laid it out for its own products
        self._cache: KVCache | None = None

    def _forward(self, tokens_BT: torch.Tensor, pos_BT: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.model(tokens_BT, pos_BT, cache, logits_to_keep=1)[:, -1]  # (B, V)

    # ------------------------------------------------------------------ inputs
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer (Generator(model, tokenizer))")
            return self.tokenizer.encode(prompt, bos=True)
        return [int(i) for i in prompt]

    def prepare(
        self, prompts: Sequence[str | Sequence[int]], cfg: GenerationConfig
    ) -> tuple[list[list[int]], list[int]]:
        """Token ids per prompt, checked against the vocabulary and the context length, and the
        number of tokens ``truncate`` dropped from each."""
        if (
            isinstance(prompts, str)
            or (isinstance(prompts, torch.Tensor) and prompts.dim() < 2)
            or any(isinstance(p, numbers.Integral) for p in prompts)
        ):
            raise ValueError(
                "generate: prompts must be a list of prompts (each a string or a list of token ids), "
                f"got {type(prompts).__name__} {str(prompts)[:40]!r}; wrap a single prompt in a list"
            )
        if len(prompts) == 0:
            raise ValueError("generate: no prompts given")
        ctx, V = self.config.max_seq_len, self.config.vocab_size
        out, dropped = [], []
        for i, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            if not ids:
                raise ValueError(f"generate: prompt {i} is empty (it needs at least one token, e.g. BOS)")
            bad = [t for t in ids if not 0 <= t < V]
            if bad:
                raise ValueError(
                    f"generate: prompt {i} has token id {bad[0]} outside the model's vocabulary [0, {V})"
                )
            bad = [t for t in ids if t >= self.n_ids]
            if bad:  # a padding row of the model: the tokenizer could not decode the prompt
                raise ValueError(
                    f"generate: prompt {i} has token id {bad[0]}, but the tokenizer "
                    f"{getattr(self.tokenizer, 'path', '')} has only {self.n_ids} pieces (ids 0..{self.n_ids - 1})"
                )
            budget = ctx - cfg.max_new_tokens
            if len(ids) > budget:
                if not cfg.truncate or budget < 1:
                    fix = (
                        "lower max_new_tokens below max_seq_len (truncate=True needs room for at least one prompt token)"
                        if cfg.truncate
                        else "Shorten the prompt, lower max_new_tokens, or pass truncate=True to drop the oldest "
                        "prompt tokens"
                    )
                    raise ValueError(
                        f"generate: prompt {i} has {len(ids)} tokens; with max_new_tokens={cfg.max_new_tokens} that is "
                        f"{len(ids) + cfg.max_new_tokens} > the model's context max_seq_len={ctx}. {fix}"
                    )
                dropped.append(len(ids) - budget)
                ids = ids[-budget:]
            else:
                dropped.append(0)
            out.append(ids)
        if cfg.stop and self.tokenizer is None:
            raise ValueError("generate: stop strings need a tokenizer (Generator(model, tokenizer))")
        return out, dropped

    def _take_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache for one generation, owned by it until ``_give_back``. The idle one is reused
        when it fits; a generation that starts while another is paused mid-stream (its cache
        taken) gets a new one, so the two never read each other's keys and values."""
        c, w = self._cache, self.model.tok_embeddings.weight
        self._cache = None
        # Reuse only a cache the model can still write: ``model.to(dtype or device)`` since the
        # last generation needs a new one.
        if c is not None and (c.batch_size, c.max_len) == (batch_size, max_len) and c.matches(w):
            c.reset()
            return c
        return KVCache.for_model(self.model, batch_size, max_len)

    def _give_back(self, cache: KVCache) -> None:
        self._cache = cache  # the latest finished generation's cache waits for the next one

    # ------------------------------------------------------------------ tokens
    @torch.inference_mode()
    def stream_ids(
        self,
        prompts: Sequence[Sequence[int]],
        cfg: GenerationConfig,
        stop_fn: Callable[[int, int], bool] | None = None,
    ) -> Iterator[TokenStep]:
        """Decode ``prompts`` (checked ids, see ``prepare``) step by step. ``stop_fn(row, token)``
        is called for every new token of an unfinished row and ends that row when it returns True.

        Each call holds its own KV cache from its first step to its end, so calls on one
        Generator may interleave (stream A paused while stream B or ``generate`` runs); when
        they do not, one cache is reused from call to call."""
        B, lens = len(prompts), [len(p) for p in prompts]
        if cfg.max_new_tokens == 0:
            return
        L = max(lens)
        device = self.model.tok_embeddings.weight.device
        tokens_BL = torch.full((B, L), PAD_ID, dtype=torch.long)
        pos_BL = torch.full((B, L), -1, dtype=torch.long)
        for b, ids in enumerate(prompts):
            tokens_BL[b, L - len(ids) :] = torch.tensor(ids)
            pos_BL[b, L - len(ids) :] = torch.arange(len(ids))
        tokens_BL, pos_BL = tokens_BL.to(device), pos_BL.to(device)
        cache = self._take_cache(B, L + cfg.max_new_tokens)
        try:
            if isinstance(self._decode_step, fast_decode.FastDecodeStep):
                self._decode_step.refresh()
            for s in range(0, L, cfg.prefill_chunk):
                e = min(L, s + cfg.prefill_chunk)
                logits_BV = self._forward(tokens_BL[:, s:e], pos_BL[:, s:e], cache)

            sampling = cfg.sampling
            gens = None
            if not sampling.greedy:
                seed = secrets.randbits(62) if cfg.seed is None else cfg.seed
                # Row b's seed wraps past torch's largest (2**64 - 1) instead of overflowing; negative
                # seeds stay as given (torch maps them itself).
                gens = make_generators([s if s < 2**64 else s - 2**64 for s in range(seed, seed + B)], device)
            eos = self.tokenizer.eos_id if self.tokenizer is not None else DEFAULT_EOS_ID
            pos_B1 = torch.tensor(lens, device=device).unsqueeze(1)
            done: list[str | None] = [None] * B
            next_B = sample(logits_BV[:, : self.n_ids], sampling, gens)
            for step in range(cfg.max_new_tokens):
                if step > 0:
                    logits_BV = self._decode_step(next_B.unsqueeze(1), pos_B1, cache)
                    pos_B1 = pos_B1 + 1
                    next_B = sample(logits_BV[:, : self.n_ids], sampling, gens)
                ids = next_B.tolist()
                out: list[int | None] = [None] * B
                finished: list[str | None] = [None] * B
                for b, t in enumerate(ids):
                    if done[b]:
                        continue
                    out[b] = t
                    if cfg.stop_at_eos and t == eos:
                        done[b] = finished[b] = "eos"
                    elif stop_fn is not None and stop_fn(b, t):
                        done[b] = finished[b] = "stop"
                    elif step == cfg.max_new_tokens - 1:
                        done[b] = finished[b] = "length"
                yield TokenStep(out, finished)
                if all(done):
                    return
        finally:  # also when the caller stops early (close, garbage collection)
            self._give_back(cache)

    # ------------------------------------------------------------------ text
    def _run_text(
        self, prompts: Sequence[str | Sequence[int]], cfg: GenerationConfig, results: list[Completion]
    ) -> Iterator[list[str]]:
        """Yield each row's new text per step (and a last flush); fill ``results`` as it goes."""
        ids, dropped = self.prepare(prompts, cfg)
        tok = self.tokenizer
        streams = [TextStream(tok, p, cfg.stop) if tok is not None else None for p in ids]
        results[:] = [Completion("", [], "length", len(p), d) for p, d in zip(ids, dropped)]
        pending = [""] * len(ids)

        def stop_fn(row: int, token: int) -> bool:
            s = streams[row]
            if s is None or (cfg.stop_at_eos and token == tok.eos_id):
                return False
            pending[row] += s.push(token)
            return s.stopped

        for step in self.stream_ids(ids, cfg, stop_fn):
            for b, t in enumerate(step.tokens):
                if t is not None:
                    results[b].token_ids.append(t)
                if step.finished[b]:
                    results[b].finish_reason = step.finished[b]
            yield pending[:]
            pending[:] = [""] * len(ids)
        tails = [s.flush() if s is not None else "" for s in streams]
        for b, s in enumerate(streams):
            if s is not None:
                results[b].text = s.text
        yield tails

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        cfg: GenerationConfig,
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[Completion]:
        """Generate for every prompt (batched); ``on_text(row, delta)`` streams text as it comes."""
        results: list[Completion] = []
        for deltas in self._run_text(prompts, cfg, results):
            if on_text is not None:
                for b, d in enumerate(deltas):
                    if d:
                        on_text(b, d)
        return results

    def stream(
        self, prompt: str | Sequence[int], cfg: GenerationConfig, results: list[Completion] | None = None
    ) -> Iterator[str]:
        """Text deltas of one prompt as they are generated (needs a tokenizer). Pass a list as
        ``results`` to receive the final Completion in it."""
        if self.tokenizer is None:
            raise ValueError("stream: text output needs a tokenizer (Generator(model, tokenizer))")
        results = [] if results is None else results
        for deltas in self._run_text([prompt], cfg, results):
            if deltas[0]:
                yield deltas[0]


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: str | Sequence[str | Sequence[int]],
    **kwargs,
) -> Completion | list[Completion]:
    """One-call convenience: ``generate(model, tok, "Hello", max_new_tokens=20, temperature=0.7)``.
    A single string prompt returns one Completion; a list returns a list."""
    single = isinstance(prompts, str)
    results = Generator(model, tokenizer).generate(
        [prompts] if single else prompts, GenerationConfig(**kwargs)
    )
    return results[0] if single else results
