"""How the next token is chosen: transformers' logits processors, applied in the order `model.generate()` uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers.generation import LogitsProcessorList

from tinyseek.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. ``temperature=0`` is greedy decoding (the repetition penalty and the constraints still
    apply); 0 / 1.0 / 0.0 switch top-k / top-p / min-p off. The constraints: EOS is not chosen before
    ``min_new_tokens`` new tokens (when there is an EOS), no n-gram of ``no_repeat_ngram_size`` tokens repeats, and no
    sequence of ``bad_words_ids`` is completed. The defaults are transformers' own. OpenAI's adjustments come first,
    on the model's logits: ``logit_bias`` ((token id, bias) pairs) is added, and every token generated so far is
    lowered by ``frequency_penalty`` per occurrence plus ``presence_penalty`` once (`OpenAIPenalties`)."""

    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_new_tokens: int = 0
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_new_tokens < 0 or self.no_repeat_ngram_size < 0:
            raise ConfigError("min_new_tokens and no_repeat_ngram_size must be >= 0")
        if any(not words for words in self.bad_words_ids):
            raise ConfigError("bad_words_ids: every banned sequence needs at least one token id")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ConfigError("presence_penalty and frequency_penalty must be in [-2, 2], as OpenAI allows")
        if any(not -100 <= bias <= 100 for _, bias in self.logit_bias):
            raise ConfigError("logit_bias: every bias must be in [-100, 100], as OpenAI allows")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def logits_processor(self, prompt_length: int = 0, eos_token_ids=()) -> LogitsProcessorList:
        """The processors for sequences whose prompts (left-padded) take ``prompt_length`` columns."""
        # Imported here so that the settings themselves (the commands' defaults) load without transformers.
        from transformers.generation import (
            LogitsProcessorList,
            MinNewTokensLengthLogitsProcessor,
            MinPLogitsWarper,
            NoBadWordsLogitsProcessor,
            NoRepeatNGramLogitsProcessor,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        processors = LogitsProcessorList()
        eos = sorted(eos_token_ids)
        if self.logit_bias or self.presence_penalty or self.frequency_penalty:
            processors.append(OpenAIPenalties(prompt_length, self.presence_penalty, self.frequency_penalty,
                                              self.logit_bias))
        if self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.no_repeat_ngram_size:
            processors.append(NoRepeatNGramLogitsProcessor(self.no_repeat_ngram_size))
        if self.bad_words_ids:
            processors.append(NoBadWordsLogitsProcessor([list(words) for words in self.bad_words_ids], eos or None))
        if self.min_new_tokens and eos:
            processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, self.min_new_tokens, eos))
        if self.greedy:
            return processors
        if self.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            processors.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            processors.append(TopPLogitsWarper(self.top_p))
        if self.min_p:
            processors.append(MinPLogitsWarper(self.min_p))
        return processors

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A private random stream for reproducible sampling, or None to use torch's global one."""
        import torch

        if self.seed is None or self.greedy:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def choose(self, scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Next token ids [B] from processed scores [B, V].

        From torch's global random stream (no ``generator``) the draw is `torch.multinomial`'s, as transformers'
        generate() draws: `model.generate()` after `torch.manual_seed(s)` makes transformers' very draws. From a
        private stream (a seed, a server's row) it is one uniform number per row, inverted through the cumulative
        probabilities. Both sample the same distribution; torch.multinomial spends one exponential draw per vocabulary
        entry (about 0.6 ms a row at 32,256 entries on one core, most of a 32-row server step), this one number."""
        import torch

        if self.greedy:
            return scores.argmax(dim=-1)
        probabilities = scores.softmax(dim=-1)
        if generator is None:
            return torch.multinomial(probabilities, num_samples=1).squeeze(1)
        cumulative = probabilities.cumsum(dim=-1)
        total = cumulative[:, -1:]
        uniform = torch.rand(total.shape, generator=generator, dtype=total.dtype, device=total.device)
        # Strictly below the total, so that rounding never reaches past the last token with a probability.
        target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cumulative, target, right=True).squeeze(1)

    def generate_kwargs(self) -> dict:
        """The same settings as keyword arguments of `model.generate()` (seed it with `torch.manual_seed`)."""
        constraints = {
            "min_new_tokens": self.min_new_tokens or None, "no_repeat_ngram_size": self.no_repeat_ngram_size or None,
            "bad_words_ids": [list(words) for words in self.bad_words_ids] or None,
        }
        if self.greedy:
            return {"do_sample": False, "repetition_penalty": self.repetition_penalty, **constraints}
        return {
            "do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
            "min_p": self.min_p or None, "repetition_penalty": self.repetition_penalty, **constraints,
        }


class OpenAIPenalties:
    """OpenAI's logit adjustments, as its API reference defines them: logits[j] += logit_bias[j], then
    logits[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, with c[j] the times token j was generated
    so far (the prompt does not count, as in vLLM). Written here because transformers has no processor for the
    penalties (its SequenceBiasLogitsProcessor would do the bias, at the cost of a second pass)."""

    def __init__(self, prompt_length: int, presence: float, frequency: float, logit_bias: tuple[tuple[int, float], ...]):
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency
        self.biased = [token for token, _ in logit_bias]
        self.biases = [bias for _, bias in logit_bias]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        scores = scores.clone()
        if self.biased:
            tokens = torch.tensor(self.biased, device=scores.device)
            biases = torch.tensor(self.biases, dtype=scores.dtype, device=scores.device)
            scores.index_add_(1, tokens, biases.expand(len(scores), -1))
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] and (self.presence or self.frequency):
            ones = torch.ones_like(generated, dtype=scores.dtype)
            counts = torch.zeros_like(scores).scatter_add_(1, generated, ones)
            scores -= counts * self.frequency + (counts > 0).to(scores.dtype) * self.presence
        return scores
