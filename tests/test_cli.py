"""`python -m ipex_llm_tf` end to end on SmolLM2 (subprocesses) and its user errors: exit 2, one line, no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from ipex_llm_tf import cli
from ipex_llm_tf.gguf_import import find_default_gguf

pytestmark = pytest.mark.slow  # about two minutes on two CPU cores: every model run is a fresh process


@pytest.fixture(scope="session")
def smollm2() -> Path:
    try:
        return find_default_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    # One conversion cache for the whole session: the GGUF is converted by the first run, loaded by the rest.
    cache = tmp_path_factory.mktemp("ipex-llm-tf-cache")
    return {**os.environ, "IPEX_LLM_TF_CACHE": str(cache), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def run_cli(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """Run `python -m ipex_llm_tf ARGS` and return the finished process (text stdout / stderr)."""
    return subprocess.run([sys.executable, "-m", "ipex_llm_tf", *args], env=env, input=stdin, text=True,
                          capture_output=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Assert exit 0, showing stderr when it is not."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2 with exactly one non-empty stderr line naming the problem, and no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("ipex-llm-tf: error:")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="session")
def converted(cli_env: dict[str, str], smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(destination, stdout) of `convert` from the default GGUF."""
    destination = tmp_path_factory.mktemp("converted") / "smollm2-asym_int4"
    return destination, ok(run_cli(cli_env, "convert", str(smollm2), str(destination))).stdout


def test_generate_prints_stats(cli_env, smollm2):
    proc = ok(run_cli(cli_env, "generate", "Say hi.", "--max-new-tokens", "4"))
    assert proc.stdout.strip()
    stats = proc.stderr.strip().splitlines()[-1]
    assert "tokens/s" in stats and "first token" in stats and "asym_int4 on cpu" in stats


def test_generate_raw(cli_env, smollm2):
    assert ok(run_cli(cli_env, "generate", "The capital of France is", "--raw", "--max-new-tokens", "4")).stdout.strip()


def test_chat_reset_and_exit(cli_env, smollm2):
    proc = ok(run_cli(cli_env, "chat", "--max-new-tokens", "4", stdin="Hi\n/reset\n/exit\n"))
    assert proc.stdout.count("> ") >= 2 and "(history cleared)" in proc.stderr


def test_chat_ends_on_eof(cli_env, smollm2):
    ok(run_cli(cli_env, "chat", "--max-new-tokens", "4", stdin=""))


def test_convert(converted, smollm2):
    destination, stdout = converted
    assert f"{smollm2.stat().st_size / 2**20:.1f} MiB -> " in stdout and "| name | bits/weight |" in stdout
    field = json.loads((destination / "config.json").read_text())["ipex_llm_tf"]
    assert field["low_bit"] == "asym_int4" and (destination / "tokenizer.json").is_file()


def test_generate_from_converted_dir(cli_env, converted):
    proc = ok(run_cli(cli_env, "generate", "Hi", "--model", str(converted[0]), "--max-new-tokens", "3"))
    assert "asym_int4 on cpu" in proc.stderr


def test_bench_writes_csv_and_json(cli_env, converted, tmp_path):
    # the converted directory rather than the GGUF: asym_int4 would be a second cache entry to convert
    ok(run_cli(cli_env, "--quiet", "bench", "--model", str(converted[0]), "--low-bits", "asym_int4",
               "--prompt-tokens", "8", "--new-tokens", "3", "--csv", str(tmp_path / "b.csv"),
               "--json", str(tmp_path / "b.json")))
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["prompt_tokens"] == 8 and report["rows"][0]["low_bit"] == "asym_int4"
    assert (tmp_path / "b.csv").read_text().startswith("low_bit,device,")


def test_info(cli_env):
    stdout = ok(run_cli(cli_env, "info")).stdout
    assert "devices: cpu" in stdout and "torch: " in stdout and "transformers: " in stdout


def test_missing_model_path_subprocess(cli_env, tmp_path):
    assert_user_error(run_cli(cli_env, "generate", "hi", "--model", str(tmp_path / "nope")), "nope")


# -- user errors through cli.main(): no model is loaded, so in-process is seconds faster ------------------------

@pytest.fixture
def main(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """cli.main(argv) -> (exit code, stderr lines), with the conversion cache in tmp_path."""
    monkeypatch.setattr(cli, "CACHE_DIR", tmp_path / "cache")

    def call(*argv: str) -> tuple[int, list[str]]:
        capsys.readouterr()
        code = cli.main(list(argv))
        return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return call


def tiny_gguf(path: Path, architecture: str) -> Path:
    """A small, valid GGUF file of the given architecture."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["bench", "--prompt-tokens", "0"], "--prompt-tokens must be at least 1"),
    (["generate", "hi", "--device", "cuda"], "not available"),
    (["generate", "hi", "--device", "tpu"], "not a device name"),
    (["generate", "hi", "--device", "meta"], "cannot run a model"),
    (["generate", "hi", "--model", "/no/such/model.gguf"], "does not exist"),
    (["generate", "hi", "--model", "/no/such/dir"], "neither an existing directory nor a Hub repo id"),
    (["bench", "--csv", "/no/such/dir/b.csv"], "does not exist"),
])
def test_user_errors(main, argv, fragment):
    code, err = main(*argv)
    assert code == 2 and len(err) == 1 and err[0].startswith("ipex-llm-tf: error:") and fragment in err[0], err


def test_unsupported_gguf_architecture(main, tmp_path):
    code, err = main("generate", "hi", "--model", str(tiny_gguf(tmp_path / "gpt2.gguf", "gpt2")))
    assert code == 2 and len(err) == 1 and "'gpt2' is not supported" in err[0], err


def test_not_a_gguf_file(main, tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    code, err = main("generate", "hi", "--model", str(tmp_path / "junk.gguf"))
    assert code == 2 and len(err) == 1 and "not a readable GGUF file" in err[0], err


def test_directory_without_tokenizer(main, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, err = main("generate", "hi", "--model", str(tmp_path / "model"))
    assert code == 2 and len(err) == 1 and "has no usable tokenizer" in err[0], err


def test_unknown_low_bit(capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error
        cli.main(["generate", "hi", "--low-bit", "int3"])
    assert exit_info.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, quiet", [(["--quiet", "info"], True), (["info", "--quiet"], True), (["info"], False)])
def test_quiet_either_side_of_the_subcommand(argv, quiet):
    assert cli.build_parser().parse_args(argv).quiet is quiet
