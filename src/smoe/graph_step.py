"""CUDA graphs for single-token decode steps.

Legend: B batch rows, V vocabulary.

A Mixtral decode step is a few thousand small kernels; launched one by one from Python, the
launches rather than the memory traffic set the speed at batch 1. Captured once in a CUDA graph,
one replay launches them all. Two users:

- ``GraphedDecodeStep``: ``step(tokens_B1, pos_B1, cache) -> logits_BV``, the Generator's decode
  step on CUDA (sampling, stop strings and streaming stay outside the graph, on the host);
- ``smoe.decode_loop.GreedyDecodeLoop``: greedy decoding with the argmax inside the graph.

Capturing runs the step a few times (warm-up on a side stream, then the capture itself), and
each run writes keys and values into the cache. ``GraphedDecodeStep`` captures with every
position at -1: the cache protocol (``smoe.cache``) sends negative positions to the junk slot,
which no query ever sees, so it can capture after the prefill without touching its slots.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from smoe.cache import KVCache


def capture(fn: Callable[[], None], warmup: int = 3) -> torch.cuda.CUDAGraph:
    """Warm ``fn`` up on a side stream (cuBLAS handles, Triton compilation, allocator pools),
    then capture one call of it. Tensors ``fn`` reads and writes must stay where they are."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    before = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph):
            fn()
    except BaseException:
        # A failed capture raises from the graph's exit before it switches back from its side
        # stream; without this, everything after (the eager fallback too) ran on that stream.
        torch.cuda.set_stream(before)
        raise
    return graph


class GraphedDecodeStep:
    """``forward(tokens_B1, pos_B1, cache) -> logits_BV`` replayed from a CUDA graph, captured
    on the first call for each cache (a new cache object, e.g. another batch size, recaptures).

    The logits returned live in the graph's output buffer: the next call overwrites them, so
    consume them (sample) first. If capture fails (an engine that reads device data on the host,
    such as ``reference``), it says so once on stderr and runs ``forward`` eagerly from then on.
    ``cuda_graph=False`` runs the same protocol (static buffers, the junk-slot warm-up) without
    a graph, which is how the CPU tests check it.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor, torch.Tensor, KVCache], torch.Tensor],
        cuda_graph: bool = True,
        warmup: int = 3,
    ):
        self.forward, self.cuda_graph, self.warmup = forward, cuda_graph, warmup
        self._cache: KVCache | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._eager = False  # set when a capture failed

    @torch.inference_mode()
    def _prepare(self, cache: KVCache, device: torch.device) -> None:
        B = cache.batch_size
        self.tok_B1 = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.pos_B1 = torch.full((B, 1), -1, dtype=torch.long, device=device)  # the junk slot
        self._cache, self._graph = cache, None

        def run() -> None:
            self.logits_BV = self.forward(self.tok_B1, self.pos_B1, cache)

        if self._eager:  # a capture failed before: plain steps, no warm-up to pay again
            return
        if not self.cuda_graph:
            for _ in range(self.warmup):  # the same writes as a capture's warm-up
                run()
            return
        try:
            self._graph = capture(run, self.warmup)
        except Exception as e:  # any capture failure: eager steps stay correct
            self._eager = True
            print(
                f"smoe: CUDA graph capture of the decode step failed, decoding eagerly "
                f"({str(e).splitlines()[0][:200]})",
                file=sys.stderr,
            )
            torch.cuda.synchronize()

    @torch.inference_mode()
    def __call__(self, tokens_B1: torch.Tensor, pos_B1: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if cache is not self._cache:
            self._prepare(cache, tokens_B1.device)
        if self._graph is None:
            return self.forward(tokens_B1, pos_B1, cache)
        self.tok_B1.copy_(tokens_B1)
        self.pos_B1.copy_(pos_B1)
        self._graph.replay()
        return self.logits_BV
