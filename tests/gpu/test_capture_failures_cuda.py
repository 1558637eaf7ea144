"""Graph captures that CUDA refuses, on a CUDA device: each case runs in a process of its own, since a failed
capture may leave process state behind (PyTorch leaves the random generator in capture mode, which
graph_storage.record_graph undoes; the garbage collector's settings here are the test's own).

generate() must survive a refused capture with the eager tokens (models/graph_storage.record_graph raises
CaptureFailed, GraphDecoder falls back), and captures must not be refused for what Python does meanwhile: the
garbage collector is paused while one runs (devices.collector_paused).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


_FAILING_CAPTURE = """
import sys, torch
sys.path.insert(0, "tests")
from model_factories import tiny_model
from transformers import DynamicCache
import ipex_llm_tf
from ipex_llm_tf.models.graph_decode import CACHE_KWARG, graph_decoder

model = tiny_model("llama", attn_implementation="sdpa").half()
model = ipex_llm_tf.optimize_model(model, low_bit="sym_int4").to("cuda")
head = model.lm_head.forward
def syncing_head(x):  # a sync inside a capture, which CUDA refuses
    if torch.cuda.is_current_stream_capturing():
        torch.cuda.synchronize()
    return head(x)
ids = torch.randint(2, 128, (1, 12), generator=torch.Generator().manual_seed(9)).cuda()
with torch.inference_mode():
    want = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0, **{CACHE_KWARG: DynamicCache()})
model.lm_head.forward = syncing_head
with torch.inference_mode():
    got = [model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0) for _ in range(2)]
decoder = graph_decoder(model)
print("equal", all(torch.equal(g, want) for g in got))
print("stream", torch.cuda.current_stream() == torch.cuda.default_stream())
print("error", decoder.capture_error is not None, decoder.stats.captures)
with torch.inference_mode():  # random draws after the failure: the generator left capture mode
    sampled = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=True, pad_token_id=0)
print("random", sampled.shape == (1, 16), torch.rand(2, device="cuda").shape == (2,))
"""


def _run_script(script: str, *args: str) -> list[str]:
    """The lines `script` prints, run in a process of its own from the repository root (it must exit cleanly)."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split("\n")


def test_a_failed_capture_leaves_generate_eager() -> None:
    """A step whose capture CUDA refuses (here: a sync inside it) gives generate() the eager tokens, with the
    default stream current again and no graph kept; sampling and random draws work after it."""
    lines = _run_script(_FAILING_CAPTURE)
    assert lines[:4] == ["equal True", "stream True", "error True 0", "random True True"], lines


_COLLECTED_MID_CAPTURE = """
import contextlib, gc, sys, weakref, torch
sys.path.insert(0, "tests")
from model_factories import tiny_model
import ipex_llm_tf
from ipex_llm_tf.models import graph_storage
from ipex_llm_tf.models.graph_decode import graph_decoder

if sys.argv[1] == "unpaused":
    graph_storage.collector_paused = contextlib.nullcontext

class Dropped:  # an earlier model's graph in a reference cycle, as a dropped model leaves it
    def __init__(self):
        self.me, self.graph, x = self, torch.cuda.CUDAGraph(), torch.zeros(4, device="cuda")
        with torch.cuda.graph(self.graph):
            x.add_(1)

model = tiny_model("llama", attn_implementation="sdpa").half()
model = ipex_llm_tf.optimize_model(model, low_bit="sym_int4").to("cuda")
ids = torch.randint(2, 128, (1, 12), generator=torch.Generator().manual_seed(9)).cuda()
held = [Dropped()]
freed_capturing = []
weakref.finalize(held[0], lambda: freed_capturing.append(torch.cuda.is_current_stream_capturing()))
head = model.lm_head.forward
def dropping_head(x):  # the cycle becomes garbage inside the capture, and a collection comes when one may
    if torch.cuda.is_current_stream_capturing() and held:
        held.clear()
        if gc.isenabled():  # as automatic collections do
            gc.collect()
    return head(x)
model.lm_head.forward = dropping_head
with torch.inference_mode():
    model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
gc.collect()
decoder = graph_decoder(model)
print("freed", freed_capturing)
print("error", decoder.capture_error is not None, decoder.stats.captures)
"""


@pytest.mark.parametrize("paused", [True, False], ids=["paused", "unpaused"])
def test_a_collection_mid_capture_waits(paused: bool) -> None:
    """An earlier graph that becomes unreachable garbage while a step is captured: with the collector paused
    during captures (devices.collector_paused) the capture stands and the old graph goes after it; unpaused, the
    collection frees the old graph inside the capture and CUDA invalidates it (session 31's and 32's flaky
    failures under pytest-xdist)."""
    lines = _run_script(_COLLECTED_MID_CAPTURE, "paused" if paused else "unpaused")
    assert lines[0] == ("freed [False]" if paused else "freed [True]"), lines
    assert lines[1] == ("error False 1" if paused else "error True 0"), lines


_FAILING_TUNER_CAPTURE = """
import torch
from ipex_llm_tf.kernels.triton_tuning import _replay_ms

x = torch.ones(4, device="cuda")
def syncing():  # fine in the eager run before the capture; a sync inside the capture, which CUDA refuses
    x.add_(1)
    if torch.cuda.is_current_stream_capturing():
        torch.cuda.synchronize()
try:
    _replay_ms([syncing], torch.device("cuda"))
    print("refused False")
except Exception:
    print("refused True")
print("random", torch.rand(2, device="cuda").shape == (2,))
"""


def test_a_tuning_capture_that_fails_leaves_random_draws_working() -> None:
    """The tuner times a candidate by capturing it (triton_tuning._replay_ms); where that capture fails the
    candidate is skipped, and the random generator leaves capture mode as after a failed decode capture."""
    assert _run_script(_FAILING_TUNER_CAPTURE)[:2] == ["refused True", "random True"]
