"""`remat_kit.auto` on Hugging Face architectures built from small configs: budget held as measured,
gradients exact, in one process run.

For each architecture (decoders, an encoder, an encoder-decoder; 8 layers, hidden 64, random
weights, dropout as the config has it) one training step is measured with no remat and with
`auto` at each budget: activation memory by the live-storage tracker (remat_kit._torch._measure),
the prediction beside it, and the gradients against no remat (same seed, same dropout masks).

No remat is measured twice: with the KV cache off, as `auto` runs the model (`config.use_cache =
False`, what `gradient_checkpointing_enable()` does too; the budget's baseline), and with the
config as built (cache on for decoders), the step a user runs without remat. Where the two differ
the report says so.

    python -m benchmarks.hf_zoo                       # all architectures, budgets 0.7 0.5 0.3
    python -m benchmarks.hf_zoo --models t5 llama --budgets 0.5

Writes reports/torch/hf_zoo.json and reports/torch/hf_zoo.md with the command that produced them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

import remat_kit as rk
from remat_kit.measure import format_bytes, hf_kv_cache_configs, rel_err, torch_step

LAYERS, HIDDEN, HEADS, FFN, VOCAB, BATCH, SEQ = 8, 64, 4, 128, 128, 2, 32


def _configs(tf: Any) -> dict[str, tuple[Callable[[Any], torch.nn.Module], Any, bool]]:
    """name -> (model class or factory, config, encoder-decoder)."""
    common = dict(
        num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=FFN, vocab_size=VOCAB
    )
    causal = tf.AutoModelForCausalLM.from_config
    return {
        "gpt2": (
            causal,
            tf.GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, vocab_size=VOCAB, n_positions=SEQ),
            False,
        ),
        "llama": (causal, tf.LlamaConfig(**common, num_key_value_heads=2), False),
        "mistral": (causal, tf.MistralConfig(**common, num_key_value_heads=2, sliding_window=16), False),
        "qwen2": (causal, tf.Qwen2Config(**common, num_key_value_heads=2), False),
        "gemma2": (causal, tf.Gemma2Config(**common, num_key_value_heads=2, head_dim=16, sliding_window=16), False),
        "phi": (causal, tf.PhiConfig(**common), False),
        "gpt_neox": (causal, tf.GPTNeoXConfig(**common), False),
        "falcon": (
            causal,
            tf.FalconConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, vocab_size=VOCAB),
            False,
        ),
        "opt": (
            causal,
            tf.OPTConfig(
                num_hidden_layers=LAYERS,
                hidden_size=HIDDEN,
                num_attention_heads=HEADS,
                ffn_dim=FFN,
                vocab_size=VOCAB,
                word_embed_proj_dim=HIDDEN,
            ),
            False,
        ),
        "roberta": (tf.RobertaForMaskedLM, tf.RobertaConfig(**common), False),
        "t5": (
            tf.T5ForConditionalGeneration,
            tf.T5Config(
                num_layers=LAYERS,
                num_decoder_layers=LAYERS,
                d_model=HIDDEN,
                num_heads=HEADS,
                d_ff=FFN,
                d_kv=HIDDEN // HEADS,
                vocab_size=VOCAB,
            ),
            True,
        ),
    }


def _grads(model: torch.nn.Module, kwargs: dict) -> list[torch.Tensor]:
    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    model(**kwargs).loss.backward()
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _activation(model: torch.nn.Module, kwargs: dict) -> int:
    torch.manual_seed(1)
    return torch_step(model, (), kwargs, loss_fn=lambda out: out.loss, count_flops=False).activation_bytes


def _cache_off(model: torch.nn.Module) -> torch.nn.Module:
    """The model as `auto` runs it: use_cache off in every config it holds."""
    for config in hf_kv_cache_configs(model):
        config.use_cache = False
    return model


def run_model(name: str, build: Callable, config: Any, enc_dec: bool, budgets: list[float]) -> list[dict]:
    torch.manual_seed(0)
    model = build(config).train()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    kwargs = dict(input_ids=ids, labels=ids, **(dict(decoder_input_ids=ids) if enc_dec else {}))
    as_built = _activation(model, kwargs)
    _cache_off(model)
    reference = _grads(model, kwargs)
    none = _activation(model, kwargs)
    rows = [dict(model=name, strategy="none", activation_bytes=none, as_built_bytes=as_built)]
    print(f"{name:9s} none {format_bytes(none)} (as built {format_bytes(as_built)})", flush=True)
    for budget in budgets:
        row = dict(model=name, strategy=f"auto {budget}", budget=budget)
        rematted = rk.auto(copy.deepcopy(model), budget)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                row["grad_rel_err"] = rel_err(_grads(rematted, kwargs), reference)
                row["activation_bytes"] = _activation(rematted, kwargs)
            plan = rk.plan_of(rematted)[-1]
            row.update(
                predicted_activation_bytes=plan.predicted_activation_bytes,
                fraction=row["activation_bytes"] / none,
                within_budget=row["activation_bytes"] <= budget * none,
                warnings=[str(w.message)[:160] for w in caught if "re-planning" in str(w.message)],
            )
        except Exception as e:  # an infeasible budget, or a failure: in the report, never lost
            row["error"] = f"{type(e).__name__}: {str(e)[:240]}"
        print(
            f"  {row['strategy']}: "
            + (row.get("error") or f"{row['fraction']:.3f} of none, grad err {row['grad_rel_err']:.1e}"),
            flush=True,
        )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    try:
        import transformers as tf
    except ImportError:
        sys.exit("benchmarks.hf_zoo needs transformers: pip install transformers")
    tf.logging.set_verbosity_error()
    configs = _configs(tf)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(configs), choices=list(configs))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    ap.add_argument("--out", default="reports/torch")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    warnings.filterwarnings("ignore", message="remat_kit.auto: setting")
    rows = [r for name in args.models for r in run_model(name, *configs[name], args.budgets)]
    result = dict(
        command="python -m benchmarks.hf_zoo " + " ".join(argv if argv is not None else sys.argv[1:]),
        torch=torch.__version__,
        transformers=tf.__version__,
        rows=rows,
    )
    write(result, args.out)
    return result


def write(result: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "hf_zoo.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [
        f"# remat_kit.auto on Hugging Face architectures (CPU, torch {result['torch']}, transformers "
        f"{result['transformers']})",
        "",
        f"Command: `{result['command'].strip()}`",
        "",
        f"Small configs ({LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, batch {BATCH}, seq {SEQ}, random "
        "weights, the config's dropout), one training step each. Activation memory: live-storage tracker "
        "peak. `of none`: against no remat with the KV cache off, as `auto` runs the model (the budget's "
        "baseline); `none as built` is no remat with the config as built (cache on for decoders).",
        "",
        "| model | strategy | activation | of none | predicted | within budget | grad rel. err | note |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for r in result["rows"]:
        if r["strategy"] == "none":
            built = r["as_built_bytes"]
            note = (
                ""
                if built == r["activation_bytes"]
                else (f"none as built: {format_bytes(built)} ({built / r['activation_bytes']:.3f} of cache off)")
            )
            lines.append(f"| {r['model']} | none | {format_bytes(r['activation_bytes'])} | 1.000 | | | | {note} |")
        elif "error" in r:
            lines.append(f"| {r['model']} | {r['strategy']} | | | | | | {r['error']} |")
        else:
            lines.append(
                f"| {r['model']} | {r['strategy']} | {format_bytes(r['activation_bytes'])} | "
                f"{r['fraction']:.3f} | {format_bytes(r['predicted_activation_bytes'])} | "
                f"{'yes' if r['within_budget'] else 'NO'} | {r['grad_rel_err']:.1e} | "
                f"{'; '.join(r['warnings'])} |"
            )
    with open(os.path.join(out, "hf_zoo.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
