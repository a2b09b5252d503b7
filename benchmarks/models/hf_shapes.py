"""Published Hugging Face model shapes, for planning from shapes on the meta device.

The configs are written once here so that the bench (`benchmarks.torch_bench`) and the test that plans
a 7B stack (`tests/test_torch_replicate.py`) plan the same model. Needs `transformers`."""

from __future__ import annotations

from typing import Any


def llama_7b_config() -> Any:
    """Llama-7B's shapes: 32 layers, d 4096, 32 heads (no grouped KV), MLP 11008, vocab 32000."""
    import transformers

    return transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        use_cache=False,
    )


def gpt2_xl_config() -> Any:
    """GPT-2 XL's shapes: 48 layers, d 1600, 25 heads, 1024 positions."""
    import transformers

    return transformers.GPT2Config(n_layer=48, n_embd=1600, n_head=25, n_positions=1024, use_cache=False)
