"""`tinyseek export --format gguf`: one GGUF file that llama.cpp runs (and so ollama, LM Studio, llama-cpp-python).

Written with the `gguf` package (llama.cpp's own writer and numpy quantizers), not by llama.cpp's
`convert_hf_to_gguf.py` on a `--format transformers` export: that converter reads DeepSeek weights as DeepSeek
publishes them, RoPE dimensions interleaved in pairs, while tinyseek (like transformers with
``rope_interleave=False``) rotates halves; and transformers' DeepseekV3 config names no scoring function, so it
writes none and llama.cpp assumes softmax. Either alone moves the logits by ~0.1 or more (docs/export.md).

An architecture goes out as the llama.cpp architecture that computes the same function (``GGUF_ARCHITECTURES``, by
attention type): MLA, with a DeepSeekMoE or a dense MLP, as ``deepseek2``; softmax attention with a dense MLP as
``llama``. What llama.cpp cannot compute is refused, with the reason, before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import gguf
import numpy as np

from tinyseek import faults
from tinyseek.errors import ConfigError, FileError, InputError
from tinyseek.moe import feed_forward_spec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from tinyseek.config import TinySeekConfig
    from tinyseek.modeling import TinySeekForCausalLM

# Kept in fp32 whatever the file type, as llama.cpp's converter does: 1-D tensors (norms, the balancing bias) are
# tiny, and the router's scores decide discrete expert choices that rounding would flip.
FP32_KINDS = (gguf.MODEL_TENSOR.FFN_GATE_INP,)
# `--gguf-type` -> the file type llama.cpp reports (general.file_type).
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one family of tinyseek models is written as one llama.cpp architecture."""

    name: str
    """llama.cpp's architecture name (``general.architecture``)."""
    problem: Callable[[TinySeekConfig], str | None]
    """Why llama.cpp's implementation of this architecture cannot compute this config, or None."""
    hyperparameters: Callable[[gguf.GGUFWriter, TinySeekConfig], None]
    """Write the architecture's keys besides the ones every model has (sizes, norms, RoPE)."""
    attention_tensors: Callable[[dict, TinySeekConfig, int], Iterator[tuple]]
    """``(gguf tensor kind, array)`` pairs of layer `i`'s attention, in llama.cpp's layout."""


def interleave_rope_rows(weight: np.ndarray, heads: int, head_dim: int, rope_start: int) -> np.ndarray:
    """Reorder the output rows of a projection so that each head's rotary part pairs dimensions (0, 1), (2, 3), ...

    tinyseek pairs dimension i with i + d/2 (rotate-half); llama.cpp's LLAMA and DEEPSEEK2 rope types rotate adjacent
    pairs. Within each head, rows [rope_start, head_dim) are the rotary ones; the rows before them are left alone."""
    rows = weight.reshape(heads, head_dim, -1)
    rope = rows[:, rope_start:]
    half = rope.shape[1] // 2
    interleaved = rope.reshape(heads, 2, half, -1).swapaxes(1, 2).reshape(rope.shape)
    return np.concatenate([rows[:, :rope_start], interleaved], axis=1).reshape(weight.shape)


def llama_problem(config: TinySeekConfig) -> str | None:
    if config.ffn_type != "dense":
        return ("llama.cpp's llama architecture routes experts Mixtral's way (softmax over the top k), not "
                "DeepSeekMoE's; use ffn_type='dense' with MHA, or MLA for a MoE")
    return None


def llama_hyperparameters(writer: gguf.GGUFWriter, config: TinySeekConfig) -> None:
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)


def llama_attention(state: dict, config: TinySeekConfig, i: int) -> Iterator[tuple]:
    attention, kinds = f"model.layers.{i}.self_attn.", gguf.MODEL_TENSOR
    head_dim = config.head_dim
    yield kinds.ATTN_Q, interleave_rope_rows(state[attention + "q_proj.weight"], config.num_attention_heads, head_dim, 0)
    yield kinds.ATTN_K, interleave_rope_rows(state[attention + "k_proj.weight"], config.num_key_value_heads, head_dim, 0)
    yield kinds.ATTN_V, state[attention + "v_proj.weight"]
    yield kinds.ATTN_OUT, state[attention + "o_proj.weight"]


def deepseek2_problem(config: TinySeekConfig) -> str | None:
    from tinyseek.attention.latent import LATENT_NORM_EPS

    if config.q_lora_rank is None:
        # llama.cpp reads a full-rank query only for DeepSeek-V2-Lite's depths (26, 27 or 48 layers).
        return "llama.cpp's deepseek2 needs a low-rank query projection; set q_lora_rank"
    if config.rms_norm_eps != LATENT_NORM_EPS:
        return (f"llama.cpp's deepseek2 uses one epsilon for every norm, but this model's rms_norm_eps is "
                f"{config.rms_norm_eps} and its latent norms' {LATENT_NORM_EPS}")
    if config.ffn_type == "moe":
        if config.router_bias:
            return "llama.cpp's deepseek2 router has no learnable bias (router_bias=True here)"
        if config.scoring_func.upper() not in gguf.ExpertGatingFuncType.__members__:
            return f"llama.cpp has no {config.scoring_func!r} expert scoring function"
    return None


def deepseek2_hyperparameters(writer: gguf.GGUFWriter, config: TinySeekConfig) -> None:
    writer.add_head_count_kv(1)  # llama.cpp runs MLA as multi-query attention over the shared latent
    writer.add_q_lora_rank(config.q_lora_rank)
    writer.add_kv_lora_rank(config.kv_lora_rank)
    writer.add_key_length(config.kv_lora_rank + config.qk_rope_head_dim)
    writer.add_value_length(config.kv_lora_rank)
    writer.add_key_length_mla(config.qk_head_dim)
    writer.add_value_length_mla(config.v_head_dim)
    writer.add_rope_dimension_count(config.qk_rope_head_dim)
    moe = config.ffn_type == "moe"
    writer.add_leading_dense_block_count(config.first_k_dense_replace if moe else config.num_hidden_layers)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_expert_shared_count(max(config.n_shared_experts, 1) if moe else 0)
    if moe:
        writer.add_expert_count(config.n_routed_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        # Always written: without it llama.cpp assumes softmax, and a sigmoid router then picks wrong experts silently.
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType[config.scoring_func.upper()])
        writer.add_expert_weights_norm(config.norm_topk_prob)
        writer.add_expert_weights_scale(config.routed_scaling_factor)


def deepseek2_attention(state: dict, config: TinySeekConfig, i: int) -> Iterator[tuple]:
    attention, kinds = f"model.layers.{i}.self_attn.", gguf.MODEL_TENSOR
    heads, nope, rope, v_dim, rank = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                                      config.v_head_dim, config.kv_lora_rank)
    yield kinds.ATTN_Q_A, state[attention + "q_a_proj.weight"]
    yield kinds.ATTN_Q_A_NORM, state[attention + "q_a_layernorm.weight"]
    yield kinds.ATTN_Q_B, interleave_rope_rows(state[attention + "q_b_proj.weight"], heads, nope + rope, nope)
    # One "head" of the latent followed by the shared rotary key.
    yield kinds.ATTN_KV_A_MQA, interleave_rope_rows(state[attention + "kv_a_proj_with_mqa.weight"], 1, rank + rope, rank)
    yield kinds.ATTN_KV_A_NORM, state[attention + "kv_a_layernorm.weight"]
    # llama.cpp absorbs the up-projections (as tinyseek's decode does): keys' as [heads, rank, nope], values' as is.
    up_key, up_value = np.split(state[attention + "kv_b_proj.weight"].reshape(heads, nope + v_dim, rank), [nope], axis=1)
    yield kinds.ATTN_K_B, np.ascontiguousarray(up_key.swapaxes(1, 2))
    yield kinds.ATTN_V_B, np.ascontiguousarray(up_value)
    yield kinds.ATTN_OUT, state[attention + "o_proj.weight"]


GGUF_ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "mla": GGUFArchitecture("deepseek2", deepseek2_problem, deepseek2_hyperparameters, deepseek2_attention),
    "mha": GGUFArchitecture("llama", llama_problem, llama_hyperparameters, llama_attention),
}
"""The llama.cpp architecture each attention type is written as; a type missing here is refused."""

NO_GGUF_REASONS = {
    "linear": "llama.cpp has no ELU+1 causal linear attention",
    "sliding-window-mha": "llama.cpp's llama architecture has no sliding window",
}


def gguf_problem(config: TinySeekConfig) -> str | None:
    """Why llama.cpp cannot run this architecture, or None."""
    architecture = GGUF_ARCHITECTURES.get(config.attention_type)
    if architecture is None:
        return NO_GGUF_REASONS.get(config.attention_type, f"llama.cpp has no {config.attention_type} attention")
    if config.attention_bias:
        return "llama.cpp's attention projections here have no bias (attention_bias=True)"
    if config.hidden_act != "silu":
        return f"llama.cpp's feed-forward gates are SiLU (SwiGLU); this model's hidden_act is {config.hidden_act}"
    if config.final_logit_softcapping is not None:
        return f"llama.cpp's {architecture.name} architecture has no final logit soft-capping (final_logit_softcapping)"
    return architecture.problem(config)


def swiglu_tensors(state: dict, prefix: str, kinds: tuple) -> Iterator[tuple]:
    for kind, name in zip(kinds, ("gate_proj", "up_proj", "down_proj")):
        yield kind, state[f"{prefix}{name}.weight"]


def feed_forward_tensors(state: dict, config: TinySeekConfig, i: int) -> Iterator[tuple]:
    mlp, kinds = f"model.layers.{i}.mlp.", gguf.MODEL_TENSOR
    if not feed_forward_spec(config.feed_forward_type(i)).routes:
        yield from swiglu_tensors(state, mlp, (kinds.FFN_GATE, kinds.FFN_UP, kinds.FFN_DOWN))
        return
    yield kinds.FFN_GATE_INP, state[mlp + "gate.weight"]
    yield kinds.FFN_EXP_PROBS_B, state[mlp + "gate.e_score_correction_bias"]
    gate, up = np.split(state[mlp + "experts.gate_up_proj"], 2, axis=1)
    yield kinds.FFN_GATE_EXP, np.ascontiguousarray(gate)
    yield kinds.FFN_UP_EXP, np.ascontiguousarray(up)
    yield kinds.FFN_DOWN_EXP, state[mlp + "experts.down_proj"]
    shared = f"{mlp}shared_experts."
    if not config.n_shared_experts:
        # llama.cpp's deepseek2 always runs a shared expert; one with zero weights adds exactly nothing.
        width, hidden = config.moe_intermediate_size, config.hidden_size
        state = {f"{shared}gate_proj.weight": np.zeros((width, hidden), np.float32),
                 f"{shared}up_proj.weight": np.zeros((width, hidden), np.float32),
                 f"{shared}down_proj.weight": np.zeros((hidden, width), np.float32)}
    yield from swiglu_tensors(state, shared, (kinds.FFN_GATE_SHEXP, kinds.FFN_UP_SHEXP, kinds.FFN_DOWN_SHEXP))


def model_tensors(
    model: TinySeekForCausalLM, architecture: GGUFArchitecture
) -> Iterator[tuple[str, gguf.MODEL_TENSOR, np.ndarray]]:
    """(GGUF name, tensor kind, fp32 array) of every tensor llama.cpp reads; multi-token-prediction modules are left
    out."""
    config, kinds = model.config, gguf.MODEL_TENSOR
    state = {name: tensor.detach().float().cpu().numpy() for name, tensor in model.state_dict().items()
             if not name.startswith("mtp.")}

    def named(kind, array, layer=None):
        suffix = "bias" if kind == kinds.FFN_EXP_PROBS_B else "weight"
        return f"{gguf.TENSOR_NAMES[kind].format(bid=layer)}.{suffix}", kind, array

    yield named(kinds.TOKEN_EMBD, state["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        yield named(kinds.ATTN_NORM, state[f"model.layers.{i}.input_layernorm.weight"], i)
        for kind, array in architecture.attention_tensors(state, config, i):
            yield named(kind, array, i)
        yield named(kinds.FFN_NORM, state[f"model.layers.{i}.post_attention_layernorm.weight"], i)
        for kind, array in feed_forward_tensors(state, config, i):
            yield named(kind, array, i)
    yield named(kinds.OUTPUT_NORM, state["model.norm.weight"])
    if not config.tie_word_embeddings:  # llama.cpp reuses token_embd when output.weight is absent
        yield named(kinds.OUTPUT, state["lm_head.weight"])


def encoded(array: np.ndarray, kind: gguf.MODEL_TENSOR, gguf_type: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The array in the file's type; where a type cannot hold it (Q8_0 needs rows of whole 32-blocks), F16."""
    types = gguf.GGMLQuantizationType
    if array.ndim == 1 or kind in FP32_KINDS or gguf_type == "f32":
        return array.astype(np.float32), types.F32
    qtype = types[gguf_type.upper()]
    if qtype == types.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = types.F16
    return gguf.quants.quantize(array, qtype), qtype



def reproduced_pre_tokenizers() -> dict[str, dict]:
    """llama.cpp implements each pre-tokenizer in C++ under a name; these are the tokenizer.json definitions of the
    ones tinyseek's tokenizers use: DeepSeek-Coder's (the built-in tokenizer) and GPT-2's byte-level regex (what
    `tinyseek tokenizer train` builds)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tinyseek.data.builtin import BUILTIN_TOKENIZER

    gpt2 = Tokenizer(models.BPE())
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return {
        "deepseek-coder": json.loads((BUILTIN_TOKENIZER / "tokenizer.json").read_text())["pre_tokenizer"],
        "gpt-2": json.loads(gpt2.to_str())["pre_tokenizer"],
    }


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer as llama.cpp's BPE ("gpt2") tokenizer reads it: one entry per embedding row."""

    pre_tokenizer: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]


def gguf_vocabulary(tokenizer: PreTrainedTokenizerFast, rows: int) -> Vocabulary:
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    model, normalizer = definition["model"], definition.get("normalizer")
    if model["type"] != "BPE" or (definition.get("decoder") or {}).get("type") != "ByteLevel":
        raise InputError(f"--format gguf: the tokenizer is a {model['type']} model without a byte-level decoder; "
                         "llama.cpp's BPE reads byte-level BPE tokenizers (DeepSeek-Coder's, `tinyseek tokenizer train`)")
    if normalizer and normalizer.get("normalizers") != []:
        raise InputError(
            f"--format gguf: llama.cpp's BPE applies no normalizer, but the tokenizer has {normalizer['type']}"
        )
    if not model["merges"]:  # the gguf writer cannot store an empty list, and llama.cpp's BPE requires one
        raise InputError("--format gguf: the tokenizer has no merges (one token per byte); llama.cpp's BPE needs them")
    names = [name for name, known in reproduced_pre_tokenizers().items() if known == definition["pre_tokenizer"]]
    if not names:
        raise InputError("--format gguf: the tokenizer's pre-tokenizer has no llama.cpp equivalent (llama.cpp "
                         f"reproduces {', '.join(reproduced_pre_tokenizers())} here)")
    added = {token["id"]: token for token in definition["added_tokens"]}
    by_id = {index: token for token, index in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True).items()}
    types = gguf.TokenType
    tokens, token_types = [], []
    for index in range(rows):
        if index not in by_id:  # the embedding rows past the tokenizer's ids
            tokens.append(f"[PAD{index}]")
            token_types.append(types.UNUSED)
        elif index in added:
            # Added tokens are matched in the raw text, as llama.cpp matches CONTROL and USER_DEFINED tokens.
            tokens.append(added[index]["content"])
            token_types.append(types.CONTROL if added[index]["special"] else types.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            token_types.append(types.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    return Vocabulary(names[0], tokens, token_types, merges)


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerFast, rows: int) -> None:
    from tinyseek.data.tokenizer import encode_prompt

    vocabulary = gguf_vocabulary(tokenizer, rows)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocabulary.pre_tokenizer)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.token_types)
    writer.add_token_merges(vocabulary.merges)
    # llama.cpp begins a prompt as tinyseek does (encode_prompt): with BOS, or with EOS where there is no BOS.
    writer.add_bos_token_id(encode_prompt(tokenizer, "")[0])
    writer.add_add_bos_token(True)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_eos_token(False)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_chat_and_card(writer: gguf.GGUFWriter, model: TinySeekForCausalLM, tokenizer: PreTrainedTokenizerFast,
                        training: dict | None, name: str) -> None:
    """What keeps chat working in llama.cpp (the end-of-turn token, for a chat-trained model), the model card and the
    licences the file inherits, as metadata."""
    from tinyseek.data.chat import END_OF_TURN_TOKEN, chat_refusal, chat_token_ids, is_chat_trained
    from tinyseek.generate.model_card import (
        DATA_LICENCE, TOKENIZER_LICENCE, inherited_licences, licence_text, model_card,
    )

    writer.add_bool("tinyseek.chat_trained", is_chat_trained(model.config))
    if chat_refusal(model.config, tokenizer, base_model_allowed=False) is None:
        # llama.cpp ends generation at EOS and at this token; without it a reply would run on past <|EOT|>.
        writer.add_eot_token_id(chat_token_ids(tokenizer)[END_OF_TURN_TOKEN])
    licences = inherited_licences(tokenizer, training)
    writer.add_description(model_card(model, licences, training, "gguf", name))
    if TOKENIZER_LICENCE in licences:
        writer.add_string("tokenizer.license", licence_text(TOKENIZER_LICENCE))
    if DATA_LICENCE in licences:
        writer.add_string("tinyseek.data.license", licence_text(DATA_LICENCE))
        writer.add_dataset_count(1)
        writer.add_dataset_name(0, "TinyStories (a sample, and instruction conversations made from it)")
        writer.add_dataset_repo_url(0, "https://huggingface.co/datasets/roneneldan/TinyStories")
    if licences:
        writer.add_license_name("; ".join(f"{licence.name} ({licence.folder})" for licence in licences)
                                + "; the weights are yours")


def write_hyperparameters(writer: gguf.GGUFWriter, config: TinySeekConfig, architecture: GGUFArchitecture,
                          gguf_type: str) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[gguf_type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    architecture.hyperparameters(writer, config)


def export_gguf(model: TinySeekForCausalLM, tokenizer: PreTrainedTokenizerFast | None, out: Path,
                gguf_type: str = "f32", training: dict | None = None) -> list[str]:
    """Write `model` and `tokenizer` to the GGUF file `out`, with a model card that tells how it was trained from
    `training` (`model_card.training_record` of its checkpoint; None: not recorded); return notes on what was left
    out.

    Everything is checked before the first byte is written; the file is written beside `out` and renamed into place,
    so a failure at any point leaves no partial file."""
    from tinyseek.durable import fsync_path, staging_directory

    config = model.config
    problem = gguf_problem(config)
    if problem is not None:
        raise ConfigError(f"--format gguf: this {config.attention_type}/{config.ffn_type} model cannot run in "
                          f"llama.cpp: {problem}")
    if tokenizer is None:
        raise InputError("--format gguf needs the model's tokenizer (llama.cpp reads text through it); "
                         "copy one into the model folder")
    if out.exists():
        raise FileError(f"--out {out} already exists")
    architecture = GGUF_ARCHITECTURES[config.attention_type]
    staging = staging_directory(out.parent, out.name)
    partial = staging / out.name
    try:
        writer = gguf.GGUFWriter(partial, architecture.name)
        writer.add_name(out.stem)
        write_hyperparameters(writer, config, architecture, gguf_type)
        write_tokenizer(writer, tokenizer, config.vocab_size)
        write_chat_and_card(writer, model, tokenizer, training, out.name)
        for name, kind, array in model_tensors(model, architecture):
            data, qtype = encoded(array, kind, gguf_type)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
        faults.point("gguf.written")
        fsync_path(partial)
        os.replace(partial, out)
        fsync_path(out.parent)
    except OSError as error:
        raise FileError(f"cannot write {out}: {error.strerror or error}; nothing was written") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    notes = []
    if config.num_nextn_predict_layers:
        notes.append(f"left out {config.num_nextn_predict_layers} multi-token-prediction module(s): llama.cpp's "
                     f"{architecture.name} predicts one token per step")
    return notes


def open_in_llama_cpp(path: Path | str, **options):
    """A `llama_cpp.Llama` on a GGUF file, with llama.cpp's extra CPU buffer types off.

    Where llama.cpp is built for a CPU with AMX (Sapphire Rapids and later), it places F16 and Q8_0 weights in AMX
    buffers, and its scheduler then finds no backend for the ops that read them and aborts the process
    (`GGML_ASSERT(*cur_backend_id != -1)` in ggml-backend.cpp, llama-cpp-python 0.3.36). llama-cpp-python's
    constructor does not expose `use_extra_bufts`, so its default model parameters are replaced while it builds."""
    import llama_cpp

    default_parameters = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        parameters = default_parameters()
        parameters.use_extra_bufts = False
        return parameters

    llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), **options)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default_parameters
