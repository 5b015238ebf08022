"""tinyseek: a small, fast, correct DeepSeek-style language model and the pipeline that trains it."""

from transformers import AutoConfig, AutoModelForCausalLM

from tinyseek.config import PRESETS, TinySeekConfig
from tinyseek.modeling import TinySeekForCausalLM, TinySeekModel
from tinyseek.report import estimate_flops_per_token, format_parameter_report, parameter_report

AutoConfig.register(TinySeekConfig.model_type, TinySeekConfig, exist_ok=True)
AutoModelForCausalLM.register(TinySeekConfig, TinySeekForCausalLM, exist_ok=True)

__all__ = [
    "PRESETS",
    "TinySeekConfig",
    "TinySeekForCausalLM",
    "TinySeekModel",
    "estimate_flops_per_token",
    "format_parameter_report",
    "parameter_report",
]
