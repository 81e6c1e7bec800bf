"""The server's export cache: an adapter merged into a GGUF once, reused while its inputs are unchanged.

A cache hit reads file names, sizes and bytes only: no torch, no transformers (which would add ~200 MB to a
server that otherwise needs llama.cpp alone). A miss runs the full export (`pipeline.export`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

from adaptserve.export.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter, read_adapter
from adaptserve.export.config import ExportConfig, ExportError
from adaptserve.models import DEFAULT_MODEL, cache_dir, resolve

log = logging.getLogger(__name__)

REPORT = "export_report.json"  # written last by every export: its presence says the export is whole
# What an export reads from the adapter directory; checkpoints and reports beside them do not change it.
_ADAPTER_INPUTS = (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def base_ref(config: ExportConfig, adapter: Adapter) -> str:
    return config.base_model or adapter.recorded_base or DEFAULT_MODEL


def default_name(config: ExportConfig) -> str:
    return Path(config.adapter).resolve().name


def ensure_gguf(adapter_dir: str | Path, quant: str = "q4_k_m", threads: int | None = None) -> Path:
    """A merged GGUF of the adapter, exported into the cache on first use and reused while the adapter files,
    the base and the quant are unchanged (they name the cache entry)."""
    config = ExportConfig(adapter=str(adapter_dir), formats=["gguf"], quants=[quant], threads=threads)
    config.validate()
    adapter = read_adapter(Path(config.adapter))
    base, name = base_ref(config, adapter), default_name(config)
    out = cache_dir() / "exports" / f"{name}-{_fingerprint(adapter, base, quant)}"
    path = out / f"{name}-{quant}.gguf"
    if path.is_file() and (out / REPORT).is_file():  # the report is published last, so the export is whole
        log.info("using cached export %s", path)
        return path
    from adaptserve.export.pipeline import export  # torch and transformers: only on a cache miss

    export(dataclasses.replace(config, base_model=base, output_dir=str(out)))
    return path


def _fingerprint(adapter: Adapter, base: str, quant: str) -> str:
    digest = hashlib.sha256(f"{quant}\n{_base_identity(base)}\n".encode())
    for file in sorted(adapter.path / f for f in _ADAPTER_INPUTS if (adapter.path / f).is_file()):
        digest.update(f"{file.name}\n".encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _base_identity(ref: str) -> str:
    """The base's files by path, size and mtime: hashing a multi-GB base on every server start would cost more
    than the export it guards, and a changed file gets a new mtime."""
    try:
        spec = resolve(ref)
    except ValueError as err:
        raise ExportError(f"cannot resolve base model {ref!r}: {err}") from err
    if spec.format == "hub":
        return spec.location
    files = [spec.path] if spec.path.is_file() else sorted(p for p in spec.path.iterdir() if p.is_file())
    return "\n".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
