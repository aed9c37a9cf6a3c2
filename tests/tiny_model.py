"""A tiny randomly initialised Llama with the real SmolLM2 tokenizer, for mechanics tests."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def tiny_model_and_tokenizer():
    """(model, tokenizer): 2 layers, 64 hidden units, fixed seed; the tokenizer is SmolLM2's."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from aggregation.sources.local import ensure_smollm2

    tok = AutoTokenizer.from_pretrained(ensure_smollm2())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    return model, tok


def tiny_source():
    """A LocalSource over the tiny model."""
    from aggregation.sources.local import LocalSource

    model, tok = tiny_model_and_tokenizer()
    return LocalSource(model, tok)


def save_tiny_model(path) -> str:
    """Save the tiny model and its tokenizer as a model directory at ``path``; returns the path."""
    model, tok = tiny_model_and_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
