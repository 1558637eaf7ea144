"""mixed_precision=True: lm_head (and a tied embedding, sharing one packed table) in sym_int8, through load and save."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ipex_llm_tf
from ipex_llm_tf import AutoModelForCausalLM
from ipex_llm_tf.low_bit_linear import LowBitEmbedding, LowBitLinear
from model_factories import tiny_model
from conftest import sqnr_db

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 64, 11, 23, 7, 2, 90]])
# Against the same sym_int4 model with a float32 head only the head's 8-bit rounding differs: sym_int8 weights have
# ~40 dB SQNR, so the logits keep more than 30 dB
MIN_SQNR_DB = 30.0


def _check_head(model: torch.nn.Module, tied: bool) -> None:
    assert isinstance(model.lm_head, LowBitLinear) and model.lm_head.low_bit == "sym_int8"
    embedding = model.get_input_embeddings()
    if tied:
        assert isinstance(embedding, LowBitEmbedding) and embedding.low_bit == "sym_int8"
        assert model.lm_head.qweight.data_ptr() == embedding.qweight.data_ptr(), "one table for lookup and head"
    else:
        assert not isinstance(embedding, LowBitEmbedding)


@pytest.mark.parametrize("tied", [False, True])
def test_optimize_model_quantizes_the_head(tied: bool) -> None:
    full_head = ipex_llm_tf.optimize_model(tiny_model("llama", tie_word_embeddings=tied), low_bit="sym_int4")
    with torch.no_grad():
        want = full_head(IDS).logits
    model = ipex_llm_tf.optimize_model(tiny_model("llama", tie_word_embeddings=tied), low_bit="sym_int4",
                                       mixed_precision=True)
    _check_head(model, tied)
    with torch.no_grad():
        assert sqnr_db(model(IDS).logits, want) > MIN_SQNR_DB
        model.generate(IDS, max_new_tokens=4, pad_token_id=0)
    assert model.config.ipex_llm_tf["layer_formats"]["lm_head"] == "sym_int8"


@pytest.mark.parametrize("tied", [False, True])
def test_from_pretrained_then_save_and_load(tied: bool, tmp_path: Path) -> None:
    tiny_model("qwen2", tie_word_embeddings=tied).save_pretrained(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", load_in_low_bit="asym_int4", mixed_precision=True)
    _check_head(model, tied)
    model.save_low_bit(tmp_path / "low")
    again = AutoModelForCausalLM.load_low_bit(tmp_path / "low")
    _check_head(again, tied)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_contradicting_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="modules_to_not_convert keeps it"):
        ipex_llm_tf.optimize_model(tiny_model("llama"), low_bit="sym_int4", mixed_precision=True,
                                   modules_to_not_convert=["lm_head"])
    with pytest.raises(ValueError, match="below the fp16"):
        ipex_llm_tf.optimize_model(tiny_model("llama"), low_bit="fp16", mixed_precision=True)
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs load_in_4bit"):
        AutoModelForCausalLM.from_pretrained(tmp_path, mixed_precision=True)


@pytest.mark.parametrize("low_bit", ["sym_int4", "asym_int5", "sym_int8", "nf4", "fp8_e4m3", "fp6"])
def test_quantizing_in_row_bands_gives_the_same_bytes(low_bit: str) -> None:
    from ipex_llm_tf.formats import get_format
    fmt = get_format(low_bit)
    weight = torch.randn(1000, 256)
    whole, banded = fmt.quantize(weight), fmt.quantize_in_row_chunks(weight, max_elements=256 * 96)
    assert whole.keys() == banded.keys()
    for name in whole:
        assert torch.equal(whole[name].view(torch.uint8), banded[name].view(torch.uint8)), name


def test_a_move_keeps_the_tied_table_shared() -> None:
    model = ipex_llm_tf.optimize_model(tiny_model("llama", tie_word_embeddings=True), low_bit="sym_int4",
                                       mixed_precision=True)
    # what .to("cuda") does to every module, with a copy standing in for the device transfer
    model._apply(lambda tensor: tensor.clone())
    assert model.lm_head.qweight is model.get_input_embeddings().qweight, "a move must not duplicate the table"
    assert model.lm_head.scales is model.get_input_embeddings().scales
    model.half()
    assert model.lm_head.qweight.dtype == torch.int8 and model.lm_head.qweight is model.get_input_embeddings().qweight
    with torch.no_grad():
        model.float()(IDS)


def test_cpu_embedding_keeps_a_packed_table_on_the_cpu(tmp_path: Path) -> None:
    from ipex_llm_tf.low_bit_linear import CPULowBitEmbedding
    tiny_model("llama", tie_word_embeddings=True).save_pretrained(tmp_path / "src")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "src", load_in_low_bit="sym_int4", mixed_precision=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", load_in_low_bit="sym_int4", mixed_precision=True,
                                                 cpu_embedding=True)
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, CPULowBitEmbedding) and embedding.qweight is not model.lm_head.qweight
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, plain(IDS).logits)
    model.save_low_bit(tmp_path / "low")
    again = AutoModelForCausalLM.load_low_bit(tmp_path / "low")
    assert isinstance(again.get_input_embeddings(), CPULowBitEmbedding)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, plain(IDS).logits)
    model.to("meta")  # stands in for an accelerator: everything moves except the table
    assert embedding.qweight.device.type == "cpu" and model.lm_head.qweight.device.type == "meta"
    assert embedding(torch.tensor([[1, 2]])).device.type == "meta"
    assert model.device.type == "meta"
