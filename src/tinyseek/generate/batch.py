"""Continuous batching: generations join and leave one running batch at step boundaries, and every running row
advances in one lean decode step per token (`tinyseek serve` runs its requests through one `ContinuousBatch`).

Each row has a slot in caches preallocated for the whole batch, with its own length and position: it writes its own
cache column and attends to its own columns (`tinyseek.decoding.Step`), so rows of any lengths share a step whatever
the attention type. A prompt of at most ``join_by_steps`` tokens that arrives while rows are decoding joins at once
and feeds its tokens through the decode steps, one a step, so the running rows never wait for it. Other prompts are
prefilled through the model's forward, one chunk of at most ``prefill_chunk`` tokens between two steps, so the
running rows wait for one chunk at most: short prompts that arrived together go left-padded into one chunk (padding
columns stay masked, as in `GenerationEngine.stream`), a long one goes alone in several. A prompt's ``copies``
(OpenAI's ``n``) share its prefill: its cache is copied into free slots. Rows keep their own sampling settings, logits
processors, stop strings and random generator, so a seeded row draws the same tokens alone and among others unless
batching's rounding moved its logits across a sampling boundary (docs/generation.md). A row that finishes or is
cancelled frees its slot at once: the last running row moves into it, so the running rows always fill the first
slots and the step runs on those alone (the compiled step on the smallest of `BATCH_SIZES` that holds them, each
size compiled once: by `compile_steps` before the first request, where a server starts).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from tinyseek.errors import ConfigError, InputError
from tinyseek.generate.engine import GenerationEngine, TokenEvent, TokenLogprobs, fp32_inference, left_pad
from tinyseek.generate.forward import CachedForward
from tinyseek.generate.lean import compiled_lean_step, lean_step, supports_lean_decoding, warn_compile_failed
from tinyseek.generate.sampling import Sampling
from tinyseek.generate.streaming import TextStream

# Prompt tokens (padding included) prefilled between two steps: what the running rows wait for at most.
PREFILL_CHUNK = 256
# Prompts up to this many tokens that arrive while rows are decoding join the batch at once and feed their prompt
# through its decode steps, one token a step, instead of a prefill between two steps. A prefill through the model's
# forward stalls the running rows for a large part of a step even for a few tokens (seed model, one CPU thread: about
# 4 ms for one 11-token prompt and 7 ms for five, against about 9 ms for a 32-row step), while a joining row costs
# each step what one more row does. A longer prompt would wait one step per token for its first one, and is prefilled
# in chunks instead.
JOIN_BY_STEPS = 32
# The batch sizes the compiled step is compiled for (a few compilations, not one per number of running rows).
BATCH_SIZES = (1, 8, 32, 64)


# The owner of a prompt cancelled while it was prefilled with others: its rows join and leave at once.
CANCELLED = object()


def map_tensors(cache, function: Callable[[torch.Tensor], torch.Tensor]):
    """The cache (a tensor, a tuple or list of them, or None) with `function` applied to each tensor."""
    if isinstance(cache, torch.Tensor):
        return function(cache)
    if isinstance(cache, (tuple, list)):
        return type(cache)(map_tensors(part, function) for part in cache)
    return cache


def slot_rows(tensor: torch.Tensor, slots: int, start: int, stop: int) -> torch.Tensor:
    """Slots [start, stop) of a cache tensor whose leading dimension is the slot (alone or times a per-row count,
    as `tinyseek.decoding` requires of every cache): a contiguous view."""
    per_slot = tensor.shape[0] // slots
    return tensor[start * per_slot : stop * per_slot]


@dataclass(eq=False)
class Row:
    """One running generation: its settings, the tokens so far, and the token to feed at the next step."""

    owner: object
    index: int  # which of its owner's copies: OpenAI's choice index
    sampling: Sampling
    processors: list[Callable]
    generator: torch.Generator
    text: TextStream | None
    sequence: torch.Tensor  # [prompt + max_new_tokens] token ids; the first `length` are set
    length: int
    max_new_tokens: int
    capture: bool
    top_logprobs: int | None
    generated: int = 0
    pending: int = 0
    finished: bool = False
    feeding: deque[int] = field(default_factory=deque)  # prompt tokens still to feed after `pending`
    joining: Prompt | None = None  # the prompt a row joining by decode steps feeds: its copies start with its 1st token


@dataclass(eq=False)
class Prompt:
    """A prompt waiting to join: its rows' settings and how many copies of it run."""

    owner: object
    ids: list[int]
    sampling: Sampling
    max_new_tokens: int
    stop: Sequence[str]
    capture: bool
    top_logprobs: int | None
    copies: int


@dataclass(eq=False)
class Prefill:
    """Prompts being prefilled together (left-padded to ``ids``' width), chunk by chunk."""

    prompts: list[Prompt]
    ids: torch.Tensor  # [prompts, width]
    attention_mask: torch.Tensor
    forward: CachedForward
    done: int = 0


def row_generator(seed: int | None, index: int, device: torch.device) -> torch.Generator:
    """A row's own random stream: copy 0 is seeded as `tinyseek generate --seed` seeds its one row, copy i with
    seed + i; unseeded rows from the OS."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed if index == 0 else (seed + index) % 2**64)
    return generator


class ContinuousBatch:
    """Up to ``rows`` generations of one model decoding together; see the module docstring.

    `add` queues a prompt, `cancel` drops an owner's rows (running or still prefilling), and `advance` runs one
    prefill chunk (if a prompt waits) and one decode step of every running row, returning (owner, event) pairs:
    `TokenEvent` as `GenerationEngine.stream` makes them, with ``row`` the copy's index and ``logprobs`` for rows that
    ask for them. Only one thread may call these."""

    def __init__(self, engine: GenerationEngine, rows: int, *, compiled: bool = False,
                 prefill_chunk: int = PREFILL_CHUNK, join_by_steps: int = JOIN_BY_STEPS):
        if not supports_lean_decoding(engine.model):
            raise ConfigError("continuous batching steps through the decode step of each layer's type; this model has "
                              "a layer whose type declares none, or is sharded")
        self.engine, self.model, self.rows = engine, engine.model, rows
        self.prefill_chunk, self.join_by_steps = prefill_chunk, join_by_steps
        self.model.eval()  # a batch only decodes
        self.weights = engine.lean_weights()
        self.device = self.weights.head.device
        self.capacity = self.model.config.max_position_embeddings
        # A compiled step runs on a fixed number of rows: the caches hold the largest batch size it may run.
        self.slots = next((size for size in BATCH_SIZES if size >= rows), rows) if compiled else rows
        self.compiled = compiled
        self.caches = [
            (attention.new_cache(self.slots, self.capacity), feed_forward.new_cache(self.slots, self.capacity))
            for _, attention, _, feed_forward in self.weights.layers
        ]
        self.mask = self.weights.head.new_full((self.slots, 1, 1, self.capacity), float("-inf"))
        self.mask[..., 0] = 0.0  # a free slot that a compiled step runs attends to one column: no NaN anywhere
        self.lengths = [0] * self.slots  # cache columns of each slot: the column its next token goes to
        self.positions = [0] * self.slots  # the position of its next token (fewer than columns after left padding)
        self.running: list[Row] = []  # running[i] decodes in slot i
        self.queued: deque[Prompt] = deque()
        self.prefilling: Prefill | None = None

    def room(self) -> int:
        """Rows still free, counting those of the prompts waiting or being prefilled."""
        waiting = list(self.queued) + (self.prefilling.prompts if self.prefilling is not None else [])
        copies_to_come = sum(row.joining.copies - 1 for row in self.running if row.joining is not None)
        return self.rows - len(self.running) - sum(prompt.copies for prompt in waiting) - copies_to_come

    @property
    def prefills(self) -> list[Prompt]:
        """The prompts not yet joined: being prefilled, then waiting."""
        return (self.prefilling.prompts if self.prefilling is not None else []) + list(self.queued)

    def add(self, owner, prompt_ids: Sequence[int], sampling: Sampling, max_new_tokens: int, *, stop: Sequence[str] = (),
            capture: bool = False, top_logprobs: int | None = None, copies: int = 1) -> None:
        """Queue a prompt for ``copies`` rows (InputError where it cannot be generated, or `room` is too small)."""
        prompt = list(prompt_ids)
        self.engine.check([prompt], max_new_tokens, stop)
        if copies > self.room():
            raise InputError(f"{copies} rows asked for; {self.room()} of {self.rows} are free")
        self.queued.append(Prompt(owner, prompt, sampling, min(max_new_tokens, self.engine.room(len(prompt))), stop,
                                  capture, top_logprobs, copies))

    def cancel(self, owner) -> None:
        """Drop the owner's rows, freeing their slots now (a prompt being prefilled with others still joins, and
        its rows leave at once)."""
        self.queued = deque(prompt for prompt in self.queued if prompt.owner is not owner)
        if self.prefilling is not None:
            for prompt in self.prefilling.prompts:
                if prompt.owner is owner:
                    prompt.owner = CANCELLED
        for slot in reversed(range(len(self.running))):
            if self.running[slot].owner is owner:
                self.free(slot)

    def advance(self) -> list[tuple[object, TokenEvent]]:
        return [event for phase in self.phases() for event in phase]

    def phases(self) -> Iterator[list[tuple[object, TokenEvent]]]:
        """`advance`'s events as they come: the first tokens of the rows that joined, then the step's tokens (a
        server hands the first ones over before the step runs)."""
        while self.prefilling is None and self.queued and self.running and (
            len(self.queued[0].ids) <= self.join_by_steps
        ):
            self.join_by_steps_of(self.queued.popleft())
        if self.prefilling is None and self.queued:
            self.prefilling = self.next_prefill()
        if self.prefilling is not None:
            with fp32_inference(self.device.type):
                joined = self.prefill()
            yield joined
        if self.running:
            with fp32_inference(self.device.type):
                stepped = self.step()
            yield stepped

    def next_prefill(self) -> Prefill:
        """The oldest waiting prompt, and as many of the next as fit one chunk with it, left-padded together (a
        padded row has fewer cache columns after it: every row must still fit its tokens)."""
        group = [self.queued.popleft()]
        while self.queued and len(group[0].ids) <= self.prefill_chunk:
            candidate = group + [self.queued[0]]
            width = max(len(prompt.ids) for prompt in candidate)
            if width * len(candidate) > self.prefill_chunk or any(
                width + prompt.max_new_tokens - 1 > self.capacity for prompt in candidate
            ):
                break
            group.append(self.queued.popleft())
        ids, attention_mask = left_pad([prompt.ids for prompt in group], self.engine.pad_token_id)
        forward = CachedForward(self.model, any(prompt.capture for prompt in group))
        return Prefill(group, ids.to(self.device), attention_mask.to(self.device), forward)

    def prefill(self) -> list[tuple[object, TokenEvent]]:
        """One chunk of the prompts being prefilled; once they are whole, their rows join with their first tokens."""
        prefill = self.prefilling
        end = prefill.done + self.prefill_chunk
        if prefill.done == 0:
            logits = prefill.forward.prefill(prefill.ids[:, :end], prefill.attention_mask[:, :end])
        else:  # only a prompt alone is longer than a chunk: no padding after its first
            logits = prefill.forward.extend(prefill.ids[:, prefill.done : end])
        prefill.done = min(end, prefill.ids.shape[1])
        if prefill.done < prefill.ids.shape[1]:
            return []
        self.prefilling = None
        width, first = prefill.ids.shape[1], len(self.running)
        for (_, attention, _, _), (cache, _), layer in zip(self.weights.layers, self.caches, prefill.forward.cache.layers):
            slots = map_tensors(cache, lambda tensor: slot_rows(tensor, self.slots, first, first + len(prefill.prompts)))
            attention.load(slots, layer, width)
        experts = prefill.forward.experts() if prefill.forward.routers else None
        joined = []
        for index, prompt in enumerate(prefill.prompts):  # each prompt's first copy in the slot it was loaded into
            slot = first + index
            self.mask[slot] = float("-inf")
            self.mask[slot, ..., width - len(prompt.ids) : width] = 0.0
            self.lengths[slot], self.positions[slot] = width, len(prompt.ids)
            joined.append((self.new_row(prompt, 0), index))
        self.running += [row for row, _ in joined]
        for row, index in list(joined):
            joined += [(copy, index) for copy in self.start_copies(prefill.prompts[index], first + index)]
        events = [(row.owner, self.choose(row, logits[index : index + 1], experts[index] if experts else []))
                  for row, index in joined]
        for row in self.running:
            row.finished = row.finished or row.owner is CANCELLED
        self.free_finished()
        return [(owner, event) for owner, event in events if owner is not CANCELLED]

    def join_by_steps_of(self, prompt: Prompt) -> None:
        """The prompt's first copy takes the next slot, emptied, and feeds its prompt through the decode steps."""
        slot = len(self.running)
        for layer in self.caches:  # a recurrent state starts from zero; cache columns are written before they are read
            map_tensors(layer, lambda tensor: slot_rows(tensor, self.slots, slot, slot + 1).zero_())
        self.mask[slot] = float("-inf")
        self.lengths[slot] = self.positions[slot] = 0
        row = self.new_row(prompt, 0)
        row.pending, row.feeding = prompt.ids[0], deque(prompt.ids[1:])
        row.joining = prompt
        self.running.append(row)

    def start_copies(self, prompt: Prompt, slot: int) -> list[Row]:
        """Copies 1.. of a prompt whose first copy's cache in ``slot`` holds the whole prompt: each runs from a
        copy of that cache, in the next free slot."""
        copies = []
        for copy in range(1, prompt.copies):
            self.copy_slot(slot, len(self.running))
            self.running.append(self.new_row(prompt, copy))
            copies.append(self.running[-1])
        return copies

    def new_row(self, prompt: Prompt, index: int) -> Row:
        length = len(prompt.ids)
        sequence = torch.zeros(length + prompt.max_new_tokens, dtype=torch.long, device=self.device)
        sequence[:length] = torch.tensor(prompt.ids)
        tokenizer = self.engine.tokenizer
        return Row(
            owner=prompt.owner, index=index, sampling=prompt.sampling,
            processors=list(prompt.sampling.logits_processor(length, self.engine.eos_token_ids)),
            generator=row_generator(prompt.sampling.seed, index, self.device),
            text=TextStream(tokenizer, prompt.ids, prompt.stop) if tokenizer is not None else None,
            sequence=sequence, length=length, max_new_tokens=prompt.max_new_tokens, capture=prompt.capture,
            top_logprobs=prompt.top_logprobs,
        )

    def step(self) -> list[tuple[object, TokenEvent]]:
        """One decode step of every running row, and each row's next token."""
        count = len(self.running)
        batch = next(size for size in self.batch_sizes() if size >= count) if self.compiled else count
        logits, routed = self.decode(batch, [row.pending for row in self.running],
                                     any(row.capture for row in self.running))
        for slot in range(count):
            self.lengths[slot] += 1
            self.positions[slot] += 1
        experts = routed.tolist() if routed is not None else [[] for _ in range(batch)]
        events = []
        for slot, row in enumerate(self.running[:count]):
            if row.feeding:  # still reading its prompt: no token yet
                row.pending = row.feeding.popleft()
                continue
            joined = [row]
            if row.joining is not None:  # its prompt is read: its copies start from its cache, with its logits
                joined += self.start_copies(row.joining, slot)
                row.joining = None
            events += [(each.owner, self.choose(each, logits[slot : slot + 1], experts[slot])) for each in joined]
        self.free_finished()
        return events

    def batch_sizes(self) -> list[int]:
        """The numbers of rows a compiled step runs on: the sizes of `BATCH_SIZES` below the slots, and the slots."""
        return [*(size for size in BATCH_SIZES if size < self.slots), self.slots]

    def compile_steps(self, announce: Callable[[int, float], None] = lambda rows, seconds: None) -> None:
        """Compile the step for every batch size now, before any row runs (a server's startup), so that no request
        waits seconds while its batch size compiles; ``announce(rows, seconds)`` follows each. The steps run on free
        slots, which write their column 0 and are never read before a prompt is loaded into them."""
        for size in self.batch_sizes():
            if not self.compiled:  # compilation failed and was reported: the eager step needs none
                return
            start = time.perf_counter()
            with fp32_inference(self.device.type):
                self.decode(size, [], capture=False)
            announce(size, time.perf_counter() - start)

    def decode(self, batch: int, tokens: list[int], capture: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The logits (and routed experts, where captured) of one step of the first ``batch`` slots, fed
        ``tokens`` (slots beyond them are free and fed token 0); None where a compile-only step (no tokens) found
        that the step cannot compile."""
        columns = self.lengths[:batch]  # a free slot in a compiled batch writes its column 0, never read
        column = torch.tensor(columns, dtype=torch.long, device=self.device)
        positions = torch.tensor(self.positions[:batch], dtype=torch.long, device=self.device)
        self.mask[:batch, 0, 0].scatter_(1, column[:, None], 0.0)
        if self.compiled:
            length, mask = self.capacity, self.mask[:batch]
        else:
            length = max(columns) + 1
            mask = self.mask[:batch, ..., :length]
        fed = torch.tensor(tokens + [0] * (batch - len(tokens)), device=self.device)
        caches = [map_tensors(layer, lambda tensor: slot_rows(tensor, self.slots, 0, batch)) for layer in self.caches]
        try:
            return self.step_function(batch, capture)(self.weights, caches, fed, positions, column, mask, length,
                                                      capture)
        except Exception as error:  # noqa: BLE001 - whatever stops compilation (no C++ compiler, an unsupported op)
            if not self.compiled:
                raise
            warn_compile_failed(error)
            self.compiled = False
            return self.decode(len(tokens), tokens, capture) if tokens else None

    def step_function(self, batch: int, capture: bool):
        if not self.compiled:
            return lean_step
        return compiled_lean_step(self.model.config.to_json_string(), capture, batch, self.capacity, self.device.type,
                                  self.weights.dtype)

    def choose(self, row: Row, logits: torch.Tensor, experts: list[list[int]]) -> TokenEvent:
        """The row's next token from its logits [1, V], through its own processors and generator."""
        scores = logits
        # Each processor called directly: LogitsProcessorList's call inspects every processor's signature, which
        # costs more than the processor itself, once per row and step.
        for processor in row.processors:
            scores = processor(row.sequence[None, : row.length], scores)
        token = int(row.sampling.choose(scores, row.generator))
        row.sequence[row.length] = token
        row.length += 1
        row.generated += 1
        row.pending = token
        details = self.engine.capture_details([experts], logits) if row.capture else None
        event = self.engine.event(0, token, row.text, row.generated == row.max_new_tokens, details)
        row.finished = event.finish_reason is not None
        logprobs = self.logprobs(scores[0], token, row.top_logprobs) if row.top_logprobs is not None else None
        return replace(event, row=row.index, logprobs=logprobs)

    def logprobs(self, scores: torch.Tensor, token: int, top: int) -> TokenLogprobs:
        logprobs = scores.log_softmax(dim=-1)
        best = logprobs.topk(top) if top else None
        alternatives = [] if best is None else [
            (alternative, self.engine.token_text(alternative), value)
            for alternative, value in zip(best.indices.tolist(), best.values.tolist())
        ]
        return TokenLogprobs(self.engine.token_text(token), float(logprobs[token]), alternatives)

    def free_finished(self) -> None:
        for slot in reversed(range(len(self.running))):
            if self.running[slot].finished:
                self.free(slot)

    def free(self, slot: int) -> None:
        """Free a slot: the last running row moves into it, so the running rows keep filling the first slots."""
        last = len(self.running) - 1
        if slot != last:
            self.copy_slot(last, slot)
            self.running[slot] = self.running[last]
        self.running.pop()
        self.lengths[last] = self.positions[last] = 0
        self.mask[last] = float("-inf")
        self.mask[last, ..., 0] = 0.0

    def copy_slot(self, source: int, target: int) -> None:
        for layer in self.caches:
            map_tensors(layer, lambda tensor: slot_rows(tensor, self.slots, target, target + 1).copy_(
                slot_rows(tensor, self.slots, source, source + 1)))
        self.mask[target] = self.mask[source]
        self.lengths[target], self.positions[target] = self.lengths[source], self.positions[source]
