"""Turn a training run's checkpoint back into a plain model (for export, sampling, analysis)."""

from __future__ import annotations

from pathlib import Path

import torch

from smoe.config import ModelConfig
from smoe.model.transformer import Transformer
from smoe.train import checkpoint as ckpt


def model_from_run(
    run_dir: str | Path, checkpoint: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> Transformer:
    """The model of ``run_dir``'s newest checkpoint (or of ``checkpoint``), in eval mode."""
    path = Path(checkpoint) if checkpoint is not None else ckpt.latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"{ckpt.checkpoint_dir(run_dir)}: no checkpoint (has the run saved one yet?)")
    state = ckpt.load_checkpoint(path)
    cfg = ModelConfig.from_dict(state["model_config"])
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(state["model"], strict=True, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(dtype).eval()
