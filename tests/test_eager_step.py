"""eager_step: plain one-token CPU steps skip transformers' per-layer wrappers and give the same logits."""
from __future__ import annotations

import pytest
import torch

import ipex_llm_tf
from ipex_llm_tf.models import eager_step
from model_factories import ARCHITECTURES, SLIDING_WINDOW, step_logits, tiny_model


def _with_and_without_eager_step(model: torch.nn.Module, ids: torch.Tensor, chunks: list[int],
                                 monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> tuple[list, list, int]:
    taken = []
    real_step = eager_step.step
    monkeypatch.setattr(eager_step, "step", lambda *a: taken.append(1) or real_step(*a))
    fast = step_logits(model, ids, chunks)
    with monkeypatch.context() as off:
        off.setattr(eager_step, "can_step", lambda *a: False)
        slow = step_logits(model, ids, chunks)
    return fast, slow, len(taken)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_one_token_steps_equal_transformers_forward(arch: str, attn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = ipex_llm_tf.optimize_model(tiny_model(arch, attn_implementation=attn), low_bit="sym_int8")
    ids = torch.randint(2, 128, (2, 6 + 2 * SLIDING_WINDOW), generator=torch.Generator().manual_seed(1))
    chunks = [6] + [1] * (2 * SLIDING_WINDOW)  # Mistral's window is passed well before the end
    fast, slow, taken = _with_and_without_eager_step(model, ids, chunks, monkeypatch)
    assert taken == len(chunks) - 1
    for step, (got, want) in enumerate(zip(fast, slow)):
        # bit for bit: the same ops in the same order; beyond Mistral's window transformers masks the keys the
        # step slices off, which may reorder SDPA's sums (float32, logits of order 1: 1e-5 absolute)
        if arch == "mistral" and step + 6 > SLIDING_WINDOW:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        else:
            assert torch.equal(got, want), f"step {step}"


def test_greedy_generate_uses_it_and_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ipex_llm_tf.optimize_model(tiny_model("llama"), low_bit="sym_int4")
    ids = torch.randint(2, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    taken = []
    real_step = eager_step.step
    monkeypatch.setattr(eager_step, "step", lambda *a: taken.append(1) or real_step(*a))
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        monkeypatch.setattr(eager_step, "can_step", lambda *a: False)
        want = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert len(taken) == 11 and torch.equal(got, want)


def _plain_step_kwargs(model: torch.nn.Module) -> tuple[torch.Tensor, object, dict]:
    from ipex_llm_tf.models.graph_decode import CACHE_KWARG
    ids = torch.randint(2, 128, (2, 5))
    with torch.no_grad():
        cache = getattr(model(input_ids=ids, use_cache=True), CACHE_KWARG)
    return ids[:, -1:], cache, {"attention_mask": torch.ones(2, 6, dtype=torch.long)}


def test_anything_but_a_plain_step_goes_to_transformers() -> None:
    model = ipex_llm_tf.optimize_model(tiny_model("qwen2"), low_bit="sym_int8")
    token, cache, kwargs = _plain_step_kwargs(model)
    assert eager_step.can_step(model, token, cache, kwargs)
    padded = torch.ones(2, 6, dtype=torch.long)
    padded[0, 0] = 0
    assert not eager_step.can_step(model, token, cache, {"attention_mask": padded})
    assert not eager_step.can_step(model, token, cache, {**kwargs, "output_hidden_states": True})
    assert not eager_step.can_step(model, token, cache, {**kwargs, "return_dict": False})
    assert not eager_step.can_step(model, token, None, kwargs)
    assert not eager_step.can_step(model, torch.cat([token, token], 1), cache, kwargs)
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert not eager_step.can_step(model, token, cache, kwargs), "a hook would be skipped"
    handle.remove()
    assert eager_step.can_step(model, token, cache, kwargs)


def test_env_switch_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPEX_LLM_TF_GRAPH_DECODE", "0")
    model = ipex_llm_tf.optimize_model(tiny_model("llama"), low_bit="sym_int4")
    assert "forward" not in model.__dict__


def test_a_static_cache_keeps_transformers_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # a static cache returns its whole preallocated length; only transformers' mask makes attending to it right
    from transformers import DynamicCache, StaticCache
    from ipex_llm_tf.models.graph_decode import CACHE_KWARG
    model = ipex_llm_tf.optimize_model(tiny_model("llama"), low_bit="sym_int8")
    ids = torch.randint(2, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    logits = {}
    for name, cache in (("static", StaticCache(config=model.config, max_cache_len=32)), ("dynamic", DynamicCache())):
        with torch.no_grad():
            model(input_ids=ids[:, :6], use_cache=True, **{CACHE_KWARG: cache})
            assert eager_step.can_step(model, ids[:, 6:7], cache, {}) == (name == "dynamic")
            logits[name] = [model(input_ids=ids[:, i:i + 1], use_cache=True, **{CACHE_KWARG: cache}).logits
                            for i in range(6, 12)]
    for got, want in zip(logits["static"], logits["dynamic"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_fp8_kv_cache_steps_eagerly_with_the_same_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ipex_llm_tf.optimize_model(tiny_model("qwen3"), low_bit="sym_int8", quantize_kv_cache=True)
    ids = torch.randint(2, 128, (1, 9), generator=torch.Generator().manual_seed(6))
    taken = []
    real_step = eager_step.step
    monkeypatch.setattr(eager_step, "step", lambda *a: taken.append(type(a[2]).__name__) or real_step(*a))
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        monkeypatch.setattr(eager_step, "can_step", lambda *a: False)
        want = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert taken == ["Fp8BlockKVCache"] * 9 and torch.equal(got, want)
