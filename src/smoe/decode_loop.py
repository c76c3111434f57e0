"""Greedy decoding that stays on the device: no host synchronisation per token, and on CUDA
each step replayed from one captured CUDA graph.

Legend: B batch rows, N decode steps, V vocabulary.

Every tensor a step touches is static: the input token and position buffers (B, 1), the KV
cache, and an output buffer (B, N) written at a step counter that lives on the device. One step
is::

    logits_BV = model(tok_B1, pos_B1, cache)[:, -1]
    tok_B1    = argmax(logits_BV)          # written in place: the next step's input
    out_BN[:, step] = tok_B1; pos_B1 += 1; step += 1

so replaying the captured step N times decodes N tokens with N graph launches and nothing else.
This is the throughput path (benchmarks/gpu_decode.py); ``smoe.generate.Generator`` is the
general one (sampling, stop strings, streaming), which reads every token on the host.
"""

from __future__ import annotations

import torch

from smoe.cache import KVCache
from smoe.graph_step import capture

CAPTURE_WARMUP = 3


class GreedyDecodeLoop:
    """Create (and on CUDA capture) before the prefill: capturing runs warm-up steps that
    scribble on the cache, and ends by resetting it."""

    def __init__(
        self, model: torch.nn.Module, cache: KVCache, max_steps: int, cuda_graph: bool | None = None
    ):
        p = model.tok_embeddings.weight
        self.model, self.cache, self.device = model, cache, p.device
        B = cache.batch_size
        self.tok_B1 = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        self.pos_B1 = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        # The capture's warm-up steps write columns 0..CAPTURE_WARMUP-1 too: at least that many.
        self.out_BN = torch.zeros(B, max(max_steps, CAPTURE_WARMUP), dtype=torch.long, device=self.device)
        self.step_1 = torch.zeros(1, dtype=torch.long, device=self.device)
        self.max_steps = max_steps
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"GreedyDecodeLoop: CUDA graphs need a CUDA model, this one is on {self.device}")
        self._graph: torch.cuda.CUDAGraph | None = None
        self._steps = 0
        if self.cuda_graph:
            self._capture()

    @torch.inference_mode()
    def _step(self) -> None:
        logits_BV = self.model(self.tok_B1, self.pos_B1, self.cache)[:, -1]
        self.tok_B1.copy_(logits_BV.argmax(dim=-1, keepdim=True))
        self.out_BN.scatter_(1, self.step_1.expand(self.out_BN.shape[0], 1), self.tok_B1)
        self.pos_B1.add_(1)
        self.step_1.add_(1)

    def _capture(self) -> None:
        """Capture one step, before any prefill, then forget what its warm-up wrote."""
        self._graph = capture(self._step, warmup=CAPTURE_WARMUP)
        self.cache.reset()

    def start(self, first_tok_B: torch.Tensor, next_pos_B: torch.Tensor) -> None:
        """Set each row's first input token and its position (after the prefill)."""
        self.tok_B1.copy_(first_tok_B.view(-1, 1))
        self.pos_B1.copy_(next_pos_B.view(-1, 1))
        self.step_1.zero_()
        self._steps = 0

    def run(self, n: int) -> torch.Tensor:
        """Decode ``n`` more steps; returns the (B, steps so far) output buffer view, on device,
        without waiting for it. Output column j is the token generated from input j."""
        if self._steps + n > self.max_steps:
            raise ValueError(
                f"GreedyDecodeLoop: {self._steps} + {n} steps exceed the buffer of {self.max_steps}"
            )
        self._steps += n
        for _ in range(n):
            if self._graph is not None:
                self._graph.replay()
            else:
                self._step()
        return self.out_BN[:, : self._steps]
