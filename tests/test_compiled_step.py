"""Compiled CPU decode steps (IPEX_LLM_TF_COMPILE_CPU_DECODE=1): graph_decode's static-span step under torch.compile.

The compiled step must give what the same step gives eagerly. With the reference backend (float32 matmuls) logits
agree to 1e-5 of the largest: Inductor only fuses and reorders float32 elementwise work. With the CPU int4 kernel
the activations are rounded to bfloat16 before every packed matmul, so a last-bit difference upstream can move one
activation by a bfloat16 step; logits then agree to a stated 3% of the largest, the tokens where no near-tie flips.
"""
from __future__ import annotations

import pytest
import torch

import ipex_llm_tf
from ipex_llm_tf.models.graph_decode import CACHE_KWARG, GraphKVCache, graph_decoder
from model_factories import tiny_model


def _generate(model, ids, new_tokens):
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores), out[CACHE_KWARG]


@pytest.mark.parametrize("arch,backend", [("llama", "torch"), ("mistral", "torch"), ("qwen2", "auto")])
def test_compiled_cpu_steps_match_eager(arch: str, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", backend)
    ids = torch.randint(2, 128, (1, 7), generator=torch.Generator().manual_seed(4))
    eager = ipex_llm_tf.optimize_model(tiny_model(arch, attn_implementation="sdpa"), low_bit="sym_int4")
    assert graph_decoder(eager) is None
    want, want_scores, _ = _generate(eager, ids, 12)
    monkeypatch.setenv("IPEX_LLM_TF_COMPILE_CPU_DECODE", "1")
    model = ipex_llm_tf.optimize_model(tiny_model(arch, attn_implementation="sdpa"), low_bit="sym_int4")
    decoder = graph_decoder(model)
    assert decoder is not None, "the CPU model gets the static-step decoder"
    got, scores, cache = _generate(model, ids, 12)
    assert isinstance(cache, GraphKVCache)
    assert decoder.compiled.compiled is not None and decoder.stats.captures == 1
    tolerance = 1e-5 if backend == "torch" else 0.03
    assert (scores - want_scores).abs().max() <= tolerance * want_scores.abs().max()
    if backend == "torch":
        assert torch.equal(got, want)


def test_compiled_steps_across_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    """A generation crossing a 256-token span compiles again once, with the span dimension dynamic, and stays equal
    to eager decoding (reference backend)."""
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "torch")
    ids = torch.randint(2, 128, (1, 250), generator=torch.Generator().manual_seed(6))
    eager = ipex_llm_tf.optimize_model(tiny_model("llama", max_position_embeddings=1024), low_bit="sym_int8")
    want, want_scores, _ = _generate(eager, ids, 12)
    monkeypatch.setenv("IPEX_LLM_TF_COMPILE_CPU_DECODE", "1")
    model = ipex_llm_tf.optimize_model(tiny_model("llama", max_position_embeddings=1024), low_bit="sym_int8")
    got, scores, _ = _generate(model, ids, 12)
    assert graph_decoder(model).stats.captures == 2, "one compile per span seen"
    assert torch.equal(got, want)
    assert (scores - want_scores).abs().max() <= 1e-5 * want_scores.abs().max()


def test_compiled_steps_left_padded_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two left-padded rows: the compiled step reads the padding through the same key-validity mask as eager decoding,
    and gives its tokens (reference backend)."""
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "torch")
    ids = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0

    def generate(model):
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.scores)

    want, want_scores = generate(ipex_llm_tf.optimize_model(tiny_model("qwen2"), low_bit="asym_int4"))
    monkeypatch.setenv("IPEX_LLM_TF_COMPILE_CPU_DECODE", "1")
    model = ipex_llm_tf.optimize_model(tiny_model("qwen2"), low_bit="asym_int4")
    got, scores = generate(model)
    assert graph_decoder(model).stats.captures == 1
    assert torch.equal(got, want)
    assert (scores - want_scores).abs().max() <= 1e-5 * want_scores.abs().max()
