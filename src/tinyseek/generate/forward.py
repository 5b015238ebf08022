"""The decoders' one interface, and its reference implementation: the model's own forward with its cache."""

from __future__ import annotations

from typing import Protocol

import torch

from tinyseek.moe import Router


class Decoder(Protocol):
    """What `GenerationEngine` drives, whichever implementation it chose (`tinyseek.generate.engine.DECODERS`)."""

    path: str
    """How it decodes, in words (shown by `tinyseek generate` and the server)."""

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] in fp32 for the token after each left-padded prompt [B, P]."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] in fp32 after feeding one token [B] per row."""

    def experts(self) -> list[list[list[int]]]:
        """Per row, per MoE layer: the routed experts of the position whose output gave the latest logits (only
        asked of a decoder made with capture on)."""


class CachedForward:
    """Decoding through the model's own forward and its `TinySeekCache`, one call per step."""

    path = "model forward"

    def __init__(self, model, capture: bool):
        self.model, self.cache, self.attention_mask = model, None, None
        self.routers = [module for module in model.model.modules() if isinstance(module, Router)] if capture else []
        self.routed: list[torch.Tensor] = []

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.attention_mask = attention_mask
        return self.forward(input_ids)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.extend(tokens[:, None])

    def extend(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] after feeding [B, T] more tokens, none of them padding (the next chunk of a prompt
        prefilled in chunks)."""
        self.attention_mask = torch.cat((self.attention_mask, self.attention_mask.new_ones(input_ids.shape)), dim=1)
        return self.forward(input_ids)

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
