"""Hugging Face decoders at test size (d 32, 4 heads, MLP 64), built from configs: no download.

Shared by the torch tests that need an outside model with Hugging Face's own layer code
(tests/test_torch_compile.py, tests/test_torch_replicate.py). Each test adds what it is about
(dropout, positions, no KV cache) as config keywords; transformers is imported on first use, so a
test file that imports this still collects where it is not installed (the test skips).
"""

from __future__ import annotations

from typing import Any

import pytest


def tiny_gpt2(layers: int = 4, vocab: int = 64, **config: Any) -> Any:
    tf = pytest.importorskip("transformers")
    return tf.GPT2LMHeadModel(
        tf.GPT2Config(n_layer=layers, n_embd=32, n_head=4, n_positions=64, vocab_size=vocab, **config)
    )


def tiny_llama(layers: int = 4, vocab: int = 64, **config: Any) -> Any:
    tf = pytest.importorskip("transformers")
    return tf.LlamaForCausalLM(
        tf.LlamaConfig(
            num_hidden_layers=layers,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab,
            **config,
        )
    )
