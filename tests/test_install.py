"""The ways the product is installed, each into a fresh virtual environment outside the checkout: the built wheel
(`pip install adaptserve`, as the Docker image does) and the Space folder with only its requirements. Each serves the
base and the shipped adapter side by side, with no torch and no repository beside it. pip's cache keeps this to a
minute or two once llama-cpp-python's wheel has been built."""

from __future__ import annotations

import subprocess
import sys
import venv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, Server

FINQA = {
    "question": "what was the percentage change in revenue from 2018 to 2019?",
    "table": [["", "2019", "2018"], ["revenue", "5829", "5735"]],
}


def _venv(path: Path) -> Path:
    venv.create(path, with_pip=True)
    return path / "bin" / "python"


def _pip(python: Path, *args: str) -> None:
    run = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]


@contextmanager
def _serve(command: list[str], cwd: Path) -> Iterator[str]:
    """The server `command` started in `cwd` (not the checkout, so nothing is imported from it), until the block ends."""
    server = Server([], cwd, command, cwd)
    try:
        yield server.url
    finally:
        server.stop()


def _answers_from_both_models(url: str) -> None:
    served = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
    assert served == ["smollm2-135m", "smollm2-135m-finqa"]  # a plain install has SmolLM2's weights, not Gemma's
    for model in served:
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8},
            timeout=120,
        )
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
    r = httpx.post(f"{url}/v1/finqa", json={"model": "smollm2-135m-finqa", **FINQA}, timeout=120)
    assert r.status_code == 200 and r.json()["program"].startswith("subtract("), r.text


def _no_torch(python: Path) -> None:
    check = subprocess.run([str(python), "-c", "import torch"], capture_output=True, check=False)
    assert check.returncode != 0, "the plain install must not need torch"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO), "-w", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return next(out.glob("adaptserve-*.whl"))


def test_installed_wheel_serves_base_and_adapter(wheel: Path, tmp_path: Path) -> None:
    python = _venv(tmp_path / "venv")
    _pip(python, str(wheel))
    _no_torch(python)
    with _serve([str(python.parent / "adaptserve"), "serve", "--no-ui", "--n-threads", "2", "--port", "{port}"], tmp_path) as url:
        _answers_from_both_models(url)


def test_space_folder_serves_base_and_adapter(tmp_path: Path) -> None:
    space = tmp_path / "space"
    run = subprocess.run(["make", "-s", "space", f"SPACE={space}"], cwd=REPO, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    python = _venv(tmp_path / "venv")
    _pip(python, "-r", str(space / "requirements.txt"))
    _no_torch(python)
    with _serve([str(python), "app.py"], space) as url:
        _answers_from_both_models(url)
        assert httpx.get(f"{url}/ui/", timeout=60).status_code == 200
