"""tinyseek's own batched decode loop: one prefill of the (left-padded) prompts, then one token per step from the
model's cache (the MLA latent, the linear-attention state or the MHA keys/values)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers.generation import EosTokenCriteria, StoppingCriteriaList, StopStringCriteria

from tinyseek.generate.sampling import Sampling


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, longest] with every prompt right-aligned, so new tokens line up in a column."""
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, -len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
            attention_mask[row, -len(prompt):] = 1
    return input_ids, attention_mask


def stopping_criteria(
    eos_token_id: int | Sequence[int] | None = None, stop_strings: Sequence[str] = (), tokenizer=None
) -> StoppingCriteriaList:
    criteria = StoppingCriteriaList()
    if eos_token_id is not None:
        criteria.append(EosTokenCriteria(eos_token_id))
    if stop_strings:
        criteria.append(StopStringCriteria(tokenizer, list(stop_strings)))
    return criteria


@torch.no_grad()
def decode_stream(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(temperature=0),
    stopping: StoppingCriteriaList | None = None,
    pad_token_id: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next token ids [B], still running [B] bool) once per step, up to max_new_tokens steps.

    A row that has stopped (a criterion of ``stopping`` fired for it) gets ``pad_token_id`` from then on; the loop
    ends when every row has stopped. The token chosen last is never fed back, so a prompt of P tokens needs only
    P + max_new_tokens - 1 positions.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    processors = sampling.logits_processor()
    generator = sampling.generator(input_ids.device)
    sequences, step_input, cache = input_ids, input_ids, None
    running = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        output = model(step_input, attention_mask=attention_mask, cache=cache, use_cache=True, logits_to_keep=1)
        cache = output.cache
        scores = processors(sequences, output.logits[:, -1].float())
        next_tokens = sampling.choose(scores, generator).masked_fill(~running, pad_token_id)
        sequences = torch.cat((sequences, next_tokens[:, None]), dim=1)
        if stopping:
            running = running & ~stopping(sequences, scores)
        yield next_tokens, running
        if not running.any() or step == max_new_tokens - 1:
            return
        attention_mask = torch.cat((attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)), dim=1)
        step_input = next_tokens[:, None]


def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **options) -> torch.Tensor:
    """The prompts followed by their continuations [B, P + new], like `model.generate()`'s output."""
    steps = [tokens for tokens, _ in decode_stream(model, input_ids, attention_mask, **options)]
    return torch.cat((input_ids, torch.stack(steps, dim=1)), dim=1) if steps else input_ids
