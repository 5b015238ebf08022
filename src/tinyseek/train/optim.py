"""Optimizers as a registry of named builders, and the one place that decides parameter groups.

Modelled on torchtitan's optimizer components: the config names an optimizer (``optim.name``), a builder registered
under that name makes it from the model and the config, and every parameter has a role (torchtitan's "scalar",
"embedding", "head" ... classes) that decides its weight decay and learning-rate multiplier. Everything downstream
(the scheduler, resuming with the current config's settings, the announcement, checkpoints) works on
``optimizer.param_groups`` whatever their number, so a new optimizer is one ``@register_optimizer`` function.

Adding one::

    @register_optimizer("sgd")
    def build_sgd(model, optim, device):
        return torch.optim.SGD(parameter_groups(model, optim), lr=optim.lr, momentum=0.9)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from tinyseek.errors import ConfigError
from tinyseek.train.muon import MuonWithAdamW, build_muon_with_adamw

if TYPE_CHECKING:  # the config module consults this registry when it validates; only the types go the other way
    from tinyseek.train.config import OptimConfig, TrainConfig

# Every trainable parameter has exactly one role, in this order of precedence.
ROLES = ("matrix", "head", "embedding", "vector")
"""matrix: weight matrices and expert weight stacks of the blocks (and the MTP modules); head: the LM head's weight
(when untied); embedding: the token embedding; vector: norms' scales and biases (1-D)."""
# `optim.lr_multipliers` also takes this key, for optim.name muon: the matrices Muon takes, on top of their role's.
MUON_MULTIPLIER = "muon"
# Decay pulls weights towards zero; for norms, biases and token embeddings that shrinks scales and rare tokens'
# vectors without regularising anything useful, so only matrices decay.
DECAYED_ROLES = ("matrix", "head")

OptimizerBuilder = Callable[[nn.Module, "OptimConfig", torch.device], torch.optim.Optimizer]
OPTIMIZERS: dict[str, OptimizerBuilder] = {}
# What an optimizer asks of the rest of the run (a ConfigError otherwise), checked with the config.
ConfigRule = Callable[["TrainConfig"], None]
CONFIG_RULES: dict[str, ConfigRule] = {}


def register_optimizer(name: str, rule: ConfigRule | None = None) -> Callable[[OptimizerBuilder], OptimizerBuilder]:
    """Decorator: make `name` a valid ``optim.name``, built by the decorated ``builder(model, optim, device)``;
    `rule(config)` raises a ConfigError for a run the optimizer cannot serve."""

    def register(builder: OptimizerBuilder) -> OptimizerBuilder:
        if name in OPTIMIZERS:
            raise TypeError(f"optimizer {name!r} is already registered by {OPTIMIZERS[name].__name__}")
        OPTIMIZERS[name] = builder
        if rule is not None:
            CONFIG_RULES[name] = rule
        return builder

    return register


def parameter_role(model: nn.Module) -> Callable[[nn.Parameter], str]:
    """The role of each of `model`'s parameters (a tied head is the embedding)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = {id(output.weight)} if output is not None else set()

    def role(parameter: nn.Parameter) -> str:
        if id(parameter) in embeddings:
            return "embedding"
        if id(parameter) in head:
            return "head"
        return "vector" if parameter.ndim < 2 else "matrix"

    return role


def parameter_groups(model: nn.Module, optim: OptimConfig, roles: tuple[str, ...] = ROLES) -> list[dict]:
    """torch param groups for the trainable parameters whose role is in `roles`: roles with the same weight decay
    and learning-rate multiplier share a group (so by default, decayed matrices and everything else: two groups),
    groups come in the order of `roles`, parameters in the model's order.

    Each group carries ``roles``, ``weight_decay``, ``lr_scale`` and ``lr`` (= optim.lr x lr_scale, the peak the
    scheduler multiplies); the extra keys travel in the optimizer's state dict.
    """
    groups: dict[tuple[float, float], dict] = {}
    group_of_role = {}
    for role in roles:
        settings = (optim.weight_decay if role in DECAYED_ROLES else 0.0, optim.lr_multipliers.get(role, 1.0))
        group = groups.setdefault(settings, {
            "params": [], "roles": [], "weight_decay": settings[0], "lr_scale": settings[1],
            "lr": optim.lr * settings[1],
        })
        group["roles"].append(role)
        group_of_role[role] = group
    role_of = parameter_role(model)
    for parameter in model.parameters():
        if parameter.requires_grad and role_of(parameter) in group_of_role:
            group_of_role[role_of(parameter)]["params"].append(parameter)
    return [group for group in groups.values() if group["params"]]


def kernel_choice(optim: OptimConfig, device: torch.device) -> dict[str, bool]:
    """``fused``/``foreach`` keyword arguments of torch's optimizers for ``optim.implementation``."""
    implementation = optim.implementation
    if implementation == "auto":
        implementation = "fused" if device.type in ("cpu", "cuda", "mps") else "foreach"
    return {"fused": implementation == "fused", "foreach": implementation == "foreach"}


@register_optimizer("adamw")
def build_adamw(model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        parameter_groups(model, optim), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
        **kernel_choice(optim, device),
    )


def muon_needs_whole_matrices(config: TrainConfig) -> None:
    if config.parallel == "fsdp":
        raise ConfigError(
            "optim.name muon: Muon orthogonalises whole weight matrices, and under --parallel fsdp each process holds "
            "only a shard of each; use --parallel ddp, or optim.name adamw with fsdp"
        )


@register_optimizer("muon", rule=muon_needs_whole_matrices)
def build_muon(model: nn.Module, optim: OptimConfig, device: torch.device) -> MuonWithAdamW:
    """Muon for the blocks' 2-D hidden matrices (attention projections, dense and shared-expert MLPs), AdamW with
    these groups' settings for the rest (embedding, head, norms, biases, router, routed-expert stacks): one
    optimizer, so one step, one scheduler and one checkpoint (tinyseek.train.muon)."""
    return build_muon_with_adamw(
        model, parameter_groups(model, optim), betas=optim.betas, eps=optim.eps, device=device,
        muon_lr_scale=optim.lr_multipliers.get(MUON_MULTIPLIER, 1.0), **kernel_choice(optim, device),
    )


def build_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    if optim.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name: unknown optimizer {optim.name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[optim.name](model, optim, device)


def apply_current_hyperparameters(optimizer: torch.optim.Optimizer, current: torch.optim.Optimizer, scheduler) -> None:
    """A loaded optimizer carries the old run's settings; `current`, the same optimizer freshly built from this
    run's config, wins (an unchanged config gives back exactly the same values). The state (moments, steps) stays."""
    if len(optimizer.param_groups) != len(current.param_groups):
        raise ConfigError(
            f"the checkpoint's optimizer has {len(optimizer.param_groups)} parameter groups, this run's config makes "
            f"{len(current.param_groups)} (optim.name or optim.lr_multipliers changed); resume with the same ones"
        )
    multiplier = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group, fresh in zip(optimizer.param_groups, current.param_groups):
        group.update({key: value for key, value in fresh.items() if key != "params"})
        group["initial_lr"] = fresh["lr"]
        group["lr"] = fresh["lr"] * multiplier
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]


def describe(optimizer: torch.optim.Optimizer, optim: OptimConfig) -> str:
    """``adamw (fused) | matrix+head: 1,234 parameters, lr x1, weight decay 0.1 | ...`` for the run's log."""
    kernel = "fused" if optimizer.defaults.get("fused") else "foreach" if optimizer.defaults.get("foreach") else "for-loop"
    groups = [
        f"{'+'.join(group.get('roles', ['all']))}: {sum(p.numel() for p in group['params']):,} parameters, "
        f"lr x{group.get('lr_scale', 1.0):g}, weight decay {group['weight_decay']:g}"
        for group in optimizer.param_groups
    ]
    return " | ".join([f"{optim.name} ({kernel})", *groups])
