"""Text generation (tinyseek's own batched decode loop, sampling, streaming) and export to Hugging Face folders."""

from tinyseek.generate.decode import decode, decode_stream, left_pad, stopping_criteria
from tinyseek.generate.sampling import Sampling
from tinyseek.generate.streaming import TextStream

__all__ = ["Sampling", "TextStream", "decode", "decode_stream", "left_pad", "stopping_criteria"]
