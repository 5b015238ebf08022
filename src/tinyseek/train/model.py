"""The trainer's model component: where the run trains (device, process group, precision), the model built for it
(sparse embedding gradients, activation checkpointing, regional compilation), and the module the loop calls (made
data-parallel from outside by `tinyseek.distributed.parallelize`)."""

from __future__ import annotations

import copy
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from tinyseek import TinySeekConfig, TinySeekForCausalLM, distributed, ops
from tinyseek.data import check_tokenizer_fits, tokenizer_identity
from tinyseek.device import choose_device
from tinyseek.distributed import World
from tinyseek.report import check_model_fits
from tinyseek.train.compile import compile_decoder_layers
from tinyseek.errors import ConfigError
from tinyseek.train.config import TrainConfig, check_window_fits
from tinyseek.train.initial import InitialModel

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose_precision(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cpu":
        return "bf16"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model_config(config: TrainConfig, tokenizer: PreTrainedTokenizerBase,
                       initial: InitialModel | None = None) -> TinySeekConfig:
    """The model's configuration for this tokenizer (the saved model's, when the run starts from one), refused before
    any corpus is tokenized for a model that the tokenizer does not fit or that cannot be trained here anyway."""
    if initial is None:
        model_config = config.build_model_config(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    else:
        if tokenizer_identity(tokenizer) != initial.tokenizer_id:
            raise ConfigError(f"init_from {initial.folder} was trained with tokenizer {initial.tokenizer_id}, this run "
                              f"uses {config.data.tokenizer} ({tokenizer_identity(tokenizer)}); leave --tokenizer out "
                              "to use the model's own")
        model_config = copy.deepcopy(initial.config)
        check_window_fits(config, model_config.max_position_embeddings)
    check_tokenizer_fits(tokenizer, model_config.vocab_size)
    check_model_fits(model_config, choose_device(config.device))
    return model_config


@dataclass
class Placement:
    """The device, the process group under torchrun (a world of one otherwise), and the training precision."""

    world: World
    device: torch.device
    precision: str

    @classmethod
    def join(cls, config: TrainConfig) -> Placement:
        device = choose_device(config.device)
        world = distributed.init_distributed(device)
        device = distributed.local_device(device, world)
        return cls(world, device, choose_precision(config.dtype, device))

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.precision]

    def largest_across_ranks(self, value: int) -> int:
        """`value`'s maximum over all processes (a collective under torchrun: every process must call it)."""
        return distributed.max_across_ranks(value, self.world, self.device) if self.world.is_distributed else value

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


@dataclass
class BuiltModel:
    model: TinySeekForCausalLM
    forward_model: torch.nn.Module  # what the loop calls: the model made data-parallel under torchrun, else itself
    compile_path: str  # how the decoder layers run: "off", compiled, or eager and why


def build_model(config: TrainConfig, model_config: TinySeekConfig, placement: Placement,
                initial_weights: dict[str, torch.Tensor] | None = None) -> BuiltModel:
    """The model, initialised from the config's seed (or given its initial weights), then made data-parallel under
    torchrun."""
    seed_everything(config.seed)
    model = TinySeekForCausalLM(model_config).to(placement.device)
    if initial_weights is not None:
        model.load_state_dict(initial_weights)
    if not placement.world.is_distributed:  # DDP and FSDP reduce dense gradient buckets
        for module in model.modules():
            if isinstance(module, ops.Embedding):
                module.accumulate_sparse_gradients = True
    if config.gradient_checkpointing != "none":
        model.activation_checkpointing_enable(selective=config.gradient_checkpointing == "selective")
    compile_path = compile_decoder_layers(model, placement.device) if config.compile else "off"
    forward_model = distributed.parallelize(model, config.parallel, placement.world, placement.device)
    return BuiltModel(model, forward_model, compile_path)
