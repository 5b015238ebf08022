"""The trainer's evaluation component: the validation loss, and continuations of the configured prompts."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Callable

import torch

from tinyseek.data import TokenDataset, iter_eval_batches
from tinyseek.data.tokenizer import encode_prompt
from tinyseek.generate.engine import GenerationEngine
from tinyseek.train.config import TrainConfig


class Evaluator:
    def __init__(self, config: TrainConfig, val_set: TokenDataset, tokenizer, world_size: int):
        self.config, self.val_set, self.tokenizer = config, val_set, tokenizer
        self.batch_windows = config.data.micro_batch_size * config.data.grad_accum * world_size

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, forward_model: torch.nn.Module, device: torch.device,
                 autocast: Callable[[], AbstractContextManager]) -> dict[str, float]:
        """Mean next-token loss over the same validation windows every time (spread evenly over the split), in
        batches of one optimizer step's windows (of all processes): without gradients they fit where training fits.

        Every process evaluates all windows: FSDP needs all ranks in every forward, and the figure is then the
        single-process one exactly."""
        model.eval()
        total, windows = torch.zeros((), device=device), 0
        batches = iter_eval_batches(
            self.val_set, self.config.data.seq_len, self.batch_windows, max_batches=self.config.logging.eval_batches,
        )
        for window in batches:
            window = window.to(device)
            with autocast():
                loss = forward_model(input_ids=window[:, :-1], shift_labels=window[:, 1:]).lm_loss
            total += loss.float() * len(window)
            windows += len(window)
        val_loss = total.item() / windows
        return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}

    def sample(self, model: torch.nn.Module) -> list[dict[str, str]]:
        """Continuations of the configured prompts, through the generation engine (fp32, whatever the training
        precision). Each prompt draws from its own generator seeded from the config, so sampling neither perturbs
        training (exact resume) nor varies between evaluations except through the weights."""
        settings = self.config.sample
        sampling = settings.sampling(self.config.seed)
        engine = GenerationEngine(model, self.tokenizer)
        samples = []
        for prompt in settings.prompts:
            prompt_ids = encode_prompt(self.tokenizer, prompt)
            (completion,) = engine.generate([prompt_ids], sampling, settings.max_new_tokens)
            samples.append({"prompt": prompt, "continuation": completion.text})
        return samples
