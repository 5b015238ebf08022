"""What one request may ask of the server, and who may ask; apart from the app, so `tinyseek serve --help` shows the
defaults without importing torch, transformers or FastAPI."""

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
    request_timeout: float = 600.0  # seconds from a request's arrival to its last byte; then 504 or an error event

    def __post_init__(self):
        for name, value in vars(self).items():
            least = 0 if name == "max_waiting" else 1
            if value < least:
                raise ConfigError(f"{name} must be at least {least}, got {value}")


@dataclass(frozen=True)
class Exposure:
    """Who may call the server and what it records: the API key every endpoint but /health asks for (None: none),
    the origins browsers may call it from (none: CORS is off), and whether each request gets an access log line."""

    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    access_log: bool = False

    def __post_init__(self):
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key is empty: give a key, or none to serve without one")
