"""smoe: sparse mixture-of-experts language models of the Mixtral family."""

from smoe.checkpoint.files import CheckpointError
from smoe.checkpoint.load import load_config, load_model, save_model
from smoe.config import ConfigError, ModelConfig
from smoe.model.transformer import Transformer, build_model, init_weights
from smoe.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "Tokenizer",
    "Transformer",
    "build_model",
    "init_weights",
    "load_config",
    "load_model",
    "load_tokenizer",
    "save_model",
]
__version__ = "0.1.0"
