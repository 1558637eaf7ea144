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
import gc

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


def _assert_matches_eager(got, scores, want_tokens, want_scores, what: str, tolerance: float = 2e-2) -> None:
    """The same greedy tokens as the eager run and logits within `tolerance` of its largest."""
    assert torch.equal(got, want_tokens), what
    error = ((scores - want_scores).abs().max() / want_scores.abs().max()).item()
    assert error < tolerance, f"{what}: relative logit error {error:.2e}"


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
        _assert_matches_eager(*_generate(model, ids, mask, 24), want_tokens, want_scores, f"call {call}")
    assert decoder.stats.captures == 1, "the second call must replay the first call's graph"
    assert decoder.stats.replays == 2 * 23 - 1
    assert decoder.rope.agrees == {(ids.device, torch.float16): True}, "steps take the one-kernel RoPE angles"


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_prompt_graphs_match_the_eager_prompt(arch: str) -> None:
    """A prompt's second call records its bucket's graph, later calls replay it (models/prompt_graphs.py), a
    left-padded batch included: the same greedy tokens as the eager cache and logits within 2e-2 (the padded prompt's
    matmuls take other tile shapes)."""
    model = ipex_llm_tf.optimize_model(tiny_model(arch, attn_implementation="sdpa").half(), low_bit="sym_int4").to("cuda")
    decoder = graph_decoder(model)
    # 300: the storage grows to the 320-token bucket; (3, 40) left-padded: the graph kind that takes a mask
    for batch, tokens, pads in ((1, 12, ()), (3, 100, ()), (1, 300, ()), (3, 40, (0, 7, 30))):
        ids = torch.randint(2, 128, (batch, tokens), generator=torch.Generator().manual_seed(tokens)).cuda()
        mask = torch.ones_like(ids)
        for row, pad in enumerate(pads):
            mask[row, :pad] = 0
        want_tokens, want_scores = _eager(model, ids, mask, 8)
        for call in range(3):
            _assert_matches_eager(*_generate(model, ids, mask, 8), want_tokens, want_scores,
                                  f"prompt {batch}x{tokens}, call {call}")
    assert decoder.stats.prompt_captures == 4 and decoder.stats.prompt_replays == 8


def test_calls_in_and_out_of_inference_mode_share_the_graphs() -> None:
    """The graph storage and static inputs made under torch.inference_mode take a later plain call's writes."""
    model = ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa").half(), low_bit="sym_int4").to("cuda")
    ids = torch.randint(2, 128, (1, 12), generator=torch.Generator().manual_seed(9)).cuda()
    runs = []
    for inference in (True, True, False, False):
        with torch.inference_mode(inference), torch.no_grad():
            runs.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                       pad_token_id=0))
    assert all(torch.equal(run, runs[0]) for run in runs)
    stats = graph_decoder(model).stats
    assert stats.prompt_replays == 3 and stats.replays > 0


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


def test_alternating_batch_sizes_keep_their_graphs() -> None:
    """Batches of 2 and 1 rows, alternated (the larger first and then the smaller, so both orders of growth are
    seen): one storage of 2 rows serves both, nothing is recorded again after each batch size's first calls, and
    both keep the eager run's tokens and logits. A left-padded row shows the rows are not mixed up."""
    model = ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa").half(), low_bit="sym_int4").to("cuda")
    decoder = graph_decoder(model)
    inputs = {}
    for batch in (2, 1):
        ids = torch.randint(2, 128, (batch, 12), generator=torch.Generator().manual_seed(batch)).cuda()
        mask = torch.ones_like(ids)
        mask[-1, :3] = 0
        inputs[batch] = ids, mask, *_eager(model, ids, mask, 10)
    counts = []
    for round_ in range(4):
        for batch, (ids, mask, want_tokens, want_scores) in inputs.items():
            _assert_matches_eager(*_generate(model, ids, mask, 10), want_tokens, want_scores,
                                  f"round {round_}, batch {batch}")
        counts.append((decoder.stats.captures, decoder.stats.prompt_captures, decoder.buffers.version))
    assert counts[1] == counts[2] == counts[3], f"graphs were recorded again or storage regrew: {counts}"
    assert decoder.buffers.storage[0]["keys"].shape[0] == 2


def test_release_kv_storage_gives_the_memory_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """ipex_llm_tf.release_kv_storage after graph decoding: the storage's bytes leave the allocator's count (the
    graphs and their pool go too), and the next call records again with the same tokens (prompts eager in both
    calls, so that only the decode steps differ)."""
    monkeypatch.setenv("IPEX_LLM_TF_PROMPT_GRAPHS", "0")
    model = ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa").half(), low_bit="sym_int4").to("cuda")
    decoder = graph_decoder(model)
    ids = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(3)).cuda()
    mask = torch.ones_like(ids)
    want, _ = _generate(model, ids, mask, 8)
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    freed = ipex_llm_tf.release_kv_storage(model)
    assert freed > 0 and decoder.steps == {} and decoder.pool is None
    gc.collect()
    assert before - torch.cuda.memory_allocated() >= freed
    captures = decoder.stats.captures
    got, _ = _generate(model, ids, mask, 8)
    assert torch.equal(got, want) and decoder.stats.captures == captures + 1


def test_replay_ms_times_a_recorded_step_and_leaves_generate_unchanged() -> None:
    model = ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa").half(), low_bit="sym_int4").to("cuda")
    decoder = graph_decoder(model)
    assert decoder.replay_ms(1) is None, "nothing recorded yet"
    ids = torch.randint(2, 128, (1, 12), generator=torch.Generator().manual_seed(6)).cuda()
    first, _ = _generate(model, ids, torch.ones_like(ids), 10)
    ms = decoder.replay_ms(1, replays=5, rounds=3)
    assert ms is not None and 0 < ms < 1e3
    assert decoder.replay_ms(2) is None, "no step recorded at batch 2"
    again, _ = _generate(model, ids, torch.ones_like(ids), 10)
    assert torch.equal(again, first)


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
    assert graph_decoder(model).stats.early_steps == 0, "beams and sampling must not replay steps early"


def _early_model():
    return ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa").half(), low_bit="sym_int4").to("cuda")


def test_early_steps_give_the_same_tokens_and_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _early_model()
    decoder = graph_decoder(model)
    ids = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(5)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    monkeypatch.setenv("IPEX_LLM_TF_EARLY_STEP", "0")
    _generate(model, ids, mask, 30)  # capture
    want_tokens, want_scores = _generate(model, ids, mask, 30)
    assert decoder.stats.early_steps == 0
    monkeypatch.setenv("IPEX_LLM_TF_EARLY_STEP", "1")
    tokens, scores = _generate(model, ids, mask, 30)
    assert torch.equal(tokens, want_tokens)
    assert torch.equal(scores, want_scores), "an early step replays the same graph on the same inputs"
    # 29 one-token steps: every one after the first replayed early, all but the last asked for
    assert decoder.stats.early_hits == 28 and decoder.stats.early_steps == 29, decoder.stats


class _BanArgmaxEveryThirdStep:
    """A logits processor that moves the greedy choice off the raw argmax on some steps."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls % 3 == 0:
            scores = scores.clone()
            scores.scatter_(1, scores.argmax(-1, keepdim=True), float("-inf"))
        return scores


def test_early_steps_that_miss_are_replayed_from_the_real_inputs() -> None:
    from transformers import LogitsProcessorList

    model = _early_model()
    decoder = graph_decoder(model)
    ids = torch.randint(2, 128, (1, 12), generator=torch.Generator().manual_seed(6)).cuda()
    mask = torch.ones_like(ids)
    want, want_scores = _generate(model, ids, mask, 20, **{CACHE_KWARG: DynamicCache(),
                                                           "logits_processor": LogitsProcessorList([_BanArgmaxEveryThirdStep()])})
    _generate(model, ids, mask, 20)  # capture
    before = (decoder.stats.early_steps, decoder.stats.early_hits)
    got, scores = _generate(model, ids, mask, 20, logits_processor=LogitsProcessorList([_BanArgmaxEveryThirdStep()]))
    assert torch.equal(got, want)
    finite = torch.isfinite(want_scores)  # the banned tokens' scores are -inf in both
    assert torch.equal(finite, torch.isfinite(scores))
    error = ((scores - want_scores)[finite].abs().max() / want_scores[finite].abs().max()).item()
    assert error < 2e-2
    launched, hits = decoder.stats.early_steps - before[0], decoder.stats.early_hits - before[1]
    # steps 3 and 6 miss (the processor's 3rd and 6th calls), then the call stops replaying early
    assert launched - hits == 2 and hits == 3, (launched, hits)


def test_a_generate_call_leaves_no_early_step_running() -> None:
    model = _early_model()
    decoder = graph_decoder(model)
    ids = torch.randint(2, 128, (1, 12), generator=torch.Generator().manual_seed(7)).cuda()
    for _ in range(2):
        _generate(model, ids, torch.ones_like(ids), 8)
    assert decoder.early is None  # the last early step (never asked for) was waited for and dropped


@pytest.mark.parametrize("mixed_precision", [False, True])  # an nn.Embedding table, or a packed (sym_int8) one
@pytest.mark.parametrize("moved", [True, False])  # optimized then moved, or optimized where it already was
def test_a_cpu_embedding_decodes_from_graphs(mixed_precision: bool, moved: bool) -> None:
    """cpu_embedding=True on CUDA: the table stays on the host, model.device is the GPU (generate() builds its
    positions there), and steps replay graphs fed the host's lookups: the tokens of the same model with its table on
    the GPU and logits within 2e-2. No step replays early and no prompt replays (the host lookup is not recorded)."""
    def build(cpu_embedding: bool):
        model = tiny_model("llama", attn_implementation="sdpa", tie_word_embeddings=True).half()
        model = ipex_llm_tf.optimize_model(model if moved else model.cuda(), low_bit="sym_int4",
                                           mixed_precision=mixed_precision, cpu_embedding=cpu_embedding)
        return model.to("cuda") if moved else model
    on_gpu, model = build(False), build(True)
    table = model.get_input_embeddings()
    assert model.device.type == "cuda" and all(t.is_cpu for t in table.buffers())
    decoder = graph_decoder(model)
    assert decoder is not None
    ids = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(8)).cuda()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    want_tokens, want_scores = _generate(on_gpu, ids, mask, 20)
    for call in range(3):
        _assert_matches_eager(*_generate(model, ids, mask, 20), want_tokens, want_scores, f"call {call}")
    assert decoder.stats.captures == 1 and decoder.stats.replays == 3 * 19 - 1  # the first step of call 0 recorded
    assert decoder.stats.early_steps == 0 and decoder.stats.prompt_captures == 0, decoder.stats


def test_fp8_kv_cache_decodes_from_graphs() -> None:
    """quantize_kv_cache=True on CUDA (sm_89+): the graph storage holds float8 codes and scales that the decode
    attention kernel reads directly; greedy tokens equal the eager Fp8BlockKVCache's (the same codes, dequantized
    before torch's SDPA) and logits agree within 5e-2, both calls replaying the first call's graph. The bound is the
    CPU test's (test_chunked_prefill_into_the_graph_storage): a graph step attends to its own token's key rounded to
    float8, the eager cache to it unrounded, which moved this tiny random model's logits by 4.1e-2 on an H100."""
    from ipex_llm_tf.kernels.triton_linear import fp8_native
    from ipex_llm_tf.models.kv_cache import Fp8BlockKVCache

    if not fp8_native(torch.device("cuda")):
        pytest.skip("float8 storage in the graph needs sm_89 or newer")
    model = ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa").half(), low_bit="sym_int4",
                                       quantize_kv_cache=True).to("cuda")
    decoder = graph_decoder(model)
    assert decoder is not None and decoder.fp8 and decoder.serves(model.device)
    ids = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(10)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    want_tokens, want_scores = _generate(model, ids, mask, 20, **{CACHE_KWARG: Fp8BlockKVCache()})
    for call in range(2):
        got, scores = _generate(model, ids, mask, 20)
        _assert_matches_eager(got, scores, want_tokens, want_scores, f"call {call}", 5e-2)
        # the prompt attends to itself unrounded in both: its logits keep the float16 bound
        _assert_matches_eager(got, scores[:1], want_tokens, want_scores[:1], f"call {call}, prompt")
    assert decoder.buffers.storage[0]["keys"].dtype == torch.float8_e4m3fn
    assert decoder.stats.captures == 1 and decoder.stats.replays == 2 * 19 - 1


def test_graph_decode_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPEX_LLM_TF_GRAPH_DECODE", "0")
    model = ipex_llm_tf.optimize_model(copy.deepcopy(tiny_model("llama", attn_implementation="sdpa")), low_bit="sym_int4").to("cuda")
    assert graph_decoder(model) is None


@pytest.mark.parametrize("low_bit", ["sym_int4", "nf4", "fp8_e4m3"])
@pytest.mark.parametrize("batch", [1, 4])
def test_overlapped_launches_give_the_same_bits(monkeypatch: pytest.MonkeyPatch, low_bit: str, batch: int) -> None:
    """Programmatic dependent launch (kernels.launch_overlap) changes when kernels start, never what they compute:
    the graph decode of one model with it on and off gives equal tokens and logits (GEMVs at one row, the tile
    matmul and multi-row GEMVs at four)."""
    from ipex_llm_tf.kernels.launch_overlap import OVERLAP_ENV, overlap_supported

    if not overlap_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs CUDA sm_90+")
    ids = torch.randint(2, 128, (batch, 12), generator=torch.Generator().manual_seed(8)).cuda()
    mask = torch.ones_like(ids)
    results = []
    for overlap in ("0", "1"):
        monkeypatch.setenv(OVERLAP_ENV, overlap)
        model = ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa").half(),
                                           low_bit=low_bit).to("cuda")
        _generate(model, ids, mask, 16)  # capture
        results.append(_generate(model, ids, mask, 16))
    (want_tokens, want_scores), (tokens, scores) = results
    assert torch.equal(tokens, want_tokens)
    assert torch.equal(scores, want_scores)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_rotary_attention_in_one_kernel_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    """Graph steps run RoPE, the KV write and attention as one kernel (kernels.rotary_decode_attention): every layer
    of every step takes it, and the tokens and logits equal, bit for bit, those of steps captured with the two
    kernels (RoPE and the write, then attention)."""
    from ipex_llm_tf.models.graph_storage import _SpanView

    real = _SpanView.rotate_and_attend
    fused = []

    def counted(self, *args):
        out = real(self, *args)
        fused.append(out is not None)
        return out

    ids = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(9)).cuda()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    results = []
    for one_kernel in (False, True):
        monkeypatch.setattr(_SpanView, "rotate_and_attend", counted if one_kernel else lambda self, *args: None)
        model = ipex_llm_tf.optimize_model(tiny_model(arch, attn_implementation="sdpa").half(),
                                           low_bit="sym_int4").to("cuda")
        _generate(model, ids, mask, 16)  # capture
        results.append(_generate(model, ids, mask, 16))
    assert fused and all(fused), "a graph step fell back to the two kernels"
    (want_tokens, want_scores), (tokens, scores) = results
    assert torch.equal(tokens, want_tokens)
    assert torch.equal(scores, want_scores)
