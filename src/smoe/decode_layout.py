"""The CPU decode layout: a model's weights re-stored, in place and with the same values, so that
a single-token step needs few, fast matrix products.

Legend: D model dim, H query heads, G kv heads, Hd head dim, Q = (H + 2G) * Hd fused q/k/v
outputs, E experts (1 for a dense feed-forward), F expert hidden dim, V vocabulary.

Two changes, both invisible to the model's own ``forward`` (its parameters become views):

- **Transposed storage, float32 on torch's products only.** With MKL on this team's AMD CPUs, one row times a
  (in, out) contiguous matrix is several times faster than ``F.linear`` with the usual (out, in)
  row-major weight when out > in (4.5x for the 256 x 32000 output head, 1.8x for an expert's
  256 x 1408 up projection; docs/benchmarks.md). So those matrices (q/k/v, the up projections,
  the head, wo and the router) are stored as (in, out) and the parameter is its transposed view.
  The down projection w2 (704 -> 256 in ``small``) is the other way round: there the usual
  layout was 1.2-1.45x faster, so it stays as it is. In bfloat16 and float16 it is the opposite
  everywhere: on an AVX2 CPU the (in, out) layout made the head's 1-row product 4.9x slower and
  an expert's up projection 3.8x slower than the usual layout, and decoding the ``small`` preset
  4.6x slower than in float32 (docs/benchmarks.md). So 16-bit weights keep their (out, in)
  storage, and the laid-out tensors below are transposed views of it. The numba kernels
  (``smoe.cpu_kernels``, used for float32 when numba is installed) read each output's weights
  as one contiguous row, so with them float32 keeps the (out, in) storage too; ``transpose``
  chooses explicitly.
- **Fusion.** wq, wk and wv become column blocks of one (D, Q) matrix, and each expert's w1 and
  w3 column blocks of one (D, 2F) matrix, so attention's input projection is one product and
  each chosen expert's up projection another. Example, D = 2, F = 1, one expert::

      w13_EDF2[0] = [[w1[0,0], w3[0,0]],        w1 = w13_EDF2[..., :F].transpose(1, 2)
                     [w1[0,1], w3[0,1]]]        w3 = w13_EDF2[..., F:].transpose(1, 2)

Training, prefill and saving still work on the views, at the speed of this layout. Anything
that re-creates the parameters (``model.to(dtype)``, ``load_state_dict(assign=True)``) ends
the aliasing; ``DecodeWeights.is_current`` detects that, and ``apply_decode_layout`` then
lays the model out again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from smoe import cpu_kernels
from smoe.model.moe import MoE

_ATTR = "_smoe_decode_weights"


@dataclass
class DecodeLayer:
    attention_norm_D: torch.Tensor
    ffn_norm_D: torch.Tensor
    wqkv_DQ: torch.Tensor  # columns: q heads, then k heads, then v heads
    wo_QD: torch.Tensor  # (H * Hd, D)
    gate_DE: torch.Tensor | None  # router weight; None for a dense feed-forward
    w13_EDF2: torch.Tensor  # columns [:F] are w1, [F:] are w3
    w2_EDF: torch.Tensor  # left as the model stores it
    # Per-expert views, made once: indexing a Python list costs no tensor op per step.
    w13_E: list[torch.Tensor] = field(init=False, repr=False)  # (D, 2F) each
    w2t_E: list[torch.Tensor] = field(init=False, repr=False)  # (F, D) views of w2's transpose

    def __post_init__(self) -> None:
        self.w13_E = list(self.w13_EDF2.unbind(0))
        self.w2t_E = [w.t() for w in self.w2_EDF.unbind(0)]


@dataclass
class DecodeWeights:
    """The laid-out tensors; the model's parameters are views of them."""

    layers: list[DecodeLayer]
    norm_D: torch.Tensor
    head_DV: torch.Tensor
    transposed: bool  # whether the (in, out) matrices are stored contiguous
    # (module, parameter name, the view it must be) for every re-stored parameter
    views: list[tuple[nn.Module, str, torch.Tensor]] = field(default_factory=list, repr=False)

    def is_current(self) -> bool:
        """Whether every parameter still aliases this layout (nothing replaced or re-created
        them). Looks the parameters up by name: ``load_state_dict(assign=True)`` swaps the
        objects."""
        for module, name, v in self.views:
            p = getattr(module, name)
            if p.data_ptr() != v.data_ptr() or p.stride() != v.stride() or p.shape != v.shape:
                return False
        return True


def _point(views: list, module: nn.Module, name: str, view: torch.Tensor) -> None:
    """Make parameter ``module.name`` a view of the laid-out storage (same values: ``view``
    was built from it)."""
    p = getattr(module, name)
    if view.shape != p.shape:
        raise AssertionError(f"decode layout: view {tuple(view.shape)} for {name} {tuple(p.shape)}")
    p.data = view
    views.append((module, name, view))


def _transposed(views: list, module: nn.Module, name: str, restore: bool) -> torch.Tensor:
    """The (..., in, out) matrix of a (..., out, in) parameter: stored contiguous that way if
    ``restore`` (the parameter becomes its transposed view), else a view of the parameter."""
    p = getattr(module, name).detach()
    t = p.transpose(-2, -1).contiguous() if restore else p.contiguous()
    _point(views, module, name, t.transpose(-2, -1) if restore else t)
    return t if restore else t.transpose(-2, -1)


def _kept(views: list, module: nn.Module, name: str = "weight") -> torch.Tensor:
    """Use parameter ``module.name`` as it is (a norm's vector), tracked like the views."""
    t = getattr(module, name).detach()
    views.append((module, name, t))
    return t


@torch.no_grad()
def _layer(block: nn.Module, views: list, restore: bool) -> DecodeLayer:
    """``restore``: store the (in, out) matrices contiguous (float32), else keep (out, in)."""
    a, ff = block.attention, block.feed_forward
    nq, nk = a.wq.weight.shape[0], a.wk.weight.shape[0]
    wqkv_QD = torch.cat([a.wq.weight, a.wk.weight, a.wv.weight], dim=0)
    wqkv_DQ = wqkv_QD.t().contiguous() if restore else wqkv_QD.t()
    _point(views, a.wq, "weight", wqkv_DQ[:, :nq].t())
    _point(views, a.wk, "weight", wqkv_DQ[:, nq : nq + nk].t())
    _point(views, a.wv, "weight", wqkv_DQ[:, nq + nk :].t())
    wo_QD = _transposed(views, a.wo, "weight", restore)
    if isinstance(ff, MoE):  # (module, name) of w1, w2, w3
        w1, w2, w3 = (ff, "w1"), (ff, "w2"), (ff, "w3")
    else:  # dense SwiGLU: one "expert" that every token takes with weight 1
        w1, w2, w3 = (ff.w1, "weight"), (ff.w2, "weight"), (ff.w3, "weight")
    w1_EFD, w3_EFD = getattr(*w1), getattr(*w3)
    F_ = w1_EFD.shape[-2]
    w13_EDF2 = torch.cat([w1_EFD, w3_EFD], dim=-2).transpose(-2, -1)
    if restore:
        w13_EDF2 = w13_EDF2.contiguous()
    _point(views, *w1, w13_EDF2[..., :F_].transpose(-2, -1))
    _point(views, *w3, w13_EDF2[..., F_:].transpose(-2, -1))
    w2_EDF = getattr(*w2).detach().contiguous()  # (out, in): faster for this narrow product
    _point(views, *w2, w2_EDF)
    gate_DE = _transposed(views, ff.gate, "weight", restore) if isinstance(ff, MoE) else None
    if gate_DE is None:
        w13_EDF2, w2_EDF = w13_EDF2.unsqueeze(0), w2_EDF.unsqueeze(0)
    return DecodeLayer(
        _kept(views, block.attention_norm),
        _kept(views, block.ffn_norm),
        wqkv_DQ,
        wo_QD,
        gate_DE,
        w13_EDF2,
        w2_EDF,
    )


@torch.no_grad()
def apply_decode_layout(model: nn.Module, transpose: bool | None = None) -> DecodeWeights:
    """Lay ``model`` out for CPU decoding (in place, same values) and return the laid-out tensors.

    ``transpose``: store the (in, out) matrices contiguous; by default for float32 weights when
    the numba kernels are not available. Idempotent: a model already laid out that way (and not
    re-created since) returns its existing ``DecodeWeights``.
    """
    if transpose is None:  # see "Transposed storage" above
        transpose = model.output.weight.dtype == torch.float32 and not cpu_kernels.available()
    existing = getattr(model, _ATTR, None)
    if existing is not None and existing.is_current() and existing.transposed == transpose:
        return existing
    views: list[tuple[nn.Module, str, torch.Tensor]] = []
    layers = [_layer(block, views, transpose) for block in model.layers]
    head_DV = _transposed(views, model.output, "weight", transpose)  # tied: the embedding is this too
    weights = DecodeWeights(layers, _kept(views, model.norm), head_DV, transpose, views)
    object.__setattr__(model, _ATTR, weights)  # plain attribute, not a submodule or state
    return weights
