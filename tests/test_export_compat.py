"""An export loads to the same logits in every transformers release the package declares: the
current one here, and (``pytest -m slow``, needs the package registry) the oldest one."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_edit.checkpointing import export_pretrained
from lightning_edit.engine.files import verify_manifest
from lightning_edit.stream.ledger import EditLedger

IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 7, 11, 40, 3]])
ROPE = {"default": {"rope_theta": 100000.0},
        "linear": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0}}}


def _llama(rope: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, **ROPE[rope])
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("rope", sorted(ROPE))
def test_export_config_keeps_the_rotary_settings_in_both_forms(tmp_path, rope):
    """transformers 5 writes the rotary base only inside rope_parameters, which transformers 4
    ignores (it then uses 10,000 and other logits): the export writes the legacy keys beside it,
    and transformers 5 still reads it to the same logits."""
    model = _llama(rope)
    out = export_pretrained(model, None, EditLedger(), tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0 and cfg["rope_parameters"]["rope_theta"] == 100000.0
    if rope == "linear":
        assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out).eval()(IDS).logits, model(IDS).logits)
    assert verify_manifest(out) == []


def _oldest_transformers() -> str:
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    return re.search(r'"transformers>=([0-9.]+)', pyproject).group(1)


PROBE = """
import sys, torch
from transformers import AutoModelForCausalLM, __version__
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
with torch.no_grad():
    torch.save(model(torch.tensor(eval(sys.argv[3]))).logits, sys.argv[2])
print(__version__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("rope", sorted(ROPE))
def test_export_loads_to_the_same_logits_in_the_oldest_supported_transformers(tmp_path_factory, tmp_path, rope):
    oldest = _oldest_transformers()
    target = tmp_path_factory.getbasetemp() / f"transformers-{oldest}"
    if not (target / "transformers").is_dir():  # transformers 4 with the tokenizers / hub releases it accepts
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        f"transformers~={oldest}.0", "tokenizers>=0.22,<0.23", "huggingface_hub>=0.34,<1.0"], check=True)
    model = _llama(rope)
    out = export_pretrained(model, None, EditLedger(), tmp_path / "out")
    run = subprocess.run([sys.executable, "-c", PROBE, str(out), str(tmp_path / "logits.pt"), str(IDS.tolist())],
                         env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith(oldest), run.stdout
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), model(IDS).logits, rtol=0, atol=1e-5)
