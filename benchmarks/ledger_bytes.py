"""Bytes an edit checkpoint writes per batch: measured on a scaled-down Llama shape (d_k / d_model
= 3.5 as in Llama-3-8B, five edit layers), and the same formula at Llama-3-8B shapes.

    python benchmarks/ledger_bytes.py --out /tmp/ledger_bytes

Per batch of n requests, the ledger appends one file holding, per edit layer, the keys (n, d_k),
V (n, d_k) and U (d_model, n) in float32: ``layers * 4 * n * (2 d_k + d_model)`` bytes (+ a header).
Before the ledger every checkpoint rewrote the edited weights (``layers * d_model * d_k * 4``) and
AlphaEdit's ``K_p K_p^T`` (``layers * d_k^2 * 4``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def payload(layers: int, n: int, d_model: int, d_k: int) -> int:
    return layers * 4 * n * (2 * d_k + d_model)


def before(layers: int, d_model: int, d_k: int) -> int:
    return layers * 4 * (d_model * d_k + d_k * d_k)


def main(argv=None) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_edit.builtin.toy import corpus_sentences, counterfact_records, make_tokenizer
    from lightning_edit.cli import main as cli

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/ledger_bytes")
    ap.add_argument("--batch_size", type=int, default=10)
    ap.add_argument("--num_requests", type=int, default=40)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tok = make_tokenizer()
    d_model, d_k, layers = 128, 448, [4, 5, 6, 7, 8]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d_model, intermediate_size=d_k, num_hidden_layers=10, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=128, bos_token_id=tok.bos_token_id or 0,
                      eos_token_id=tok.eos_token_id or 0, pad_token_id=tok.pad_token_id or 0)
    LlamaForCausalLM(cfg).save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    (out / "corpus.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in corpus_sentences(300)))
    (out / "cf.json").write_text(json.dumps(counterfact_records(a.num_requests)))
    cli(["fit", f"--model.model={out / 'model'}", f"--model.layers={layers}", "--model.context_prefixes=0",
         "--model.residual.steps=2", "--model.residual.anchor=prompt_last", f"--data.dataset={out / 'cf.json'}",
         f"--data.batch_size={a.batch_size}", "--editor=lightning_edit.callbacks.AlphaEdit", "--editor.l2=10",
         "--editor.threshold_mode=energy", "--editor.nullspace_threshold=0.05", f"--editor.stats.corpus={out / 'corpus.jsonl'}",
         "--editor.stats.corpus_name=null", "--editor.stats.n_samples=300", "--editor.stats.max_length=64",
         f"--editor.stats.cache_dir={out / 'stats'}", f"--checkpoint.dirpath={out / 'ckpt'}",
         f"--trainer.logger.init_args.save_dir={out / 'logs'}", "--trainer.enable_progress_bar=false", "--report.n_generation=0"])
    files = sorted((out / "ckpt" / "ledger").iterdir())
    n = a.batch_size
    res = {
        "scaled_shape": {"d_model": d_model, "d_k": d_k, "edit_layers": len(layers), "batch": n},
        "batch_file_bytes_measured": [f.stat().st_size for f in files],
        "batch_payload_bytes_formula": payload(len(layers), n, d_model, d_k),
        "checkpoint_file_bytes_at_end": (out / "ckpt" / "last.safetensors").stat().st_size,
        "before_bytes_per_checkpoint_formula": before(len(layers), d_model, d_k),
        "llama3_8b": {"d_model": 4096, "d_k": 14336, "edit_layers": 5, "batch": 100,
                      "ledger_bytes_per_batch": payload(5, 100, 4096, 14336),
                      "before_bytes_per_checkpoint": before(5, 4096, 14336)},
    }
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    sys.exit(0 if main() else 1)
