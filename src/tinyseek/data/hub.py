"""Fail fast, with a hint, when the Hugging Face Hub cannot be reached.

huggingface_hub retries an unreachable host for about a minute before it gives up; a one-second connection probe
turns that into an immediate, actionable message.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from tinyseek.errors import FileError

PROBE_TIMEOUT_S = 5.0


def _hub_is_reachable() -> bool:
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def hub_answers() -> bool:
    """The Hub answers a connection (assumed through a proxy, which a direct probe cannot judge)."""
    uses_proxy = any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    return uses_proxy or _hub_is_reachable()


def require_hub(what: str, local_hint: str) -> None:
    """Raise FileError unless the Hub can serve `what`: it answers, or offline mode makes the local cache serve it."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or hub_answers():
        return
    raise FileError(
        f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}) to load {what}; {local_hint}; "
        "to use the local Hugging Face cache instead, set HF_HUB_OFFLINE=1"
    )


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
