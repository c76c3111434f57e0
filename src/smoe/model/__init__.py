from smoe.model.moe import FeedForward, MoE, Router, RouterOutput
from smoe.model.transformer import Block, Transformer, build_model, init_weights

__all__ = [
    "Block",
    "FeedForward",
    "MoE",
    "Router",
    "RouterOutput",
    "Transformer",
    "build_model",
    "init_weights",
]
