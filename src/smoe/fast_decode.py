"""A lean single-token decode step for CPU: the model's decode math in under 40 tensor calls per
layer, on the weights laid out by ``smoe.decode_layout``.

Legend: B batch rows, D model dim, H query heads, G kv heads, Hd head dim, S cache slots (plus
the junk slot), E experts, F expert hidden dim, K chosen experts, A = B * K assignments,
V vocabulary, P positions the cache can hold.

Why a second implementation of the step: at batch 1 a decode step of the ``small`` preset reads
~55 MB of weights (about 3 ms at this CPU's bandwidth), but the readable model spends ~1140
tensor ops on it (as the torch profiler counts them, nested ones included), each with a fixed
cost of a few microseconds (far more when the machine is loaded), plus full-size products where
few rows would do. This step computes the same function in ~730 (the products and attention
kernels account for most of those), and in 3.6-4.5 ms instead of ~10 (docs/benchmarks.md):

- one product for q, k and v together, and the residual add fused into the output products
  (``addmm``);
- rotary cos/sin looked up from a table for the cache's positions, built once, instead of
  computed per layer; the "rotate half" sign folded into the sin table;
- the position -> slot map and the attention mask computed once per step for all layers, and
  keys/values written straight into their slot (``index_put_``);
- routing read on the host (free on CPU: there is no device to wait for), so only the chosen
  experts' weights are touched, with one up product (w1 and w3 fused) and one down product per
  expert; with several rows the rows are grouped by expert with a single gather and a single
  scatter-add;
- the logits come from one product with the (D, V) head (oneDNN with a packed copy of the
  head from 2 rows up, where MKL's few-row product was slower).

With numba installed and float32 weights (what ``smoe generate`` has on CPU), each layer is
instead two calls into ``smoe.cpu_kernels`` (attention with its cache writes; the feed-forward
with routing), and the head of up to ``KERNEL_HEAD_MAX_ROWS`` rows a third: products that read
each weight once at the memory's speed, and two calls per layer in place of ~37 torch calls
(docs/benchmarks.md, two threads: the ``small`` preset's batch-1 step went from ~4.1 to ~2.8 ms, batch 8
from ~15 to ~8 ms). Without numba, or in 16-bit, the torch calls above run.

It equals ``Transformer.forward`` on one token per row with the same ``KVCache`` (same cache
protocol: slot = position mod S, negative positions write the junk slot and see every key), up
to float rounding, except for padding rows' own (unused) outputs, which it rotates as position 0; ``tests/test_generate_fast_decode.py`` checks it against the model, with
rolling buffers that wrap and batches of different prompt lengths. It keeps the cache usable by
the model's own forward afterwards (it maintains ``pos_BS``).

Not supported (``supports`` says why): capacity-limited routing (it may drop assignments at
T = 1), and devices other than CPU (the host reads would be synchronisations there).
"""

from __future__ import annotations

from itertools import groupby

import numpy as np
import torch
import torch.nn.functional as F

from smoe import cpu_kernels
from smoe.cache import KVCache
from smoe.decode_layout import DecodeWeights, apply_decode_layout
from smoe.dispatch import split_rows
from smoe.model.layers import causal_mask, rope_cos_sin
from smoe.model.moe import MoE

# From this many rows the head product runs in oneDNN on a packed copy of the head (V * D more
# memory, made on first use): 8 rows x 32000 x 256 took ~4.2 ms there against ~5-7 ms in MKL
# (whole steps 10% faster, interleaved, same process); for one row MKL's product is faster.
ONEDNN_HEAD_MIN_ROWS = 2
# With the kernels, the head of up to this many rows is ``cpu_kernels.rows_times_wt``: 1-4 rows
# at about the memory's speed, where from 5 rows oneDNN's packed product was faster (8 rows of
# the ``small`` head: ~4 ms in the kernel against ~2.4 ms in oneDNN).
KERNEL_HEAD_MAX_ROWS = 4


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def supports(model: torch.nn.Module) -> str | None:
    """None if ``FastDecodeStep`` computes exactly what ``model`` does, else the reason it cannot."""
    if model.tok_embeddings.weight.device.type != "cpu":
        return "the fast decode step is for CPU (it reads routing on the host)"
    if model.config.capacity_factor is not None:
        return "capacity-limited routing can drop assignments, which the fast step does not model"
    for block in model.layers:
        ff = block.feed_forward
        if isinstance(ff, MoE) and ff.capacity_factor is not None:
            return "capacity-limited routing can drop assignments, which the fast step does not model"
    return None


class FastDecodeStep:
    """``step(tokens_B1, pos_B1, cache) -> logits_BV``: one token per row, like
    ``model(tokens_B1, pos_B1, cache)[:, -1]``. Lays the model out (``apply_decode_layout``)."""

    def __init__(self, model: torch.nn.Module, kernels: bool | None = None):
        reason = supports(model)
        if reason is not None:
            raise ValueError(f"FastDecodeStep: {reason}")
        cfg = model.config
        self.model = model
        self._kernels_asked = kernels
        self._lay_out()
        self._arrays: tuple[DecodeWeights, list] | None = None
        self._scratch: dict[int, tuple] = {}
        self.H, self.G, self.Hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.top_k = cfg.top_k
        self.eps = cfg.norm_eps
        self.window = cfg.sliding_window
        self._rope: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._head_packed: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self._views: tuple[KVCache, list] | None = None
        self._kv_arrays: tuple[KVCache, list] | None = None

    def refresh(self) -> None:
        """Lay the model out again if something re-created its parameters since (``.to()``,
        ``load_state_dict(assign=True)``). Checking costs ~40 pointer comparisons, so callers
        do it once per generation, not per step (``Generator`` does)."""
        if not self.w.is_current():
            self._lay_out()

    def _lay_out(self) -> None:
        """Choose the products for the model's dtype (the kernels: float32 with numba, unless
        asked otherwise) and lay the weights out for them."""
        dtype = self.model.output.weight.dtype
        kernels = self._kernels_asked
        if kernels is None:
            kernels = cpu_kernels.available() and dtype == torch.float32
        if kernels and not cpu_kernels.available():
            raise ValueError("FastDecodeStep: kernels=True needs numba (pip install numba)")
        if kernels and dtype != torch.float32:
            raise ValueError(f"FastDecodeStep: the kernels are float32 only, the model is {dtype}")
        self.kernels = kernels
        # (in, out) storage for torch's float32 products, (out, in) for the kernels and 16 bits
        self.w = apply_decode_layout(self.model, transpose=dtype == torch.float32 and not kernels)

    def _rope_tables(self, n_pos: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos_PHd and the signed sin_PHd for positions 0..n_pos-1, from the model's own
        ``rope_cos_sin`` (so the values are the ones the full forward uses)."""
        if self._rope is None or self._rope[0] < n_pos or self._rope[1].dtype != dtype:
            pos_1P = torch.arange(n_pos, device=self.w.head_DV.device)[None]
            cos, sin = rope_cos_sin(pos_1P, self.Hd, self.model.config.rope_theta, dtype)
            half = self.Hd // 2
            # x * cos + cat(-x2, x1) * sin  ==  x * cos + roll(x, half) * cat(-sin1, sin2)
            sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
            self._rope = (n_pos, cos[0, 0], sin[0, 0])
        return self._rope[1], self._rope[2]

    def _cache_views(self, cache: KVCache) -> list[tuple[torch.Tensor, ...]]:
        """Each layer's key/value buffers and their (B, S, G, Hd) views for the slot writes,
        made once per cache."""
        if self._views is None or self._views[0] is not cache:
            views = [(k, v, k.transpose(1, 2), v.transpose(1, 2)) for k, v in zip(cache.k_BGSd, cache.v_BGSd)]
            self._views = (cache, views)
        return self._views[1]

    def _norm(self, x_BD: torch.Tensor, w_D: torch.Tensor) -> torch.Tensor:
        if x_BD.dtype == torch.float32:
            return F.rms_norm(x_BD, (x_BD.shape[-1],), w_D, self.eps)
        x32 = x_BD.float()  # the reference RMSNorm, for lower-precision activations
        return w_D * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x_BD.dtype)

    @torch.inference_mode()
    def __call__(self, tokens_B1: torch.Tensor, pos_B1: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B = tokens_B1.shape[0]
        if tokens_B1.shape != (B, 1) or pos_B1.shape != (B, 1):
            raise ValueError(f"FastDecodeStep: one token per row, got {tuple(tokens_B1.shape)}")
        if B != cache.batch_size:
            raise ValueError(f"KVCache: batch of {B} rows, but the cache was built for {cache.batch_size}")
        pos_B = pos_B1[:, 0]
        pos_list = pos_B.tolist()  # a host read, free on CPU
        last = max(pos_list)  # the model's forward checks the same, with the same words
        if last >= self.model.config.max_seq_len:
            raise ValueError(
                f"position {last} is past the model's max_seq_len of {self.model.config.max_seq_len}"
            )
        if last >= cache.max_len:  # a full buffer would wrap onto keys later queries need
            raise ValueError(f"KVCache: position {last} is past the cache's max_len of {cache.max_len}")
        embed_VD = self.model.tok_embeddings.weight
        x_BD = F.embedding(tokens_B1[:, 0], embed_VD)
        cos_PHd, sin_PHd = self._rope_tables(cache.max_len, x_BD.dtype)

        # Once per step for every layer: the slot each row writes, the mask, the rotation.
        S = cache.n_slots
        slot_B = torch.where(pos_B >= 0, pos_B % S, S)
        rows_B = torch.arange(B, device=x_BD.device)
        cache.pos_BS.index_put_((rows_B, slot_B), pos_B)
        # Attend over the slots in use only: with every position >= 0, slot p holds position p
        # until the buffer is full, so slots past the largest position (and the junk slot) are
        # empty. It keeps a cache sized for 256 new tokens from costing full-length attention
        # from the first one.
        n = min(last + 1, S) if min(pos_list) >= 0 else S + 1
        visible_B11S = causal_mask(pos_B1, cache.pos_BS[:, :n], self.window) | (pos_B1 < 0)[:, None, :, None]
        mask_B11S = torch.zeros(visible_B11S.shape, dtype=x_BD.dtype).masked_fill_(~visible_B11S, -torch.inf)
        at_B = pos_B.clamp(min=0)  # padding rows rotate by position 0; their outputs are unused
        cos_Bd, sin_Bd = cos_PHd[at_B], sin_PHd[at_B]

        if self.kernels:
            return self._kernel_layers(x_BD, slot_B, mask_B11S[:, 0, 0], cos_Bd, sin_Bd, cache)
        cos_B1d, sin_B1d = cos_Bd.unsqueeze(1), sin_Bd.unsqueeze(1)
        H, G, Hd = self.H, self.G, self.Hd
        cache_views = self._cache_views(cache)
        for i, lw in enumerate(self.w.layers):
            h_BD = self._norm(x_BD, lw.attention_norm_D)
            qkv_BQ = torch.mm(h_BD, lw.wqkv_DQ)
            qk_BNd = qkv_BQ[:, : (H + G) * Hd].view(B, H + G, Hd)
            qk_BNd = torch.addcmul(qk_BNd * cos_B1d, qk_BNd.roll(Hd // 2, dims=-1), sin_B1d)
            v_BGd = qkv_BQ[:, (H + G) * Hd :].view(B, G, Hd)
            kc_BGSd, vc_BGSd, kc_BSGd, vc_BSGd = cache_views[i]
            kc_BSGd.index_put_((rows_B, slot_B), qk_BNd[:, H:])
            vc_BSGd.index_put_((rows_B, slot_B), v_BGd)
            o_BH1d = F.scaled_dot_product_attention(
                qk_BNd[:, :H].unsqueeze(2),
                kc_BGSd[:, :, :n],
                vc_BGSd[:, :, :n],
                attn_mask=mask_B11S,
                enable_gqa=H != G,
            )
            x_BD = torch.addmm(x_BD, o_BH1d.reshape(B, H * Hd), lw.wo_QD)
            x_BD = self._experts(x_BD, self._norm(x_BD, lw.ffn_norm_D), lw)
        return self._head(self._norm(x_BD, self.w.norm_D))

    def _kernel_layers(self, x_BD, slot_B, mask_BS, cos_Bd, sin_Bd, cache: KVCache) -> torch.Tensor:
        """The layers and the head through ``smoe.cpu_kernels``: two calls per layer."""
        B = x_BD.shape[0]
        x = x_BD.contiguous()
        x_np, slot_np, mask_np = x.numpy(), slot_B.numpy(), mask_BS.contiguous().numpy()
        cos_np, sin_np = cos_Bd.contiguous().numpy(), sin_Bd.contiguous().numpy()
        attn_scratch, route, ff_scratch = self._scratch_for(B)
        cpu_kernels.match_torch_threads()
        kv = self._cache_arrays(cache)
        for (attn, ff), (k_np, v_np) in zip(self._layer_arrays(), kv):
            cpu_kernels.attention(
                x_np, *attn, cos_np, sin_np, k_np, v_np, slot_np, mask_np, self.H, *attn_scratch
            )
            if cpu_kernels.feed_forward(x_np, *ff, self.top_k, False, *route, *ff_scratch):
                self._route_tie(*route)  # as the model: torch.topk on the router's logits
                cpu_kernels.feed_forward(x_np, *ff, self.top_k, True, *route, *ff_scratch)
        h = torch.empty_like(x)
        cpu_kernels.rms_norm(x_np, self.w.norm_D.numpy(), self.eps, h.numpy())
        return self._head(h)

    def _route_tie(self, expert_A: np.ndarray, weight_A: np.ndarray, logits_BE: np.ndarray) -> None:
        """Route with ``torch.topk`` and a softmax over the chosen logits, as the model does:
        for a layer where the kernel found tied logits (which expert torch takes then is its
        own affair)."""
        top_BK, ids_BK = torch.topk(torch.from_numpy(logits_BE), self.top_k, dim=-1)
        expert_A[: ids_BK.numel()] = ids_BK.reshape(-1).numpy()
        weight_A[: ids_BK.numel()] = torch.softmax(top_BK, dim=-1).reshape(-1).numpy()

    def _cache_arrays(self, cache: KVCache) -> list[tuple]:
        """Each layer's key and value buffers as numpy arrays, made once per cache."""
        if self._kv_arrays is None or self._kv_arrays[0] is not cache:
            self._kv_arrays = (cache, [(k.numpy(), v.numpy()) for k, v in zip(cache.k_BGSd, cache.v_BGSd)])
        return self._kv_arrays[1]

    def _layer_arrays(self) -> list[tuple]:
        """Each layer's weights as the numpy arrays ``cpu_kernels.attention`` and
        ``feed_forward`` take, made once per layout (they share the tensors' memory)."""
        if self._arrays is None or self._arrays[0] is not self.w:
            empty = torch.empty(0, self.w.norm_D.shape[0])
            arrays = [
                (
                    (lw.attention_norm_D.numpy(), self.eps, lw.wqkv_DQ.t().numpy(), lw.wo_QD.t().numpy()),
                    (
                        lw.ffn_norm_D.numpy(),
                        self.eps,
                        (empty if lw.gate_DE is None else lw.gate_DE.t()).numpy(),
                        lw.w13_EDF2.transpose(1, 2).numpy(),
                        lw.w2_EDF.numpy(),
                    ),
                )
                for lw in self.w.layers
            ]
            self._arrays = (self.w, arrays)
        return self._arrays[1]

    def _scratch_for(self, B: int) -> tuple:
        """Scratch arrays of ``cpu_kernels.attention`` and ``feed_forward`` for B rows, kept
        per B."""
        if B not in self._scratch:
            lw = self.w.layers[0]
            D, F_ = lw.w2_EDF.shape[1], lw.w2_EDF.shape[2]
            A = B * (self.top_k if lw.gate_DE is not None else 1)
            Q, HHd = lw.wqkv_DQ.shape[1], self.H * self.Hd
            E = 1 if lw.gate_DE is None else lw.gate_DE.shape[1]
            attn, ff = (
                tuple(np.empty(shape, np.float32) for shape in shapes)
                for shapes in [
                    [(B, D), (B, Q), (B, HHd), (B, D)],
                    [(B, D), (A, D), (A, 2 * F_), (A, F_), (A, D)],
                ]
            )
            route = (np.empty(A, np.int64), np.empty(A, np.float32), np.empty((B, E), np.float32))
            self._scratch[B] = (attn, route, ff)
        return self._scratch[B]

    def _head(self, x_BD: torch.Tensor) -> torch.Tensor:
        B = x_BD.shape[0]
        if self.kernels and B <= KERNEL_HEAD_MAX_ROWS:
            out_BV = x_BD.new_empty(B, self.w.head_DV.shape[1])
            cpu_kernels.rows_times_wt(x_BD.contiguous().numpy(), self.w.head_DV.t().numpy(), out_BV.numpy())
            return out_BV
        if B >= ONEDNN_HEAD_MIN_ROWS and x_BD.dtype == torch.float32 and _onednn_linear_available():
            head_DV = self.w.head_DV
            # The copy is stale once the head changes, in place too (``load_state_dict``, an
            # optimizer step): those bump the parameter's version counter (its storage,
            # ``head_DV``, has a counter of its own that they do not touch).
            version = self.model.output.weight._version
            cached = self._head_packed
            if cached is None or cached[0] is not head_DV or cached[1] != version:
                packed = torch.ops.mkldnn._reorder_linear_weight(head_DV.t().contiguous(), B)
                self._head_packed = (head_DV, version, packed)
            return torch.ops.mkldnn._linear_pointwise(x_BD, self._head_packed[2], None, "none", [], "")
        return split_rows.rows_times_w(x_BD, self.w.head_DV)  # one row: on every thread

    def _route(self, h_BD: torch.Tensor, gate_DE: torch.Tensor | None) -> tuple[list, list]:
        """Host lists: each row's chosen experts (best first) and their weights."""
        B = h_BD.shape[0]
        if gate_DE is None:
            return [[0]] * B, [[1.0]] * B
        if h_BD.dtype == torch.float32:
            logits_BE = torch.mm(h_BD, gate_DE)
        else:  # router math in float32 whatever the model dtype, as the model does
            logits_BE = torch.mm(h_BD.float(), gate_DE.float())
        top_BK, ids_BK = torch.topk(logits_BE, self.top_k, dim=-1)
        weights_BK = torch.softmax(top_BK, dim=-1)
        if h_BD.dtype != torch.float32:  # the engines cast the weights to the activations' dtype
            weights_BK = weights_BK.to(h_BD.dtype)
        return ids_BK.tolist(), weights_BK.tolist()

    def _experts(self, x_BD: torch.Tensor, h_BD: torch.Tensor, lw) -> torch.Tensor:
        """x + the mixture of experts on h (one SwiGLU per chosen expert)."""
        ids, weights = self._route(h_BD, lw.gate_DE)
        F_ = lw.w2_EDF.shape[2]
        D = x_BD.shape[1]
        # Products with large experts (not the ``small`` preset's) run on every thread.
        if len(ids) == 1:  # one row: each chosen expert adds straight into the residual
            for e, w in zip(ids[0], weights[0]):
                h13_1F2 = split_rows.rows_times_w(h_BD, lw.w13_E[e])
                g_1F = F.silu(h13_1F2[:, :F_]).mul_(h13_1F2[:, F_:])
                if split_rows.blocks(g_1F, D) > 1:
                    x_BD = torch.add(x_BD, split_rows.rows_times_wt(g_1F, lw.w2_EDF[e]), alpha=w)
                else:
                    x_BD = torch.addmm(x_BD, g_1F, lw.w2t_E[e], alpha=w)
            return x_BD
        # Several rows: group the A assignments by expert (a stable host sort keeps token order
        # within an expert), gather the rows once, one up and one down product per chosen
        # expert on its block of rows, scatter-add back once.
        flat = sorted(
            ((e, b, w) for b, (ids_K, w_K) in enumerate(zip(ids, weights)) for e, w in zip(ids_K, w_K)),
            key=lambda a: a[0],
        )
        row_A = torch.tensor([b for _, b, _ in flat], device=x_BD.device)
        w_A1 = torch.tensor([[w] for _, _, w in flat], dtype=x_BD.dtype, device=x_BD.device)
        x_AD = h_BD.index_select(0, row_A)
        h13_AF2 = x_AD.new_empty(len(flat), 2 * F_)
        o_AD = torch.empty_like(x_AD)
        blocks, s = [], 0
        for e, group in groupby(a[0] for a in flat):
            n = sum(1 for _ in group)
            blocks.append((e, s, s + n))
            s += n
        for e, s, t in blocks:
            split_rows.rows_times_w(x_AD[s:t], lw.w13_E[e], out=h13_AF2[s:t])
        g_AF = F.silu(h13_AF2[:, :F_]).mul_(h13_AF2[:, F_:])
        for e, s, t in blocks:
            if split_rows.blocks(g_AF[s:t], D) > 1:
                split_rows.rows_times_wt(g_AF[s:t], lw.w2_EDF[e], out=o_AD[s:t])
            else:
                torch.mm(g_AF[s:t], lw.w2t_E[e], out=o_AD[s:t])
        return x_BD.index_add_(0, row_A, o_AD.mul_(w_A1))
