"""Parameter counts and a FLOP estimate for MFU (printed by `tinyseek info`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tinyseek.attention import attention_spec
from tinyseek.config import PRESETS, TinySeekConfig
from tinyseek.errors import ConfigError, FileError
from tinyseek.modeling import DecoderLayer, TinySeekForCausalLM


def parameter_report(model: nn.Module) -> dict[str, int]:
    """Total, trainable, embedding, non-embedding and active-per-token parameter counts.

    Embedding counts the input embedding and an untied LM head (a tied one once). Active per token counts what
    one token's forward pass uses: everything except the routed experts it is not sent to (k of n are used) and the
    multi-token-prediction modules, which only training uses.
    """
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    embedding_params = {id(p): p for name, p in model.named_parameters() if "embed_tokens" in name or "lm_head" in name}
    embedding = sum(p.numel() for p in embedding_params.values())
    mtp = getattr(model, "mtp", None)
    mtp_params = sum(p.numel() for p in mtp.parameters()) if mtp is not None else 0
    mtp_unused = unused_feed_forward_parameters(mtp) if mtp is not None else 0
    active = total - unused_feed_forward_parameters(model) - (mtp_params - mtp_unused)
    return {
        "total": total,
        "trainable": trainable,
        "embedding": embedding,
        "non_embedding": total - embedding,
        "active_per_token": active,
        "multi_token_prediction": mtp_params,
    }


def unused_feed_forward_parameters(module: nn.Module) -> int:
    """Feed-forward parameters one token does not use, as each type declares (`FeedForwardSpec.parameters_per_token`:
    for DeepSeekMoE, the routed experts it is not sent to)."""
    return sum(
        sum(p.numel() for p in layer.mlp.parameters()) - layer.feed_forward_spec.parameters_per_token(layer.mlp)
        for layer in module.modules()
        if isinstance(layer, DecoderLayer)
    )


def format_parameter_report(report: dict[str, int]) -> str:
    width = max(len(k) for k in report)
    return "\n".join(f"{name.replace('_', ' '):<{width}}  {count:>14,}" for name, count in report.items())


def estimate_flops_per_token(config: TinySeekConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token: 6 x the matrix parameters a token touches, plus what each
    layer's attention declares for itself (``AttentionSpec.flops_per_token``: scores and values for softmax
    attention, the recurrent state for linear attention)."""
    report = parameter_report(meta_model(config))
    matrix_params = report["active_per_token"] - config.vocab_size * config.hidden_size  # the embedding is a lookup
    attention = attention_spec(config.attention_type).flops_per_token(config, seq_len)
    return 6 * matrix_params + config.num_hidden_layers * attention


def meta_model(config: TinySeekConfig) -> TinySeekForCausalLM:
    """The model with shapes only: counting and printing need no memory and draw no random numbers."""
    with torch.device("meta"):
        return TinySeekForCausalLM(config)


TRAINING_BYTES_PER_PARAMETER = 16  # fp32 weights and gradients, AdamW's two moments


def check_model_fits(config: TinySeekConfig, device: torch.device) -> None:
    """Refuse, before allocating anything, a model whose weights, gradients and AdamW state alone exceed the
    device's memory: the allocation would fail with an allocator error, or the kernel would kill the process."""
    capacity = device_memory_bytes(device)
    if capacity is None:
        return
    parameters = parameter_report(meta_model(config))["total"]
    needed = parameters * TRAINING_BYTES_PER_PARAMETER
    if needed > capacity:
        raise ConfigError(
            f"model: {parameters:,} parameters need {needed / 1e9:,.1f} GB for fp32 weights, gradients and AdamW "
            f"state, more than the {capacity / 1e9:,.1f} GB of the {device.type} device; make the model smaller"
        )


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of a CUDA device or of the machine (CPU); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return None
    return None


def load_config(spec: str) -> TinySeekConfig:
    """A preset name, a config.json file, or a directory holding one."""
    if spec in PRESETS:
        return TinySeekConfig.from_preset(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config file")
    try:
        return TinySeekConfig.from_json_file(str(path))
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from None
