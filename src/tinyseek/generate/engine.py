"""The one generation engine: trainer samples, `tinyseek generate`, `model.generate()` and the server all continue
prompts through `GenerationEngine`.

`stream()` yields, once per decoding step, one `TokenEvent` per row still running: the token, the text that became
final with it, and why the row finished. With ``capture=True`` each event also carries the routed experts that
produced the token and the top alternatives with their probabilities; with capture off nothing of that is computed.
Decoding runs in fp32 whatever autocast the caller is inside (a trainer's bf16 would change greedy choices).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tinyseek.errors import ConfigError, InputError
from tinyseek.generate.lean import (
    LeanDecoder,
    LeanWeights,
    supports_lean_decoding,
    weights_version,
)
from tinyseek.generate.sampling import Sampling
from tinyseek.generate.speculative import SpeculativeForward
from tinyseek.generate.streaming import TextStream
from tinyseek.moe import Router

ALTERNATIVES = 5


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one row.

    ``text`` is the text that became final with this token (possibly empty: a character still incomplete, a possible
    stop string held back, EOS). ``finish_reason`` is None while the row runs, "stop" at EOS or a stop string, and
    "length" at ``max_new_tokens`` or the model's last position. ``experts`` (capture only) holds, per MoE layer in
    layer order, the routed expert ids of the position whose output chose this token; ``alternatives`` (capture
    only) the top tokens of the model's distribution there as (token_id, token_text, probability).
    """

    row: int
    token_id: int
    text: str
    finish_reason: str | None
    experts: list[list[int]] | None = None
    alternatives: list[tuple[int, str, float]] | None = None


@dataclass(frozen=True)
class Completion:
    """A finished row: its generated ids (EOS included, when it ended there), its text and why it ended."""

    token_ids: list[int]
    text: str
    finish_reason: str


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


class CachedForward:
    """Decoding through the model's own forward and its `TinySeekCache`, one call per step."""

    path = "model forward"

    def __init__(self, model, batch: int, capacity: int, capture: bool):
        self.model, self.capacity, self.cache, self.attention_mask = model, capacity, None, None
        self.routers = [module for module in model.model.modules() if isinstance(module, Router)] if capture else []
        self.routed: list[torch.Tensor] = []

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.attention_mask = attention_mask
        return self.forward(input_ids)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.attention_mask = torch.cat((self.attention_mask, self.attention_mask.new_ones(len(tokens), 1)), dim=1)
        return self.forward(tokens[:, None])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] in fp32 for the next token of every row."""
        self.routed = []
        hooks = [router.register_forward_hook(self.record_routing) for router in self.routers]
        try:
            output = self.model(
                input_ids, attention_mask=self.attention_mask, cache=self.cache, use_cache=True, logits_to_keep=1
            )
        finally:
            for hook in hooks:
                hook.remove()
        self.cache = output.cache
        return output.logits[:, -1].float()

    def record_routing(self, router, inputs, outputs) -> None:
        expert_indices = outputs[0]  # [B * T, k], tokens in (row, position) order
        rows = self.attention_mask.shape[0]
        self.routed.append(expert_indices.view(rows, -1, expert_indices.shape[-1])[:, -1])

    def experts(self) -> list[list[list[int]]]:
        """Per row, per MoE layer: the routed experts of the last position of the latest forward."""
        if not self.routed:
            return [[] for _ in range(self.attention_mask.shape[0])]
        return torch.stack(self.routed, dim=1).tolist()


class GenerationEngine:
    """Continues batches of token-id prompts with a TinySeek model; see the module docstring.

    ``tokenizer`` may be None (then events carry no text and stop strings are unavailable); EOS comes from
    ``eos_token_ids``, else the tokenizer, else the model's config. ``device`` None keeps the model where it is.
    ``lean=False`` decodes through the model's own forward (the reference the lean step is tested against);
    ``speculative=True`` drafts each next token with the model's MTP head and verifies it in the same forward as
    the current one (single prompts without capture; see `tinyseek.generate.speculative`). ``compile=True`` compiles
    the lean step with torch.compile (tens of seconds once, then faster steps; it pays
    for a server or long generations) and falls back to the eager step, with one warning, where that fails.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        device=None,
        compile: bool = False,
        eos_token_ids=None,
        pad_token_id=None,
        lean: bool = True,
        speculative: bool = False,
    ):
        self.model, self.tokenizer, self.compile, self.lean = model, tokenizer, compile, lean
        if speculative and model.mtp is None:
            raise ConfigError("speculative decoding drafts with the multi-token-prediction head; this model has none")
        self.speculative = speculative
        self.lean_weights: LeanWeights | None = None
        self.decoder = None
        self.device = torch.device(device) if device is not None else model.device
        if model.device != self.device:
            model.to(self.device)
        if eos_token_ids is None:
            eos_token_ids = tokenizer.eos_token_id if tokenizer is not None else model.config.eos_token_id
        if isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        self.eos_token_ids = frozenset(eos_token_ids or ())
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id
        # Padding only fills the left of shorter prompts (masked out) and the rows that have finished.
        self.pad_token_id = pad_token_id if pad_token_id is not None else min(self.eos_token_ids, default=0)

    def stream(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: Sampling,
        max_new_tokens: int,
        *,
        stop: Sequence[str] = (),
        capture: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[list[TokenEvent]]:
        """Yield one list of events per step (one event per row still running) until every row has finished."""
        prompts = [list(prompt) for prompt in prompt_ids]
        self.check(prompts, max_new_tokens, stop)
        longest = max(len(prompt) for prompt in prompts)
        steps = min(max_new_tokens, self.room(longest))
        input_ids, attention_mask = (t.to(self.device) for t in left_pad(prompts, self.pad_token_id))
        sequences = torch.cat((input_ids, input_ids.new_full((len(prompts), steps), self.pad_token_id)), dim=1)
        processors = sampling.logits_processor()
        if generator is None:
            generator = sampling.generator(self.device)
        texts = [TextStream(self.tokenizer, prompt, stop) if self.tokenizer is not None else None for prompt in prompts]
        running = list(range(len(prompts)))
        was_training = self.model.training
        self.model.eval()
        try:
            with fp32_inference(self.device.type):
                decoder = self.decoder = self.make_decoder(len(prompts), longest + steps, capture)
                logits = decoder.prefill(input_ids, attention_mask)
            for step in range(steps):
                length = longest + step
                scores = processors(sequences[:, :length], logits) if processors else logits
                tokens = sampling.choose(scores, generator)
                sequences[:, length] = tokens
                details = self.capture_details(decoder, logits) if capture else None
                token_list = tokens.tolist()
                events = []
                for row in running:
                    events.append(self.event(row, token_list[row], texts[row], step == steps - 1, details))
                running = [event.row for event in events if event.finish_reason is None]
                yield events
                if not running:
                    return
                with fp32_inference(self.device.type):
                    logits = decoder.step(tokens)
        finally:
            self.model.train(was_training)

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: Sampling,
        max_new_tokens: int,
        *,
        stop: Sequence[str] = (),
        capture: bool = False,
        generator: torch.Generator | None = None,
    ) -> list[Completion]:
        """The finished rows, in prompt order."""
        ids: list[list[int]] = [[] for _ in prompt_ids]
        texts = [""] * len(prompt_ids)
        reasons = ["length"] * len(prompt_ids)
        for events in self.stream(prompt_ids, sampling, max_new_tokens, stop=stop, capture=capture, generator=generator):
            for event in events:
                ids[event.row].append(event.token_id)
                texts[event.row] += event.text
                if event.finish_reason is not None:
                    reasons[event.row] = event.finish_reason
        return [Completion(*fields) for fields in zip(ids, texts, reasons)]

    @property
    def path(self) -> str | None:
        """How the latest stream decoded: "compiled lean step", "lean step" or "model forward"."""
        return self.decoder.path if self.decoder is not None else None

    @property
    def acceptance(self) -> tuple[int, int] | None:
        """(drafts checked, drafts accepted) of the latest stream, when it decoded speculatively."""
        if not isinstance(self.decoder, SpeculativeForward):
            return None
        return self.decoder.drafted, self.decoder.accepted

    def make_decoder(self, batch: int, capacity: int, capture: bool):
        if self.speculative and batch == 1 and not capture:
            return SpeculativeForward(self.model, batch, capacity, capture)
        if not (self.lean and supports_lean_decoding(self.model)):
            return CachedForward(self.model, batch, capacity, capture)
        if self.lean_weights is None or self.lean_weights.version != weights_version(self.model):
            self.lean_weights = LeanWeights(self.model)
        return LeanDecoder(self.model, self.lean_weights, batch, capacity, capture, compiled=self.compile)

    def room(self, prompt_length: int) -> int:
        """How many new tokens fit after a prompt of this length: the last token chosen is never fed back, so P
        prompt tokens leave room for positions - P + 1."""
        return self.model.config.max_position_embeddings - prompt_length + 1

    def check(self, prompts: list[list[int]], max_new_tokens: int, stop: Sequence[str]) -> None:
        if not prompts or any(not prompt for prompt in prompts):
            raise InputError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if stop and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer")
        positions = self.model.config.max_position_embeddings
        longest = max(len(prompt) for prompt in prompts)
        if longest >= positions:
            raise InputError(f"the prompt is {longest} tokens long; the model has max_position_embeddings={positions}")
        vocab = self.model.config.vocab_size
        if any(not 0 <= token < vocab for prompt in prompts for token in prompt):
            raise InputError(f"prompt token ids must be in [0, {vocab})")

    def event(self, row: int, token: int, text: TextStream | None, last_step: bool, details) -> TokenEvent:
        finish = "stop" if token in self.eos_token_ids else None
        piece = ""
        if text is not None:
            piece = text.push(token) if finish is None else ""
            if text.stopped:
                finish = "stop"
            elif finish is None and last_step:
                finish = "length"
            if finish is not None:
                piece += text.finish()
        elif finish is None and last_step:
            finish = "length"
        experts, alternatives = (details[0][row], details[1][row]) if details is not None else (None, None)
        return TokenEvent(row, token, piece, finish, experts, alternatives)

    def capture_details(self, decoder, logits: torch.Tensor):
        """Per row: the experts per MoE layer, and the top alternatives (id, text, probability)."""
        experts = decoder.experts()
        top = logits.softmax(dim=-1).topk(ALTERNATIVES, dim=-1)
        alternatives = [
            [(token, self.token_text(token), probability) for token, probability in zip(ids, probabilities)]
            for ids, probabilities in zip(top.indices.tolist(), top.values.tolist())
        ]
        return experts, alternatives

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else ""


@contextmanager
def fp32_inference(device_type: str):
    """no_grad with autocast off; entered around each model call only, never across a yield to the caller."""
    with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
        yield


# What the engine does itself when `model.generate()` is called; a generation config that sets anything else to a
# non-default value (beams, constraints, extra processors, scores in the output, ...) goes to transformers.
ENGINE_GENERATION_FIELDS = frozenset({
    "max_length", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
    "eos_token_id", "pad_token_id", "bos_token_id", "use_cache", "transformers_version", "_from_model_config",
    "cache_implementation", "disable_compile",
})


def generate_through_engine(model, inputs, generation_config, kwargs: dict) -> torch.Tensor | None:
    """`model.generate()`'s output [B, P + new] from the engine, or None where the request needs transformers."""
    kwargs = dict(kwargs)
    inputs = kwargs.pop("input_ids", inputs)
    if inputs is None or inputs.dim() != 2:
        return None
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    if set(model_kwargs) - {"attention_mask"} or not uses_engine_fields_only(model, config):
        return None
    if config.cache_implementation not in (None, "static"):
        return None
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(inputs)
    prompts = [row[mask.bool()].tolist() for row, mask in zip(inputs, attention_mask)]
    if any(not prompt for prompt in prompts):
        return None
    eos = config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or ())
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    steps = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - inputs.shape[1]
    if steps < 1:
        return None
    if config.do_sample:
        sampling = Sampling(config.temperature, config.top_k or 0, config.top_p, config.min_p or 0.0, config.repetition_penalty)
    else:
        sampling = Sampling(temperature=0, repetition_penalty=config.repetition_penalty)
    # transformers compiles the decode step when asked for a static cache; the engine's cache is always static.
    compile = config.cache_implementation == "static" and not config.disable_compile
    engine = GenerationEngine(model, eos_token_ids=eos, pad_token_id=pad, compile=compile)
    completions = engine.generate(prompts, sampling, steps)
    width = max(len(completion.token_ids) for completion in completions)
    new = torch.full((len(prompts), width), pad, dtype=inputs.dtype, device=inputs.device)
    for row, completion in enumerate(completions):
        new[row, : len(completion.token_ids)] = torch.tensor(completion.token_ids)
    return torch.cat((inputs, new), dim=1)


def uses_engine_fields_only(model, config) -> bool:
    baseline = type(config)()
    baseline.update(**model.generation_config._get_default_generation_params(), defaults_only=True)
    defaults = baseline.to_dict()
    # `or None`: an unset field reads None in one config and False or 0 in the other.
    return all(
        (value or None) == (defaults.get(name) or None)
        for name, value in config.to_dict().items()
        if name not in ENGINE_GENERATION_FIELDS
    )
