"""Router auxiliary losses: the Switch / Mixtral load-balancing loss and the ST-MoE z-loss.

Legend: L layers, T tokens (batch and sequence flattened), E experts, K experts chosen per token.

Both take ``router_logits``: a list with one float32 ``[T, E]`` tensor per MoE layer (the
``RouterOutput.logits_TE`` the model returns with ``return_router=True``), and an optional
``mask_T`` (1 = real token, 0 = padding; any shape that flattens to T, e.g. ``[B, S]``).

Load-balancing convention (Switch eq. 4-6, as transformers' ``load_balancing_loss_func``)::

    f_e = (number of top-K assignments to expert e) / T      # sums to K, not 1
    P_e = mean over tokens of softmax(logits)_e                # sums to 1
    loss = E * sum_e f_e * P_e

so perfectly balanced routing (f_e = K/E, P_e = 1/E) gives exactly ``K`` (top_k), and the
worst case (all tokens to the same K experts with probability 1) gives ``E``. Only ``P``
carries a gradient: the top-K counts are piecewise constant.
"""

from __future__ import annotations

import torch


def _flat_mask(mask_T: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor | None:
    if mask_T is None:
        return None
    mask_T = mask_T.reshape(-1).to(device=device, dtype=torch.float32)
    if mask_T.numel() != T:
        raise ValueError(f"mask has {mask_T.numel()} entries but the router logits have {T} tokens")
    if not mask_T.sum() > 0:
        raise ValueError("mask selects no tokens: the router losses are undefined on an empty batch")
    return mask_T


def _check(router_logits: list[torch.Tensor]) -> None:
    if len(router_logits) == 0:
        raise ValueError("router_logits is empty: the model has no MoE layers to balance")
    shapes = {tuple(x.shape) for x in router_logits}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"router_logits must be [T, E] tensors of one shape, got shapes {sorted(shapes)}")


def _balance_sums(
    logits_TE: torch.Tensor, top_k: int, mask_T: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked sums for one layer: (assignments per expert [E], probability per expert [E], rows)."""
    E = logits_TE.shape[-1]
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    expert_ids_TK = torch.topk(probs_TE, top_k, dim=-1).indices
    ones_TK = torch.ones(expert_ids_TK.shape, dtype=torch.float32, device=logits_TE.device)
    if mask_T is not None:
        ones_TK = ones_TK * mask_T[:, None]
        probs_TE = probs_TE * mask_T[:, None]
        rows = mask_T.sum()
    else:
        rows = torch.tensor(float(logits_TE.shape[0]), device=logits_TE.device)
    # Counts of 1.0 are exact in float32, so the scatter order cannot change the result.
    count_E = torch.zeros(E, dtype=torch.float32, device=logits_TE.device)
    count_E = count_E.scatter_add(0, expert_ids_TK.reshape(-1), ones_TK.reshape(-1))
    return count_E, probs_TE.sum(dim=0), rows


def load_balancing_loss(
    router_logits: list[torch.Tensor],
    top_k: int,
    mask_T: torch.Tensor | None = None,
    per_layer: bool = False,
) -> torch.Tensor:
    """Switch load-balancing loss; 1 x top_k at perfect balance (see the module docstring).

    ``per_layer=False`` pools all layers' tokens before forming f and P (transformers'
    ``load_balancing_loss_func``, which concatenates the layers). ``per_layer=True`` balances
    each layer on its own and averages the L losses, which keeps the same scale (K at balance)
    but does not let one layer's imbalance be hidden by another's opposite imbalance.
    """
    _check(router_logits)
    T, E = router_logits[0].shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, {E}], got {top_k}")
    mask_T = _flat_mask(mask_T, T, router_logits[0].device)
    sums = [_balance_sums(logits_TE, top_k, mask_T) for logits_TE in router_logits]
    if per_layer:
        losses_L = [E * torch.sum((c / n) * (p / n)) for c, p, n in sums]
        return torch.stack(losses_L).mean()
    count_E = torch.stack([c for c, _, _ in sums]).sum(0)
    prob_E = torch.stack([p for _, p, _ in sums]).sum(0)
    rows = len(sums) * sums[0][2]
    return E * torch.sum((count_E / rows) * (prob_E / rows))


def router_z_loss(router_logits: list[torch.Tensor], mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens (and layers) of logsumexp(logits)^2.

    It keeps router logits small, so the float32 softmax stays well conditioned; all-zero
    logits give exactly (ln E)^2.
    """
    _check(router_logits)
    T = router_logits[0].shape[0]
    mask_T = _flat_mask(mask_T, T, router_logits[0].device)
    z_LT = torch.stack([torch.logsumexp(x.float(), dim=-1) ** 2 for x in router_logits])
    if mask_T is None:
        return z_LT.mean()
    return (z_LT * mask_T).sum() / (len(router_logits) * mask_T.sum())
