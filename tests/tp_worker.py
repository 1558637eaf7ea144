"""Rank program for tests/test_distributed.py: `torchrun ... tp_worker.py SPEC OUT` or spawned by multiprocessing.

Every rank loads each case's checkpoint as its tensor-parallel shard (or loads the full model and parallelizes it in
memory), runs greedy generate() and rank 0 saves tokens and per-step logits to OUT/<case>.pt for the parent to compare
with the single-process model.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

PROMPT = [[5, 9, 17, 33, 2, 70, 71, 3, 99, 12, 40, 41]]
NEW_TOKENS = 6


def greedy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Tokens and the logits of every step (prefill, then decode through the cache) of a greedy generate()."""
    out = model.generate(torch.tensor(PROMPT, device=model.device), max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return {"tokens": out.sequences.cpu(), "logits": torch.stack([s.float().cpu() for s in out.logits])}


def run_case(case: dict) -> dict:
    """One case on this rank: load (sharded or full + parallelize), generate, try to save."""
    from ipex_llm_tf import AutoModelForCausalLM
    from ipex_llm_tf.distributed import (
        TensorParallelError,
        init_tensor_parallel,
        load_low_bit_tp,
        parallelize,
    )
    os.environ["IPEX_LLM_TF_BACKEND"] = case.get("backend", "torch")  # torch: exact float32, only the split differs
    if case["mode"] == "load":
        model = load_low_bit_tp(case["path"], device=case.get("device", "cpu"), optimize_model=case["optimize"],
                                timeout_s=60)
    else:
        model = AutoModelForCausalLM.load_low_bit(case["path"], optimize_model=case["optimize"])
        parallelize(model, init_tensor_parallel("cpu", timeout_s=60))
    result = greedy(model)
    result["o_proj_in"] = model.model.layers[0].self_attn.o_proj.in_features
    result["graph_decode"] = hasattr(model, "_ipex_llm_tf_graph_decoder")
    try:
        model.save_low_bit(case["out_dir"] + "/never")
        result["save_refused"] = False
    except TensorParallelError:
        result["save_refused"] = True
    return result


def main(spec_path: str, out_dir: str) -> None:
    """torchrun entry: run every case of the spec; rank 0 writes the results."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for case in json.loads(Path(spec_path).read_text()):
        result = run_case({**case, "out_dir": out_dir})
        if rank == 0:
            torch.save(result, Path(out_dir) / f"{case['name']}.pt")
        # progress on stderr, so that a rank that dies shows in the parent's assertion how far it came
        print(f"rank {rank}: {case['name']} done", file=sys.stderr, flush=True)
    import torch.distributed as dist
    dist.barrier()  # no rank tears gloo down while a peer is still sending
    dist.destroy_process_group()
    print(f"rank {rank}: torn down", file=sys.stderr, flush=True)
    # every result is on disk: leave without the interpreter's teardown, where a thread of the torch / gloo runtime
    # left joinable now and then aborted the process ("terminate called without an active exception", SIGABRT)
    os._exit(0)


def dead_rank(rank: int, world_size: int, port: int, path: str, out_dir: str) -> None:
    """multiprocessing entry: the last rank exits after loading; the others must fail with an error, not hang."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "IPEX_LLM_TF_BACKEND": "torch"})
    torch.set_num_threads(1)
    from ipex_llm_tf.distributed import load_low_bit_tp
    model = load_low_bit_tp(path, device="cpu", timeout_s=15)
    if rank == world_size - 1:
        os._exit(3)
    start = time.monotonic()
    try:
        greedy(model)
    except Exception as err:  # noqa: BLE001 - the parent checks what it was
        Path(out_dir, f"rank{rank}.txt").write_text(f"{type(err).__name__}\n{time.monotonic() - start:.1f}\n{err}")
        sys.exit(1)
    Path(out_dir, f"rank{rank}.txt").write_text("no error")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
