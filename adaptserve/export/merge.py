"""Merge: read a PEFT LoRA adapter, check it fits the base, fold it into the base's float32 weights, and save the
result as a Hugging Face directory (and, for GPUs, as a bitsandbytes NF4 checkpoint).

The base is never merged in its 4-bit GGUF form: it is dequantized to float32 first (once, cached by
`adaptserve.models.hf.base_dir`, shared with training), so the merged weights are the base the adapter was
trained on plus B @ A. Loaded from that plain copy, the merged model saves with `save_pretrained` as is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from adaptserve.export.adapter import LORA_KEY, Adapter
from adaptserve.export.config import ExportError
from adaptserve.models.hf import base_dir, nf4_config


def load_base(ref: str) -> tuple[PreTrainedModel, str]:
    """The base in float32 on CPU, and the Hugging Face directory (or hub id) it was loaded from."""
    try:
        location = base_dir(ref)
        return AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32), location
    except (ValueError, OSError) as err:  # unknown reference, offline hub id, unreadable weights
        raise ExportError(f"cannot load base model {ref!r}: {err}") from err


def load_tokenizer(adapter: Adapter, base_location: str) -> PreTrainedTokenizerBase:
    """The adapter's own tokenizer files when it has them (what training used), else the base's."""
    has_own = (adapter.path / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter.path) if has_own else base_location)
    if tokenizer.chat_template is None and has_own:
        tokenizer.chat_template = AutoTokenizer.from_pretrained(base_location).chat_template
    return tokenizer


def check_fits(model: PreTrainedModel, adapter: Adapter, base_ref: str) -> None:
    """Every LoRA factor must sit on a module of the base with matching in/out sizes.

    Comparing shapes here turns an adapter made for another model into one clear message instead of a
    size-mismatch traceback from deep inside torch.
    """
    modules = dict(model.named_modules())
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    problems = [p for key, shape in adapter.shapes.items() if (p := _misfit(key, shape, modules, params))]
    if problems:
        raise ExportError(
            f"adapter {adapter.path} does not fit base {base_ref!r} (adapter records base {adapter.recorded_base!r}): "
            f"{len(problems)} of {len(adapter.shapes)} tensors mismatch, e.g. " + "; ".join(problems[:3])
        )


def _misfit(key: str, shape: tuple[int, ...], modules: dict[str, nn.Module], params: dict[str, tuple[int, ...]]) -> str | None:
    match = LORA_KEY.match(key)
    if match is None:  # a fully saved module (modules_to_save): must equal the base parameter it replaces
        name = key.removeprefix("base_model.model.")
        return None if params.get(name) == shape else f"{name}: adapter {shape}, base {params.get(name)}"
    module = modules.get(match["module"])
    module = getattr(module, "base_layer", module)  # a module that already carries LoRA layers (a served base)
    if isinstance(module, nn.Linear):
        fan_in, fan_out = module.in_features, module.out_features
    elif isinstance(module, nn.Embedding):
        fan_in, fan_out = module.num_embeddings, module.embedding_dim
    else:
        return f"{match['module']}: no such linear or embedding module in the base"
    # A is (r, fan_in) and B is (fan_out, r).
    expected, got = (fan_in, shape[1]) if match["side"] == "A" else (fan_out, shape[0])
    return None if len(shape) == 2 and got == expected else f"{key}: shape {shape}, base module is {fan_in} -> {fan_out}"


def attach(model: PreTrainedModel, adapter: Adapter) -> PeftModel:
    try:
        return PeftModel.from_pretrained(model, str(adapter.path))
    except (ValueError, RuntimeError, KeyError) as err:
        raise ExportError(f"cannot load adapter {adapter.path}: {err}") from err


def save_hf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dst: Path) -> None:
    """safetensors + config + generation config + tokenizer (with its chat template): a directory any HF tool loads."""
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)


def save_bnb4(hf_dir: Path, tokenizer: PreTrainedTokenizerBase, dst: Path) -> PreTrainedModel:
    """The merged model as a bitsandbytes NF4 checkpoint (for GPUs); returns the quantized model for verification."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        nf4 = nf4_config(torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=nf4, device_map={"": device})
    except (RuntimeError, NotImplementedError, ImportError, ValueError) as err:
        raise ExportError(f"bnb4: bitsandbytes cannot quantize on {device} here: {err}") from err
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return model
