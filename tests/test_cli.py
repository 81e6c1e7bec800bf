"""The console script: listing models, and clean failures before any server starts."""

from __future__ import annotations

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
