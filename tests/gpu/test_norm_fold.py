"""Folded norms (kernels/triton_folded_norm.py, models/norm_fold.py): GEMVs that take a decode step's residual add
and RMSNorm into their epilogues.

RES_OUT (residual add, h * next norm weight, partial sums of squares) against the GEMV and then the add: bit for
bit (the same roundings). SCALE_OUT (the GEMV of h * w scaled by the row's 1/RMS) against rms_norm and then the
GEMV: within 1e-2 of the largest output (h * w is rounded before the scale, and the squares add in another order).
A tiny Llama's folded step against its plain step: within 2e-2. CUDA or XPU, or TRITON_INTERPRET=1 on the CPU.
"""
from __future__ import annotations

import pytest
import torch

from conftest import relative_error, triton_device

DEVICE = triton_device()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE is None, reason="needs a CUDA or XPU device (or TRITON_INTERPRET=1)")]
triton = pytest.importorskip("triton")

from ipex_llm_tf.formats import get_format  # noqa: E402
from ipex_llm_tf.kernels import triton_folded_norm as FN  # noqa: E402
from ipex_llm_tf.kernels import triton_linear as TL  # noqa: E402
from ipex_llm_tf.kernels.triton_rms_norm import rms_norm  # noqa: E402
from ipex_llm_tf.kernels.triton_silu_mul import silu_and_mul  # noqa: E402

CONFIGS = [TL.GemvConfig(8, 32, 4, 1, 1), TL.GemvConfig(16, 64, 2, 1, 2), TL.GemvConfig(4, 16, 1, 1, 0)]
FORMATS = ["sym_int4", "asym_int4", "sym_int8", "sym_int5"]


def _ops(fmt_name: str, n: int, k: int):
    fmt = get_format(fmt_name)
    torch.manual_seed(n + k)
    return TL.block_operands(fmt, fmt.quantize(torch.randn(n, k, device=DEVICE) * 0.05))


def _half(*shape: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    return (offset + scale * torch.randn(*shape, device=DEVICE)).to(torch.float16)


@pytest.mark.parametrize("fmt_name", FORMATS)
def test_residual_out_equals_the_gemv_then_the_add(fmt_name: str) -> None:
    n, k = 100, 192
    ops = _ops(fmt_name, n, k)
    x, residual, weight, bias = _half(1, k), _half(1, n), _half(n, scale=0.1, offset=1.0), _half(n)
    for cfg in CONFIGS:
        for b in (None, bias):
            count = FN.partial_count(n, cfg)
            parts = torch.full((count + 3,), 7.0, device=DEVICE)
            h, hw = FN.gemv_residual_out(x, ops, b, n, cfg, residual, weight, parts)
            assert torch.equal(h, TL.gemv_blocks(x, ops, b, n, cfg) + residual), f"{fmt_name} {cfg}"
            assert torch.equal(hw, (h.float() * weight.float()).to(torch.float16)), f"{fmt_name} {cfg}"
            assert torch.allclose(parts[:count].sum(), h.float().pow(2).sum(), rtol=1e-5), f"{fmt_name} {cfg}"
            assert torch.equal(parts[count:], torch.full((3,), 7.0, device=DEVICE)), "stored past its parts"


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("fmt_name", FORMATS)
def test_scale_out_equals_the_norm_then_the_gemv(fmt_name: str, gated: bool) -> None:
    n, k, eps = 74, 1088, 1e-5  # 1088: K not a whole number of 64-word steps (TAIL)
    ops = _ops(fmt_name, n, k)
    h, weight = _half(1, k), _half(k, scale=0.1, offset=1.0)
    bias = None if gated else _half(n)
    hw = (h.float() * weight.float()).to(torch.float16)
    squares = h.float().pow(2).reshape(-1)
    parts = torch.stack([chunk.sum() for chunk in squares.chunk(13)])  # 13 parts: not a power of two
    normed = rms_norm(h, weight, eps)
    for cfg in CONFIGS:
        got = FN.gemv_scale_out(hw, ops, bias, n, cfg, parts, parts.numel(), eps, gated=gated)
        want = TL.gemv_blocks(normed, ops, bias, n, cfg)
        want = silu_and_mul(want) if gated else want
        assert got.shape == want.shape and relative_error(got.float(), want.float()) < 1e-2, f"{fmt_name} {cfg}"


def test_residual_out_then_scale_out_is_the_norm_of_the_sum() -> None:
    """The pair as a step chains them: RES_OUT's parts feed SCALE_OUT, whatever the two tiles."""
    d, n, eps = 256, 96, 1e-6
    producer, consumer = _ops("sym_int4", d, 128), _ops("sym_int4", n, d)
    x, residual, weight = _half(1, 128), _half(1, d), _half(d, scale=0.1, offset=1.0)
    for cfg in CONFIGS:
        parts = torch.empty(FN.partial_count(d, cfg), device=DEVICE)
        h, hw = FN.gemv_residual_out(x, producer, None, d, cfg, residual, weight, parts)
        got = FN.gemv_scale_out(hw, consumer, None, n, CONFIGS[0], parts, parts.numel(), eps)
        want = TL.gemv_blocks(rms_norm(h, weight, eps), consumer, None, n, CONFIGS[0])
        assert relative_error(got.float(), want.float()) < 1e-2, str(cfg)


def test_bad_rows_and_parts_are_refused() -> None:
    n, k = 64, 128
    ops, cfg = _ops("sym_int4", n, k), CONFIGS[0]
    x, residual, weight = _half(2, k), _half(1, n), _half(n)
    with pytest.raises(ValueError, match="one row"):
        FN.gemv_residual_out(x, ops, None, n, cfg, residual, weight, torch.empty(8, device=DEVICE))
    with pytest.raises(ValueError, match="float32 parts"):
        FN.gemv_residual_out(x[:1], ops, None, n, cfg, residual, weight, torch.empty(2, device=DEVICE))
    with pytest.raises(ValueError, match="one row"):
        FN.gemv_scale_out(x, ops, None, n, cfg, torch.ones(4, device=DEVICE), 4, 1e-6)
    with pytest.raises(ValueError, match="count"):
        FN.gemv_scale_out(x[:1], ops, None, n, cfg, torch.ones(4, device=DEVICE), 5, 1e-6)


def _settle_tiles(model, cfg) -> None:
    """Give every projection of a tiny model a settled one-row GEMV plan with tile cfg (what autotuning would do)."""
    from ipex_llm_tf.kernels import PackedCache
    for layer in model.base_model.layers:
        for linear, gated in ((layer.self_attn.qkv_proj, False), (layer.self_attn.o_proj, False),
                              (layer.mlp.gate_up_proj, True), (layer.mlp.down_proj, False)):
            linear._packed_cache = PackedCache()  # the CPU path keeps its own packing in the cache it has
            ops = TL._operands(linear.fmt, linear.parts, linear._packed_cache)
            key = TL.gated_plan_key(1, torch.float16) if gated else TL.plan_key(1, torch.float16)
            ops.plans[key] = cfg if gated else (TL.gemv_blocks, cfg)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_folded_step_tracks_the_plain_step(monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    """A graph decode step with the norms folded gives the plain step's logits (IPEX_LLM_TF_FOLD_NORMS=0) within
    2e-2 of the largest, and declines (runs the plain step) at batch 2, without settled plans, or when turned off."""
    import ipex_llm_tf
    from ipex_llm_tf import kernels
    from ipex_llm_tf.models import norm_fold
    from ipex_llm_tf.models.graph_decode import CACHE_KWARG, SPAN_BLOCK, install_graph_decode
    from model_factories import tiny_model
    monkeypatch.setattr(kernels, "_choose_op_backend", lambda op, device: "triton")
    monkeypatch.setattr(kernels, "backend_for", lambda device: "triton")
    kernels._OP_BACKENDS.clear()
    model = ipex_llm_tf.optimize_model(tiny_model(arch, attn_implementation="sdpa").half(), low_bit="sym_int4",
                                       modules_to_not_convert=["lm_head"]).to(DEVICE)
    decoder = install_graph_decode(model)
    ids = torch.randint(2, 128, (1, 6), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    monkeypatch.setenv(norm_fold.FOLD_NORMS_ENV, "0")
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0,
                       **{CACHE_KWARG: decoder.new_cache()})
    step = decoder.steps[(1, SPAN_BLOCK)]
    hidden = torch.zeros(1, 1, model.config.hidden_size, device=DEVICE, dtype=torch.float16)
    assert decoder.fold_parts is not None and decoder.fold_parts.shape[0] == 2 * model.config.num_hidden_layers
    with torch.inference_mode():
        plain = decoder._run(step, SPAN_BLOCK).float()
    _settle_tiles(model, TL.GemvConfig(8, 16, 1, 1, 2))
    assert norm_fold.folded_plan(model.base_model, hidden, decoder.fold_parts) is None, "turned off"
    monkeypatch.setenv(norm_fold.FOLD_NORMS_ENV, "1")
    assert norm_fold.folded_plan(model.base_model, hidden.expand(2, 1, -1), decoder.fold_parts) is None, "2 rows"
    assert norm_fold.folded_plan(model.base_model, hidden, None) is None, "no parts buffer"
    ran = []
    real = norm_fold.run_blocks_folded
    monkeypatch.setattr(norm_fold, "run_blocks_folded", lambda *args: ran.append(1) or real(*args))
    from ipex_llm_tf.models import graph_decode
    monkeypatch.setattr(graph_decode, "run_blocks_folded", norm_fold.run_blocks_folded)
    with torch.inference_mode():
        folded = decoder._run(step, SPAN_BLOCK).float()
    assert ran, "the folded step did not run"
    error = relative_error(folded, plain)
    print(f"{arch}: folded step against the plain one: {error:.2e}")
    assert error < 2e-2
    layer = model.base_model.layers[0].self_attn.o_proj
    layer._packed_cache = kernels.PackedCache()  # an unsettled projection: the step runs plain
    assert norm_fold.folded_plan(model.base_model, hidden, decoder.fold_parts) is None, "unsettled plan"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="graph decode with autotuned plans needs a CUDA device")
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_generate_with_folded_norms_matches_the_plain_steps(monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    """generate() on CUDA folds the norms of one-row graph steps by default: the same greedy tokens as with
    IPEX_LLM_TF_FOLD_NORMS=0, logits within 2e-2 of the largest, and the same bits on every call (no atomics)."""
    import ipex_llm_tf
    from ipex_llm_tf.models import graph_decode, norm_fold
    from model_factories import tiny_model
    ran = []
    real = norm_fold.run_blocks_folded
    monkeypatch.setattr(graph_decode, "run_blocks_folded", lambda *args: ran.append(1) or real(*args))
    ids = torch.randint(2, 128, (1, 12), generator=torch.Generator().manual_seed(4)).cuda()
    results = {}
    for fold in ("0", "1"):
        monkeypatch.setenv(norm_fold.FOLD_NORMS_ENV, fold)
        model = ipex_llm_tf.optimize_model(tiny_model(arch, attn_implementation="sdpa").half(),
                                           low_bit="sym_int4").to("cuda")
        runs = []
        for _ in range(3):  # the first call records the graphs, the next two replay them
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                                     do_sample=False, pad_token_id=0, output_scores=True,
                                     return_dict_in_generate=True)
            runs.append((out.sequences, torch.stack(out.scores)))
        assert torch.equal(runs[1][0], runs[2][0]) and torch.equal(runs[1][1], runs[2][1]), f"fold {fold} varies"
        results[fold] = runs[2]
        assert bool(ran) == (fold == "1"), f"fold {fold}: folded steps run {len(ran)}"
    (want_tokens, want_scores), (tokens, scores) = results["0"], results["1"]
    assert torch.equal(tokens, want_tokens)
    assert relative_error(scores, want_scores) < 2e-2
