"""The console script: listing models, and clean failures before any server starts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "adaptserve", *args], capture_output=True, text=True, timeout=120)


def test_models_lists_builtins() -> None:
    out = run("models")
    assert out.returncode == 0 and "smollm2-135m" in out.stdout and "gemma3-270m" in out.stdout


def test_unknown_model_fails_with_a_message() -> None:
    out = run("serve", "--models", "no-such-model")
    assert out.returncode == 2
    assert "unknown model 'no-such-model'" in out.stderr and "smollm2-135m" in out.stderr


def test_bad_flag_value_is_a_usage_error() -> None:
    out = run("serve", "--port", "eighty")
    assert out.returncode == 2 and "invalid int value" in out.stderr


def test_unknown_kv_cache_type_fails_before_loading() -> None:
    out = run("serve", "--kv-cache", "q4")
    assert out.returncode == 2 and "kv_cache must be one of ['f16', 'q8_0'], got 'q4'" in out.stderr


@pytest.mark.parametrize("command", ["train", "export", "serve", "bench", "models"])
def test_every_command_prints_its_help(command: str) -> None:
    out = run(command, "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: adaptserve " + command), out.stderr[-500:]


@pytest.mark.parametrize(
    ("flags", "messages"),
    [
        (["--n-slots", "0"], ["n_slots must be between 1 and", "got 0"]),
        (["--port", "70000"], ["port must be between 1 and 65535, got 70000"]),
        (["--n-slots", "100000", "--adapter-quant", "q5"], ["got 100000", "adapter_quant must be one of"]),
    ],
)
def test_bad_serve_config_is_one_line_before_loading(flags: list[str], messages: list[str]) -> None:
    """ServeConfig.validate runs before any model loads: every bad field on one line, exit 2, and no traceback."""
    out = subprocess.run([sys.executable, "-m", "adaptserve", "serve", *flags], capture_output=True, text=True, timeout=30)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert all(m in lines[0] for m in messages), lines[0]


def test_every_serve_flag_is_documented_and_the_defaults_are_valid() -> None:
    from adaptserve.serve import ServeConfig

    assert [f.name for f in dataclasses.fields(ServeConfig) if not f.metadata.get("help")] == []
    ServeConfig().validate()
