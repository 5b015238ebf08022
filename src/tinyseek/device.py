"""The one place that decides which device tinyseek runs on, for training, generation and serving alike."""

from __future__ import annotations

import torch

from tinyseek.errors import ConfigError


def choose_device(requested: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA if present, else Apple's MPS, else the CPU. Anything else (``"cpu"``, ``"cuda:1"``, ``"mps"``)
    is taken as asked, after checking that this machine has it."""
    if isinstance(requested, torch.device):
        requested = str(requested)
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise ConfigError(f"device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {requested!r}: MPS is not available on this machine")
    return device
