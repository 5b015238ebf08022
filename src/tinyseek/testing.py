"""What the tests and the benchmarks both build, in one place: corpora written as JSON lines, the chunks of a streamed
completion, and the overrides that turn any training preset into a tiny run of seconds.

Inside the package (as transformers keeps `transformers.testing_utils`) so that benchmarks/ imports it like the rest of
tinyseek; it imports nothing heavier than the standard library.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path
from typing import Any

# A seed-shaped model (any preset's attention and feed-forward) small enough for a training step in milliseconds.
TINY_TRAINED_MODEL = {"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64, "moe_intermediate_size": 32}
# What else makes a run quick and quiet: one evaluation batch, no progress bar, and a fixed peak (no FLOP/s probe).
QUICK_LOGGING = {"eval_batches": 1, "progress_bar": False, "peak_flops": 1e11}


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """One JSON object per line, in UTF-8 (non-ASCII text kept as it is)."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return path


def set_flags(section: str, values: dict[str, Any]) -> list[str]:
    """`--set SECTION.KEY=VALUE` for each of `values`, as `tinyseek train` takes them."""
    return [argument for key, value in values.items() for argument in ("--set", f"{section}.{key}={value}")]


def tiny_training_flags(**model: Any) -> list[str]:
    """The `tinyseek train` flags of a tiny, quick CPU run in fp32; `model` overrides TINY_TRAINED_MODEL's fields."""
    return [
        "--device", "cpu", "--dtype", "fp32",
        *set_flags("model", {**TINY_TRAINED_MODEL, **model}), *set_flags("logging", QUICK_LOGGING),
    ]


async def streamed_chunks(lines: AsyncIterable[str]) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of a server-sent event stream (OpenAI's streamed completions), without the `[DONE]` marker."""
    async for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line.removeprefix("data: "))


EQUALITY_TIE = 1e-4
"""The equality rule's margin (docs/generation.md): where the reference's top two logits are this close, either is
right."""


def greedy_by_recomputation(model, prompt: list[int], new_tokens: int) -> list[int]:
    """The reference for greedy decoding: one unpadded prompt, the whole sequence recomputed without a cache at every
    step. Asserts that no step was a near-tie, so every path must agree with it token for token."""
    import torch

    sequence = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(sequence).logits[0, -1]
            top = logits.topk(2).values
            assert top[0] - top[1] > EQUALITY_TIE, "a near-tie: pick another seed or prompt"
            sequence = torch.cat([sequence, logits.argmax().view(1, 1)], 1)
    return sequence[0, len(prompt):].tolist()
