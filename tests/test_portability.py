"""Whatever x86-64 CPU runs it: every llama.cpp model opens through one loader, which keeps llama.cpp's extra buffer
types (repacked weights, AMX tiles) off; the AMX one crashes the process on Xeons that have it (docs/cpus.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from adaptserve import llama_thread
from adaptserve.models import resolve

REPO = Path(__file__).resolve().parents[1]
LOADER = REPO / "adaptserve" / "llama_thread.py"


def _python_files() -> list[Path]:
    return [p for d in ("adaptserve", "benchmarks", "tests", "space") for p in (REPO / d).rglob("*.py")]


def _llama_constructions(path: Path) -> list[int]:
    """Lines of `path` that call `Llama(...)` or `<module>.Llama(...)`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if name == "Llama":
                lines.append(node.lineno)
    return lines


def test_only_the_loader_constructs_a_llama() -> None:
    found = {str(p.relative_to(REPO)): lines for p in _python_files() if p != LOADER and (lines := _llama_constructions(p))}
    assert not found, f"open llama.cpp models with adaptserve.llama_thread.load, not llama_cpp.Llama: {found}"
    assert _llama_constructions(LOADER), "the loader itself must construct the Llama"


def test_loaded_models_keep_extra_buffer_types_off() -> None:
    llm = llama_thread.load(resolve("smollm2-135m").path, 1, n_ctx=64)
    try:
        assert llm.model_params.use_extra_bufts is False
        assert llm("The capital of France is", max_tokens=4, temperature=0)["choices"][0]["text"]  # type: ignore[index]
    finally:
        llm.close()


def test_the_policy_covers_any_llama_in_a_process_that_imported_the_loader() -> None:
    """llama-cpp-python's own server constructs its Llama itself (benchmarks/peer.py runs it this way)."""
    code = (
        "import adaptserve.llama_thread, llama_cpp\n"
        f"llm = llama_cpp.Llama(model_path={str(resolve('smollm2-135m').path)!r}, n_ctx=64, verbose=False)\n"
        "print(llm.model_params.use_extra_bufts)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr[-2000:]


def test_the_peer_server_starts_under_the_loaders_policy(tmp_path: Path) -> None:
    """benchmarks/peer.py runs llama-cpp-python's own server through the loader's import (`PEER`)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import peer
    finally:
        sys.path.pop(0)
    server = peer.start_peer(2, tmp_path / "peer.log", interrupt=False)  # returns once it answered a chat
    try:
        assert server.process.poll() is None
    finally:
        server.stop()
