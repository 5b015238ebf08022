"""Muon for the hidden weight matrices, AdamW for everything else, as ONE torch optimizer.

Muon (momentum, then the update orthogonalised by a Newton–Schulz iteration) is made for 2-D matrices that map
hidden states to hidden states: the attention projections and the dense and shared-expert MLPs. Embeddings, the LM
head, norms, biases, the router and the 3-D routed-expert stacks stay with AdamW. Both live in one optimizer, so one
`step()`, one LR scheduler (every group has an `lr`) and one checkpoint (the standard `state_dict`, keyed by
parameter like any torch optimizer's) cover them, and resume is bitwise exact on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from tinyseek.moe import Router
from tinyseek.ops import cpu_has_native_bf16_matmul

# torch.optim.Muon's defaults (Keller Jordan's quintic coefficients).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def is_muon_matrix(model: nn.Module) -> callable:
    """Which trainable parameters Muon takes: 2-D weights of the blocks, not the embedding, head or router."""
    excluded = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, Router))}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        excluded.add(id(output.weight))
    return lambda parameter: parameter.ndim == 2 and id(parameter) not in excluded


def newton_schulz_fp32(matrix: torch.Tensor, steps: int = NS_STEPS, eps: float = NS_EPS) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation with its coefficients, in fp32.

    torch runs the iteration in bf16, which CPUs without bf16 units (AVX2, plain AVX-512) emulate far slower than
    an fp32 matmul; in fp32 the same iteration is fast there and at least as accurate."""
    a, b, c = NS_COEFFICIENTS
    transposed = matrix.size(0) > matrix.size(1)
    x = matrix.float().T if transposed else matrix.float()
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if transposed else x


# torch.optim.Muon's learning-rate adjustments by the shape (rows A, columns B) of a matrix, as its documentation
# states them; torch keeps its own function private (tests/test_muon.py checks that the two agree).
LR_ADJUSTMENTS = {
    "original": lambda rows, columns: math.sqrt(max(1, rows / columns)),
    "match_rms_adamw": lambda rows, columns: 0.2 * math.sqrt(max(rows, columns)),
}


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The learning rate torch.optim.Muon applies to a matrix of `shape` (None means "original")."""
    return lr * LR_ADJUSTMENTS[adjust_lr_fn or "original"](*shape[:2])


class Float32Muon(torch.optim.Muon):
    """torch.optim.Muon's update (momentum, Nesterov, decoupled weight decay, learning-rate adjustment) with the
    Newton–Schulz iteration in fp32 (see `newton_schulz_fp32`)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(parameter.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(parameter.grad, 1 - momentum)
                update = parameter.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = newton_schulz_fp32(update, group["ns_steps"], group["eps"]).to(parameter.dtype)
                parameter.mul_(1 - lr * group["weight_decay"])
                parameter.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], parameter.shape))
        return loss


def muon_class(device: torch.device) -> type[torch.optim.Muon]:
    """torch's own Muon where bf16 matmuls are fast (GPUs, CPUs with AVX512-BF16/AMX), else the fp32 iteration."""
    fast_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16_matmul())
    return torch.optim.Muon if fast_bf16 else Float32Muon


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer over two inner ones: a Muon for the groups marked `muon: True`, an AdamW for the rest.

    The outer `param_groups` are the inner optimizers' own group dicts and all three share one `state`, so a
    scheduler, `zero_grad`, `state_dict` and `load_state_dict` see one ordinary torch optimizer."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        for group in muon.param_groups:
            group["muon"] = True
        for group in adamw.param_groups:
            group["muon"] = False
        super().__init__(self._groups_of(muon, adamw), {})
        self._link()

    @staticmethod
    def _groups_of(*optimizers: torch.optim.Optimizer) -> list[dict]:
        return [group for optimizer in optimizers for group in optimizer.param_groups]

    def _link(self) -> None:
        """Make the inner optimizers use the outer groups and state (after construction or a state load)."""
        self.param_groups = [group for group in self.param_groups if group["muon"]] + [
            group for group in self.param_groups if not group["muon"]
        ]
        self.muon.param_groups = [group for group in self.param_groups if group["muon"]]
        self.adamw.param_groups = [group for group in self.param_groups if not group["muon"]]
        self.muon.state = self.adamw.state = self.state

    def add_param_group(self, param_group: dict) -> None:
        # torch's constructor adds the inner optimizers' groups, already complete, one by one.
        self.param_groups.append(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss


def build_muon_with_adamw(
    model: nn.Module, adamw_groups: Iterable[dict], *, betas, eps: float, device: torch.device, fused: bool,
    foreach: bool, momentum: float = 0.95, muon_lr_scale: float = 1.0,
) -> MuonWithAdamW:
    """Muon over `model`'s hidden matrices, AdamW over the rest of `adamw_groups` (torch param groups covering the
    model, each with its `lr` and `weight_decay`). A matrix keeps the weight decay of the group it came from and its
    lr times `muon_lr_scale`; Muon's update is scaled to AdamW's RMS (Moonshot's "match_rms_adamw"), so the same lr
    serves both at a scale of 1."""
    takes = is_muon_matrix(model)
    matrix_groups, other_groups = [], []
    for group in adamw_groups:
        settings = {key: value for key, value in group.items() if key != "params"}
        matrices = [p for p in group["params"] if takes(p)]
        rest = [p for p in group["params"] if not takes(p)]
        if matrices:
            matrix_groups.append({
                **settings, "params": matrices, "roles": ["muon"], "lr": settings["lr"] * muon_lr_scale,
                "lr_scale": settings.get("lr_scale", 1.0) * muon_lr_scale,
            })
        if rest:
            other_groups.append({**settings, "params": rest})
    lr = matrix_groups[0]["lr"] if matrix_groups else 0.0
    muon = muon_class(device)(matrix_groups, lr=lr, momentum=momentum, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(other_groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused, foreach=foreach)
    return MuonWithAdamW(muon, adamw)
