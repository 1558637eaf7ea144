"""ipex_llm_tf.distributed: tensor parallelism on gloo (2 CPU processes) against the single-process model, packed-shard
arithmetic for every format, sharded checkpoint reads, device_map placement, and every bad input."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import tp_worker
import transformers
from model_factories import tiny_gpt2, tiny_model
from safetensors.torch import load_file, save_file

from ipex_llm_tf import (
    AutoModelForCausalLM,
    LowBitLinear,
    list_formats,
    optimize_model,
    serialization,
)
from ipex_llm_tf.devices import DeviceError
from ipex_llm_tf.distributed import (
    DeviceMapError,
    DistributedError,
    ModelShape,
    TensorParallelError,
    dispatch_model,
    init_tensor_parallel,
    memory_report,
    plan_placement,
)
from ipex_llm_tf.distributed.runtime import disable_graph_decode
from ipex_llm_tf.distributed.sharding import (
    column_ranges,
    column_shard_parts,
    row_part_slices,
    row_shard_parts,
)
from ipex_llm_tf.distributed.tp_loading import ShardSelector
from ipex_llm_tf.optimize import convert_as_saved
from ipex_llm_tf.loading import parameters_on_meta

# Ranks compute in exact float32 (IPEX_LLM_TF_BACKEND=torch); only the order of the row-parallel sums differs from
# one process, so logits agree to float32 rounding: observed max |diff| ~3e-6 on logits of magnitude ~7.
LOGIT_ATOL = 1e-4
WORKER_TIMEOUT_S = 180

# name -> (architecture, format, config overrides); Llama with every bias so row-parallel biases are added once
CHECKPOINTS = {
    "llama-sym_int4": ("llama", "sym_int4", {"attention_bias": True, "mlp_bias": True}),
    "mistral-fp8_e4m3": ("mistral", "fp8_e4m3", {}),
    "qwen2-sym_int4": ("qwen2", "sym_int4", {}),
    "llama-sym_int8": ("llama", "sym_int8", {}),
    "qwen3-asym_int4": ("qwen3", "asym_int4", {}),
}
# (case, checkpoint, "load" = each rank reads its shard | "parallelize" = full model split in memory, fused forward)
CASES = [("llama-sym_int4", "llama-sym_int4", "load", True), ("mistral-fp8", "mistral-fp8_e4m3", "load", True),
         ("qwen2-sym_int4", "qwen2-sym_int4", "load", True), ("llama-sym_int8-unfused", "llama-sym_int8", "load", False),
         ("qwen3-asym_int4", "qwen3-asym_int4", "load", True),
         ("llama-sym_int4-in-memory", "llama-sym_int4", "parallelize", True)]


pytestmark = pytest.mark.usefixtures("reference_backend")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp_ckpt")
    paths = {}
    for name, (arch, low_bit, overrides) in CHECKPOINTS.items():
        optimize_model(tiny_model(arch, **overrides), low_bit=low_bit).save_low_bit(root / name)
        paths[name] = root / name
    return paths


@pytest.fixture(scope="module")
def torchrun_results(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Launch tests/tp_worker.py with torchrun on 2 gloo ranks once; rank 0's results per case."""
    out = tmp_path_factory.mktemp("tp_out")
    spec = out / "spec.json"
    spec.write_text(json.dumps([{"name": name, "path": str(checkpoints[ckpt]), "mode": mode, "optimize": optimize}
                                for name, ckpt, mode, optimize in CASES]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(__file__).with_name("tp_worker.py")), str(spec), str(out)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run(command, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, env=env, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return {name: torch.load(out / f"{name}.pt") for name, *_ in CASES}


@pytest.mark.parametrize(("case", "ckpt", "mode", "optimize"), CASES, ids=[c[0] for c in CASES])
def test_two_ranks_match_one_process(torchrun_results, checkpoints, case: str, ckpt: str, mode: str,
                                     optimize: bool) -> None:
    single = tp_worker.greedy(AutoModelForCausalLM.load_low_bit(checkpoints[ckpt], optimize_model=optimize))
    result = torchrun_results[case]
    assert torch.equal(result["tokens"], single["tokens"])
    err = (result["logits"] - single["logits"]).abs().max().item()
    assert err <= LOGIT_ATOL, f"max |logit diff| {err:.3g} > {LOGIT_ATOL}"
    assert result["o_proj_in"] == 32  # 4 heads of 16 over 2 ranks: the rank really holds half of o_proj's inputs
    assert result["save_refused"] and not result["graph_decode"]  # collectives cannot sit in a CUDA graph


def test_a_dead_rank_makes_the_others_fail_fast(checkpoints, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=tp_worker.dead_rank, args=(rank, 2, port, str(checkpoints["llama-sym_int4"]),
                                                           str(tmp_path))) for rank in range(2)]
    start = time.monotonic()
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(WORKER_TIMEOUT_S)
    hung = [proc for proc in procs if proc.is_alive()]
    for proc in hung:
        proc.kill()
    assert not hung, "a rank hung after its peer died"
    assert [proc.exitcode for proc in procs] == [1, 3]
    kind, seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 2)
    assert kind == "DistributedError" and "rank 0" in message and "died" in message
    assert float(seconds) < 15 and time.monotonic() - start < WORKER_TIMEOUT_S


# -- packed shard arithmetic, every format ----------------------------------------------------------------------------

@pytest.mark.parametrize("low_bit", list_formats())
def test_column_and_row_shards_reproduce_the_full_layer(low_bit: str) -> None:
    full = LowBitLinear.from_linear(torch.nn.Linear(128, 96, bias=True), low_bit)
    x = torch.randn(3, 128)
    expected = full(x)
    sections = (64, 16, 16)  # q, k, v of different sizes: each rank takes its share of each
    columns, partial_sums = [], torch.zeros_like(expected)
    for rank in range(2):
        ranges = column_ranges(sections, rank, 2, "qkv")
        column = LowBitLinear(128, 48, low_bit, bias=True)
        column.load_parts(column_shard_parts(full.parts, ranges), bias=torch.cat([full.bias[a:b] for a, b in ranges]))
        columns.append(column(x).split([32, 8, 8], dim=-1))
        row = LowBitLinear(64, 96, low_bit, bias=False)
        row.load_parts(row_shard_parts(full.parts, row_part_slices(full.fmt, 96, 128, rank, 2, "o_proj")))
        partial_sums += row(x[:, rank * 64:(rank + 1) * 64])
    merged = torch.cat([torch.cat([columns[r][s] for r in range(2)], dim=-1) for s in range(3)], dim=-1)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(partial_sums + full.bias, expected, rtol=1e-5, atol=1e-4)


def test_sliced_reads_equal_slices_of_whole_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serialization, "SLICE_CHUNK_BYTES", 100)  # several chunks of whole rows per column slice
    tensors = {"a": torch.randn(37, 24), "b": torch.randint(0, 255, (10, 64), dtype=torch.uint8),
               "bias": torch.randn(40)}
    save_file(tensors, tmp_path / "model.safetensors")
    wanted = {"a": (1, 8, 16), "b": (0, 3, 7), "bias": (0, 20, 40)}
    read = dict(serialization.iter_tensors([tmp_path / "model.safetensors"], select=lambda n, s: wanted[n]))
    for name, (dim, start, stop) in wanted.items():
        assert torch.equal(read[name], tensors[name].narrow(dim, start, stop - start))
    with pytest.raises(serialization.CheckpointError, match="does not match"):
        list(serialization.iter_tensors([tmp_path / "model.safetensors"], select=lambda n, s: (1, 0, 999)))


# -- bad input ------------------------------------------------------------------------------------------------------

def _sharded_skeleton(path: Path, world_size: int, rank: int = 0) -> ShardSelector:
    field = json.loads((path / "config.json").read_text())["ipex_llm_tf"]
    config = transformers.AutoConfig.from_pretrained(path)
    with parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config)
    convert_as_saved(model, field, None)
    return ShardSelector(model, rank, world_size)


def test_world_size_must_divide_the_heads(checkpoints) -> None:
    with pytest.raises(TensorParallelError, match=r"world size 3 does not divide the model's 4 attention heads.*"
                                                  r"among \[1, 2\]"):
        _sharded_skeleton(checkpoints["llama-sym_int4"], 3)
    with pytest.raises(TensorParallelError, match="2 key/value heads"):
        ModelShape(num_heads=8, num_kv_heads=2, head_dim=16, intermediate_size=128).check(4)


def test_unsupported_architecture() -> None:
    with pytest.raises(TensorParallelError, match="no tensor-parallel plan for model_type 'gpt2'.*device_map"):
        ModelShape.from_config(tiny_gpt2().config)


def test_shards_must_keep_block_boundaries(tmp_path: Path) -> None:
    # nf4's blocks hold 64 inputs; o_proj's 64 inputs over 2 ranks would leave each half a block
    optimize_model(tiny_model("llama"), low_bit="nf4").save_low_bit(tmp_path / "nf4")
    with pytest.raises(TensorParallelError, match="would cut nf4's blocks of 64"):
        _sharded_skeleton(tmp_path / "nf4", 2)


def test_checkpoint_with_an_incompatible_block_layout(checkpoints, tmp_path: Path) -> None:
    source = checkpoints["llama-sym_int8"]
    tensors = load_file(source / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.scales"
    tensors[name] = tensors[name].reshape(tensors[name].shape[0], -1)[:, :1].contiguous()  # one 64-block, not two 32s
    (tmp_path / "bad").mkdir()
    for extra in ("config.json", "generation_config.json"):
        (tmp_path / "bad" / extra).write_text((source / extra).read_text())
    save_file(tensors, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    selector = _sharded_skeleton(tmp_path / "bad", 2)
    with pytest.raises(TensorParallelError, match=f"{name} has shape .*incompatible block layout"):
        selector.check_layout(serialization.safetensors_files(tmp_path / "bad"))


def test_without_torchrun_the_error_says_how_to_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedError, match="torchrun --nproc-per-node N"):
        init_tensor_parallel("cpu")
    with pytest.raises(DistributedError, match="no usable cuda device"):
        if not torch.cuda.is_available():
            init_tensor_parallel("cuda")
        else:
            raise DistributedError("no usable cuda device (skipped: this machine has one)")
    monkeypatch.setenv("IPEX_LLM_TF_TP_TIMEOUT", "soon")
    with pytest.raises(DistributedError, match="not a number of seconds"):
        init_tensor_parallel("cpu")


# -- device_map -------------------------------------------------------------------------------------------------------

def test_plan_placement_fills_devices_in_order_and_offloads_the_rest() -> None:
    sizes = {"embed": 4, "layers.0": 10, "layers.1": 10, "layers.2": 10, "norm": 1, "lm_head": 4}
    budgets = {"cuda:0": 16, "cuda:1": 16, "cpu": 100}
    sequential = plan_placement(sizes, budgets, "sequential")
    assert sequential == {"embed": "cuda:0", "layers.0": "cuda:0", "layers.1": "cuda:1", "layers.2": "cpu",
                          "norm": "cpu", "lm_head": "cpu"}
    roomy = {"cuda:0": 100, "cuda:1": 100, "cpu": 100}
    balanced = plan_placement(sizes, roomy, "auto")
    assert set(balanced.values()) == {"cuda:0", "cuda:1"}  # both accelerators used although one would do
    tied = plan_placement(sizes, budgets, "sequential", same_device={"lm_head": "embed"})
    assert tied["lm_head"] == tied["embed"] == "cuda:0"
    with pytest.raises(DeviceMapError, match="does not fit.*disk offload is not supported"):
        plan_placement(sizes, {"cpu": 20}, "sequential")
    with pytest.raises(DeviceMapError, match="balanced_low_0"):
        plan_placement(sizes, budgets, "balanced_low_0")


@pytest.mark.parametrize("device_map", ["auto", "sequential", {"": "cpu"}, "per-layer"])
def test_device_map_on_a_cpu_machine(checkpoints, device_map) -> None:
    path = checkpoints["qwen2-sym_int4"]
    if device_map == "per-layer":
        device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1.self_attn": "cpu",
                      "model.layers.1": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.load_low_bit(path, device_map=device_map, max_memory={"cpu": "1GiB"})
    assert set(model.hf_device_map.values()) == {"cpu"}
    expected = tp_worker.greedy(AutoModelForCausalLM.load_low_bit(path))
    assert torch.equal(tp_worker.greedy(model)["tokens"], expected["tokens"])
    report = memory_report(model)
    assert list(report) == ["cpu"] and report["cpu"]["weights_mib"] > 0 and report["cpu"]["peak_mib"] > 0


def test_dispatch_hooks_keep_generation_unchanged(checkpoints) -> None:
    # Only the CPU exists here, so force the hooks a multi-device map installs and check they change nothing
    path = checkpoints["llama-sym_int4"]
    model = AutoModelForCausalLM.load_low_bit(path)
    layer_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1.self_attn": "cpu",
                 "model.layers.1": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatch_model(model, layer_map, force_hooks=True)
    # a CUDA graph cannot record steps that cross devices: a multi-device map decodes eagerly
    assert not hasattr(model, "_ipex_llm_tf_graph_decoder") and "forward" not in vars(model)
    plain = AutoModelForCausalLM.load_low_bit(path)
    disable_graph_decode(plain)  # same decode path as the dispatched model, so outputs must be bit-identical
    single, hooked = tp_worker.greedy(plain), tp_worker.greedy(model)
    assert torch.equal(hooked["tokens"], single["tokens"]) and torch.equal(hooked["logits"], single["logits"])


def test_bad_device_maps(checkpoints) -> None:
    path = checkpoints["llama-sym_int4"]
    with pytest.raises(DeviceMapError, match="'model.layer.0', which is not a module.*look like model.embed_tokens"):
        AutoModelForCausalLM.load_low_bit(path, device_map={"model.layer.0": "cpu", "": "cpu"})
    with pytest.raises(DeviceMapError, match="merges q_proj, k_proj, v_proj.*optimize_model=False"):
        AutoModelForCausalLM.load_low_bit(path, device_map={"model.layers.0.self_attn.q_proj": "cpu", "": "cpu"})
    with pytest.raises(DeviceMapError, match="leaves .* weights unplaced, e.g. lm_head.weight"):
        AutoModelForCausalLM.load_low_bit(path, device_map={"model": "cpu"})
    with pytest.raises(DeviceMapError, match="'disk' is not supported"):
        AutoModelForCausalLM.load_low_bit(path, device_map={"": "disk"})
    with pytest.raises(DeviceMapError, match="neither a device"):
        AutoModelForCausalLM.load_low_bit(path, device_map="balanced_low_0")
    with pytest.raises(DeviceMapError, match="max_memory names"):
        AutoModelForCausalLM.load_low_bit(path, device_map="auto", max_memory={"cpu:0": "1GiB", "cpu": "2GiB"})
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="not available"):
            AutoModelForCausalLM.load_low_bit(path, device_map={"": "cuda:1"})
        with pytest.raises(DeviceError, match="has none; use 'cpu'"):
            AutoModelForCausalLM.load_low_bit(path, device_map={"": 0})
