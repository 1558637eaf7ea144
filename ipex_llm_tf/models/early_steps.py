"""Early decode steps: a greedy step replayed before generate() asks for it, on a side stream.

Between two graph replays generate() does its per-token host work (logits processors, stopping criteria, the next
step's inputs), ~0.3 ms a token on an H100 host, and its stopping check waits for the device first, so the GPU idles
for all of it. For a greedy call the next token is, in all but rare cases, the argmax of the logits just computed:
so right after step t the decoder writes that argmax, the next slot, position and mask column into the step's static
inputs (the same kernel copies step t's logits out for generate()) and replays step t+1 on a side stream, which
generate()'s own work on the current stream does not wait for.
When generate() asks for step t+1, its inputs are compared with the early ones on the device (one sync of the current
stream, not of the replay); on a match the early logits are returned, else the decoder waits for the early replay
and replays the step again from the real inputs, over the same slot. The logits are the same either way.

A call stops replaying early after EARLY_MISSES_ALLOWED misses (logits processors that move the argmax, finished
rows of a batch fed pad tokens). `IPEX_LLM_TF_EARLY_STEP=0` turns it off.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import kernels
from ..env import env_flag

EARLY_STEP_ENV = "IPEX_LLM_TF_EARLY_STEP"
EARLY_MISSES_ALLOWED = 2


@dataclass
class EarlyStep:
    """A step replayed on the side stream before generate() asked for it."""

    step: Any              # step_records.StepGraph: static inputs, graph, logits
    cache: Any             # the GraphKVCache of the call it belongs to
    length: int            # cache length it was replayed at (its token's slot)
    inputs_ready: Any      # side-stream event: ids, slot, positions and key_ok written
    done: Any              # side-stream event: the replay finished

    def confirmed(self, cache: Any, length: int, version: int, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> bool:
        """Whether generate() now asks for exactly this step (a sync of the current stream, not of the replay)."""
        step = self.step
        if self.cache is not cache or self.length != length or step.version != version \
                or input_ids.shape != step.ids.shape:
            return False
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] < length + 1:
            return False
        self.inputs_ready.wait()  # the current stream reads the early inputs only once they are written
        same = (input_ids == step.ids).all()
        if position_ids is not None:
            same &= (position_ids[:, -1:] == step.positions).all()
        if attention_mask is not None and attention_mask.dim() == 2:
            same &= (attention_mask[:, -(length + 1):].bool() == step.key_ok[:, :length + 1]).all()
        return bool(same)


def early_step_wanted(cache: Any, length: int, span: int) -> bool:
    """Whether the step at cache length `length` may be replayed early: a greedy call with few misses so far, the
    token still inside the span the step's graph covers, and the feature not turned off."""
    return (bool(getattr(cache, "early_steps", False)) and cache.early_misses < EARLY_MISSES_ALLOWED
            and length + 1 <= span and env_flag(EARLY_STEP_ENV, True))


def replay_early(api: Any, side: Any, step: Any, cache: Any, length: int,
                 after_current: bool) -> tuple[EarlyStep, torch.Tensor]:
    """Replay `step` at cache length `length` on stream `side`, its token the argmax of the step's last logits:
    (the early step, those logits copied out for generate(), which the current stream may read at once).

    One kernel writes the next inputs and the copy, on the side stream right behind the step that wrote the logits
    when that step ran there too (after_current False): the device goes from one step to the next with no clone
    kernel and no wait between streams in the way. A step replayed on the current stream is waited for first."""
    current = api.current_stream()
    if after_current:
        side.wait_stream(current)
    with api.stream(side):
        logits = torch.empty_like(step.logits)
        # generate() extends the attention mask with ones: the key at the new slot becomes visible
        kernels.next_greedy_inputs(step.logits[:, -1, :], step.ids, step.positions, step.key_ok, step.slot, length,
                                   copy_to=logits[:, -1, :])
        inputs_ready = side.record_event()
        step.graph.replay()
        done = side.record_event()
    logits.record_stream(current)  # made on the side stream, used and freed on the current one
    current.wait_event(inputs_ready)
    return EarlyStep(step, cache, length, inputs_ready, done), logits


def greedy_call(model: nn.Module, kwargs: dict) -> bool:
    """Whether a generate() call decodes greedily with one beam and no assistant (its steps can run early)."""
    config = kwargs.get("generation_config") or model.generation_config
    do_sample = kwargs.get("do_sample", getattr(config, "do_sample", False))
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    assisted = kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None
    return not do_sample and beams == 1 and not assisted
