"""Fault injection for the crash and fault tests: make the process fail at a named point, on purpose.

`TINYSEEK_FAULTS` holds comma-separated `POINT[@N[+]]=ACTION` rules. A rule fires the N-th time (default: the first)
this process reaches POINT, and with `+` every time from then on; for points that pass an index (the training step),
N is that index instead.

Actions:  kill      SIGKILL this process (a crash at exactly that instant)
          pause:S   sleep S seconds (a window in which another process can kill this one)
          enospc    raise OSError(ENOSPC), as a full disk would
          eacces    raise PermissionError(EACCES), as a read-only directory would (tests run as root)
          nan       the caller makes its value non-finite (only at points that say so)

Points:   checkpoint.staging     checkpoint.weights     checkpoint.optimizer    checkpoint.state
          checkpoint.renamed     run_dir.write          prepare.batch           prepare.meta
          gguf.written (a GGUF export, complete but not yet renamed into place)
          train.loss (indexed by the step being computed, 1-based; action nan)
          train.step (indexed the same; `train.step@20+=pause:0.05` makes every step from the 20th 50 ms slower)

Example:  TINYSEEK_FAULTS=checkpoint.optimizer@2=kill tinyseek train ...   (dies inside its second checkpoint write)
Unset, every call is one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from functools import cache

ENVIRONMENT_VARIABLE = "TINYSEEK_FAULTS"
ACTIONS = ("kill", "pause", "enospc", "eacces", "nan")
_reached: dict[str, int] = {}


@cache
def _rules(text: str) -> tuple[dict[tuple[str, int], str], dict[str, tuple[int, str]]]:
    """The rules for one occurrence, by (point, N), and the open-ended ones, by point: (N, action)."""
    rules, from_on = {}, {}
    for rule in filter(None, (part.strip() for part in text.split(","))):
        where, _, action = rule.partition("=")
        point, _, occurrence = where.partition("@")
        if action.partition(":")[0] not in ACTIONS or not point or not re.fullmatch(r"(\d+\+?)?", occurrence):
            raise ValueError(f"{ENVIRONMENT_VARIABLE}: cannot read rule {rule!r}; expected POINT[@N[+]]=ACTION")
        if occurrence.endswith("+"):
            from_on[point] = (int(occurrence[:-1]), action)
        else:
            rules[(point, int(occurrence or 1))] = action
    return rules, from_on


def point(name: str, index: int | None = None) -> str | None:
    """Mark named point `name`; perform the action of a matching rule. Returns "nan" for the caller to act on."""
    text = os.environ.get(ENVIRONMENT_VARIABLE)
    if not text:
        return None
    if index is None:
        index = _reached[name] = _reached.get(name, 0) + 1
    rules, from_on = _rules(text)
    action = rules.get((name, index))
    if action is None and name in from_on and index >= from_on[name][0]:
        action = from_on[name][1]
    if action is None:
        return None
    kind, _, argument = action.partition(":")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "pause":
        time.sleep(float(argument or 3600))
    elif kind == "enospc":
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at {name})")
    elif kind == "eacces":
        raise PermissionError(errno.EACCES, f"{os.strerror(errno.EACCES)} (injected at {name})")
    return kind
