"""Start a run from a model checkpoint (``smoe train --init DIR``), e.g. an upcycled one.

A checkpoint directory (Hugging Face ``config.json`` or Mistral ``params.json``) stores the
architecture but not the runtime choices of ``ModelConfig`` (dispatch engine, capacity factor,
router jitter): loading one gives their defaults. So when a run config is given as well, only
the architecture must agree with the checkpoint, and the run's runtime choices are applied::

    checkpoint  dim=32 ... router_jitter=0.0 (not stored)
    run config  dim=32 ... router_jitter=0.1
    run         the checkpoint's weights, router_jitter=0.1
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from smoe.checkpoint import load_model
from smoe.config import RUNTIME_FIELDS, ModelConfig
from smoe.model.transformer import Transformer


def architecture_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Names of the fields other than ``RUNTIME_FIELDS`` on which ``a`` and ``b`` differ."""
    names = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in RUNTIME_FIELDS]
    return [n for n in names if getattr(a, n) != getattr(b, n)]


def load_init_model(
    path: str | Path,
    run_cfg: ModelConfig | None = None,
    source: str | None = None,
    dispatch: str | None = None,
) -> Transformer:
    """The float32 model in checkpoint directory ``path``, to train from.

    With ``run_cfg`` (the model section of the run file ``source``) its architecture must equal
    the checkpoint's, and the model gets ``run_cfg``'s runtime fields. Without it the model has
    the checkpoint's config, with ``dispatch`` if given.
    """
    model = load_model(path, dtype="float32", dispatch=dispatch if run_cfg is None else None)
    if run_cfg is None or model.config == run_cfg:
        return model
    diff = architecture_differences(model.config, run_cfg)
    if diff:
        both = ", ".join(f"{n}={getattr(model.config, n)!r} vs {getattr(run_cfg, n)!r}" for n in diff)
        raise ValueError(
            f"--init {path}: the checkpoint's architecture differs from the model section of "
            f"{source or 'the run config'} (checkpoint vs config: {both}); make the model section match the checkpoint "
            f"(only {', '.join(RUNTIME_FIELDS)} may differ: checkpoints do not store them)"
        )
    # The modules read their runtime fields (engine, jitter, capacity) when built, so build the
    # model again with the run's config and move the loaded tensors into it (no copy).
    with torch.device("meta"):
        rebuilt = Transformer(run_cfg)
    rebuilt.load_state_dict(model.state_dict(), strict=True, assign=True)
    if run_cfg.tie_embeddings:  # assign replaced the shared parameter by two; share it again
        rebuilt.output.weight = rebuilt.tok_embeddings.weight
    return rebuilt.eval()
