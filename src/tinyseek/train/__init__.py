"""The trainer: configuration, loop, checkpoints, metrics and plots (`tinyseek train`, `python train.py`)."""

from tinyseek.train.checkpoint import latest_checkpoint, load_model_and_tokenizer
from tinyseek.train.config import TrainConfig, load_config

__all__ = ["TrainConfig", "latest_checkpoint", "load_config", "load_model_and_tokenizer"]
