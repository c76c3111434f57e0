from smoe.checkpoint.files import CheckpointError
from smoe.checkpoint.load import load_config, load_model, parse_dtype, save_model

__all__ = ["CheckpointError", "load_config", "load_model", "parse_dtype", "save_model"]
