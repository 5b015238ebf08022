"""The trainer: configuration, loop, checkpoints, metrics and plots (`tinyseek train`, `python train.py`)."""

from tinyseek.lazy import lazy_exports

__all__ = ["TrainConfig", "latest_checkpoint", "load_config"]

# Imported on first use, so that the command-line parsers in this package load without torch or transformers.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "latest_checkpoint": "tinyseek.train.checkpoint",
        "TrainConfig": "tinyseek.train.config",
        "load_config": "tinyseek.train.config",
    },
)
