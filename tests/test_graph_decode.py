"""The static-span decode step behind CUDA graph decoding, run eagerly on CPU through an explicit GraphKVCache.

On CUDA the same step is recorded once and replayed (tests/gpu/test_graph_decode.py); here every step runs as plain
ops, which checks what the graph records: writing each token into the shared storage at its slot, attending over the
span through the key-validity mask (left padding, causality, Mistral's window), RoPE positions, beam reordering in
place, and storage reuse across generate() calls. Matmuls run on the reference backend, so what is compared is the
step's logic, not kernel rounding (the CPU int4 kernel can round a row differently between calls). Greedy tokens
must equal the eager path; logits within 1e-5 of the largest (only SDPA's sums over the span's masked slots differ).
"""
from __future__ import annotations

import contextlib
import gc
import logging

import pytest
import torch
from transformers import DynamicCache

import ipex_llm_tf
from ipex_llm_tf.models.graph_decode import (CACHE_KWARG, SPAN_BLOCK, XPU_GRAPHS_ENV, GraphKVCache, graph_api,
                                             graph_decoder, graphs_supported, install_graph_decode)
from ipex_llm_tf.models.graph_storage import KVBuffers
from ipex_llm_tf.models.kv_cache import Fp8BlockKVCache
from model_factories import ARCHITECTURES, SLIDING_WINDOW, tiny_model


def _generate(model, ids, mask, new_tokens, cache, **kwargs):
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                             **{CACHE_KWARG: cache}, **kwargs)
    return out.sequences, torch.stack(out.scores)


pytestmark = pytest.mark.usefixtures("reference_backend")


@pytest.fixture(scope="module", params=ARCHITECTURES)
def patched(request):
    model = ipex_llm_tf.optimize_model(tiny_model(request.param, attn_implementation="sdpa"), low_bit="sym_int8",
                                       modules_to_not_convert=["lm_head"])
    install_graph_decode(model)  # on CPU it is only installed by hand: the step then runs eagerly
    return model


def test_static_step_matches_eager_with_left_padding(patched) -> None:
    decoder = graph_decoder(patched)
    ids = torch.randint(2, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    # Mistral's window is 8 tokens: 30 new tokens take its window far past the prompt
    want, want_scores = _generate(patched, ids, mask, 30, DynamicCache())
    for call in range(2):
        cache = decoder.new_cache()
        got, scores = _generate(patched, ids, mask, 30, cache)
        assert torch.equal(got, want), f"call {call}"
        assert (scores - want_scores).abs().max() <= 1e-5 * want_scores.abs().max()
        assert isinstance(cache, GraphKVCache) and cache.get_seq_length() == 39
    assert len(decoder.buffers.storage) == patched.config.num_hidden_layers
    assert decoder.buffers.version == patched.config.num_hidden_layers, "the second call must reuse the storage"
    assert decoder.steps and decoder.replay_ms(2) is None, "steps run eagerly here record no graph to time"


def test_release_kv_storage_frees_it_and_the_next_call_starts_afresh() -> None:
    """ipex_llm_tf.release_kv_storage: the bytes of the storage kept between calls, which is then gone with the
    steps recorded over it; the next generate() allocates again and gives the same tokens. 0 for a model that keeps
    none."""
    model = ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa"), low_bit="sym_int8")
    assert ipex_llm_tf.release_kv_storage(model) == 0
    decoder = install_graph_decode(model)
    ids = torch.randint(2, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    want, _ = _generate(model, ids, torch.ones_like(ids), 5, DynamicCache())
    assert torch.equal(_generate(model, ids, torch.ones_like(ids), 5, decoder.new_cache())[0], want)
    planes = [p for layer in decoder.buffers.storage.values() for p in layer.values()]
    held = sum(p.numel() * p.element_size() for p in planes)
    assert held > 0 and decoder.steps
    assert ipex_llm_tf.release_kv_storage(model) == held
    assert decoder.buffers.storage == {} and decoder.steps == {} and decoder.pool is None
    assert torch.equal(_generate(model, ids, torch.ones_like(ids), 5, decoder.new_cache())[0], want)
    assert decoder.buffers.storage and ipex_llm_tf.release_kv_storage(model) == held


def test_static_step_across_span_boundary_and_storage_growth() -> None:
    model = ipex_llm_tf.optimize_model(tiny_model("llama", max_position_embeddings=1024), low_bit="sym_int4")
    decoder = install_graph_decode(model)
    ids = torch.randint(2, 128, (1, SPAN_BLOCK - 4), generator=torch.Generator().manual_seed(1))
    want, _ = _generate(model, ids, torch.ones_like(ids), 12, DynamicCache())
    got, _ = _generate(model, ids, torch.ones_like(ids), 12, decoder.new_cache())
    assert torch.equal(got, want)
    longer = torch.randint(2, 128, (1, 2 * SPAN_BLOCK - 2), generator=torch.Generator().manual_seed(2))
    want, _ = _generate(model, longer, torch.ones_like(longer), 6, DynamicCache())
    got, _ = _generate(model, longer, torch.ones_like(longer), 6, decoder.new_cache())
    assert torch.equal(got, want), "storage regrown to a larger power of two keeps earlier tokens"


def test_beam_search_reorders_storage_in_place() -> None:
    model = ipex_llm_tf.optimize_model(tiny_model("qwen2"), low_bit="sym_int8")
    decoder = install_graph_decode(model)
    ids = torch.randint(2, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        want = model.generate(ids, **kwargs, **{CACHE_KWARG: DynamicCache()})
        got = model.generate(ids, **kwargs, **{CACHE_KWARG: decoder.new_cache()})
    assert torch.equal(got, want)
    assert not decoder.buffers.detached


@pytest.mark.parametrize("mixed_precision", [False, True])  # an nn.Embedding table, or a packed (sym_int8) one
def test_a_cpu_embedding_feeds_the_step_its_vectors(mixed_precision: bool) -> None:
    """cpu_embedding=True: the step takes the host's lookups as a static input (a graph cannot record them), filled
    before each step, and gives the eager tokens (that such steps never replay early is checked on CUDA)."""
    def build(cpu_embedding: bool):
        return ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa", tie_word_embeddings=True),
                                          low_bit="sym_int8", mixed_precision=mixed_precision,
                                          cpu_embedding=cpu_embedding)
    plain, model = build(False), build(True)
    install_graph_decode(model)
    decoder = graph_decoder(model)
    ids = torch.randint(2, 128, (2, 7), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    want, want_scores = _generate(plain, ids, mask, 12, DynamicCache())
    cache = decoder.new_cache()
    got, scores = _generate(model, ids, mask, 12, cache)
    assert torch.equal(got, want)
    assert (scores - want_scores).abs().max() <= 1e-5 * want_scores.abs().max()
    (step,) = decoder.steps.values()
    assert step.hidden is not None and torch.equal(step.hidden, model.get_input_embeddings()(got[:, -2:-1]))


def test_captures_run_on_one_stream_warmed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """record_graph captures on one stream per device, after one eager run there before its first capture (so
    per-stream library state is made outside any capture), and leaves the caller's stream current."""
    from conftest import fake_graphs
    from ipex_llm_tf.models.graph_storage import record_graph
    fake = fake_graphs(monkeypatch, refuse=False)
    ran_on = []

    def run() -> torch.Tensor:
        ran_on.append(fake.current.name)
        return torch.ones(1)
    for _ in range(2):
        record_graph(torch.device("cpu"), None, run)
    assert ran_on == ["capture"] * 3, "the warm run, then one run a capture, all on the capture stream"
    assert fake.streams_made == 1 and fake.captures == 2 and fake.replays == 2 and fake.current is fake.default


@pytest.mark.parametrize("refuse", [False, True], ids=["captured", "refused"])
def test_garbage_collection_waits_out_every_capture(monkeypatch: pytest.MonkeyPatch, refuse: bool) -> None:
    """record_graph captures with Python's garbage collector off (a collection that frees an old graph inside a
    capture invalidates it on CUDA: tests/gpu's test_a_collection_mid_capture_waits) and turns it back on after,
    a refused capture included; a collector the caller had off stays off."""
    from conftest import fake_graphs
    from ipex_llm_tf.models.graph_storage import CaptureFailed, record_graph
    fake = fake_graphs(monkeypatch, refuse=refuse)
    failures = pytest.raises(CaptureFailed) if refuse else contextlib.nullcontext()
    with failures:
        record_graph(torch.device("cpu"), None, lambda: torch.ones(1))
    assert fake.collecting == [False] and gc.isenabled()
    gc.disable()
    try:
        with failures:
            record_graph(torch.device("cpu"), None, lambda: torch.ones(1))
        assert fake.collecting == [False, False] and not gc.isenabled()
    finally:
        gc.enable()


def test_a_generator_that_cannot_be_freed_still_reports_the_capture(refusing_graphs) -> None:
    """Where the random generator cannot be given a fresh state, the capture's own error is still the one raised,
    and says so."""
    from ipex_llm_tf.models.graph_storage import CaptureFailed, record_graph

    def unsupported(other) -> None:
        raise NotImplementedError("graphsafe_set_state is not supported in this Generator")
    refusing_graphs.default_generators[0].graphsafe_set_state = unsupported
    with pytest.raises(CaptureFailed, match="previous error during capture.*stays in capture mode.*not supported"):
        record_graph(torch.device("cpu"), None, lambda: torch.ones(1))
    assert refusing_graphs.current is refusing_graphs.default


def test_a_failed_capture_leaves_decoding_eager(monkeypatch: pytest.MonkeyPatch, refusing_graphs,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A capture the device refuses: the step's eager logits stand, the stream that was current is current again,
    the random generator leaves capture mode with its seed and offset, a warning says why, and later steps and
    calls run eagerly with no capture tried again."""
    model = ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa"), low_bit="sym_int8",
                                       modules_to_not_convert=["lm_head"])
    decoder = install_graph_decode(model)
    monkeypatch.setattr("ipex_llm_tf.models.graph_decode.graphs_supported", lambda device: True)
    ids = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    want, want_scores = _generate(model, ids, mask, 10, DynamicCache())
    with caplog.at_level(logging.WARNING, logger="ipex_llm_tf"):
        for call in range(2):
            got, scores = _generate(model, ids, mask, 10, decoder.new_cache())
            assert torch.equal(got, want), f"call {call}"
            assert (scores - want_scores).abs().max() <= 1e-5 * want_scores.abs().max()
    assert refusing_graphs.captures == 1 and refusing_graphs.current is refusing_graphs.default
    generator = refusing_graphs.default_generators[0]
    assert not generator.capturing and (generator.seed, generator.offset) == (1234, 8)
    assert "previous error during capture" in decoder.capture_error and "decodes eagerly from now on" in caplog.text
    assert decoder.stats.captures == 0 and all(step.graph is None for step in decoder.steps.values())


def test_graph_decode_follows_the_device_and_env_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ipex_llm_tf.optimize_model(tiny_model("llama"), low_bit="sym_int4")
    assert graph_decoder(model) is None, "off CUDA no graph decoder, and generate() is the class's own"
    assert "generate" not in model.__dict__ and model._ipex_llm_tf_graph_decode
    assert "forward" in model.__dict__  # the wrapper that serves CPU steps through eager_step
    monkeypatch.setattr("ipex_llm_tf.models.graph_decode.graphs_supported", lambda device: True)
    model.to("cpu")  # with capture pretended possible, a move installs it ...
    decoder = graph_decoder(model)
    assert decoder is not None and "forward" in model.__dict__
    ids = torch.randint(2, 128, (1, 6), generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr("ipex_llm_tf.models.graph_decode.graphs_supported", lambda device: False)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=3, pad_token_id=0)
    assert decoder.buffers.storage == {}, "no graph cache where graphs cannot be captured"
    model.to("cpu")  # ... and a move to where it is not possible removes it again
    assert graph_decoder(model) is None and "generate" not in model.__dict__
    monkeypatch.setenv("IPEX_LLM_TF_GRAPH_DECODE", "0")
    assert not getattr(ipex_llm_tf.optimize_model(tiny_model("llama"), low_bit="sym_int4"),
                       "_ipex_llm_tf_graph_decode", False)


def test_graph_api_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA records graphs; XPU does when PyTorch has XPUGraph and IPEX_LLM_TF_XPU_GRAPHS=1 asks for it (opt-in
    until it has run on Intel hardware); the CPU never."""
    assert graph_api(torch.device("cuda")) is torch.cuda
    assert graph_api(torch.device("cpu")) is None and not graphs_supported(torch.device("cpu"))
    assert graph_api(torch.device("xpu")) is None
    monkeypatch.setenv(XPU_GRAPHS_ENV, "1")
    assert graph_api(torch.device("xpu")) is (torch.xpu if hasattr(torch.xpu, "XPUGraph") else None)
    monkeypatch.delattr(torch.xpu, "XPUGraph", raising=False)
    assert graph_api(torch.device("xpu")) is None, "a PyTorch without XPU graphs decodes eagerly"


def test_sliding_window_mask_in_static_step() -> None:
    model = ipex_llm_tf.optimize_model(tiny_model("mistral"), low_bit="fp16")
    model = model.float()
    decoder = install_graph_decode(model)
    assert decoder.windows == [SLIDING_WINDOW]
    ids = torch.randint(2, 128, (1, 4), generator=torch.Generator().manual_seed(5))
    want, _ = _generate(model, ids, torch.ones_like(ids), 3 * SLIDING_WINDOW, DynamicCache())
    got, _ = _generate(model, ids, torch.ones_like(ids), 3 * SLIDING_WINDOW, decoder.new_cache())
    assert torch.equal(got, want)


def test_fp8_kv_cache_in_the_graph_storage() -> None:
    """quantize_kv_cache=True: off CUDA generate() brings the eager Fp8BlockKVCache; the graph step (run eagerly
    here) keeps float8 codes and per-vector scales in its storage, and its logits stay within float8 rounding."""
    model = ipex_llm_tf.optimize_model(tiny_model("llama"), low_bit="sym_int8", quantize_kv_cache=True,
                                       modules_to_not_convert=["lm_head"])
    ids = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    assert isinstance(out[CACHE_KWARG], Fp8BlockKVCache)
    decoder = install_graph_decode(model)
    assert decoder.fp8
    got, scores = _generate(model, ids, mask, 8, decoder.new_cache())
    planes = decoder.buffers.storage[0]
    assert planes["keys"].dtype == torch.float8_e4m3fn and planes["values_scale"].dtype == torch.float32
    # every step's logits against a float forward (no cache) over the same tokens: within float8 rounding, which
    # on this tiny random model moves logits by 4-8% of the largest, for the eager Fp8BlockKVCache as well
    with torch.inference_mode():
        full = model(got, attention_mask=torch.cat([mask, torch.ones_like(got[:, 9:])], dim=1)).logits
    want = full[:, 8:-1].transpose(0, 1)
    assert (scores[0] - want[0]).abs().max() <= 1e-5 * want.abs().max(), "the prompt attends to itself unrounded"
    assert (scores - want).abs().max() <= 0.1 * want.abs().max()

@pytest.mark.parametrize("fp8", [False, True], ids=["fp16-kv", "fp8-kv"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_prefill_into_the_graph_storage(arch, fp8) -> None:
    """generate(prefill_chunk_size=...) (transformers' chunked prefill, which bounds prefill activations) writes a
    left-padded prompt into the graph storage chunk by chunk: the same tokens as one prefill, and logits within 1e-5
    of the largest. With float8 storage later chunks attend to the rounded keys of earlier ones, so the reference is
    the eager Fp8BlockKVCache prefilled in the same chunks."""
    model = ipex_llm_tf.optimize_model(tiny_model(arch, attn_implementation="sdpa"), low_bit="sym_int8",
                                       modules_to_not_convert=["lm_head"], quantize_kv_cache=fp8)
    decoder = install_graph_decode(model)
    ids = torch.randint(2, 128, (2, 23), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    want, want_scores = _generate(model, ids, mask, 6, decoder.new_cache())
    cache = decoder.new_cache()
    got, scores = _generate(model, ids, mask, 6, cache, prefill_chunk_size=8)
    assert isinstance(cache, GraphKVCache) and cache.get_seq_length() == 28
    if fp8:
        # later chunks attend to float8 keys: the first token's logits equal the eager float8 cache's prefilled in
        # the same chunks; the decode steps after it stay within float8 rounding of them (the graph step attends to
        # its own token's key rounded, the eager cache to it unrounded)
        want, want_scores = _generate(model, ids, mask, 6, Fp8BlockKVCache(), prefill_chunk_size=8)
        assert (scores[0] - want_scores[0]).abs().max() <= 1e-5 * want_scores[0].abs().max()
        assert (scores - want_scores).abs().max() <= 0.05 * want_scores.abs().max()
    else:
        assert torch.equal(got, want)
        assert (scores - want_scores).abs().max() <= 1e-5 * want_scores.abs().max()


def test_only_greedy_single_beam_calls_replay_steps_early() -> None:
    from transformers import GenerationConfig

    from ipex_llm_tf.models.early_steps import greedy_call

    model = tiny_model("llama")
    assert greedy_call(model, {})
    assert greedy_call(model, {"do_sample": False, "num_beams": 1})
    assert not greedy_call(model, {"do_sample": True})
    assert not greedy_call(model, {"num_beams": 3})
    assert not greedy_call(model, {"generation_config": GenerationConfig(do_sample=True)})
    assert not greedy_call(model, {"prompt_lookup_num_tokens": 3})
    assert not greedy_call(model, {"assistant_model": model})


def test_early_steps_stay_inside_the_span_and_the_miss_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from ipex_llm_tf.models.early_steps import EARLY_MISSES_ALLOWED, EARLY_STEP_ENV, early_step_wanted

    cache = GraphKVCache(KVBuffers(), 2)
    assert not early_step_wanted(cache, 10, SPAN_BLOCK), "off unless generate() marked the call greedy"
    cache.early_steps = True
    assert early_step_wanted(cache, 10, SPAN_BLOCK)
    assert early_step_wanted(cache, SPAN_BLOCK - 1, SPAN_BLOCK)
    assert not early_step_wanted(cache, SPAN_BLOCK, SPAN_BLOCK), "the last slot of a span belongs to the next graph"
    cache.early_misses = EARLY_MISSES_ALLOWED
    assert not early_step_wanted(cache, 10, SPAN_BLOCK)
    cache.early_misses = 0
    monkeypatch.setenv(EARLY_STEP_ENV, "0")
    assert not early_step_wanted(cache, 10, SPAN_BLOCK)


class _DoneEvent:
    """Stands in for a device event already reached (the CPU has no streams)."""

    def wait(self) -> None:
        pass


def _early_step(length: int, batch: int = 2, span: int = 16):
    from types import SimpleNamespace

    from ipex_llm_tf.models.early_steps import EarlyStep

    key_ok = torch.zeros(batch, span, dtype=torch.bool)
    key_ok[:, :length + 1] = True
    key_ok[1, :3] = False  # row 1 left-padded
    step = SimpleNamespace(ids=torch.tensor([[5], [7]]), positions=torch.tensor([[length], [length - 3]]),
                           key_ok=key_ok, version=4)
    cache = object()
    return EarlyStep(step, cache, length, _DoneEvent(), _DoneEvent()), cache


def test_an_early_step_is_used_only_for_exactly_its_inputs() -> None:
    length = 9
    early, cache = _early_step(length)
    mask = torch.ones(2, length + 1, dtype=torch.long)
    mask[1, :3] = 0
    ids, positions = torch.tensor([[5], [7]]), torch.tensor([[length], [length - 3]])
    assert early.confirmed(cache, length, 4, ids, mask, positions)
    assert early.confirmed(cache, length, 4, ids, None, None), "no mask, no positions: the ids decide"
    assert not early.confirmed(cache, length, 4, torch.tensor([[5], [8]]), mask, positions), "another token"
    assert not early.confirmed(cache, length, 4, ids, mask, positions + 1), "another position"
    other_mask = mask.clone()
    other_mask[0, -1] = 0
    assert not early.confirmed(cache, length, 4, ids, other_mask, positions), "the new token masked out"
    other_mask = mask.clone()
    other_mask[1, 1] = 1
    assert not early.confirmed(cache, length, 4, ids, other_mask, positions), "an earlier column changed"
    assert not early.confirmed(cache, length, 4, ids, mask[:, 1:], positions), "a mask shorter than the cache"
    assert not early.confirmed(object(), length, 4, ids, mask, positions), "another generate() call's cache"
    assert not early.confirmed(cache, length + 1, 4, ids, mask, positions), "another length"
    assert not early.confirmed(cache, length, 5, ids, mask, positions), "storage moved since"
    assert not early.confirmed(cache, length, 4, ids[:1], mask[:1], positions[:1]), "another batch size"
