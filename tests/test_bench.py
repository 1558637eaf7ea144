"""ipex_llm_tf.bench's next-token clock: one timestamp per generated token, generate()'s output unchanged, and the
median of the gaps (CPU, a tiny model)."""
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
