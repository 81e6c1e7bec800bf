"""GGUF work that needs llama.cpp and gguf-py only, no torch: merging a LoRA GGUF into its base GGUF, quantizing,
and rewriting a LoRA GGUF in the form the server applies at run time.

This is how an installed package turns the shipped adapter's LoRA GGUF into the merged GGUF it serves, on a machine
without torch or the adapter's PEFT weights. The result matches the torch export (`pipeline`), which merges into
the same dequantized base: each adapted weight is dequantized, `alpha / rank * B @ A` added in float32, and stored
as f16 with the base's metadata; llama.cpp's quantizer then makes the served type.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

from adaptserve.export.config import ExportError

log = logging.getLogger(__name__)

FTYPES = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}
_LORA_ALPHA = "adapter.lora.alpha"


def merge_lora(base: Path, lora: Path, dst: Path) -> None:
    """An f16 GGUF of `base` with the LoRA GGUF `lora` merged into its weights."""
    model, adapter = gguf.GGUFReader(base), gguf.GGUFReader(lora)
    if _LORA_ALPHA not in adapter.fields:
        raise ExportError(f"{lora}: not a LoRA GGUF (no {_LORA_ALPHA})")
    alpha = float(adapter.fields[_LORA_ALPHA].contents())
    factors = {t.name: np.asarray(t.data, dtype=np.float32) for t in adapter.tensors}
    writer = gguf.GGUFWriter(dst, model.fields[gguf.Keys.General.ARCHITECTURE].contents())
    _copy_metadata(model, writer)
    merged = 0
    for tensor in model.tensors:
        weights = _floats(tensor)
        if (a := factors.pop(f"{tensor.name}.lora_a", None)) is not None:
            b = factors.pop(f"{tensor.name}.lora_b")
            weights = weights + (alpha / a.shape[0]) * (b @ a)
            merged += 1
        writer.add_tensor(tensor.name, weights.astype(np.float16) if weights.ndim == 2 else weights)
    if factors:
        raise ExportError(f"{lora}: adapts tensors {sorted(factors)[:4]} that {base.name} does not have")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("merged %s into %d weights of %s", lora.name, merged, base.name)


def served_lora(lora: Path, dst: Path) -> None:
    """The LoRA GGUF `lora` as the server applies it to a shared base: each factor in Q8_0, the rank zero-padded to
    a multiple of Q8_0's 32-value block, `alpha / rank` folded into B and alpha written as 0 (llama.cpp then scales
    by 1). llama.cpp multiplies float factors with one kernel for a lone row and a tiled one from two rows on, so
    in f16 a sequence's output changes with the sequences decoded beside it; Q8_0 factors take kernels that compute
    a row alike either way, as the base's weights do (benchmarks/serving.md, "Adapters on a shared base")."""
    adapter = gguf.GGUFReader(lora)
    if _LORA_ALPHA not in adapter.fields:
        raise ExportError(f"{lora}: not a LoRA GGUF (no {_LORA_ALPHA})")
    alpha = float(adapter.fields[_LORA_ALPHA].contents())
    factors = {t.name: np.asarray(t.data, dtype=np.float32) for t in adapter.tensors}
    writer = gguf.GGUFWriter(dst, adapter.fields[gguf.Keys.General.ARCHITECTURE].contents())
    _copy_fields(adapter, writer, skip=(_LORA_ALPHA,))
    writer.add_float32(_LORA_ALPHA, 0.0)
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    for name in sorted(n for n in factors if n.endswith(".lora_a")):
        a, b = factors[name], factors[name.removesuffix("_a") + "_b"]  # a: rank x in, b: out x rank
        rank = a.shape[0]
        pad = -rank % block
        a = np.concatenate([a, np.zeros((pad, a.shape[1]), np.float32)])
        b = np.concatenate([b * (alpha / rank), np.zeros((b.shape[0], pad), np.float32)], axis=1)
        for tensor, values in ((name, a), (name.removesuffix("_a") + "_b", b)):
            data = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(tensor, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _copy_metadata(model: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    """Every key of the base but those the writer sets itself; the file type becomes f16."""
    _copy_fields(model, writer, skip=(gguf.Keys.General.FILE_TYPE,))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)


def _copy_fields(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, skip: tuple[str, ...]) -> None:
    """Every key of `reader` but the writer's own (architecture, GGUF header) and `skip`."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in (gguf.Keys.General.ARCHITECTURE, *skip):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)


def _floats(tensor: gguf.ReaderTensor) -> np.ndarray:
    """The tensor as float32 in numpy's row-major shape, dequantized if it is stored quantized."""
    if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(tensor.data, dtype=np.float32)
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


def quantize(src: Path, dst: Path, quant: str, threads: int | None) -> None:
    """Requantize an f16 GGUF. Widths that are not a multiple of 256 (SmolLM2's 576) cannot take k-quants,
    so llama.cpp falls back to q5_0/q8_0 for those tensors in q4_k_m: the file is larger than a pure Q4_K."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[quant]
    params.nthread = threads or 0  # 0: llama.cpp uses every core
    with _quiet_llama():
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp could not quantize {src} to {quant} (status {status})")


@contextmanager
def _quiet_llama() -> Iterator[None]:
    # llama.cpp logs one line per tensor through llama-cpp-python's logger; keep errors only.
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
