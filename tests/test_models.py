"""Fused forwards (ipex_llm_tf.models): same logits and tokens as transformers' eager forward, per-instance patching."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.models.llama import modeling_llama

from conftest import relative_error
from ipex_llm_tf import LowBitLinear, convert
from ipex_llm_tf.models import (is_optimized, optimize_architecture, register_architecture,
                                supported_architectures)
from ipex_llm_tf.models.common import ConcatProjections, FusedAttention, FusedGatedMLP, FusedRMSNorm
from ipex_llm_tf.models.graph_decode import CACHE_KWARG
from ipex_llm_tf.models.kv_cache import BlockKVCache, BlockKVLayer, Fp8BlockKVCache
from model_factories import ARCHITECTURES, SLIDING_WINDOW, step_logits, tiny_gpt2, tiny_model

ATOL = 1e-4
# (arch, config overrides): the four architectures, plus Qwen2 with its per-layer sliding window switched on
CASES = [(arch, {}) for arch in ARCHITECTURES] + [
    ("qwen2", dict(use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=1))]
CASE_IDS = [arch for arch in ARCHITECTURES] + ["qwen2-sliding"]
# for the logits test also Llama with every optional bias, which the merged projections must carry
LOGIT_CASES = CASES + [("llama", dict(attention_bias=True, mlp_bias=True))]
LOGIT_CASE_IDS = CASE_IDS + ["llama-biases"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These matmuls are tiny: with OpenMP threads on a busy 2-core machine each one waits milliseconds for its workers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def patched_copy(model: nn.Module, attn_implementation: str | None = None) -> nn.Module:
    """A deep copy of `model` with the fused forward installed (optionally under another attention implementation)."""
    fused = copy.deepcopy(model)
    if attn_implementation is not None:
        fused.set_attn_implementation(attn_implementation)
    assert optimize_architecture(fused) is True
    return fused


def prompts(batch: int = 1, length: int = 12, seed: int = 1) -> torch.Tensor:
    """Random prompts, longer than the sliding window used for Mistral."""
    return torch.randint(2, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_steps_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for step, (a, e) in enumerate(zip(actual, expected)):
        err = (a - e).abs().max().item()
        assert err <= ATOL, f"step {step}: max |diff| {err:.3g} > {ATOL}"


# Prefill 12 tokens (> the window of 8), a 3-token chunk through the cache (a mask with an offset), then single-token
# decode steps that run past the window again.
CHUNKS = [12, 3] + [1] * 8


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(("arch", "overrides"), LOGIT_CASES, ids=LOGIT_CASE_IDS)
def test_logits_match_eager_at_prefill_and_every_decode_step(arch: str, overrides: dict,
                                                             attn_implementation: str) -> None:
    reference = tiny_model(arch, **overrides)
    fused = patched_copy(reference, attn_implementation)
    ids = prompts(batch=2, length=sum(CHUNKS))
    assert_steps_close(step_logits(fused, ids, CHUNKS), step_logits(reference, ids, CHUNKS))


def test_repeated_kv_heads_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # the path CUDA takes when a mask is given: KV heads repeated instead of SDPA's enable_gqa
    monkeypatch.setattr("ipex_llm_tf.models.common.native_gqa_ok", lambda mask, device: False)
    reference = tiny_model("mistral")
    ids = prompts(batch=2, length=sum(CHUNKS))
    assert_steps_close(step_logits(patched_copy(reference, "sdpa"), ids, CHUNKS), step_logits(reference, ids, CHUNKS))


def test_patching_a_bare_decoder_model() -> None:
    reference = tiny_model("qwen3").model
    fused = patched_copy(reference)
    assert isinstance(fused.layers[0].self_attn, FusedAttention)
    ids = prompts(batch=2, length=10)
    with torch.no_grad():
        assert (fused(ids).last_hidden_state - reference(ids).last_hidden_state).abs().max() <= ATOL


def test_patch_swaps_every_piece() -> None:
    fused = patched_copy(tiny_model("qwen3"))
    layer = fused.model.layers[0]
    assert isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, FusedGatedMLP)
    qkv = layer.self_attn.qkv_proj
    assert isinstance(qkv, nn.Linear) and qkv.out_features == 4 * 16 + 2 * 2 * 16
    assert isinstance(layer.mlp.gate_up_proj, nn.Linear) and layer.mlp.gate_up_proj.out_features == 2 * 128
    assert all(isinstance(m, FusedRMSNorm) for m in (layer.input_layernorm, layer.post_attention_layernorm,
                                                      layer.self_attn.q_norm, fused.model.norm))
    assert is_optimized(fused) and optimize_architecture(fused) is True  # a second call is a no-op
    # generate() already asks for the last position's logits only at prefill (logits_to_keep=1) when the forward
    # takes it; the patch keeps transformers' *ForCausalLM.forward, so that stays in force
    assert fused._supports_logits_to_keep()


def test_head_multiplies_the_prefill_last_position_as_one_matrix() -> None:
    # transformers passes hidden[:, -1:, :] at prefill; for a frozen weight torch.matmul's batched path copied the
    # whole head for it (~50 ms for SmolLM2's on the CPU)
    fused = patched_copy(tiny_model("llama"))
    head = fused.get_output_embeddings()
    head.weight.requires_grad_(False)
    hidden = torch.randn(2, 9, 64)[:, -1:, :]
    with torch.no_grad(), torch.profiler.profile() as prof:
        logits = head(hidden)
    names = {event.name for event in prof.events()}
    assert "aten::mm" in names and "aten::bmm" not in names
    assert logits.shape == (2, 1, 128)
    assert torch.equal(logits, nn.Linear.forward(head, hidden.contiguous().view(2, 1, 64).clone()))


NORM_DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
               (torch.float16, torch.float16)]


@pytest.mark.parametrize(("weight_dtype", "input_dtype"), NORM_DTYPES)
def test_rms_norm_is_transformers_rms_norm_bit_for_bit(weight_dtype: torch.dtype, input_dtype: torch.dtype) -> None:
    norm = modeling_llama.LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64) + 0.5)
    norm.to(weight_dtype)
    x = (torch.randn(3, 5, 64) * 4).to(input_dtype)
    expected, actual = norm(x), FusedRMSNorm.from_module(norm)(x)
    assert actual.dtype == expected.dtype and torch.equal(actual, expected)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bf16_model_matches_transformers_sdpa(arch: str) -> None:
    reference = tiny_model(arch, attn_implementation="sdpa").to(torch.bfloat16)
    fused = patched_copy(reference)
    ids = prompts(batch=2, length=sum(CHUNKS))
    for a, e in zip(step_logits(fused, ids, CHUNKS), step_logits(reference, ids, CHUNKS)):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, e, atol=2e-2 * e.abs().max().item(), rtol=0)


@pytest.mark.parametrize("low_bit", ["sym_int8", "sym_int4", "nf4"])
@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=CASE_IDS)
def test_low_bit_logits_match_unpatched_low_bit(arch: str, overrides: dict, low_bit: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "torch")  # both sides compute in exact fp32
    reference = tiny_model(arch, **overrides)
    convert(reference, low_bit)
    fused = patched_copy(reference)
    qkv = fused.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, LowBitLinear) and qkv.low_bit == low_bit
    assert (qkv.bias is not None) == (arch == "qwen2")
    assert isinstance(fused.model.layers[0].mlp.gate_up_proj, LowBitLinear)
    ids = prompts(batch=2, length=sum(CHUNKS))
    assert_steps_close(step_logits(fused, ids, CHUNKS), step_logits(reference, ids, CHUNKS))


def test_low_bit_on_the_default_cpu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    # the merged layers take the same kernels: the packed int4 one for few rows, dequantize + bf16 GEMM for many
    monkeypatch.delenv("IPEX_LLM_TF_BACKEND", raising=False)
    reference = tiny_model("qwen2")
    convert(reference, "sym_int4")
    fused = patched_copy(reference)
    with torch.no_grad():
        for length in (6, 80):
            ids = prompts(length=length)
            expected = reference(ids).logits
            assert (fused(ids).logits - expected).abs().max() <= 1e-2 * expected.abs().max()


def test_merged_low_bit_weight_is_the_stacked_weights() -> None:
    reference = tiny_model("qwen2")
    convert(reference, "sym_int4")
    attn = reference.model.layers[0].self_attn
    expected = torch.cat([attn.q_proj.dequantized_weight(), attn.k_proj.dequantized_weight(),
                          attn.v_proj.dequantized_weight()])
    expected_bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
    merged = patched_copy(reference).model.layers[0].self_attn.qkv_proj
    assert torch.equal(merged.dequantized_weight(), expected) and torch.equal(merged.bias, expected_bias)


def test_output_projection_knows_attention_precedes_it() -> None:
    """The patcher tells a packed o_proj that decode attention of the layer's shape produces its input
    (kernels.decode_context: autotuning times its GEMV after that kernel); nothing else is marked, and a float
    o_proj is left as it is."""
    from ipex_llm_tf.kernels.decode_context import AfterAttention
    reference = tiny_model("qwen2")
    convert(reference, "sym_int4")
    attn = patched_copy(reference).model.layers[0].self_attn
    assert attn.o_proj._packed_cache.decode_context == AfterAttention(attn.num_heads, attn.num_key_value_heads,
                                                                      attn.head_dim)
    assert attn.qkv_proj._packed_cache.decode_context is None
    reference = tiny_model("llama")
    convert(reference, "sym_int4", modules_to_not_convert=["lm_head", "o_proj"])
    assert type(patched_copy(reference).model.layers[0].self_attn.o_proj) is nn.Linear


def test_mixed_precision_projections_fall_back_to_concatenation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "torch")
    reference = tiny_model("llama")
    convert(reference, "sym_int8", modules_to_not_convert=["lm_head", "q_proj", "up_proj"])
    fused = patched_copy(reference)
    assert isinstance(fused.model.layers[0].self_attn.qkv_proj, ConcatProjections)
    assert isinstance(fused.model.layers[0].mlp.gate_up_proj, ConcatProjections)
    ids = prompts(batch=2, length=sum(CHUNKS))
    assert_steps_close(step_logits(fused, ids, CHUNKS), step_logits(reference, ids, CHUNKS))


@torch.no_grad()
def generate(model: nn.Module, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, **kwargs)


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=CASE_IDS)
def test_greedy_generate_matches_unpatched(arch: str, overrides: dict) -> None:
    reference = tiny_model(arch, **overrides)
    fused = patched_copy(reference)
    ids = prompts(length=10)
    expected = generate(reference, ids, do_sample=False)
    assert expected.shape[1] == 30
    assert torch.equal(generate(fused, ids, do_sample=False), expected)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_left_padded_batch_matches_single_prompt_runs(arch: str, attn_implementation: str) -> None:
    fused = patched_copy(tiny_model(arch), attn_implementation)
    rows = [prompts(length=n, seed=n)[0] for n in (3, 11, 7)]  # 11 > Mistral's window of 8
    width = max(len(r) for r in rows)
    pad = fused.config.pad_token_id
    ids = torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]) for r in rows]).long()
    with torch.no_grad():
        batched = fused.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    for row, prompt in zip(batched, rows):
        single = generate(fused, prompt[None], do_sample=False)[0, len(prompt):len(prompt) + 12]
        assert torch.equal(row[width:], single)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_beam_search_and_sampling_match_unpatched(arch: str) -> None:
    reference = tiny_model(arch)
    fused = patched_copy(reference)
    ids = prompts(batch=2, length=9)
    assert torch.equal(generate(fused, ids, num_beams=2, do_sample=False),
                       generate(reference, ids, num_beams=2, do_sample=False))
    sampled = []
    for model in (reference, fused):
        torch.manual_seed(123)
        sampled.append(generate(model, ids, do_sample=True, top_k=20, temperature=0.8))
    assert torch.equal(sampled[0], sampled[1])


def test_patching_one_instance_leaves_the_class_and_other_instances_alone() -> None:
    class_attrs = {cls: dict(vars(cls)) for cls in (modeling_llama.LlamaAttention, modeling_llama.LlamaMLP,
                                                     modeling_llama.LlamaRMSNorm, modeling_llama.LlamaDecoderLayer,
                                                     modeling_llama.LlamaModel, modeling_llama.LlamaForCausalLM)}
    module_attrs = dict(vars(modeling_llama))
    plain = tiny_model("llama")
    ids = prompts(batch=2, length=10)
    with torch.no_grad():
        before = plain(ids).logits
    fused = patched_copy(plain)
    assert {cls: dict(vars(cls)) for cls in class_attrs} == class_attrs
    assert dict(vars(modeling_llama)) == module_attrs
    assert isinstance(plain.model.layers[0].self_attn, modeling_llama.LlamaAttention)
    with torch.no_grad():
        # interleaved: each keeps its own forward and its own correct output
        assert torch.equal(plain(ids).logits, before)
        assert (fused(ids).logits - before).abs().max() <= ATOL
        fresh = tiny_model("llama")
        assert torch.equal(fresh(ids).logits, before)
    assert torch.equal(generate(plain, ids[:1], do_sample=False), generate(fused, ids[:1], do_sample=False))


def test_unsupported_model_type_is_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_gpt2()
    ids = prompts(length=8)
    with torch.no_grad():
        before = model(ids).logits
    with caplog.at_level(logging.INFO, logger="ipex_llm_tf"):
        assert optimize_architecture(model) is False
    assert "no fused forward for model_type gpt2; using low-bit linears with transformers' own forward" in caplog.text
    assert "gpt2" not in supported_architectures() and not is_optimized(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert generate(model, ids, do_sample=False).shape[1] == 28


def test_unexpected_layout_or_meta_weights_are_refused_untouched(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model("llama")
    del model.model.layers[1].mlp.up_proj
    original = model.model.layers[0].self_attn
    with caplog.at_level(logging.INFO, logger="ipex_llm_tf"):
        assert optimize_architecture(model) is False
    assert "lacks up_proj" in caplog.text and model.model.layers[0].self_attn is original
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(tiny_model("llama").config)
    assert optimize_architecture(skeleton) is False


def test_registry_api() -> None:
    assert supported_architectures() == ["llama", "mistral", "qwen2", "qwen3"]
    with pytest.raises(ValueError, match="already"):
        register_architecture("llama", lambda model: None)


@pytest.mark.parametrize("window", [None, 5])
def test_attention_without_a_mask_applies_causality_and_the_window_itself(window: int | None) -> None:
    # transformers hands sdpa attention no mask when plain causality suffices; the fused layer must then apply
    # causality (and its own sliding window) itself. Oracle: transformers' eager attention with a mask built by loops.
    model = tiny_model("mistral", sliding_window=window)
    eager_attn = model.model.layers[0].self_attn
    fused_attn = FusedAttention(copy.deepcopy(eager_attn), sliding_window=window, qk_norm=False)
    length = 12
    hidden = torch.randn(2, length + 1, 64)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(length + 1)[None])
    allowed = torch.tensor([[k <= q and (window is None or q - k < window) for k in range(length + 1)]
                            for q in range(length + 1)])
    float_mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        expected, _ = eager_attn(hidden, (cos, sin), float_mask)
        cache = DynamicCache()
        prefill, _ = fused_attn(hidden[:, :length], (cos[:, :length], sin[:, :length]), None, cache=cache)
        decode, _ = fused_attn(hidden[:, length:], (cos[:, length:], sin[:, length:]), None, cache=cache)
    assert (prefill - expected[:, :length]).abs().max() <= ATOL
    assert (decode - expected[:, length:]).abs().max() <= ATOL


# -- optional KV caches -----------------------------------------------------------------------------------------------

def test_block_cache_grows_in_blocks_and_writes_in_place() -> None:
    layer = BlockKVLayer(block_size=4)
    keys = torch.randn(2, 2, 6, 16)
    values = torch.randn(2, 2, 6, 16)
    k, v = layer.update(keys[:, :, :3], values[:, :, :3])
    assert layer.capacity() == 4 and torch.equal(k, keys[:, :, :3])
    storage = layer._planes["keys"].data_ptr()
    layer.update(keys[:, :, 3:4], values[:, :, 3:4])
    assert layer._planes["keys"].data_ptr() == storage  # still room in the block: no copy
    k, v = layer.update(keys[:, :, 4:], values[:, :, 4:])
    assert layer.capacity() == 8 and layer.get_seq_length() == 6
    assert torch.equal(k, keys) and torch.equal(v, values)
    layer.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(layer.keys, keys[[1, 1]])
    layer.crop(-2)
    assert layer.get_seq_length() == 4 and torch.equal(layer.values, values[[1, 1], :, :4])
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.keys is None and layer.values is None
    with pytest.raises(AttributeError, match="write them through update"):
        layer.keys = keys  # keys / values are views of the planes, made when read


def test_block_cache_rotates_and_appends_a_prompt_as_rotary_then_update() -> None:
    """A prompt's merged projection into a BlockKVLayer: the rotated query and every key and value so far, as the
    rotary op and then update() give them, bit for bit; the attention of a block cache's layers takes that path,
    transformers' own layers and float8 ones do not."""
    from ipex_llm_tf.kernels import rotary
    from ipex_llm_tf.models.kv_cache import rotate_and_append
    heads, kv_heads, dim = 4, 2, 16
    qkv = torch.randn(2, 9, heads + 2 * kv_heads, dim)
    cos, sin = torch.randn(1, 9, dim), torch.randn(1, 9, dim)
    fused, plain = BlockKVLayer(block_size=4), BlockKVLayer(block_size=4)
    for chunk in (slice(0, 5), slice(5, 9)):
        query, keys, values = fused.rotate_and_append(qkv[:, chunk], cos[:, chunk], sin[:, chunk], heads, kv_heads)
        query_key = rotary(qkv[:, chunk, :heads + kv_heads].transpose(1, 2), cos[:, chunk], sin[:, chunk])
        want_keys, want_values = plain.update(query_key[:, heads:], qkv[:, chunk, heads + kv_heads:].transpose(1, 2))
        assert torch.equal(query, query_key[:, :heads])
        assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
    assert fused.get_seq_length() == 9 and fused.capacity() == 12
    assert rotate_and_append(DynamicCache(), qkv, cos, sin, 0, heads, kv_heads) is None
    fp8 = Fp8BlockKVCache()
    fp8.update(torch.randn(2, kv_heads, 3, dim), torch.randn(2, kv_heads, 3, dim), 0)
    assert rotate_and_append(fp8, qkv, cos, sin, 0, heads, kv_heads) is None
    assert rotate_and_append(BlockKVCache(), qkv, cos, sin, 0, heads, kv_heads) is None  # layer 0 not made yet


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_block_cache_generates_exactly_what_the_dynamic_cache_does(arch: str) -> None:
    reference = tiny_model(arch)
    fused = patched_copy(reference)
    ids = prompts(batch=2, length=9)
    expected = generate(reference, ids, do_sample=False)
    for model in (reference, fused):
        assert torch.equal(generate(model, ids, do_sample=False, **{CACHE_KWARG: BlockKVCache(block_size=8)}), expected)
    beams = generate(reference, ids, num_beams=2, do_sample=False)
    block_cache = {CACHE_KWARG: BlockKVCache(block_size=8)}
    assert torch.equal(generate(fused, ids, num_beams=2, do_sample=False, **block_cache), beams)


def test_fp8_cache_stays_close_to_full_precision() -> None:
    fused = patched_copy(tiny_model("qwen3"))
    ids = prompts(batch=2, length=sum(CHUNKS))
    expected = step_logits(fused, ids, CHUNKS)
    with torch.no_grad():
        cache = Fp8BlockKVCache(block_size=8)
        out = fused(input_ids=ids[:, :CHUNKS[0]], use_cache=True, **{CACHE_KWARG: cache})
        actual, start = [out.logits], CHUNKS[0]
        for size in CHUNKS[1:]:
            actual.append(fused(input_ids=ids[:, start:start + size], use_cache=True, **{CACHE_KWARG: cache}).logits)
            start += size
    assert cache.layers[0].keys.dtype == torch.float8_e4m3fn
    errors = [relative_error(a, e) for a, e in zip(actual, expected)]
    # the prompt attends to its own unrounded states; later steps see e4m3-rounded past states (3 mantissa bits),
    # which this deliberately sharp-attention toy model amplifies to a few percent (transformers' per-tensor-scale
    # Fp8QuantizedLayer measures 6-10% on the same steps)
    assert errors[0] == 0 and max(errors) < 0.15, errors
    assert generate(fused, ids, do_sample=False, **{CACHE_KWARG: Fp8BlockKVCache()}).shape == (2, ids.shape[1] + 20)


@pytest.mark.parametrize("low_bit", [None, "sym_int4", "mixed"])
def test_state_dict_keeps_transformers_layout(low_bit: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "torch")
    reference, other = tiny_model("qwen2"), tiny_model("qwen2", seed=1)
    for model in (reference, other):
        if low_bit == "mixed":  # q_proj and up_proj stay full precision: ConcatProjections
            convert(model, "sym_int8", modules_to_not_convert=["lm_head", "q_proj", "up_proj"])
        elif low_bit is not None:
            convert(model, low_bit)
    expected = reference.state_dict()
    fused = patched_copy(reference)
    actual = fused.state_dict()
    assert sorted(actual) == sorted(expected)
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    # and a patched model loads a checkpoint in transformers' layout
    fused_other = patched_copy(other)
    fused_other.load_state_dict(expected)
    ids = prompts(batch=2, length=10)
    with torch.no_grad():
        assert torch.equal(fused_other(ids).logits, fused(ids).logits)


def test_save_pretrained_from_a_patched_model_loads_unpatched(tmp_path) -> None:
    reference = tiny_model("qwen3")
    patched_copy(reference).save_pretrained(tmp_path)
    reloaded = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = prompts(batch=2, length=10)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, reference(ids).logits)


def test_attention_backends_leave_out_cudnn_for_steps_and_short_prompts_on_cuda() -> None:
    """cuDNN is kept out of one-query steps and prompts up to SHORT_PROMPT_QUERIES on CUDA (its host time a call);
    longer prompts and other devices get torch's own choice."""
    import contextlib
    from ipex_llm_tf.models import common
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for q_len in (1, 32, common.SHORT_PROMPT_QUERIES):
        assert not isinstance(common.attention_backends(cuda, q_len), contextlib.nullcontext)
    assert isinstance(common.attention_backends(cuda, common.SHORT_PROMPT_QUERIES + 1), contextlib.nullcontext)
    assert isinstance(common.attention_backends(cpu, 1), contextlib.nullcontext)
    with common.attention_backends(cuda, 8):  # entering sets the allowed backends, which exclude cuDNN
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pre_norm_blocks_add_and_norm_in_one_op(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each patched layer runs the attention's residual add and the post-attention norm as one op, with the logits
    of transformers' layer forward over the same fused modules bit for bit on the CPU (the same ops there); a layer
    with a child of another kind (here an extra norm) keeps transformers' forward."""
    from ipex_llm_tf.models.patching import pre_norm_block_forward
    reference = tiny_model(arch)
    fused = patched_copy(reference)
    layers = fused.model.layers
    assert all(layer.forward.__func__ is pre_norm_block_forward for layer in layers)
    unfused = copy.deepcopy(fused)
    for layer in unfused.model.layers:
        del layer.forward  # back to the class's forward
    calls = []
    real = FusedRMSNorm.add_forward
    monkeypatch.setattr(FusedRMSNorm, "add_forward", lambda self, x, residual: calls.append(1) or real(self, x, residual))
    ids = prompts(batch=2, length=9)
    with torch.no_grad():
        assert torch.equal(fused(ids).logits, unfused(ids).logits)
        assert (fused(ids).logits - reference(ids).logits).abs().max() <= ATOL
    assert len(calls) == 2 * len(layers)
    other = copy.deepcopy(reference)
    other.model.layers[0].extra_norm = nn.Identity()
    optimize_architecture(other)
    assert "forward" not in vars(other.model.layers[0]) and "forward" in vars(other.model.layers[1])
