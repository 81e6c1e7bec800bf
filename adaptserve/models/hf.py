"""Hugging Face loading shared by training, export and the transformers engine: the base model as a directory
`from_pretrained` reads, the 4-bit NF4 quantization config, and whether to compute in bf16."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from adaptserve.models import cache_dir, resolve

log = logging.getLogger(__name__)


class MissingPackageError(ValueError):
    """A loading option that needs an optional package which is not installed."""


def base_dir(ref: str) -> str:
    """A Hugging Face directory or hub id for `ref` that `from_pretrained` loads directly.

    A GGUF is dequantized once into a cached copy, which loads far faster than parsing the GGUF again. Raises
    UnknownModelError for a reference that names no model.
    """
    spec = resolve(ref)
    if spec.format != "gguf":
        return spec.location
    gguf = spec.path
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "hf" / f"{gguf.stem}-{key}"
    if not (target / "config.json").is_file():
        _dequantize(gguf, target)
    return str(target)


def _dequantize(gguf: Path, target: Path) -> None:
    log.info("dequantizing %s into %s (once)", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are plain floats by now; transformers only refuses to save while it sees the GGUF "quantizer".
    model.hf_quantizer = None
    del model.config.quantization_config
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished the same copy first
        shutil.rmtree(tmp)


def nf4_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """bitsandbytes 4-bit NF4 with double quantization, computing in `compute_dtype`."""
    try:
        import bitsandbytes  # noqa: F401  (only checked for: transformers imports it itself)
    except ImportError as err:
        raise MissingPackageError("4-bit NF4 needs bitsandbytes: pip install bitsandbytes") from err
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype
    )


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to train in bf16. "auto" means: where the hardware has it natively (for speed); a CPU without
    AVX512-BF16 or AMX emulates it, many times slower than fp32. N data-parallel processes train what one does to
    1e-4 in fp32, and only to a few 1e-3 of a step's loss in bf16 (benchmarks/precision.md)."""
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if precision == "bf16" and not native:
        log.warning("this %s has no native bf16: expect training to be many times slower than fp32", device.type)
    return precision == "bf16" or (precision == "auto" and native)
