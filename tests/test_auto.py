"""The transformers-style API: from_pretrained (quantize on load), save_low_bit / load_low_bit, low_memory_init,
optimize_model, cpu_embedding, and every bad input. Tiny random Llama / Mistral / Qwen2 checkpoints on disk."""
from __future__ import annotations

import gc
import json
import os
import weakref
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from ipex_llm_tf import AutoModel, AutoModelForCausalLM, LowBitLinear, get_format, list_formats, optimize_model
from ipex_llm_tf.devices import CPUEmbedding, DeviceError
from ipex_llm_tf.loading import SkeletonFiller
from ipex_llm_tf.models import optimize_architecture
from ipex_llm_tf.optimize import load_low_bit, low_memory_init
from ipex_llm_tf.serialization import CheckpointError
from model_factories import tiny_model

# With IPEX_LLM_TF_BACKEND=torch every LowBitLinear computes F.linear(x, dequantize(W)) in float32, so our model and
# transformers' model holding dequantize(quantize(W)) agree to float32 rounding of differently fused ops.
LOGIT_ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("reference_backend")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for arch in ("llama", "mistral", "qwen2"):
        tiny_model(arch, tie_word_embeddings=arch == "llama").save_pretrained(root / arch)
        paths[arch] = root / arch
    return paths


def dequantized_reference(path: Path, low_bit: str, keep: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    fmt = get_format(low_bit)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] not in keep:
            module.weight.data = fmt.dequantize(fmt.quantize(module.weight.data))
    return model


IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 64, 11, 23, 7, 2, 90]])


@pytest.mark.parametrize("low_bit", list_formats())
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_from_pretrained_logits_match_dequantized_transformers(checkpoints, arch: str, low_bit: str) -> None:
    ours = AutoModelForCausalLM.from_pretrained(checkpoints[arch], load_in_low_bit=low_bit)
    assert isinstance(ours.model.layers[0].mlp.down_proj, LowBitLinear) or ours.model.layers[0].mlp.down_proj
    expected = dequantized_reference(checkpoints[arch], low_bit)
    with torch.inference_mode():
        torch.testing.assert_close(ours(IDS).logits, expected(IDS).logits, atol=LOGIT_ATOL, rtol=0)


def test_load_in_4bit_is_sym_int4_and_quantizes_lm_head_on_request(checkpoints) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoints["qwen2"], load_in_4bit=True, modules_to_not_convert=[])
    assert model.lm_head.low_bit == "sym_int4"
    assert model.config.ipex_llm_tf["low_bit"] == "sym_int4"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_greedy_equals_transformers(checkpoints, dtype: torch.dtype) -> None:
    low_bit = "fp16" if dtype == torch.float16 else "bf16"
    ours = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], load_in_low_bit=low_bit, dtype=dtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], dtype=dtype).eval()
    kwargs = dict(max_new_tokens=12, do_sample=False)
    assert torch.equal(ours.generate(IDS, **kwargs), theirs.generate(IDS, **kwargs))


@pytest.mark.parametrize("low_bit", ["sym_int4", "nf3", "fp8_e5m2"])
def test_save_then_load_is_bitwise_identical(checkpoints, tmp_path: Path, low_bit: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoints["mistral"], load_in_low_bit=low_bit)
    model.save_low_bit(tmp_path / "saved", max_shard_size="20KB")
    assert (tmp_path / "saved" / "model.safetensors.index.json").is_file()  # sharded above the limit
    assert not list(tmp_path.glob(".saved.tmp-*"))
    loaded = AutoModelForCausalLM.load_low_bit(tmp_path / "saved")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    with torch.inference_mode():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")  # detected from config.json
    assert again.config.ipex_llm_tf["low_bit"] == low_bit


def test_saved_config_field_and_files(checkpoints, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], load_in_low_bit="asym_int5",
                                                 cpu_embedding=True)
    tokenizer_files = []

    class FakeTokenizer:
        def save_pretrained(self, directory: Path) -> None:
            (Path(directory) / "tokenizer.json").write_text("{}")
            tokenizer_files.append(directory)

    model.save_low_bit(tmp_path / "out", tokenizer=FakeTokenizer())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    field = config["ipex_llm_tf"]
    assert field["low_bit"] == "asym_int5" and field["cpu_embedding"] is True
    assert field["modules_to_not_convert"] == ["lm_head"] and field["format_version"] == 1
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "generation_config.json", "model.safetensors",
                                                    "tokenizer.json"]


def test_low_memory_init_then_load_low_bit(checkpoints, tmp_path: Path) -> None:
    source = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], load_in_low_bit="sym_int8")
    source.save_low_bit(tmp_path / "saved")
    with low_memory_init():
        model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "saved", dtype="auto")
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    model = load_low_bit(model, tmp_path / "saved")
    with torch.inference_mode():
        assert torch.equal(model(IDS).logits, source(IDS).logits)


def test_optimize_model_then_save_and_load(checkpoints, tmp_path: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["qwen2"]).eval()
    expected = dequantized_reference(checkpoints["qwen2"], "nf4")
    model = optimize_model(model, low_bit="nf4")
    with torch.inference_mode():
        torch.testing.assert_close(model(IDS).logits, expected(IDS).logits, atol=LOGIT_ATOL, rtol=0)
    model.save_low_bit(tmp_path / "opt")
    loaded = AutoModelForCausalLM.load_low_bit(tmp_path / "opt")
    with torch.inference_mode():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)


def test_auto_model_base_class(checkpoints) -> None:
    model = AutoModel.from_pretrained(checkpoints["llama"], load_in_low_bit="sym_int4")
    assert isinstance(model.layers[0].self_attn.o_proj, LowBitLinear)
    assert model(IDS).last_hidden_state.shape == (1, IDS.shape[1], 64)


def test_without_low_bit_is_plain_transformers(checkpoints) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    assert type(model) is transformers.LlamaForCausalLM
    assert not any(isinstance(m, LowBitLinear) for m in model.modules())


def test_cpu_embedding_stays_on_cpu(checkpoints) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], load_in_low_bit="sym_int4", cpu_embedding=True)
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, CPUEmbedding) and embedding.weight is not model.lm_head.weight
    model.to("meta")  # stands in for an accelerator: everything moves except the embedding
    assert embedding.weight.device.type == "cpu" and model.lm_head.weight.device.type == "meta"
    assert embedding(torch.tensor([[1, 2]])).device.type == "meta"
    assert model.device.type == "meta", "generate() builds its positions on model.device: the moved model's"


def test_generate_streamer_batch_and_inference_mode(checkpoints) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoints["qwen2"], load_in_low_bit="sym_int4")
    seen = []

    class Collect(transformers.generation.BaseStreamer):
        def put(self, value: torch.Tensor) -> None:
            seen.append(value.clone())

        def end(self) -> None:
            seen.append(None)

    with torch.inference_mode():
        out = model.generate(IDS, max_new_tokens=5, do_sample=False, streamer=Collect())
        batch = torch.tensor([[0, 0, 5, 6, 7], [9, 8, 5, 6, 7]])
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        padded = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False)
        single = model.generate(batch[:1, 2:], max_new_tokens=4, do_sample=False)
    assert out.shape[1] == IDS.shape[1] + 5 and seen[-1] is None and len(seen) == 1 + 5 + 1  # prompt, tokens, end
    assert torch.equal(padded[0, 2:], single[0])


# ---- bad input: each a clear error, nothing half-written ----

def test_conflicting_and_unknown_low_bit(checkpoints) -> None:
    with pytest.raises(ValueError, match="load_in_4bit=True means sym_int4"):
        AutoModelForCausalLM.from_pretrained(checkpoints["llama"], load_in_4bit=True, load_in_low_bit="nf4")
    with pytest.raises(ValueError, match="unknown low-bit format 'int2'.*sym_int4"):
        AutoModelForCausalLM.from_pretrained(checkpoints["llama"], load_in_low_bit="int2")
    with pytest.raises(TypeError, match="not_an_option"):
        AutoModelForCausalLM.from_pretrained(checkpoints["llama"], load_in_4bit=True, not_an_option=1)


def test_load_low_bit_on_normal_checkpoint(checkpoints) -> None:
    with pytest.raises(CheckpointError, match="normal \\(not low-bit\\) checkpoint"):
        AutoModelForCausalLM.load_low_bit(checkpoints["llama"])


def test_truncated_safetensors(checkpoints, tmp_path: Path) -> None:
    AutoModelForCausalLM.from_pretrained(checkpoints["llama"], load_in_4bit=True).save_low_bit(tmp_path / "s")
    weights = tmp_path / "s" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        AutoModelForCausalLM.load_low_bit(tmp_path / "s")


def test_config_not_matching_tensors(checkpoints, tmp_path: Path) -> None:
    AutoModelForCausalLM.from_pretrained(checkpoints["llama"], load_in_4bit=True).save_low_bit(tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    config["intermediate_size"] = 256
    (tmp_path / "s" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config does not match"):
        AutoModelForCausalLM.load_low_bit(tmp_path / "s")


def test_pickle_checkpoints_are_not_loaded(checkpoints, tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.json").write_text((checkpoints["llama"] / "config.json").read_text())
    torch.save({}, tmp_path / "p" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never loads pickles"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "p", load_in_4bit=True)


def test_absent_device(checkpoints) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], load_in_4bit=True)
    absent = next(d for d in ("cuda", "xpu") if not getattr(torch, d).is_available())
    with pytest.raises(DeviceError, match="not available on this machine"):
        model.to(absent)
    with pytest.raises(DeviceError, match="not available"):
        AutoModelForCausalLM.from_pretrained(checkpoints["llama"], load_in_4bit=True, device_map=absent)


def test_failed_save_leaves_nothing(checkpoints, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], load_in_4bit=True)
    model.save_low_bit(tmp_path / "keep")
    before = (tmp_path / "keep" / "model.safetensors").read_bytes()

    class Broken:
        def save_pretrained(self, directory: Path) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        model.save_low_bit(tmp_path / "keep", tokenizer=Broken())
    with pytest.raises(OSError):
        model.save_low_bit(tmp_path / "new", tokenizer=Broken())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    assert (tmp_path / "keep" / "model.safetensors").read_bytes() == before


def test_save_low_bit_needs_low_bit_model(checkpoints, tmp_path: Path) -> None:
    from ipex_llm_tf.optimize import save_low_bit
    with pytest.raises(CheckpointError, match="needs a model made by ipex_llm_tf"):
        save_low_bit(transformers.AutoModelForCausalLM.from_pretrained(checkpoints["llama"]), tmp_path / "x")


def test_quantize_kv_cache_option_and_env(checkpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    from ipex_llm_tf.models.kv_cache import Fp8BlockKVCache
    seen = []
    original = Fp8BlockKVCache.__init__

    def record(self, *args, **kwargs):
        seen.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Fp8BlockKVCache, "__init__", record)
    plain = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], load_in_4bit=True)
    fp8 = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], load_in_4bit=True, quantize_kv_cache=True)
    with torch.inference_mode():
        expected = plain.generate(IDS, max_new_tokens=6, do_sample=False)
        out = fp8.generate(IDS, max_new_tokens=6, do_sample=False)
    assert len(seen) == 1 and out.shape == expected.shape
    assert torch.equal(out[:, : IDS.shape[1] + 1], expected[:, : IDS.shape[1] + 1])  # prefill is exact
    monkeypatch.setenv("IPEX_LLM_TF_QUANTIZE_KV_CACHE", "1")
    from_env = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], load_in_4bit=True)
    with torch.inference_mode():
        from_env.generate(IDS, max_new_tokens=2, do_sample=False)
    assert len(seen) == 2


def test_a_finished_filler_keeps_no_module_alive() -> None:
    # loaders hold their filler until they return, after the patch has merged q/k/v and gate/up: the replaced
    # projections must be freed then, not kept beside their merged copies at the load's peak
    model = tiny_model("llama")
    filler = SkeletonFiller(model, None, "tiny")
    filler.finish()
    replaced = weakref.ref(model.model.layers[0].mlp.gate_proj)
    assert optimize_architecture(model)
    gc.collect()
    assert replaced() is None and filler.model is model
