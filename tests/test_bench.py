"""ipex_llm_tf.bench's timed generations: end-of-sequence blocked by one write a step (the same tokens as
transformers' min_new_tokens), the next-token clock's one timestamp per generated token with generate()'s output
unchanged, and the median of the gaps (CPU, a tiny model)."""
from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteriaList

from model_factories import tiny_model

import ipex_llm_tf
from ipex_llm_tf import bench


def _generate(model, ids, tokens, **kwargs):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                              min_new_tokens=tokens, do_sample=False, pad_token_id=0, **kwargs)


def test_token_clock_notes_each_token_and_never_stops() -> None:
    model = ipex_llm_tf.optimize_model(tiny_model("llama"), low_bit="sym_int4")
    ids = torch.randint(2, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    clock = bench.TokenClock()
    got = _generate(model, ids, 9, stopping_criteria=StoppingCriteriaList([clock]))
    assert torch.equal(got, _generate(model, ids, 9))
    assert len(clock.times) == 9 and clock.times == sorted(clock.times)


def test_median_token_ms_is_the_median_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gaps of 1, 5, 2, 2 ms: the median is 2 whatever the one slow gap (a host pause) was."""
    ticks = iter([0.0, 0.001, 0.006, 0.008, 0.010])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks, 1.0))
    monkeypatch.setattr(bench, "time_generate",
                        lambda model, ids, tokens, stopping_criteria, **kw: [stopping_criteria[0](ids, None)
                                                                             for _ in range(tokens)])
    assert bench.median_token_ms(None, torch.zeros(1, 4, dtype=torch.long), 5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least 3"):
        bench.median_token_ms(None, torch.zeros(1, 4, dtype=torch.long), 2)


def test_block_tokens_generates_what_min_new_tokens_does() -> None:
    """A model whose greedy pick is often its EOS: blocking it gives min_new_tokens' tokens, all new_tokens of them."""
    model = ipex_llm_tf.optimize_model(tiny_model("llama"), low_bit="sym_int4")
    ids = torch.randint(2, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    free = _generate(model, ids, 12)
    model.generation_config.eos_token_id = [int(free[0, 7]), int(free[1, 9])]   # tokens it would pick
    from transformers import LogitsProcessorList
    with torch.inference_mode():
        blocked = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 pad_token_id=0,
                                 logits_processor=LogitsProcessorList([bench.BlockTokens(
                                     model.generation_config.eos_token_id)]))
    assert torch.equal(blocked, _generate(model, ids, 12))
    assert blocked.shape[1] == 6 + 12
    assert not torch.isin(blocked[:, 6:], torch.tensor(model.generation_config.eos_token_id)).any()


def test_block_tokens_takes_one_id_or_several() -> None:
    scores = torch.zeros(2, 5)
    assert bench.BlockTokens(3)(None, scores.clone())[:, 3].eq(float("-inf")).all()
    out = bench.BlockTokens([4, 1, 4])(None, scores.clone())
    assert torch.isinf(out).sum() == 4 and out[:, [1, 4]].eq(float("-inf")).all()


def test_time_generate_runs_every_token_past_eos(monkeypatch: pytest.MonkeyPatch) -> None:
    """time_generate passes generate() a BlockTokens for the model's EOS, after any processors the caller gave."""
    seen = {}
    model = ipex_llm_tf.optimize_model(tiny_model("llama"), low_bit="sym_int4")
    model.generation_config.eos_token_id = 7
    real = model.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(model, "generate", spy)
    mine = bench.BlockTokens(9)
    bench.time_generate(model, torch.randint(2, 100, (1, 4)), 3, logits_processor=[mine])
    processors = list(seen["logits_processor"])
    assert processors[0] is mine and processors[1].token_ids == [7] and "min_new_tokens" not in seen
