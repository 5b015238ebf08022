"""The attention types: one module each (its nn.Module, decode step, cache and `AttentionSpec`), and the registry
that declares them (`tinyseek.attention.registry`). Every module of this package is loaded with it, so a new type is
one new file here, and nothing else names it."""

import importlib
import pkgutil

from tinyseek.attention.registry import (
    ATTENTION_REGISTRY,
    AttentionSpec,
    TinySeekCache,
    attention_spec,
    document_positions,
    register_attention,
)

__all__ = ["ATTENTION_REGISTRY", "AttentionSpec", "TinySeekCache", "attention_spec", "document_positions", "register_attention"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
