"""The one generation engine: trainer samples, `tinyseek generate`, `model.generate()` and the server all continue
prompts through `GenerationEngine`.

`stream()` yields, once per decoding step, one `TokenEvent` per row still running: the token, the text that became
final with it, and why the row finished. With ``capture=True`` each event also carries the routed experts that
produced the token and the top alternatives with their probabilities; with capture off nothing of that is computed.
Decoding runs in fp32 whatever autocast the caller is inside (a trainer's bf16 would change greedy choices).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tinyseek.config import registered
from tinyseek.errors import ConfigError, InputError
from tinyseek.generate.forward import CachedForward, Decoder
from tinyseek.device import decode_weights_dtype
from tinyseek.generate.lean import LeanDecoder, LeanWeights, supports_lean_decoding
from tinyseek.generate.sampling import Sampling
from tinyseek.generate.speculative import SpeculativeForward
from tinyseek.generate.streaming import TextStream
from tinyseek.modeling import TinySeekForCausalLM

ALTERNATIVES = 5


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one row.

    ``text`` is the text that became final with this token (possibly empty: a character still incomplete, a possible
    stop string held back, EOS). ``finish_reason`` is None while the row runs, "stop" at EOS or a stop string, and
    "length" at ``max_new_tokens`` or the model's last position. ``experts`` (capture only) holds, per MoE layer in
    layer order, the routed expert ids of the position whose output chose this token; ``alternatives`` (capture
    only) the top tokens of the model's distribution there as (token_id, token_text, probability). ``logprobs``
    (a continuous batch's rows that ask for them, `tinyseek.generate.batch`) holds the token's log-probability and
    the likeliest alternatives under the scores it was drawn from.
    """

    row: int
    token_id: int
    text: str
    finish_reason: str | None
    experts: list[list[int]] | None = None
    alternatives: list[tuple[int, str, float]] | None = None
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class TokenLogprobs:
    """OpenAI's logprobs of one token: its text (alone), its log-probability and the ``top`` likeliest tokens as
    (token_id, token_text, log-probability), under the scores it was drawn from (after every logits processor: the
    penalties, the bias, the temperature, top-k and top-p; a token they rule out has -inf)."""

    text: str
    logprob: float
    top: list[tuple[int, str, float]]


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


def lean(engine: GenerationEngine, batch: int, capacity: int, capture: bool, compiled: bool = False) -> Decoder:
    if not supports_lean_decoding(engine.model):
        return CachedForward(engine.model, capture)
    return LeanDecoder(engine.model, engine.lean_weights(), batch, capacity, capture, compiled=compiled)


def compiled(engine: GenerationEngine, batch: int, capacity: int, capture: bool) -> Decoder:
    return lean(engine, batch, capacity, capture, compiled=True)


def speculative(engine: GenerationEngine, batch: int, capacity: int, capture: bool) -> Decoder:
    if batch == 1 and not capture:
        return SpeculativeForward(engine.model)
    return lean(engine, batch, capacity, capture)


def needs_mtp(model) -> str | None:
    if model.mtp is None:
        return "speculative decoding drafts with the multi-token-prediction head; this model has none"
    return None


@dataclass(frozen=True)
class DecoderChoice:
    """One way to decode: how the engine builds it for a stream, and why a model cannot use it (or None)."""

    build: Callable[[GenerationEngine, int, int, bool], Decoder]
    refuse: Callable[[TinySeekForCausalLM], str | None] = lambda model: None


DECODERS: dict[str, DecoderChoice] = {
    # The lean step (`tinyseek.generate.lean`): each layer's declared decode step, on preallocated caches. Models
    # with a layer whose type declares none, and sharded models, decode through the model's forward instead.
    "lean": DecoderChoice(lean),
    # The lean step through torch.compile: seconds once, then faster steps (pays for a server or long
    # generations); where compilation fails, the eager lean step, with one warning.
    "compiled": DecoderChoice(compiled),
    # The model's own forward with its TinySeekCache: the reference every other decoder is tested against.
    "model-forward": DecoderChoice(lambda engine, batch, capacity, capture: CachedForward(engine.model, capture)),
    # Drafts each next token with the MTP head and verifies it in the same forward as the current one
    # (`tinyseek.generate.speculative`); single prompts without capture, others decode lean.
    "speculative": DecoderChoice(speculative, refuse=needs_mtp),
}


class GenerationEngine:
    """Continues batches of token-id prompts with a TinySeek model; see the module docstring.

    ``tokenizer`` may be None (then events carry no text and stop strings are unavailable); EOS comes from
    ``eos_token_ids``, else the tokenizer, else the model's config. ``decoder`` names how to decode, one of
    `DECODERS`. ``weights`` is the dtype the lean steps keep their GEMM weights in: "fp32" (the default), "bf16"
    (half the bytes a step reads, fp32 accumulation; docs/decode.md gives its agreement with fp32), or "auto" (bf16
    where the device has bf16 units, `tinyseek.device.has_bf16_units`). The model's own forward (prefill, and the
    decoders that use it) is unchanged.
    """

    def __init__(
        self, model, tokenizer=None, *, decoder: str = "lean", weights: str = "fp32", eos_token_ids=None,
        pad_token_id=None,
    ):
        self.decoder_choice = registered(DECODERS, "decoder", "decoder", decoder)
        refusal = self.decoder_choice.refuse(model)
        if refusal is not None:
            raise ConfigError(refusal)
        self.model, self.tokenizer = model, tokenizer
        self.cached_lean_weights: LeanWeights | None = None
        self.decoder: Decoder | None = None
        self.device = model.device
        self.weights_dtype = decode_weights_dtype(weights, self.device)
        if eos_token_ids is None:
            eos_token_ids = tokenizer.eos_token_id if tokenizer is not None else model.config.eos_token_id
        if isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        self.eos_token_ids = frozenset(eos_token_ids or ())
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id
        # Padding only fills the left of shorter prompts (masked out) and the rows that have finished.
        self.pad_token_id = pad_token_id if pad_token_id is not None else min(self.eos_token_ids, default=0)

    def lean_weights(self) -> LeanWeights:
        """The model's weights arranged for the lean step, rearranged only when a weight or their dtype changed."""
        if self.cached_lean_weights is None or not self.cached_lean_weights.fits(self.model, self.weights_dtype):
            self.cached_lean_weights = LeanWeights(self.model, self.weights_dtype)
        return self.cached_lean_weights

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
        processors = sampling.logits_processor(longest, self.eos_token_ids)
        if generator is None:
            generator = sampling.generator(self.device)
        texts = [TextStream(self.tokenizer, prompt, stop) if self.tokenizer is not None else None for prompt in prompts]
        running = list(range(len(prompts)))
        was_training = self.model.training
        self.model.eval()
        try:
            with fp32_inference(self.device.type):
                decoder = self.decoder = self.decoder_choice.build(self, len(prompts), longest + steps, capture)
                logits = decoder.prefill(input_ids, attention_mask)
            for step in range(steps):
                length = longest + step
                scores = processors(sequences[:, :length], logits) if processors else logits
                tokens = sampling.choose(scores, generator)
                sequences[:, length] = tokens
                details = self.capture_details(decoder.experts(), logits) if capture else None
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

    def capture_details(self, experts: list[list[list[int]]], logits: torch.Tensor):
        """Per row: the experts per MoE layer (as given), and the top alternatives (id, text, probability)."""
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
# non-default value (beams, constraints, extra processors, scores in the output, ...) goes to transformers' loop,
# with a warning naming the field.
ENGINE_GENERATION_FIELDS = frozenset({
    "max_length", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
    "eos_token_id", "pad_token_id", "bos_token_id", "use_cache", "transformers_version", "_from_model_config",
    "cache_implementation", "disable_compile", "min_new_tokens", "stop_strings", "num_return_sequences",
    "no_repeat_ngram_size", "bad_words_ids",
})
ENGINE_MODEL_KWARGS = frozenset({"attention_mask", "tokenizer"})
FALLBACK_WARNED: set[str] = set()


def generate_through_engine(model, inputs, generation_config, kwargs: dict) -> torch.Tensor | None:
    """`model.generate()`'s output [B * num_return_sequences, P + new] from the engine, or None (after a warning
    naming what needs it, once per process) where the request needs transformers' loop."""
    kwargs = dict(kwargs)
    inputs = kwargs.pop("input_ids", inputs)
    # A copy updated with the call's fields, as transformers does (GenerationConfig.update returns the rest).
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    model_kwargs = config.update(**kwargs)
    config.validate(user_set_attributes=set(kwargs) - set(model_kwargs))  # refuses what transformers' generate() refuses
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None and inputs is not None:
        attention_mask = torch.ones_like(inputs)
    needs_transformers = transformers_only_fields(model, inputs, config, model_kwargs, attention_mask)
    if needs_transformers:
        warn_transformers_loop(needs_transformers)
        return None
    prompts = [row[mask.bool()].tolist() for row, mask in zip(inputs, attention_mask)]
    copies = config.num_return_sequences or 1
    prompts = [prompt for prompt in prompts for _ in range(copies)]  # transformers' order: each prompt's copies together
    eos = config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or ())
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    steps = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - inputs.shape[1]
    constraints = dict(
        min_new_tokens=config.min_new_tokens or 0, no_repeat_ngram_size=config.no_repeat_ngram_size or 0,
        bad_words_ids=tuple(tuple(words) for words in config.bad_words_ids or ()),
    )
    # Unset (None) fields take Sampling's defaults, which are transformers' own.
    chosen = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, min_p=config.min_p,
                  repetition_penalty=config.repetition_penalty)
    if not config.do_sample:
        chosen = dict(temperature=0, repetition_penalty=config.repetition_penalty)
    sampling = Sampling(**{name: value for name, value in chosen.items() if value is not None}, **constraints)
    # transformers compiles the decode step when asked for a static cache; the engine's cache is always static.
    decoder = "compiled" if config.cache_implementation == "static" and not config.disable_compile else "lean"
    engine = GenerationEngine(model, model_kwargs.get("tokenizer"), decoder=decoder, eos_token_ids=eos, pad_token_id=pad)
    completions = engine.generate(prompts, sampling, steps, stop=config.stop_strings or ())
    width = max(len(completion.token_ids) for completion in completions)
    new = torch.full((len(prompts), width), pad, dtype=inputs.dtype, device=inputs.device)
    for row, completion in enumerate(completions):
        new[row, : len(completion.token_ids)] = torch.tensor(completion.token_ids)
    return torch.cat((inputs.repeat_interleave(copies, dim=0), new), dim=1)


def transformers_only_fields(model, inputs, config, model_kwargs: dict, attention_mask) -> list[str]:
    """What in this `model.generate()` call the engine does not do: fields, keyword arguments, or input shapes."""
    if inputs is None or inputs.dim() != 2:
        return ["inputs (anything but a [batch, length] tensor of token ids)"]
    fields = sorted(set(model_kwargs) - ENGINE_MODEL_KWARGS)
    defaults = type(config)().to_dict()
    # `or None`: an unset field reads None in one config and False or 0 in the other.
    fields += [
        name for name, value in config.to_dict().items()
        if name not in ENGINE_GENERATION_FIELDS and (value or None) != (defaults.get(name) or None)
    ]
    if config.cache_implementation not in (None, "static"):
        fields.append(f"cache_implementation={config.cache_implementation!r}")
    if config.stop_strings and model_kwargs.get("tokenizer") is None:
        fields.append("stop_strings (without tokenizer=)")
    if config.stop_strings and config.eos_token_id is None:  # transformers then keeps generating the stopped rows
        fields.append("stop_strings (without eos_token_id)")
    if config.max_new_tokens is None and (config.max_length is None or config.max_length <= inputs.shape[1]):
        fields.append("max_new_tokens (unset, and max_length leaves no room)")
    if not bool(attention_mask.any(dim=1).all()):
        fields.append("attention_mask (a row without tokens)")
    return fields


def warn_transformers_loop(fields: list[str]) -> None:
    """Once per process for each field: the slow path is never taken silently, nor announced at every call."""
    new = [field for field in fields if field not in FALLBACK_WARNED]
    if new:
        FALLBACK_WARNED.update(new)
        warnings.warn(
            f"model.generate(): tinyseek's generation engine does not do {', '.join(new)}; decoding with transformers' "
            "generate() loop instead, several times slower",
            RuntimeWarning,
            stacklevel=4,
        )


TinySeekForCausalLM.engine_generate = generate_through_engine
