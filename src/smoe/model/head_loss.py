"""Output head and cross-entropy in one pass over row chunks, without (N, V) logits.

Legend: N rows (tokens), D model dim, V vocabulary, C rows in a chunk.

``F.cross_entropy(F.linear(h_ND, w_VD), targets_N)`` keeps the (N, V) logits, the (N, V)
log-probabilities and, in backward, an (N, V) gradient: at batch 8 x 2048 and V = 32000 that is
2 GB of float32 each. Its memory passes over them can cost more than the head's products: in
one profiled CPU training step of the ``small`` preset (8 x 256 tokens) log-softmax took 143 ms
and its backward 352 ms, against 1.49 s for all of the step's matrix products; the step with
this module is 1.7-1.85x faster than the unfused one (``docs/benchmarks.md``).

``linear_cross_entropy`` instead takes C rows at a time: their logits, then in place the
softmax (on CPU torch's one-pass row kernel; elsewhere max, exp, sum and scale), each row's
loss, and, when a gradient is wanted, the logits' gradient ``softmax - onehot`` turned at once
into the input's and weight's gradients (two products), already scaled for the mean. Backward
with an upstream gradient of 1 (the loss itself) returns the stored gradients; another one
scales them. Peak memory is one (C, V) buffer, reused by every chunk, plus the (V, D) weight
gradient.

Example (N = 3, V = 4, one row ignored):

    >>> h, w = torch.randn(3, 2), torch.randn(4, 2)
    >>> t = torch.tensor([1, -100, 3])
    >>> ref = F.cross_entropy(h @ w.T, t, ignore_index=-100)
    >>> torch.allclose(linear_cross_entropy(h, w, t), ref)
    True

The mean is over the rows whose target is not ``ignore_index`` (0 if there are none, with zero
gradients; ``F.cross_entropy`` gives NaN). Under autocast the two inputs are cast to the
autocast dtype as ``F.linear`` would be, and the softmax and loss are computed in float32.
Backward with an upstream gradient of 1 hands out the stored gradient tensors themselves: a
caller that changes a returned gradient in place (``torch.autograd.grad`` with
``retain_graph=True``, then ``g.mul_(...)``) gets autograd's in-place error on the next
backward, as with any saved tensor.
"""

from __future__ import annotations

import contextlib

import torch

# Rows per chunk = CHUNK_ELEMENTS // V. On CPU, 2**24 float32 logits (64 MB; 524 rows at
# V = 32000) was the fastest of 128-2048 rows for 2048 x 256 -> 32000: the elementwise passes
# want small chunks, the three products want many rows. Accelerators have memory to spare and
# want big products: 2**27 (512 MB; 4194 rows).
CHUNK_ELEMENTS = {"cpu": 2**24}
CHUNK_ELEMENTS_DEFAULT = 2**27


def chunk_rows(n_vocab: int, device: torch.device) -> int:
    return max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS_DEFAULT) // n_vocab)


def _softmax_and_loss_(logits_CV: torch.Tensor, t_C: torch.Tensor) -> torch.Tensor:
    """Turn float32 logits into their softmax in place; return each row's -log p(target).
    ``t_C`` must be valid indices (ignored rows are dealt with by the caller). Five passes over
    the chunk, each a plain elementwise or reduction kernel: the form for accelerators, where
    such passes are cheap."""
    target_logit_C = logits_CV.gather(1, t_C[:, None])[:, 0]
    max_C1 = logits_CV.amax(dim=-1, keepdim=True)
    sum_C1 = logits_CV.sub_(max_C1).exp_().sum(dim=-1, keepdim=True)
    logits_CV.div_(sum_C1)
    return sum_C1[:, 0].log() + max_C1[:, 0] - target_logit_C


def _softmax_and_loss_cpu_(
    logits_CV: torch.Tensor, t_C: torch.Tensor, valid_C: torch.Tensor, h_CD: torch.Tensor, w_VD: torch.Tensor
) -> torch.Tensor:
    """``_softmax_and_loss_`` in one pass: torch's CPU softmax takes a row at a time (max, exp
    and sum, scale, while the row sits in cache), written in place; the loss is then -log of the
    target's probability. That loses accuracy only where the probability leaves float32's normal
    range (a target logit ~87 below the log-sum-exp); such valid rows, rare, are computed again
    from their logits (``h_CD``, ``w_VD``) with a log-sum-exp. Measured on a 524 x 32000 chunk,
    2 threads: ~10 ms against ~20 ms for the five passes. Torch's vectorised softmax rounds a
    little more than the five passes (loss error ~1e-5 against ~3e-6 at logits of std 4; the
    same as ``F.cross_entropy`` in float32)."""
    torch.softmax(logits_CV, dim=-1, out=logits_CV)  # in place: the CPU kernel reads a row before writing it
    p_C = logits_CV.gather(1, t_C[:, None])[:, 0]
    loss_C = p_C.log().neg_()
    tiny_C = (p_C < _TINY_PROBABILITY) & valid_C  # ignored rows' losses are dropped anyway
    if tiny_C.any():  # a host read, free on CPU
        rows_R = tiny_C.nonzero()[:, 0]
        logits_RV = torch.mm(h_CD[rows_R], w_VD.t()).float()
        target_R = logits_RV.gather(1, t_C[rows_R, None])[:, 0]
        loss_C[rows_R] = torch.logsumexp(logits_RV, dim=-1) - target_R
    return loss_C


# Below this a float32 probability may have lost precision (smallest normal: 1.2e-38).
_TINY_PROBABILITY = 1e-30


def _chunk_softmax_losses(h_ND, w_VD, t_N, valid_N, rows):
    """For each chunk of ``rows`` rows: (start, the float32 (C, V) softmax, the per-row loss
    -log p(target), the chunk's buffer in h's dtype). The buffers are reused: the caller must
    be done with a chunk before asking for the next.

    One logits buffer serves all chunks (plus a float32 one when the product is 16-bit): a
    fresh (C, V) tensor per chunk is a fresh mapping on CPU, and its first-touch page faults
    cost ~25 ms per 64 MB chunk here, a third of the product's own time."""
    N, V = h_ND.shape[0], w_VD.shape[0]
    buf_CV = torch.empty((min(rows, N), V), dtype=h_ND.dtype, device=h_ND.device)
    in_f32 = h_ND.dtype == torch.float32
    f32_CV = buf_CV if in_f32 else torch.empty_like(buf_CV, dtype=torch.float32)
    # The one-pass form reads the tiny rows on the host: CPU only, and not while being traced.
    one_pass = h_ND.device.type == "cpu" and not torch.compiler.is_compiling()
    for s in range(0, N, rows):
        h_CD, t_C = h_ND[s : s + rows], t_N[s : s + rows]
        logits_CV = torch.mm(h_CD, w_VD.t(), out=buf_CV[: h_CD.shape[0]])
        p_CV = f32_CV[: h_CD.shape[0]]
        if not in_f32:
            p_CV.copy_(logits_CV)
        if one_pass:
            loss_C = _softmax_and_loss_cpu_(p_CV, t_C, valid_N[s : s + rows], h_CD, w_VD)
        else:
            loss_C = _softmax_and_loss_(p_CV, t_C)
        yield s, p_CV, loss_C, logits_CV


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss of the valid rows, summed and multiplied by ``scale`` (1 for the sum, 1 / count for
    the mean); the gradients are made in forward (see the module doc), with ``scale`` applied
    to their (C, D) factors so that backward with an upstream gradient of 1 has nothing to do."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, t_N, valid_N, scale, rows):
        grad_h_ND = torch.empty_like(h_ND)
        grad_w_VD = None  # float32, written by the first chunk's product (no zero fill)
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        for s, p_CV, loss_C, buf_CV in _chunk_softmax_losses(h_ND, w_VD, t_N, valid_N, rows):
            h_CD, t_C, valid_C = h_ND[s : s + rows], t_N[s : s + rows], valid_N[s : s + rows]
            total += loss_C.masked_fill_(~valid_C, 0.0).sum()
            # d(sum of losses)/d(logits) = softmax - onehot(target) on valid rows. Ignored rows
            # keep their softmax here; zeroing their h rows (for the weight gradient) and their
            # input-gradient rows afterwards costs (C, D) instead of another (C, V) pass.
            p_CV.scatter_add_(1, t_C[:, None], valid_C[:, None].to(p_CV.dtype).neg())
            g_CV = p_CV if p_CV.dtype == h_ND.dtype else buf_CV.copy_(p_CV)
            keep_C1 = (valid_C[:, None] * scale).to(h_ND.dtype)
            torch.mm(g_CV, w_VD, out=grad_h_ND[s : s + rows]).mul_(keep_C1)
            if grad_w_VD is None:
                grad_w_VD = torch.mm(g_CV.t(), h_CD * keep_C1).float()
            elif w_VD.dtype == torch.float32:
                grad_w_VD.addmm_(g_CV.t(), h_CD * keep_C1)
            else:  # accumulate the weight gradient in float32 across chunks
                grad_w_VD += torch.mm(g_CV.t(), h_CD * keep_C1).float()
        if grad_w_VD is None:  # no rows
            grad_w_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device)
        ctx.save_for_backward(grad_h_ND, grad_w_VD.to(w_VD.dtype))
        return total * scale

    @staticmethod
    def backward(ctx, grad_total):
        grad_h_ND, grad_w_VD = ctx.saved_tensors
        if grad_total.device.type == "cpu" and grad_total.item() == 1.0:
            # The usual case (the loss itself, one micro-batch): no copies. Reading the value is
            # free on CPU; the (V, D) scaled copy would cost a fresh 32 MB allocation at
            # V = 32000, D = 256.
            return grad_h_ND, grad_w_VD, None, None, None, None
        g = grad_total.to(grad_h_ND.dtype)
        return grad_h_ND * g, grad_w_VD * g.to(grad_w_VD.dtype), None, None, None, None


@torch.no_grad()
def _loss_sum(h_ND, w_VD, t_N, valid_N, rows) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
    for s, _, loss_C, _ in _chunk_softmax_losses(h_ND, w_VD, t_N, valid_N, rows):
        total += loss_C.masked_fill_(~valid_N[s : s + rows], 0.0).sum()
    return total


def linear_cross_entropy(
    h_ND: torch.Tensor,
    w_VD: torch.Tensor,
    targets_N: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    rows: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(h_ND, w_VD), targets_N, ignore_index=..., reduction=...)``
    for reduction "mean" or "sum", computed ``rows`` rows at a time (default: ``chunk_rows``).
    Unlike torch, "mean" over targets that are all ``ignore_index`` is 0, not NaN."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if (
        h_ND.ndim != 2
        or w_VD.ndim != 2
        or h_ND.shape[1] != w_VD.shape[1]
        or targets_N.shape != h_ND.shape[:1]
    ):
        raise ValueError(
            f"linear_cross_entropy: expected h (N, D), w (V, D), targets (N,); got "
            f"{tuple(h_ND.shape)}, {tuple(w_VD.shape)}, {tuple(targets_N.shape)}"
        )
    device = h_ND.device
    has_autocast = torch.amp.is_autocast_available(device.type)  # not e.g. for meta tensors
    if has_autocast and torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        h_ND, w_VD = h_ND.to(dtype), w_VD.to(dtype)
    elif h_ND.dtype != w_VD.dtype:
        raise ValueError(f"linear_cross_entropy: h is {h_ND.dtype} but w is {w_VD.dtype}")
    if rows is not None and rows < 1:
        raise ValueError(f"linear_cross_entropy: rows must be a positive chunk size, got {rows}")
    valid_N = targets_N != ignore_index
    t_N = targets_N.masked_fill(~valid_N, 0)
    rows = rows or chunk_rows(w_VD.shape[0], device)
    with torch.autocast(device.type, enabled=False) if has_autocast else contextlib.nullcontext():
        # clamp: a batch whose targets are all ignored gives a loss of 0 and zero gradients
        # (torch gives NaN and zero gradients; 0 / 0 here made the gradients NaN too, so one
        # all-padding micro-batch poisoned a whole accumulated step).
        scale = 1.0 / valid_N.sum().clamp(min=1) if reduction == "mean" else torch.ones((), device=device)
        if torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad):
            return _LinearCrossEntropy.apply(h_ND.contiguous(), w_VD, t_N, valid_N, scale, rows)
        return _loss_sum(h_ND, w_VD, t_N, valid_N, rows) * scale
