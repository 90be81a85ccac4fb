"""Tiny models and a tokenizer built locally (nothing is downloaded): a byte-level BPE tokenizer trained with
`tokenizers`, a random-init Llama policy and a Llama sequence-classification reward model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
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
