"""Text generation (one engine for every caller, a lean decode step, sampling, streaming text) and export."""

from tinyseek.generate.engine import Completion, GenerationEngine, TokenEvent, left_pad
from tinyseek.generate.sampling import Sampling
from tinyseek.generate.streaming import TextStream

__all__ = ["Completion", "GenerationEngine", "Sampling", "TextStream", "TokenEvent", "left_pad"]
