"""Self-speculative greedy decoding with the model's multi-token-prediction (MTP) head.

At position p the engine has chosen token x. The MTP module, from the main model's last hidden state at p - 1 and
the embedding of x, drafts the token after x; the main model then runs x and the draft together (one forward of
two tokens) and so yields the logits after x and, if the engine's next choice equals the draft, the logits after
the draft as well: that step needs no forward at all. The engine chooses every token from the main model's logits,
so the output is the non-speculative greedy output; a wrong draft costs only its column of the cache, which is
dropped where the cache can crop, and otherwise (a recurrent state cannot drop a token) the cache's snapshot from
before the pair is restored and x is run again. The cache says which (`TinySeekCache.can_crop`); the attention type
is never asked.

The MTP block has its own cache: position i of it reads (h_i, x_{i+1}), which the prefill fills for the prompt and
each draft extends by the positions verified since the last one.
"""

from __future__ import annotations

import torch

from tinyseek.attention import TinySeekCache


class SpeculativeForward:
    """A `Decoder` for one row, with an MTP draft per step. Any rule for choosing tokens works: logits after a draft
    are used only when the chosen token is the draft."""

    path = "speculative (MTP draft, model forward verify)"

    def __init__(self, model):
        self.model = model
        self.mtp = model.mtp[0]
        self.cache = TinySeekCache(model.config)
        self.mtp_cache = TinySeekCache(model.config, num_layers=1)
        self.drafted = self.accepted = 0
        # From the last verify: (draft, logits after the draft, hidden at the draft, hidden at the token before it).
        self.pending = None
        self.snapshot: list | None = None  # the cache before the last verify, where it cannot crop
        self.last_pair_first: torch.Tensor | None = None
        self.unseen: list[tuple[torch.Tensor, int]] = []  # (main hidden at i, token i + 1) not yet in the MTP cache

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden, logits = self.forward(input_ids)
        self.last_hidden = hidden[:, -1:]
        prompt = input_ids[0].tolist()
        # MTP positions 0 .. P - 2 read (h_i, x_{i+1}); position P - 1 waits for the first generated token.
        self.unseen = [(hidden[:, i : i + 1], prompt[i + 1]) for i in range(len(prompt) - 1)]
        return logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        token = int(tokens[0])
        if self.pending is not None:
            draft, logits_after, hidden_at_draft, hidden_before = self.pending
            self.pending = None
            self.drafted += 1
            if token == draft:
                self.accepted += 1
                self.unseen.append((hidden_before, token))
                self.last_hidden = hidden_at_draft
                return logits_after
            self.drop_draft()
            self.last_hidden = hidden_before
        self.unseen.append((self.last_hidden, token))
        if self.cache.get_seq_length() + 2 > self.model.config.max_position_embeddings:
            hidden, logits = self.forward(tokens[:, None])  # no position left for a draft
            self.last_hidden = hidden[:, -1:]
            return logits[:, 0]
        draft = self.draft()
        pair = torch.tensor([[token, draft]], device=tokens.device)
        self.snapshot = None if self.cache.can_crop else self.cache.snapshot()
        hidden, logits = self.forward(pair)
        self.pending = (draft, logits[:, 1], hidden[:, 1:], hidden[:, :1])
        return logits[:, 0]

    def draft(self) -> int:
        """Run the MTP block over the unseen positions; its last output's greedy token."""
        past = self.mtp_cache.get_seq_length()
        hidden = torch.cat([h for h, _ in self.unseen], dim=1)
        tokens = torch.tensor([[t for _, t in self.unseen]], device=hidden.device)
        self.unseen = []
        count = tokens.shape[1]
        positions = torch.arange(past, past + count, device=hidden.device)[None]
        rotary = self.model.model.rotary_emb(positions) if self.model.model.rotary_emb is not None else None
        causal_mask = self.model.model.attention.mask(self.model.config, None, count, past, hidden.device, None)
        _, normed, _ = self.mtp(
            hidden, self.model.model.embed_tokens(tokens), rotary, causal_mask=causal_mask,
            cache_layer=self.mtp_cache.layers[0],
        )
        # The raw head, not head_logits: a soft-cap keeps the logits' order, so the draft's argmax is the same.
        return int(self.model.lm_head(normed[:, -1]).argmax(-1))

    def drop_draft(self) -> None:
        """Forget the rejected draft's entry in every layer of the main cache."""
        if self.snapshot is None:
            for layer in self.cache.layers:
                layer.crop(-1)
            return
        # A cache that cannot drop a token: restore it as it was before the pair and run the pair's first token again.
        self.cache.restore(self.snapshot)
        self.forward(self.last_pair_first)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-norm hidden states, fp32 logits) of the new tokens, extending the main cache."""
        self.last_pair_first = input_ids[:, :1]
        output = self.model.model(input_ids, cache=self.cache, use_cache=True)
        return output.pre_norm_hidden_state, self.model.head_logits(output.last_hidden_state).float()

    def experts(self):
        raise NotImplementedError("the engine decodes captures without speculation")
