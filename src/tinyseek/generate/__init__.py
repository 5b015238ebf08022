"""Text generation (one engine for every caller, a lean decode step, sampling, streaming text) and export."""

from tinyseek.lazy import lazy_exports

__all__ = ["Completion", "GenerationEngine", "Sampling", "TextStream", "TokenEvent", "left_pad"]

# Imported on first use, so that the command-line parsers in this package load without torch or transformers.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "Completion": "tinyseek.generate.engine",
        "GenerationEngine": "tinyseek.generate.engine",
        "TokenEvent": "tinyseek.generate.engine",
        "left_pad": "tinyseek.generate.engine",
        "Sampling": "tinyseek.generate.sampling",
        "TextStream": "tinyseek.generate.streaming",
    },
)
