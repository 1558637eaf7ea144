"""What a Triton kernel compiles to for an NVIDIA sm_90 target, compiled on the host (no GPU, nothing run).

tests/test_launch_overlap.py and tests/test_gemv_ptx.py check instructions in it; benchmarks/gemv_ptx_report.py
prints what the decode GEMV's K loop runs per code. The host's Triton may be newer than a device's, so counts here
are a guide to what a change does to a loop, not a device measurement: a GPU timing decides (docs/gpu-log.md,
session 19: a change that cut the loop's shared-memory instructions 20x ran 1.3-4x slower).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

F16 = "*fp16"
LABEL = re.compile(r"^\$L\w+:")  # a PTX block label at the start of a line
# pointer types of the block-format GEMV's arguments (triton_gemv.gemv_words_kernel, triton_gemv_planes)
GEMV_POINTERS = {"w_ptr": "*i32", "qh_ptr": "*i32", "tab_ptr": "*fp32",
                 **{name: F16 for name in ("x_ptr", "s_ptr", "mn_ptr", "b_ptr", "y_ptr")}}


def compile_sm90(kernel: Any, pointers: dict[str, str], constexprs: dict[str, Any], num_warps: int = 4) -> dict:
    """Triton's compiled forms of `kernel` for sm_90 ({"ttgir": ..., "ptx": ...}), launched as the package launches
    it: the given pointer types, fp32 for scale / eps, i32 for the other runtime arguments, every pointer and integer
    16-aligned (so that weights are read 16 bytes at a time); constexprs not given take their defaults, and an
    OVERLAP constexpr turns on programmatic dependent launch as at a launch."""
    defaults = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}
    constexprs = {**defaults, **constexprs}
    names = [p.name for p in kernel.params if p.name not in constexprs]
    signature = {name: pointers.get(name, "fp32" if name in ("scale", "eps") else "i32") for name in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind != "fp32"}
    source = ASTSource(kernel, {**signature, **{name: "constexpr" for name in constexprs}}, constexprs=constexprs,
                       attrs=aligned)
    options = dict(num_warps=num_warps, launch_pdl=bool(constexprs.get("OVERLAP", False)), enable_fp_fusion=True)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm


def ptx_lines(kernel: Any, pointers: dict[str, str], constexprs: dict[str, Any], num_warps: int = 4) -> list[str]:
    """The PTX of compile_sm90, line by line."""
    return compile_sm90(kernel, pointers, constexprs, num_warps)["ptx"].splitlines()


def _instructions(lines: list[str]) -> list[str]:
    stripped = (line.strip() for line in lines)
    return [line for line in stripped if line and ";" in line and not line.startswith(("//", "$", "{", "}", "."))]


def loop_body(lines: list[str]) -> list[str]:
    """The instructions of the PTX's first innermost loop (from LLVM's "Inner Loop Header" label to the branch back
    to it); empty if it has none."""
    header = next((i for i, line in enumerate(lines) if "Inner Loop Header" in line), None)
    if header is None:
        return []
    # the label shares the comment's line, or (LLVM with a block name to print, as Triton 3.6's) is the line above
    while not LABEL.match(lines[header]):
        header -= 1
    label = lines[header].split(":")[0].strip()
    back = re.compile(rf"bra(\.uni)?\s+{re.escape(label)};")
    end = next(i for i in range(header, len(lines)) if back.search(lines[i]))
    return _instructions(lines[header:end + 1])


def opcode(instruction: str) -> str:
    """An instruction's opcode with its type suffixes (`fma.rn.f32`), past any predicate."""
    words = instruction.split()
    return words[1] if words[0].startswith("@") else words[0]


def loop_summary(asm: dict, codes_per_thread: int) -> dict[str, Any]:
    """Counts of the K loop of compiled `asm` (compile_sm90): instructions in all and per code a thread decodes,
    barriers, shared-memory accesses, global loads, 4-byte scalar global loads (gathers), local (spilled) accesses,
    layout conversions in the TTGIR (the whole kernel), and the ten most frequent opcodes."""
    body = loop_body(asm["ptx"].splitlines())
    ops = Counter(opcode(line) for line in body)
    return {"loop_instructions": len(body),
            "per_code": round(len(body) / codes_per_thread, 2),
            "barriers": sum(op.startswith("bar.") for op in ops.elements()),
            "shared": sum(".shared" in line for line in body),
            "global_loads": sum(op.startswith("ld.global") for op in ops.elements()),
            "gathers": sum(op == "ld.global.b32" for op in ops.elements()),
            "local": sum(".local" in line for line in body),
            "layout_conversions": asm["ttgir"].count("ttg.convert_layout"),
            "top_opcodes": dict(ops.most_common(10))}


def registers(asm: dict) -> int | None:
    """Registers a thread of compiled `asm` (compile_sm90) uses, from its cubin by the cuobjdump Triton ships; None
    where that tool is missing or says nothing (a kernel's occupancy follows from it: 65536 per multiprocessor)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if "cubin" not in asm or not os.access(tool, os.X_OK):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+)", usage)
    return int(found.group(1)) if found else None
