"""The server's export cache: an adapter exported to a GGUF once (merged, or as a LoRA GGUF in the form the server
applies), reused while its inputs are unchanged; and `served`, the form llama.cpp runs a model in.

A cache hit reads file names, sizes and bytes only: no torch, no transformers, whose memory a server that otherwise
needs llama.cpp alone would carry (benchmarks/serving.md). A miss runs the full export (`pipeline.export`), or for an
adapter that carries its LoRA GGUF the torch-free merge (`native`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path

from adaptserve.export import native
from adaptserve.export.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter, read_adapter
from adaptserve.export.config import ExportConfig, ExportError
from adaptserve.export.names import REPORT, base_ref, default_name
from adaptserve.models import AUTO, MERGED_DEFAULT, ModelSpec, cache_dir, resolve

log = logging.getLogger(__name__)

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


def served(spec: ModelSpec, quant: str, threads: int | None = None, beside: Collection[str] = ()) -> ModelSpec:
    """What llama.cpp runs for `spec`: a GGUF as it is; an adapter in its form `spec.quant`, else `quant`: merged
    into its base and quantized to that GGUF type, or "lora", the base's GGUF with the adapter's LoRA GGUF applied
    at run time (as `native.served_lora` rewrites it, so that batching does not change its output). "auto" is
    "lora" when the base's GGUF is among `beside`, the GGUFs served in the same process, so that base and adapter
    share one copy of the weights; else the merged MERGED_DEFAULT, which decodes faster where there is nothing to
    share. An adapter that carries a LoRA GGUF (a shipped one) needs no torch in any form."""
    if spec.format != "adapter":
        return spec
    base = resolve(base_ref(ExportConfig(adapter=str(spec.path)), read_adapter(spec.path, weights=False)))
    form = spec.quant or quant
    if form == AUTO:
        form = "lora" if base.format == "gguf" and base.location in beside else MERGED_DEFAULT
    if form != "lora" and spec.lora is None:
        return dataclasses.replace(spec, format="gguf", location=str(ensure_gguf(spec.path, form, threads)))
    if base.format != "gguf":
        raise ExportError(f"{spec.name}: llama.cpp applies a LoRA GGUF to a GGUF base; {base.name} is {base.format}")
    lora = Path(spec.lora) if spec.lora else ensure_gguf(spec.path, "lora", threads)
    if form == "lora":
        return dataclasses.replace(spec, format="gguf", location=base.location, lora=str(served_lora(spec, lora)))
    return dataclasses.replace(spec, format="gguf", location=str(merged_from_lora(spec, base, lora, form, threads)), lora=None)


def served_lora(spec: ModelSpec, lora: Path) -> Path:
    """The LoRA GGUF `lora` in the form the server applies at run time (`native.served_lora`), cached."""
    digest = hashlib.sha256(b"served-lora\n" + lora.read_bytes()).hexdigest()
    return _cached(spec, digest, "lora-q8_0", lambda dst: native.served_lora(lora, dst))


def merged_from_lora(spec: ModelSpec, base: ModelSpec, lora: Path, quant: str, threads: int | None) -> Path:
    """`base` with the LoRA GGUF `lora` merged in and quantized to `quant` (export.native, no torch), cached."""
    digest = hashlib.sha256(f"lora-merge\n{quant}\n{_base_identity(base.name)}\n".encode())
    digest.update(lora.read_bytes())

    def make(dst: Path) -> None:
        f16 = dst.with_name("f16.gguf")
        native.merge_lora(base.path, lora, f16)
        if quant != "f16":
            native.quantize(f16, dst, quant, threads)
        else:
            f16.rename(dst)
        log.info("merged %s into %s as %s", lora.name, base.name, quant)

    return _cached(spec, digest.hexdigest(), quant, make)


def _cached(spec: ModelSpec, digest: str, kind: str, make: Callable[[Path], None]) -> Path:
    """The file `make(path)` writes for the adapter `spec`, made once and kept in the export cache under `digest`
    (of its inputs); it is written in a scratch directory and appears by an atomic rename, so its presence means
    it is whole."""
    name = spec.name.split("@")[0]
    out = cache_dir() / "exports" / f"{name}-{digest[:16]}"
    path = out / f"{name}-{kind}.gguf"
    if path.is_file():
        log.info("using cached export %s", path)
        return path
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        staged = Path(tmp) / path.name
        make(staged)
        os.replace(staged, path)
    log.info("wrote %s", path)
    return path


def ensure_gguf(adapter_dir: str | Path, quant: str = "q4_k_m", threads: int | None = None) -> Path:
    """A GGUF of the adapter, exported into the cache on first use and reused while the adapter files, the base and
    the quant are unchanged (they name the cache entry): merged into its base and quantized to `quant`, or for
    "lora" the adapter alone as a LoRA GGUF."""
    if quant == "lora":
        config = ExportConfig(adapter=str(adapter_dir), formats=["lora-gguf"], threads=threads)
    else:
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
