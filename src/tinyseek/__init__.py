"""tinyseek: a small, fast, correct DeepSeek-style language model and the pipeline that trains it."""

from tinyseek.config import PRESETS, TinySeekConfig

__all__ = ["PRESETS", "TinySeekConfig"]
