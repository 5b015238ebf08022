"""tinyseek: a small, fast, correct DeepSeek-style language model and the pipeline that trains it.

Names are imported on first use (`tinyseek.lazy`), so `import tinyseek` and the `tinyseek` command's `--help` stay
instant; `tinyseek.TinySeekConfig`, `tinyseek.hf` and the rest work as if imported here.
"""

import importlib
import sys

from tinyseek.lazy import after_import, is_importing, lazy_exports

__all__ = [
    "PRESETS",
    "TinySeekConfig",
    "TinySeekForCausalLM",
    "TinySeekModel",
    "estimate_flops_per_token",
    "format_parameter_report",
    "parameter_report",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "PRESETS": "tinyseek.config",
        "TinySeekConfig": "tinyseek.config",
        "TinySeekForCausalLM": "tinyseek.modeling",
        "TinySeekModel": "tinyseek.modeling",
        "estimate_flops_per_token": "tinyseek.report",
        "format_parameter_report": "tinyseek.report",
        "parameter_report": "tinyseek.report",
    },
)


def _register_auto_classes() -> None:
    """`import tinyseek` then `AutoModelForCausalLM.from_pretrained(folder)` must work: tinyseek.modeling registers
    the Auto classes when it loads, so it loads as soon as transformers does (and no sooner, to keep the CLI light).
    When transformers is first imported by a tinyseek module, loading the model then could be circular (it may need
    that very module); the model registers itself whenever it loads later."""
    if not any(is_importing(name) for name in list(sys.modules) if name.startswith("tinyseek.")):
        importlib.import_module("tinyseek.modeling")


after_import("transformers", _register_auto_classes)


# Extension points whose owners sit above the module they extend (which therefore cannot import them): the attention
# and feed-forward registries add their configuration checks to tinyseek.config, and the generation engine takes over
# the model's generate(). Each loads as soon as the module it extends has loaded.
after_import("tinyseek.config", lambda: [importlib.import_module(name) for name in ("tinyseek.attention", "tinyseek.moe")])
after_import("tinyseek.modeling", lambda: importlib.import_module("tinyseek.generate.engine"))
