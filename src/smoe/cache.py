"""The key/value cache: preallocated static buffers, owned by the caller and passed to the model.

Legend: L layers, B batch rows, G kv heads, S cache slots, T tokens in this call, Hd head dim.

Slots are indexed by position: position p of a row lives in slot ``p mod S``. Without a
sliding window (or when the window covers ``max_len``), S = ``max_len`` and the mapping is the
identity. With a window W < ``max_len`` the buffer is a rolling one of S = W slots, so memory is
bounded by the window, not by the sequence. Example, W = 4, after positions 0..5 of one row::

    slot:      0  1  2  3 | junk
    position:  4  5  2  3 |  -1

One extra "junk" slot (index S) is the write target of padding tokens (negative positions, see
``smoe.generate``); its position stays -1, so no query ever sees it. Every slot position is kept
in ``pos_BS`` and the attention mask is computed from it, so one mask serves full, rolling and
left-padded batches alike.

Chunked prefill into a rolling buffer. A chunk of T > 1 tokens at positions p..p+T-1 overwrites
slot of position p+j-W with position p+j; but query p+i (i < j) still needs key p+j-W. So for
such chunks the layer attends over [the cache as it was before this call] + [the new chunk]
(S + 1 + T keys), and only then writes the chunk's last min(T, W) tokens into the buffer.
Single-token decode steps write first and attend over the buffer: the key they overwrite
(position p-W) is just outside their window.

The call protocol (what ``smoe.model.transformer.Transformer.forward`` does): ``mask(pos_BT)``
once per forward, before any layer, then ``update(layer, ...)`` once per layer. ``mask`` records
the new slot positions; ``update`` writes each layer's keys and values. No method syncs with the
host, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from smoe.config import ModelConfig
from smoe.model.layers import causal_mask


class KVCache:
    """Static key/value buffers for ``batch_size`` rows of at most ``max_len`` positions.

    The caller must keep every position below ``max_len`` (``smoe.generate`` checks this on the
    host before it starts; on the CPU the model's forward raises); a full (non-rolling) buffer would
    otherwise wrap and overwrite.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"KVCache: batch_size and max_len must be positive, got {batch_size}, {max_len}")
        self.window = cfg.sliding_window
        self.rolling = self.window is not None and self.window < max_len
        self.n_slots = self.window if self.rolling else max_len  # S, not counting the junk slot
        self.max_len, self.batch_size = max_len, batch_size
        shape = (batch_size, cfg.n_kv_heads, self.n_slots + 1, cfg.head_dim)
        # Zeros, not empty: masked slots still enter SDPA's weighted sum (with weight 0), and
        # 0 * NaN from uninitialised memory would poison real rows.
        self.k_BGSd = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v_BGSd = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos_BS = torch.full((batch_size, self.n_slots + 1), -1, device=device, dtype=torch.long)
        # Set by mask() for the update() calls of the same forward.
        self._write_idx_BGTd: torch.Tensor | None = None
        self._skip = 0  # leading chunk tokens not written (rolling buffer, T > S)
        self._concat = False

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int) -> KVCache:
        """A cache on the model's device and in its dtype."""
        p = model.tok_embeddings.weight
        return cls(model.config, batch_size, max_len, device=p.device, dtype=p.dtype)

    def matches(self, x: torch.Tensor) -> bool:
        """Whether this cache holds keys and values of ``x``'s dtype on ``x``'s device."""
        k = self.k_BGSd[0]
        return k.dtype == x.dtype and k.device == x.device

    def reset(self) -> None:
        """Forget every position (the buffers keep their finite old values, which are masked)."""
        self.pos_BS.fill_(-1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_BGSd + self.v_BGSd)

    def mask(self, pos_BT: torch.Tensor) -> torch.Tensor:
        """Boolean (B, 1, T, keys) mask for queries at ``pos_BT``; records their slots.

        Negative positions are padding: they are written to the junk slot and their query rows
        see every key, so that SDPA never gets a fully masked row (which would give NaN).
        """
        B, T = pos_BT.shape
        if B != self.batch_size:
            raise ValueError(f"KVCache: batch of {B} rows, but the cache was built for {self.batch_size}")
        S = self.n_slots
        self._concat = self.rolling and T > 1
        self._skip = max(0, T - S) if self._concat else 0
        written_BT = pos_BT[:, self._skip :]
        slot_BT = torch.where(written_BT >= 0, written_BT % S, S)
        if self._concat:
            k_pos_BS = torch.cat([self.pos_BS, pos_BT], dim=1)  # keys before the write + chunk
            self.pos_BS.scatter_(1, slot_BT, written_BT)
        else:
            self.pos_BS.scatter_(1, slot_BT, written_BT)
            k_pos_BS = self.pos_BS
        G, Hd = self.k_BGSd[0].shape[1], self.k_BGSd[0].shape[3]
        self._write_idx_BGTd = slot_BT[:, None, :, None].expand(B, G, slot_BT.shape[1], Hd)
        mask = causal_mask(pos_BT, k_pos_BS, self.window)
        return mask | (pos_BT < 0)[:, None, :, None]

    def update(
        self, layer: int, pos_BT: torch.Tensor, k_BGTd: torch.Tensor, v_BGTd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this layer's new keys/values; return the keys/values to attend over."""
        if self._write_idx_BGTd is None:
            raise RuntimeError("KVCache.update called before KVCache.mask in this forward")
        kc_BGSd, vc_BGSd = self.k_BGSd[layer], self.v_BGSd[layer]
        k_new, v_new = k_BGTd, v_BGTd
        if self._skip:
            k_new, v_new = k_BGTd[:, :, self._skip :], v_BGTd[:, :, self._skip :]
        if self._concat:
            k_all = torch.cat([kc_BGSd, k_BGTd], dim=2)  # copies the old slots before the write
            v_all = torch.cat([vc_BGSd, v_BGTd], dim=2)
            kc_BGSd.scatter_(2, self._write_idx_BGTd, k_new)
            vc_BGSd.scatter_(2, self._write_idx_BGTd, v_new)
            return k_all, v_all
        kc_BGSd.scatter_(2, self._write_idx_BGTd, k_new)
        vc_BGSd.scatter_(2, self._write_idx_BGTd, v_new)
        return kc_BGSd, vc_BGSd
