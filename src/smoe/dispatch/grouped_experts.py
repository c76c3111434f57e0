"""Expert SwiGLUs through ``torch._grouped_mm`` (exact rows per expert, no padding, no host
read of the counts), with a hand-written backward.

Legend: A sorted rows, D model dim, E experts, F expert hidden dim.

Why a hand-written backward instead of autograd through the three grouped products:
- The weight gradients come from one grouped product each with the rows as the grouped
  reduction dimension (``_grouped_mm(dh1_AF.t(), x_AD, offs)`` -> (E, F, D)), written once,
  zeros for experts without rows.
- Fewer (A, F) temporaries. Every such tensor is large (A = 8192, F = 3584: 117 MB in float32),
  above glibc's mmap threshold, so each fresh one costs page faults on first touch; autograd's
  silu and product backward allocate several more than the four below. Without gradients the
  forward does silu and the product in place (two (A, F) tensors instead of four).
- h1 and h3 are saved; silu(h1) * h3 is recomputed in the backward instead of kept.

Rows past offs[-1] (dropped assignments, sorted last) are never written by grouped_mm: their
output and input-gradient rows hold garbage, which the caller masks (``combine`` masks the
output; the input gradient is masked here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will call a backward: without one the experts work in place."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


def silu_mul_backward(h1_XF: torch.Tensor, h3_XF: torch.Tensor, dg_XF: torch.Tensor):
    """Gradients of g = silu(h1) * h3 given dg, and g itself, with two new tensors of h1's size
    in float32 (three in 16-bit; dg's memory is reused for dh3, so the caller must not need dg
    afterwards; a fresh large tensor costs its page faults on CPU, ~0.4 ms per MB here).
    d silu(h)/dh = sig * (1 + h - silu) = sig + silu - sig * silu, as sig * h = silu."""
    sig_XF = torch.sigmoid(h1_XF)
    silu_XF = h1_XF * sig_XF
    if h1_XF.dtype == torch.float32:  # in sig's memory
        dh1_XF = sig_XF.addcmul_(sig_XF, silu_XF, value=-1).add_(silu_XF).mul_(h3_XF).mul_(dg_XF)
    else:  # 16-bit: the form with fewer roundings (max error 1.3e-2 against 2.1e-2 in bf16)
        dh1_XF = torch.sub(h1_XF, silu_XF).add_(1).mul_(sig_XF).mul_(h3_XF).mul_(dg_XF)
    dh3_XF = dg_XF.mul_(silu_XF)
    return dh1_XF, dh3_XF, silu_XF.mul_(h3_XF)


class GroupedExperts(torch.autograd.Function):
    """x_AD (rows sorted by expert), offs_E (int32 cumulative rows per expert) -> o_AD."""

    @staticmethod
    def forward(ctx, x_AD, w1_EFD, w2_EDF, w3_EFD, offs_E, valid_A1, save: bool):
        h1_AF = _gmm(x_AD, w1_EFD.transpose(-2, -1), offs_E)
        h3_AF = _gmm(x_AD, w3_EFD.transpose(-2, -1), offs_E)
        if save:
            g_AF = F.silu(h1_AF).mul_(h3_AF)
            ctx.save_for_backward(x_AD, w1_EFD, w2_EDF, w3_EFD, offs_E, valid_A1, h1_AF, h3_AF)
        else:
            g_AF = F.silu(h1_AF, inplace=True).mul_(h3_AF)
        return _gmm(g_AF, w2_EDF.transpose(-2, -1), offs_E)

    @staticmethod
    def backward(ctx, do_AD):
        x_AD, w1_EFD, w2_EDF, w3_EFD, offs_E, valid_A1, h1_AF, h3_AF = ctx.saved_tensors
        do_AD = do_AD.contiguous()  # grouped_mm rejects expanded (stride-0) gradients
        dg_AF = _gmm(do_AD, w2_EDF, offs_E)
        dh1_AF, dh3_AF, g_AF = silu_mul_backward(h1_AF, h3_AF, dg_AF)
        need = ctx.needs_input_grad
        dx_AD = dw1 = dw2 = dw3 = None
        if need[0]:
            dx_AD = _gmm(dh1_AF, w1_EFD, offs_E).add_(_gmm(dh3_AF, w3_EFD, offs_E))
            dx_AD = torch.where(valid_A1, dx_AD, 0)
        if need[1]:
            dw1 = _gmm(dh1_AF.t(), x_AD, offs_E)
        if need[2]:
            dw2 = _gmm(do_AD.t(), g_AF, offs_E)
        if need[3]:
            dw3 = _gmm(dh3_AF.t(), x_AD, offs_E)
        return dx_AD, dw1, dw2, dw3, None, None, None
