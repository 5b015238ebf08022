"""What one request may ask of the server; apart from the app, so `tinyseek serve --help` shows the defaults
without importing torch, transformers or FastAPI."""

from __future__ import annotations

from dataclasses import dataclass

from tinyseek.errors import ConfigError


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server, and how many it serves at once."""

    max_body_bytes: int = 1 << 20
    max_streams: int = 16  # generations advanced together, one token each in turn
    max_waiting: int = 64  # accepted requests waiting for a stream slot; beyond that, 503
    max_tokens: int = 1024  # new tokens per request

    def __post_init__(self):
        for name, value in vars(self).items():
            least = 0 if name == "max_waiting" else 1
            if value < least:
                raise ConfigError(f"{name} must be at least {least}, got {value}")
