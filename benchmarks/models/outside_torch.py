"""PyTorch models written outside this project, built from small configs with random weights.

Each case is the library's own model class, called the way its authors document it: Hugging Face
`*For*` heads take `labels` and return `.loss`; x-transformers' `TransformerWrapper` and mambapy's
`JambaLM` return logits, and the loss is a cross-entropy on them. Dropout is on wherever the model
has it (the configs' 0.1). No downloads: every model is made from a config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

LAYERS, HIDDEN, HEADS, FFN, VOCAB, BATCH, SEQ = 4, 32, 4, 64, 64, 2, 32
DROPOUT = 0.1


@dataclasses.dataclass(frozen=True)
class TorchCase:
    name: str
    source: str  # package and class, as a user imports it
    kind: str  # decoder, encoder, encoder-decoder, vision, MoE, ...
    build: Callable[[], torch.nn.Module]
    kwargs: Callable[[], dict[str, Any]]  # forward keyword arguments
    loss: Callable[[Any], torch.Tensor]  # forward output -> scalar loss
    dropout: bool  # whether the model draws random numbers in training


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _lm_kwargs() -> dict[str, Any]:
    ids = _tokens()
    return dict(input_ids=ids, labels=ids)


def _hf_loss(out: Any) -> torch.Tensor:
    return out.loss


_TARGETS = _tokens(1)


def _logits_loss(out: Any) -> torch.Tensor:
    logits = out[0] if isinstance(out, tuple) else out
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), _TARGETS.reshape(-1))


def _hf(cls_name: str, config_name: str, **config: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import transformers as tf

        tf.logging.set_verbosity_error()
        return getattr(tf, cls_name)(getattr(tf, config_name)(**config))

    return build


_DECODER = dict(
    num_hidden_layers=LAYERS,
    hidden_size=HIDDEN,
    num_attention_heads=HEADS,
    num_key_value_heads=2,
    intermediate_size=FFN,
    vocab_size=VOCAB,
    attention_dropout=DROPOUT,
)
_BERT_LIKE = dict(
    num_hidden_layers=LAYERS,
    hidden_size=HIDDEN,
    num_attention_heads=HEADS,
    intermediate_size=FFN,
    hidden_dropout_prob=DROPOUT,
    attention_probs_dropout_prob=DROPOUT,
)


def _vit_kwargs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return dict(pixel_values=torch.randn(BATCH, 3, 16, 16, generator=g), labels=torch.tensor([1, 3]))


def _image_kwargs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return dict(pixel_values=torch.randn(BATCH, 3, 32, 32, generator=g), labels=torch.tensor([1, 3]))


def _whisper_kwargs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return dict(input_features=torch.randn(BATCH, 8, 32, generator=g), labels=_tokens()[:, :8])


def _bart_kwargs() -> dict[str, Any]:
    ids = _tokens()
    return dict(input_ids=ids, decoder_input_ids=_tokens(2), labels=_tokens(2))


def _x_transformers() -> torch.nn.Module:
    from x_transformers import Decoder, TransformerWrapper

    return TransformerWrapper(
        num_tokens=VOCAB,
        max_seq_len=SEQ,
        attn_layers=Decoder(
            dim=HIDDEN, depth=LAYERS, heads=HEADS, rotary_pos_emb=True, attn_dropout=DROPOUT, ff_dropout=DROPOUT
        ),
    )


def _jamba() -> torch.nn.Module:
    from mambapy.jamba import JambaLM, JambaLMConfig

    # Mamba and attention layers alternate, and so do MLP and mixture-of-experts layers: a period-2
    # pattern of four different layer classes (Jamba's own default periods are 8 and 2).
    return JambaLM(
        JambaLMConfig(
            d_model=HIDDEN,
            n_layers=LAYERS,
            mlp_size=FFN,
            d_state=8,
            num_attention_heads=HEADS,
            num_key_value_heads=2,
            attention_dropout=DROPOUT,
            num_experts=4,
            num_experts_per_tok=2,
            attn_layer_offset=1,
            attn_layer_period=2,
            expert_layer_offset=1,
            expert_layer_period=2,
            vocab_size=VOCAB,
        )
    )


def _classify_kwargs() -> dict[str, Any]:
    return dict(input_ids=_tokens(), labels=torch.tensor([0, 1]))


def _audio_kwargs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return dict(input_values=torch.randn(BATCH, 1600, generator=g), labels=torch.tensor([0, 1]))


def _ids_only() -> dict[str, Any]:
    return dict()


def cases() -> dict[str, TorchCase]:
    c = [
        TorchCase(
            "hf-llama",
            "transformers LlamaForCausalLM",
            "decoder",
            _hf("LlamaForCausalLM", "LlamaConfig", **_DECODER),
            _lm_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "hf-gpt2",
            "transformers GPT2LMHeadModel",
            "decoder, Conv1D projections, learned positions",
            _hf("GPT2LMHeadModel", "GPT2Config", n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, vocab_size=VOCAB),
            _lm_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "hf-gpt-neox",
            "transformers GPTNeoXForCausalLM",
            "decoder, parallel attention and MLP, partial rotary",
            _hf(
                "GPTNeoXForCausalLM",
                "GPTNeoXConfig",
                num_hidden_layers=LAYERS,
                hidden_size=HIDDEN,
                num_attention_heads=HEADS,
                intermediate_size=FFN,
                vocab_size=VOCAB,
                attention_dropout=DROPOUT,
                hidden_dropout=DROPOUT,
            ),
            _lm_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "hf-bert",
            "transformers BertForMaskedLM",
            "encoder",
            _hf("BertForMaskedLM", "BertConfig", **_BERT_LIKE, vocab_size=VOCAB),
            _lm_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "hf-bart",
            "transformers BartForConditionalGeneration",
            "encoder-decoder",
            _hf(
                "BartForConditionalGeneration",
                "BartConfig",
                encoder_layers=LAYERS // 2,
                decoder_layers=LAYERS // 2,
                d_model=HIDDEN,
                encoder_attention_heads=HEADS,
                decoder_attention_heads=HEADS,
                encoder_ffn_dim=FFN,
                decoder_ffn_dim=FFN,
                vocab_size=VOCAB,
                max_position_embeddings=SEQ,
                dropout=DROPOUT,
                attention_dropout=DROPOUT,
                activation_dropout=DROPOUT,
            ),
            _bart_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "hf-vit",
            "transformers ViTForImageClassification",
            "vision transformer",
            _hf("ViTForImageClassification", "ViTConfig", **_BERT_LIKE, image_size=16, patch_size=4, num_labels=4),
            _vit_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "hf-resnet",
            "transformers ResNetForImageClassification",
            "convolutional, BatchNorm (running statistics move in training), Flatten head",
            _hf(
                "ResNetForImageClassification",
                "ResNetConfig",
                embedding_size=8,
                hidden_sizes=[16, 32, 64, 64],
                depths=[2, 2, 2, 2],
                layer_type="basic",
                num_labels=4,
            ),
            _image_kwargs,
            _hf_loss,
            False,
        ),
        TorchCase(
            "hf-mobilenet-v2",
            "transformers MobileNetV2ForImageClassification",
            "convolutional, depthwise, BatchNorm, in-place dropout on a view",
            _hf(
                "MobileNetV2ForImageClassification",
                "MobileNetV2Config",
                image_size=32,
                depth_multiplier=0.35,
                num_labels=4,
                classifier_dropout_prob=DROPOUT,
            ),
            _image_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "hf-convnext",
            "transformers ConvNextForImageClassification",
            "convolutional, channels-last LayerNorm (weight gradients copied into their layout), layer scale, drop path",
            _hf(
                "ConvNextForImageClassification",
                "ConvNextConfig",
                hidden_sizes=[8, 16, 32, 64],
                depths=[1, 1, 2, 1],
                drop_path_rate=DROPOUT,
                num_labels=4,
            ),
            _image_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "hf-phi",
            "transformers PhiForCausalLM",
            "decoder, attention and MLP in parallel on one LayerNorm, partial rotary",
            _hf("PhiForCausalLM", "PhiConfig", **_DECODER, resid_pdrop=DROPOUT, embd_pdrop=DROPOUT),
            _lm_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "hf-whisper",
            "transformers WhisperForConditionalGeneration",
            "audio encoder-decoder, convolutional front end",
            _hf(
                "WhisperForConditionalGeneration",
                "WhisperConfig",
                vocab_size=VOCAB,
                num_mel_bins=8,
                d_model=HIDDEN,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=HEADS,
                decoder_attention_heads=HEADS,
                encoder_ffn_dim=FFN,
                decoder_ffn_dim=FFN,
                max_source_positions=16,
                max_target_positions=SEQ,
                dropout=DROPOUT,
                attention_dropout=DROPOUT,
                activation_dropout=DROPOUT,
                pad_token_id=0,
                decoder_start_token_id=1,
                bos_token_id=1,
                eos_token_id=2,
            ),
            _whisper_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "hf-mixtral",
            "transformers MixtralForCausalLM",
            "mixture of experts",
            _hf("MixtralForCausalLM", "MixtralConfig", **_DECODER, num_local_experts=4, num_experts_per_tok=2),
            _lm_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "hf-qwen2-moe",
            "transformers Qwen2MoeForCausalLM",
            "MoE every other layer + shared expert",
            _hf(
                "Qwen2MoeForCausalLM",
                "Qwen2MoeConfig",
                **_DECODER,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=FFN // 2,
                shared_expert_intermediate_size=FFN,
                decoder_sparse_step=2,
            ),
            _lm_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "hf-gemma3",
            "transformers Gemma3ForCausalLM",
            "local/global attention (Gemma 3 text)",
            _hf(
                "Gemma3ForCausalLM",
                "Gemma3TextConfig",
                **_DECODER,
                head_dim=HIDDEN // HEADS,
                sliding_window=8,
                layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2),
            ),
            _lm_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "hf-t5",
            "transformers T5ForConditionalGeneration",
            "encoder-decoder, shared position bias",
            _hf(
                "T5ForConditionalGeneration",
                "T5Config",
                num_layers=LAYERS // 2,
                num_decoder_layers=LAYERS // 2,
                d_model=HIDDEN,
                num_heads=HEADS,
                d_ff=FFN,
                d_kv=HIDDEN // HEADS,
                vocab_size=VOCAB,
                dropout_rate=DROPOUT,
            ),
            _bart_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "hf-opt",
            "transformers OPTForCausalLM",
            "decoder, learned positions with offset",
            _hf(
                "OPTForCausalLM",
                "OPTConfig",
                num_hidden_layers=LAYERS,
                hidden_size=HIDDEN,
                num_attention_heads=HEADS,
                ffn_dim=FFN,
                vocab_size=VOCAB,
                word_embed_proj_dim=HIDDEN,
                dropout=DROPOUT,
                attention_dropout=DROPOUT,
                max_position_embeddings=64,
            ),
            _lm_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "hf-bloom",
            "transformers BloomForCausalLM",
            "decoder, ALiBi, fused QKV",
            _hf(
                "BloomForCausalLM",
                "BloomConfig",
                n_layer=LAYERS,
                hidden_size=HIDDEN,
                n_head=HEADS,
                vocab_size=VOCAB,
                hidden_dropout=DROPOUT,
                attention_dropout=DROPOUT,
            ),
            _lm_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "hf-deberta-v2",
            "transformers DebertaV2ForSequenceClassification",
            "encoder, disentangled relative-position attention",
            _hf("DebertaV2ForSequenceClassification", "DebertaV2Config", vocab_size=VOCAB, **_BERT_LIKE),
            _classify_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "hf-wav2vec2",
            "transformers Wav2Vec2ForSequenceClassification",
            "audio, conv feature encoder then transformer",
            _hf(
                "Wav2Vec2ForSequenceClassification",
                "Wav2Vec2Config",
                num_hidden_layers=LAYERS,
                hidden_size=HIDDEN,
                num_attention_heads=HEADS,
                intermediate_size=FFN,
                conv_dim=(16, 16),
                conv_stride=(5, 2),
                conv_kernel=(10, 3),
                num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=4,
                hidden_dropout=DROPOUT,
                attention_dropout=DROPOUT,
                activation_dropout=DROPOUT,
                feat_proj_dropout=DROPOUT,
                mask_time_prob=0.0,
            ),
            _audio_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "hf-swin",
            "transformers SwinForImageClassification",
            "vision, shifted windows, stages, drop path",
            _hf(
                "SwinForImageClassification",
                "SwinConfig",
                image_size=32,
                patch_size=4,
                embed_dim=16,
                depths=[2, 2],
                num_heads=[2, 4],
                window_size=4,
                hidden_dropout_prob=DROPOUT,
                attention_probs_dropout_prob=DROPOUT,
                drop_path_rate=0.1,
                num_labels=4,
            ),
            _image_kwargs,
            _hf_loss,
            True,
        ),
        TorchCase(
            "x-transformers",
            "x_transformers TransformerWrapper(Decoder)",
            "decoder, rotary",
            _x_transformers,
            lambda: dict(x=_tokens()),
            _logits_loss,
            True,
        ),
        TorchCase(
            "mambapy-jamba",
            "mambapy JambaLM",
            "Mamba/attention and MLP/MoE alternating",
            _jamba,
            lambda: dict(tokens=_tokens()),
            _logits_loss,
            True,
        ),
    ]
    return {case.name: case for case in c}
