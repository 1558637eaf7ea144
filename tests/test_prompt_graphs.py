"""Prompt graphs (ipex_llm_tf.models.prompt_graphs) on the CPU: what a graph would record, replayed as plain ops.

A CPU has no graphs, so the tests pretend it does: `record` returns a stand-in whose replay() reruns the recorded
function into the same output tensor, as a graph replay rewrites its static output. That checks the logic a CUDA
graph records (the prompt padded to its bucket, its keys and values written from slot 0 of the decoder's storage,
the last real token's logits, the cache taking over the storage at the prompt's length, decode steps going on
from there) and when a prompt declines the graph. The real capture runs in tests/gpu/test_graph_decode_cuda.py.
Matmuls run on the float32 reference backend; a padded prompt multiplies more rows, which may change a sum's
blocking, so logits agree within 1e-5 of the largest and greedy tokens exactly.
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import ipex_llm_tf
from ipex_llm_tf.models import graph_decode
from ipex_llm_tf.models.graph_decode import CACHE_KWARG, GraphKVCache, install_graph_decode
from ipex_llm_tf.models.prompt_graphs import (LEFT_PADDED, MAX_PROMPT_TOKENS, MAX_RECORDS, PLAIN, PROMPT_GRAPHS_ENV,
                                              prompt_bucket)
from model_factories import ARCHITECTURES, tiny_model

pytestmark = pytest.mark.usefixtures("reference_backend")


class _Rerun:
    """A stand-in graph: replay() reruns the recorded work into the output tensor it first returned."""

    def __init__(self, run, out: torch.Tensor) -> None:
        self.run, self.out = run, out

    def replay(self) -> None:
        with torch.inference_mode():  # the output was made inside it, as generate() under inference_mode makes it
            self.out.copy_(self.run())


def _pretend_graphs(monkeypatch: pytest.MonkeyPatch, decoder) -> None:
    monkeypatch.setattr(graph_decode, "graphs_supported", lambda device: True)

    def record(run, device):
        out = run()
        return _Rerun(run, out), out
    monkeypatch.setattr(decoder, "record", record)


def _generate(model, ids, new_tokens, cache, mask=None):
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True, **{CACHE_KWARG: cache})
    return out.sequences, torch.stack(out.scores)


def test_prompt_bucket() -> None:
    assert [prompt_bucket(n) for n in (1, 2, 32, 33, 256, 257, 300, 513, 1000, 1024)] == \
        [32, 32, 32, 64, 256, 320, 320, 640, 1024, 1024]
    for tokens in range(1, MAX_PROMPT_TOKENS + 1):
        bucket = prompt_bucket(tokens)
        assert 0 <= bucket - tokens < max(32, tokens / 4), tokens
    assert len({prompt_bucket(n) for n in range(1, MAX_PROMPT_TOKENS + 1)}) == 16
    with pytest.raises(ValueError, match="at least one token"):
        prompt_bucket(0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_replayed_prompts_match_the_eager_forward(monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    model = ipex_llm_tf.optimize_model(tiny_model(arch, attn_implementation="sdpa"), low_bit="sym_int8",
                                       modules_to_not_convert=["lm_head"])
    decoder = install_graph_decode(model)
    _pretend_graphs(monkeypatch, decoder)
    for batch, tokens, pads in ((1, 10, ()), (2, 37, ()), (3, 21, (0, 5, 13))):  # Mistral's window is 8
        ids = torch.randint(2, 128, (batch, tokens), generator=torch.Generator().manual_seed(tokens))
        mask = torch.ones_like(ids)
        for row, pad in enumerate(pads):
            mask[row, :pad] = 0  # left padding, as generate() pads a batch
        want, want_scores = _generate(model, ids, 5, DynamicCache(), mask)
        captures, replays = decoder.stats.prompt_captures, decoder.stats.prompt_replays
        for call in range(3):  # eager, recorded then replayed, replayed
            cache = decoder.new_cache()
            got, scores = _generate(model, ids, 5, cache, mask)
            assert torch.equal(got, want), f"{batch}x{tokens}, call {call}"
            error = (scores - want_scores).abs().max() / want_scores.abs().max()
            assert error <= 1e-5, f"{batch}x{tokens}, call {call}: {error:.2e}"
            assert cache.get_seq_length() == tokens + 4
        assert decoder.stats.prompt_captures == captures + 1
        assert decoder.stats.prompt_replays == replays + 2
        assert (batch, prompt_bucket(tokens), LEFT_PADDED if pads else PLAIN) in decoder.prompts.graphs


def test_a_replayed_prompt_leaves_the_cache_as_the_eager_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa"), low_bit="fp16").float()
    decoder = install_graph_decode(model)
    _pretend_graphs(monkeypatch, decoder)
    ids = torch.randint(2, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    caches = []
    for _ in range(2):
        caches.append(decoder.new_cache())
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1,
                        **{CACHE_KWARG: caches[-1]})
        keys = [layer.keys.clone() for layer in caches[-1].layers]
    decoder.new_cache()
    with torch.inference_mode():
        replayed = model(input_ids=ids, logits_to_keep=1, **{CACHE_KWARG: (cache := decoder.new_cache())})
    assert decoder.stats.prompt_replays == 2 and isinstance(cache, GraphKVCache)
    assert cache.get_seq_length() == 20 and cache.layers[0].capacity() >= prompt_bucket(20)
    for layer, want in zip(cache.layers, keys):
        assert torch.allclose(layer.keys, want, rtol=0, atol=1e-5)
    assert torch.allclose(replayed.logits, out.logits, rtol=0, atol=1e-5 * out.logits.abs().max().item())


def _kind(decoder, ids, cache=None, **kwargs) -> "str | None":
    kwargs.setdefault("logits_to_keep", 1)
    kwargs.setdefault("attention_mask", torch.ones_like(ids))
    return decoder.prompts.kind_of(ids, decoder.new_cache() if cache is None else cache, kwargs)


def _declines(model, decoder, ids, cache=None, **kwargs) -> bool:
    return _kind(decoder, ids, cache, **kwargs) is None


def test_prompts_that_take_the_eager_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa"), low_bit="sym_int8")
    decoder = install_graph_decode(model)
    _pretend_graphs(monkeypatch, decoder)
    ids = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    assert not _declines(model, decoder, ids)
    assert not _declines(model, decoder, ids, position_ids=torch.arange(12).expand(2, 12), attention_mask=None)
    assert _kind(decoder, ids) == PLAIN
    padded = torch.ones_like(ids)
    padded[1, :3] = 0
    assert _kind(decoder, ids, attention_mask=padded) == LEFT_PADDED
    generated_positions = (padded.cumsum(-1) - 1).masked_fill(padded == 0, 1)
    assert _kind(decoder, ids, attention_mask=padded, position_ids=generated_positions) == LEFT_PADDED
    assert _declines(model, decoder, ids, attention_mask=padded, position_ids=torch.arange(12).expand(2, 12))
    right = torch.ones_like(ids)
    right[0, -2:] = 0
    assert _declines(model, decoder, ids, attention_mask=right), "right padding"
    inner = torch.ones_like(ids)
    inner[0, 4] = 0
    assert _declines(model, decoder, ids, attention_mask=inner), "a hole inside the prompt"
    assert _declines(model, decoder, ids, attention_mask=torch.zeros_like(ids)), "rows with no token"
    assert _declines(model, decoder, ids, attention_mask=torch.ones(2, 1, 12, 12)), "a 4-D mask"
    assert _declines(model, decoder, ids, position_ids=torch.arange(12).expand(2, 12) + 1)
    assert _declines(model, decoder, ids, logits_to_keep=0), "every position's logits: the eager forward"
    assert _declines(model, decoder, ids, output_hidden_states=True)
    assert _declines(model, decoder, ids[:, :1]), "one token is a decode step's shape"
    assert _declines(model, decoder, torch.randint(2, 128, (1, MAX_PROMPT_TOKENS + 1)))
    assert _declines(model, decoder, ids, cache=DynamicCache())
    filled = decoder.new_cache()
    with torch.inference_mode():
        model(input_ids=ids, **{CACHE_KWARG: filled})
    assert _declines(model, decoder, ids, cache=filled), "a cache already holding tokens"
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *args: None)
    assert _declines(model, decoder, ids)
    handle.remove()
    monkeypatch.setenv(PROMPT_GRAPHS_ENV, "0")
    assert _declines(model, decoder, ids)
    monkeypatch.delenv(PROMPT_GRAPHS_ENV)
    monkeypatch.setattr(graph_decode, "graphs_supported", lambda device: False)
    assert _declines(model, decoder, ids), "no graphs on this device (compiled CPU steps share the cache)"


def test_a_failed_prompt_capture_leaves_prompts_eager(monkeypatch: pytest.MonkeyPatch, refusing_graphs) -> None:
    """The second call of a bucket records it; a capture the device refuses gives that call the eager forward's
    logits, and no later call tries again (GraphDecoder.record turned capturing off)."""
    model = ipex_llm_tf.optimize_model(tiny_model("qwen2", attn_implementation="sdpa"), low_bit="sym_int8",
                                       modules_to_not_convert=["lm_head"])
    decoder = install_graph_decode(model)
    monkeypatch.setattr(graph_decode, "graphs_supported", lambda device: True)
    ids = torch.randint(2, 128, (1, 20), generator=torch.Generator().manual_seed(8))
    want, want_scores = _generate(model, ids, 1, DynamicCache())
    for call in range(3):
        got, scores = _generate(model, ids, 1, decoder.new_cache())
        assert torch.equal(got, want), f"call {call}"
        assert (scores - want_scores).abs().max() <= 1e-5 * want_scores.abs().max()
    assert refusing_graphs.captures == 1 and refusing_graphs.current is refusing_graphs.default
    assert decoder.capture_error is not None and decoder.stats.prompt_captures == 0


def test_dynamic_rope_and_fp8_caches_take_the_eager_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    dynamic = tiny_model("llama", attn_implementation="sdpa",
                         rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    for model in (ipex_llm_tf.optimize_model(dynamic, low_bit="sym_int8"),
                  ipex_llm_tf.optimize_model(tiny_model("llama"), low_bit="sym_int8", quantize_kv_cache=True)):
        decoder = install_graph_decode(model)
        _pretend_graphs(monkeypatch, decoder)
        assert _declines(model, decoder, torch.randint(2, 128, (1, 12)))


@pytest.mark.parametrize("prompt_graphs_on", [True, False], ids=["prompt-graphs", "eager-prompts"])
def test_calls_with_and_without_inference_mode_share_the_storage(monkeypatch: pytest.MonkeyPatch,
                                                                 prompt_graphs_on: bool) -> None:
    """Storage and static inputs made in a generate() under torch.inference_mode take writes from a later call
    without it (generate() only disables grad): they are made outside inference mode."""
    monkeypatch.setenv(PROMPT_GRAPHS_ENV, "1" if prompt_graphs_on else "0")
    model = ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa"), low_bit="sym_int8")
    decoder = install_graph_decode(model)
    _pretend_graphs(monkeypatch, decoder)
    ids = torch.randint(2, 128, (1, 10), generator=torch.Generator().manual_seed(6))
    sequences = []
    for inference in (True, True, False, False):
        with torch.inference_mode(inference), torch.no_grad():
            sequences.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                            do_sample=False, pad_token_id=0, **{CACHE_KWARG: decoder.new_cache()}))
    assert all(torch.equal(seq, sequences[0]) for seq in sequences)
    assert decoder.stats.prompt_replays == (3 if prompt_graphs_on else 0)


def test_beam_search_and_sampling_after_a_replayed_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beams expand the prompt before its forward, so the replayed prompt has batch x beams rows; the storage it
    fills is then reordered in place as beams are chosen. Sampling with a seed is reproducible across the calls."""
    model = ipex_llm_tf.optimize_model(tiny_model("qwen2", attn_implementation="sdpa"), low_bit="sym_int8",
                                       modules_to_not_convert=["lm_head"])
    decoder = install_graph_decode(model)
    _pretend_graphs(monkeypatch, decoder)
    ids = torch.randint(2, 128, (2, 11), generator=torch.Generator().manual_seed(8))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, pad_token_id=0)
    with torch.inference_mode():
        want = model.generate(ids, num_beams=3, do_sample=False, **kwargs, **{CACHE_KWARG: DynamicCache()})
        for call in range(3):
            got = model.generate(ids, num_beams=3, do_sample=False, **kwargs, **{CACHE_KWARG: decoder.new_cache()})
            assert torch.equal(got, want), f"beams, call {call}"
        sampled = []
        for _ in range(3):
            torch.manual_seed(0)
            sampled.append(model.generate(ids, do_sample=True, top_k=5, **kwargs,
                                          **{CACHE_KWARG: decoder.new_cache()}))
    assert all(torch.equal(seq, sampled[0]) for seq in sampled)
    # the beams' prompt (6 rows) recorded on its second call, replayed on its second and third; the sampling calls'
    # 2 rows work in the first rows of the same storage, so the beams' graph stays, and they record their own
    assert decoder.prompts.seen == {(6, prompt_bucket(11), PLAIN): 2, (2, prompt_bucket(11), PLAIN): 2}
    assert list(decoder.prompts.graphs) == [(6, prompt_bucket(11), PLAIN), (2, prompt_bucket(11), PLAIN)]
    assert decoder.stats.prompt_captures == 2 and decoder.stats.prompt_replays == 4


def test_alternating_batch_sizes_keep_their_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls that alternate batch sizes share one storage, sized for the largest batch (a smaller one works in its
    first rows): after the larger batch first grows it, nothing regrows, each bucket is recorded once and replayed
    from then on, and the tokens never change."""
    model = ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa"), low_bit="sym_int8")
    decoder = install_graph_decode(model)
    _pretend_graphs(monkeypatch, decoder)
    prompts = {batch: torch.randint(2, 128, (batch, 9), generator=torch.Generator().manual_seed(batch))
               for batch in (1, 2)}
    want = {batch: _generate(model, ids, 3, DynamicCache())[0] for batch, ids in prompts.items()}
    versions = []
    for _ in range(6):
        for batch, ids in prompts.items():
            assert torch.equal(_generate(model, ids, 3, decoder.new_cache())[0], want[batch])
        versions.append(decoder.buffers.version)
    assert len(set(versions)) == 1, "the storage regrew after the first round"
    assert decoder.buffers.storage[0]["keys"].shape[0] == 2
    assert set(decoder.prompts.records.values()) == {1} and decoder.stats.prompt_captures == 2
    assert decoder.stats.prompt_replays == 2 * 5
    assert {key[0] for key in decoder.steps} == {1, 2}, "each batch size keeps its decode step"


def test_storage_that_keeps_moving_stops_recording(monkeypatch: pytest.MonkeyPatch) -> None:
    """Storage moved before every call drops every graph: a bucket is recorded MAX_RECORDS times at most, then its
    prompts stay eager; the tokens never change."""
    model = ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa"), low_bit="sym_int8")
    decoder = install_graph_decode(model)
    _pretend_graphs(monkeypatch, decoder)
    ids = torch.randint(2, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    want = _generate(model, ids, 3, DynamicCache())[0]
    for _ in range(6):
        decoder.buffers.version += 1  # what regrown storage does to the graphs recorded over the old one
        assert torch.equal(_generate(model, ids, 3, decoder.new_cache())[0], want)
    assert set(decoder.prompts.records.values()) == {MAX_RECORDS}
    assert decoder.stats.prompt_captures == MAX_RECORDS
