"""CUDA graph decode (ipex_llm_tf.models.graph_decode) against the same model's eager decode, on a CUDA device.

generate() on CUDA brings a GraphKVCache and replays one recorded graph per (batch, span) for one-token steps; the
eager reference is the same patched model given a DynamicCache. Greedy tokens must be identical; per-step logits
agree within 2e-2 relative (fp16: the graph step attends over the span's zero-padded slots, which changes the
order the attention kernel sums in, not the values). The models use transformers' default "sdpa" attention, whose
boolean masks send eager one-query steps to the same Triton attention kernel as the graph step; with "eager"
attention the eager steps get float masks and torch's SDPA, a different summation that can flip a near-tie token.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from model_factories import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

import ipex_llm_tf  # noqa: E402
from ipex_llm_tf.models.graph_decode import CACHE_KWARG, SPAN_BLOCK, graph_decoder  # noqa: E402


def _generate(model, ids, mask, new_tokens, **kwargs):
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                             **kwargs)
    return out.sequences, torch.stack(out.scores)


def _eager(model, ids, mask, new_tokens):
    return _generate(model, ids, mask, new_tokens, **{CACHE_KWARG: DynamicCache()})


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("low_bit", ["sym_int4", "fp16"])
def test_graph_decode_matches_eager(arch: str, low_bit: str) -> None:
    model = ipex_llm_tf.optimize_model(tiny_model(arch, attn_implementation="sdpa").half(), low_bit=low_bit).to("cuda")
    decoder = graph_decoder(model)
    assert decoder is not None
    ids = torch.randint(2, 128, (3, 12), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[1, :2] = 0
    want_tokens, want_scores = _eager(model, ids, mask, 24)
    for call in range(2):
        tokens, scores = _generate(model, ids, mask, 24)
        assert torch.equal(tokens, want_tokens), f"call {call}"
        error = ((scores - want_scores).abs().max() / want_scores.abs().max()).item()
        assert error < 2e-2, f"call {call}: relative logit error {error:.2e}"
    assert decoder.stats.captures == 1, "the second call must replay the first call's graph"
    assert decoder.stats.replays == 2 * 23 - 1


def test_graph_decode_crosses_spans_and_batch_sizes() -> None:
    model = ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa").half(), low_bit="sym_int4").to("cuda")
    decoder = graph_decoder(model)
    prompt = SPAN_BLOCK - 8
    for batch in (1, 2):
        ids = torch.randint(2, 128, (batch, prompt), generator=torch.Generator().manual_seed(batch)).cuda()
        want, _ = _eager(model, ids, torch.ones_like(ids), 20)
        got, _ = _generate(model, ids, torch.ones_like(ids), 20)
        assert torch.equal(got, want), f"batch {batch}"
    assert sorted(set(decoder.stats.spans)) == [SPAN_BLOCK, 2 * SPAN_BLOCK]


def test_graph_decode_beam_search_and_sampling() -> None:
    model = ipex_llm_tf.optimize_model(tiny_model("qwen2", attn_implementation="sdpa").half(), low_bit="sym_int8").to("cuda")
    ids = torch.randint(2, 128, (1, 10), generator=torch.Generator().manual_seed(3)).cuda()
    kwargs = dict(max_new_tokens=16, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        want = model.generate(ids, **kwargs, **{CACHE_KWARG: DynamicCache()})
        got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)
    torch.manual_seed(0)
    with torch.inference_mode():
        sampled = model.generate(ids, max_new_tokens=16, do_sample=True, top_p=0.9, pad_token_id=0)
    assert sampled.shape == (1, 26)


def test_graph_decode_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPEX_LLM_TF_GRAPH_DECODE", "0")
    model = ipex_llm_tf.optimize_model(copy.deepcopy(tiny_model("llama", attn_implementation="sdpa")), low_bit="sym_int4").to("cuda")
    assert graph_decoder(model) is None
