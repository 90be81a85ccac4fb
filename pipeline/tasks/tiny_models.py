"""Tiny models and a tokenizer built locally (nothing is downloaded): a byte-level BPE tokenizer trained with
`tokenizers`, a random-init Llama policy and a Llama sequence-classification reward model, and random-init causal
LMs of the other common families (ARCHITECTURES) for the tests that prove each one end to end."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
MAX_POSITIONS = 256
HEAD_DIM = 64  # a head size vLLM's CPU attention supports


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE: every UTF-8 string encodes (the 256 byte symbols are the base alphabet) and decodes back
    unchanged. A BOS token is prepended to every encoding, so transformers and vLLM see the same ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITIONS,
    )


def _llama_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int, layers: int, **extra) -> LlamaConfig:
    heads = max(1, hidden_size // HEAD_DIM)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden_size // heads,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def build_policy(tokenizer: PreTrainedTokenizerFast, *, hidden_size: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tokenizer, hidden_size, layers))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_reward_model(
    tokenizer: PreTrainedTokenizerFast, *, hidden_size: int, layers: int, seed: int
) -> LlamaForSequenceClassification:
    torch.manual_seed(seed + 1)
    return LlamaForSequenceClassification(_llama_config(tokenizer, hidden_size, layers, num_labels=1))


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# A chat template in the shape real chat models use (role markers, a generation prompt), made of plain text so
# the task's byte-level tokenizer encodes it without new special tokens.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def with_chat_template(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _common(tokenizer: PreTrainedTokenizerFast) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _decoder_config(
    model_type: str, tokenizer: PreTrainedTokenizerFast, hidden_size: int, layers: int, **extra
) -> PretrainedConfig:
    """Llama-shaped config of another family: grouped-query heads of HEAD_DIM, SwiGLU width 2x."""
    heads = max(2, hidden_size // HEAD_DIM)
    return AutoConfig.for_model(
        model_type,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=hidden_size // heads,
        max_position_embeddings=MAX_POSITIONS,
        **_common(tokenizer),
        **extra,
    )


def _gpt2_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int, layers: int) -> PretrainedConfig:
    # GPT-2: Conv1D projections, learned positions, tied embeddings; its dropout is on by default.
    return AutoConfig.for_model(
        "gpt2",
        n_embd=hidden_size,
        n_layer=layers,
        n_head=max(2, hidden_size // HEAD_DIM),
        n_positions=MAX_POSITIONS,
        **_common(tokenizer),
    )


# What each family brings that the weight sync and the learners must get right.
ARCHITECTURES: dict[str, Callable[[PreTrainedTokenizerFast, int, int], PretrainedConfig]] = {
    "llama": lambda t, h, n: _decoder_config("llama", t, h, n),
    "qwen2": lambda t, h, n: _decoder_config("qwen2", t, h, n, tie_word_embeddings=True),  # qkv bias, tied head
    "qwen3": lambda t, h, n: _decoder_config("qwen3", t, h, n, tie_word_embeddings=True),  # q/k norms, tied head
    "mistral": lambda t, h, n: _decoder_config("mistral", t, h, n, sliding_window=None),
    "gpt2": _gpt2_config,
    "phi3": lambda t, h, n: _decoder_config("phi3", t, h, n),  # fused qkv and gate_up projections
    "gemma": lambda t, h, n: _decoder_config("gemma", t, h, n),  # tied head, scaled embeddings, GeGLU
}


def build_causal_lm(
    architecture: str, tokenizer: PreTrainedTokenizerFast, *, hidden_size: int, layers: int, seed: int
) -> PreTrainedModel:
    """A random-init causal LM of one of ARCHITECTURES, sized for CPU tests, with the tokenizer's special ids."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}: expected one of {sorted(ARCHITECTURES)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        ARCHITECTURES[architecture](tokenizer, hidden_size, layers), dtype=torch.float32
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
