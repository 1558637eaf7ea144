"""A/B of the decode GEMV kernels: a git revision's against the working tree's, in one process, as decode runs them.

    python scripts/ab_gemv.py check --base main --formats fp4 fp6      # outputs equal? (GPU or TRITON_INTERPRET=1)
    python scripts/ab_gemv.py time --base main --formats fp4 sym_int4 --shapes 4096x11008 11008x4096 [--rounds 3]
    python scripts/ab_gemv.py time --formats fp6 --tiles 8,64,4,2,0 4,64,2 --each   # given tiles, each one's time

The base revision's GEMV kernel files (KERNEL_FILES) are read from git (or, where a machine has no .git, as the device
has not, from a folder that holds them: `git archive REV ipex_llm_tf/kernels | tar -x -C .carry/base`, then
`--base .carry/base/ipex_llm_tf/kernels`) into a temporary package and run through the
working tree's launcher (kernels/triton_linear), which swaps them in for its own; launch options the base kernels
do not know (a constexpr added since) are dropped, and `--base-option NAME=VALUE` launches the base with a
constexpr the tree's launcher now sets otherwise (fp6's X_TILE: `--base-option X_TILE=0`). `time` times every GEMV
candidate tile (or the `--tiles` given) of each side the way the tuner does (CUDA graph replays over weight
replicas, so weights come from memory), alternating the sides `--rounds` times, and prints the best of each side
with its tile (`--each`: every tile's); `--json` also writes the rows. Each session wrote such a
script for itself (.carry/s27-s30): this one keeps the sides' machine, process and candidates the same.
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_gpu_linear import parse_shape  # noqa: E402
from ipex_llm_tf.formats import get_format  # noqa: E402
from ipex_llm_tf.kernels import triton_gemv as G  # noqa: E402
from ipex_llm_tf.kernels import triton_gemv_planes as GP  # noqa: E402
from ipex_llm_tf.kernels import triton_linear as TL  # noqa: E402
from ipex_llm_tf.kernels.triton_tuning import GemvConfig, _interpreting, _replay_ms, replicas_for  # noqa: E402

# the GEMV kernels and what they import from the package (only each other and Triton)
KERNEL_FILES = ("triton_gemv.py", "triton_gemv_planes.py", "triton_gemv_tiles.py", "lane_lookup.py",
                "launch_overlap.py")
LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion", "launch_pdl")  # Triton's, not the kernel's
# (N, K) for `check`: 40 words a row, a partial 64-word step; 704 inputs, a 32-word step and a part for every format
# (nf3: 44 words)
CHECK_SHAPES = ((40, 320), (24, 256), (24, 704))
# tiles for `check`: prefetch 2, 1 and 0, a K split, two rows a program
CHECK_CONFIGS = [(GemvConfig(16, 64, 2, 1, 2), 1), (GemvConfig(8, 32, 1, 1, 1), 1), (GemvConfig(8, 32, 1, 1, 0), 1),
                 (GemvConfig(16, 64, 2, 2, 2), 1), (GemvConfig(16, 32, 2, 1, 2, block_m=2), 2)]


class _KnownOptions:
    """A kernel launched with only the keyword arguments it declares (a base kernel may predate some), and with
    `forced` options set as the base revision's launcher set them where the tree's decides otherwise."""

    def __init__(self, kernel: Any, forced: dict[str, int] | None = None) -> None:
        self.kernel, self.names, self.forced = kernel, set(kernel.arg_names), forced or {}

    def __getitem__(self, grid: Any) -> Any:
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, **{k: self.forced.get(k, v) for k, v in kwargs.items()
                                                        if k in self.names or k in LAUNCH_OPTIONS})


def load_base(rev: str, into: Path, forced: dict[str, int] | None = None) -> dict[str, Any]:
    """{"words": ..., "planes": ...}: the GEMV kernels of git revision (or kernel folder) `rev`, imported from a
    package under `into`, launched with the `forced` options."""
    package = into / "ab_base_kernels"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    for name in KERNEL_FILES:
        (package / name).write_text(_outside_imports(_base_source(rev, name)))
    sys.path.insert(0, str(into))
    for loaded in [name for name in sys.modules if name.split(".")[0] == "ab_base_kernels"]:
        del sys.modules[loaded]  # an earlier load's package (another revision or folder) must not answer this one
    importlib.invalidate_caches()
    words = importlib.import_module("ab_base_kernels.triton_gemv").gemv_words_kernel
    planes = importlib.import_module("ab_base_kernels.triton_gemv_planes").gemv_planes_kernel
    return {"words": _KnownOptions(words, forced), "planes": _KnownOptions(planes, forced)}


def parse_forced(items: list[str]) -> dict[str, int]:
    """--base-option NAME=VALUE items as {NAME: int(VALUE)}."""
    forced = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.lstrip("-").isdigit():
            raise SystemExit(f"--base-option takes NAME=INTEGER (a kernel constexpr, e.g. X_TILE=0); got {item!r}")
        forced[name] = int(value)
    return forced


def _base_source(rev: str, name: str) -> str:
    """The text of kernel file `name` in folder `rev` if there is one, else at git revision `rev`."""
    if Path(rev).is_dir():
        path = Path(rev) / name
        if not path.is_file():
            raise SystemExit(f"cannot read {name} in folder {rev!r}: it has no such file (give the folder that "
                             "holds the revision's ipex_llm_tf/kernels files)")
        return path.read_text()
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:ipex_llm_tf/kernels/{name}"],
                           capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"cannot read ipex_llm_tf/kernels/{name} at {rev!r}: {shown.stderr.strip()}")
    return shown.stdout


def _outside_imports(source: str) -> str:
    """A kernel file's imports of the package's other modules pointed at the working tree's package, so the copied
    kernel files import each other and nothing else of the base revision."""
    def pointed(match: re.Match) -> str:
        dots, module = match.group(1), match.group(2)
        if dots == "." and f"{module}.py" in KERNEL_FILES:
            return match.group(0)
        return f"from ipex_llm_tf.{'kernels.' if dots == '.' else ''}{module} import"
    return re.sub(r"^from (\.\.?)(\w+) import", pointed, source, flags=re.MULTILINE)


def declared(kernel: Any) -> set[str]:
    """The arguments a side's kernel declares: a base kernel's (_KnownOptions.names), else a Triton kernel's, or
    those of the kernel a wrapper (a test's) passes its attributes on from."""
    names = getattr(kernel, "names", None)
    return names if names is not None else set(kernel.arg_names)


class Sides:
    """The two sides' kernels, swapped into the launcher's modules for one call at a time."""

    def __init__(self, base: dict[str, Any]) -> None:
        self.kernels = {"base": base, "tree": {"words": G.gemv_words_kernel, "planes": GP.gemv_planes_kernel}}

    def run(self, side: str, x: torch.Tensor, ops: Any, n: int, cfg: GemvConfig) -> torch.Tensor:
        """The working tree's launcher on `side`'s kernels, with the launch decisions that need a kernel argument
        taken only where the side's kernels declare it: a partial last step read apart (TAIL; the launcher then
        counts full steps only, which a kernel without it would read alone) and split-K partials summed by the last
        split (LAST_SUMS; without it the splits add into a zeroed float32 output)."""
        own = (G.gemv_words_kernel, GP.gemv_planes_kernel, TL._tail_step, TL._gemv_outputs)
        kernels = self.kernels[side]

        def tail_step(words: int, cfg: GemvConfig, split: int, even: bool) -> bool:
            return "TAIL" in declared(kernels["words"]) and own[2](words, cfg, split, even)

        def gemv_outputs(x: torch.Tensor, n: int, split: int, columns: int) -> tuple[torch.Tensor, dict]:
            last_sums = all("LAST_SUMS" in declared(kernel) for kernel in kernels.values())
            return own[3](x, n, split, columns) if last_sums else (TL._split_output(x, n, split), {})

        G.gemv_words_kernel, GP.gemv_planes_kernel, TL._tail_step, TL._gemv_outputs = (
            kernels["words"], kernels["planes"], tail_step, gemv_outputs)
        try:
            return TL.gemv_blocks(x, ops, None, n, cfg)
        finally:
            G.gemv_words_kernel, GP.gemv_planes_kernel, TL._tail_step, TL._gemv_outputs = own


def operands(name: str, n: int, k: int, device: torch.device) -> Any:
    """The GEMV operands of a random n x k weight in format `name` (seeded: both sides read the same codes)."""
    fmt = get_format(name)
    if TL.block_kind(fmt) is None:
        raise SystemExit(f"{name} has no block-format GEMV to compare (fp8, fp16 and bf16 have their own kernels)")
    torch.manual_seed(0)
    return TL.block_operands(fmt, fmt.quantize(torch.randn(n, k, device=device) * 0.05))


def check(sides: Sides, names: list[str], device: torch.device) -> list[dict]:
    """Both sides' outputs for a few tiles and odd shapes: equal, or their largest difference."""
    rows = []
    for name in names:
        for n, k in CHECK_SHAPES:
            ops = operands(name, n, k, device)
            x = torch.randn(2, k, device=device, dtype=torch.float16)
            for cfg, m in CHECK_CONFIGS:
                if ops.kind in TL.PLANE_KINDS and m > 1:
                    continue
                a, b = (sides.run(side, x[:m], ops, n, cfg).float() for side in ("base", "tree"))
                rows.append({"format": name, "shape": f"{k}x{n}", "config": str(cfg), "equal": torch.equal(a, b),
                             "max_diff": (a - b).abs().max().item()})
    return rows


def parse_tile(text: str) -> GemvConfig:
    """A --tiles item BLOCK_N,BLOCK_W,WARPS[,SPLIT_K[,PREFETCH]] as a GemvConfig."""
    fields = text.split(",")
    if not 3 <= len(fields) <= 5 or not all(f.isdigit() and (int(f) <= 2 if i == 4 else int(f) > 0)
                                             for i, f in enumerate(fields)):
        raise SystemExit(f"--tiles takes BLOCK_N,BLOCK_W,WARPS[,SPLIT_K[,PREFETCH]] (positive integers, PREFETCH "
                         f"0-2), e.g. 8,64,4,2,0; got {text!r}")
    return GemvConfig(*(int(f) for f in fields))


def time_sides(sides: Sides, names: list[str], shapes: list[tuple[int, int]], rounds: int,
               device: torch.device, tiles: list[GemvConfig] | None = None, each: bool = False) -> list[dict]:
    """Best us of each side over every candidate tile (or over `tiles`), sides alternated `rounds` times; `each`
    also prints every tile's best."""
    rows = []
    for name in names:
        for k, n in shapes:
            ops = operands(name, n, k, device)
            x = torch.randn(1, k, device=device, dtype=torch.float16)
            candidates = tiles or TL._block_gemv_candidates(1, n, ops, device)
            replicas = replicas_for(ops)
            best: dict[tuple[str, GemvConfig], float] = {}
            for _ in range(rounds):
                for side in ("base", "tree"):
                    for cfg in candidates:
                        calls = [lambda r=r, c=cfg, s=side: sides.run(s, x, r, n, c) for r in replicas]
                        try:
                            ms = _replay_ms(calls, device)
                        except Exception as err:  # noqa: BLE001  (a tile one side cannot compile or launch)
                            print(f"  {side} {cfg}: {type(err).__name__}: {str(err)[:160]}", flush=True)
                            continue
                        best[(side, cfg)] = min(best.get((side, cfg), float("inf")), ms)
            for (side, cfg), ms in sorted(best.items(), key=lambda item: item[1]) if each else ():
                print(f"  {name} {k}x{n} {side} {ms * 1e3:.2f} us  {cfg}", flush=True)
            for side in ("base", "tree"):
                timed = [(ms, cfg) for (s, cfg), ms in best.items() if s == side]
                if timed:
                    ms, cfg = min(timed, key=lambda t: t[0])
                    rows.append({"format": name, "shape": f"{k}x{n}", "side": side, "us": round(ms * 1e3, 2),
                                 "config": str(cfg)})
                    print(f"{name} {k}x{n} {side}: {ms * 1e3:.2f} us  {cfg}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Run `check` or `time` as the command line says; returns the rows printed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["check", "time"])
    parser.add_argument("--base", default="main", help="git revision, or a folder of its kernel files, whose kernels are side A (default: main)")
    parser.add_argument("--formats", nargs="+", required=True)
    parser.add_argument("--shapes", nargs="+", default=["4096x11008", "11008x4096"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--base-option", nargs="*", default=[], metavar="NAME=VALUE",
                        help="launch the base kernels with this constexpr set as the base's launcher set it, where "
                             "the tree's launcher now decides otherwise (e.g. X_TILE=0)")
    parser.add_argument("--tiles", nargs="*", default=[], metavar="BN,BW,WARPS[,SPLIT[,PREFETCH]]",
                        help="time: these tiles in place of the launcher's candidates")
    parser.add_argument("--each", action="store_true", help="time: print every tile's best, fastest first")
    args = parser.parse_args(argv)
    forced = parse_forced(args.base_option)
    tiles = [parse_tile(t) for t in args.tiles]
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1; got {args.rounds}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.mode == "time" and device.type != "cuda":
        raise SystemExit("time needs a CUDA GPU (it times CUDA graph replays); check also runs under "
                         "TRITON_INTERPRET=1")
    if device.type != "cuda" and not _interpreting():
        raise SystemExit("check needs a CUDA GPU, or Triton's interpreter on the CPU: set TRITON_INTERPRET=1")
    with tempfile.TemporaryDirectory() as tmp:
        sides = Sides(load_base(args.base, Path(tmp), forced))
        if args.mode == "check":
            rows = check(sides, args.formats, device)
            for row in rows:
                print(f"{row['format']} {row['shape']} {row['config']}: equal={row['equal']} "
                      f"max_diff={row['max_diff']:.3g}")
        else:
            rows = time_sides(sides, args.formats, [parse_shape(s) for s in args.shapes], args.rounds, device,
                              tiles, args.each)
    if args.json:
        Path(args.json).write_text(json.dumps({"base": args.base, "mode": args.mode, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
