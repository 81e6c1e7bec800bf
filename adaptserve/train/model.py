"""The model being trained: the base model, wrapped for the method (LoRA, QLoRA or full fine-tuning)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from adaptserve.models import UnknownModelError, cache_dir, resolve
from adaptserve.train.config import TrainConfig, TrainError

log = logging.getLogger(__name__)

Model = PreTrainedModel | PeftModel


def base_dir(ref: str) -> str:
    """A Hugging Face directory or hub id for `ref` that `from_pretrained` loads directly.

    A GGUF is dequantized once into a cached copy: parsing the GGUF takes ~20 s on 2 cores, the copy ~1 s.
    """
    try:
        spec = resolve(ref)
    except UnknownModelError as err:
        raise TrainError(str(err)) from err
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


def load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir(ref))
    except OSError as err:  # a hub id that is not in the local cache, with the hub offline or unreachable
        raise TrainError(f"cannot load the tokenizer of {ref!r}: {err}") from err
    if tokenizer.pad_token_id is None:  # padding is never attended to or scored, any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to compute in bf16. "auto" means: where the hardware has it, for speed (an AMX Xeon trained LoRA in
    bf16 at ~480-590 tokens/s, AVX2 EPYCs in fp32 at ~190). A CPU without AVX512-BF16 or AMX emulates it: on an
    AVX2 EPYC, bf16 matmuls ran 50x and a LoRA step 8-16x slower than in fp32.

    What data parallelism promises depends on it: N processes train what one does to 1e-4 (losses and adapter) in
    fp32; in bf16 each process's share of a batch rounds otherwise, and a step's loss differed by 2.4e-3 (AMX) and
    2.8e-3 (emulated) relative from the single process's by the second step (benchmarks/precision.md)."""
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if precision == "bf16" and not native:
        log.warning("this %s has no native bf16: expect training to be many times slower than fp32", device.type)
    return precision == "bf16" or (precision == "auto" and native)


def load_model(config: TrainConfig, device: torch.device, bf16: bool) -> Model:
    """The base model prepared for `config.method`: trainable parameters in fp32, frozen ones in bf16 if `bf16`."""
    path = base_dir(config.base_model)
    frozen_dtype = torch.bfloat16 if bf16 else torch.float32
    if config.method == "qlora":
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=_nf4(frozen_dtype), device_map={"": device})
        # Casts the weights left unquantized (norms, embeddings) to fp32; checkpointing is switched on below.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        dtype = torch.float32 if config.method == "full" else frozen_dtype
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    if config.gradient_checkpointing or config.low_memory:
        # Non-reentrant checkpointing also works when the layer inputs need no grad (frozen embeddings under LoRA).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.method == "full":
        return model
    targets = "all-linear" if config.target_modules == ["all-linear"] else config.target_modules
    lora = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    try:
        # autocast_adapter_dtype keeps the LoRA weights in fp32 on a bf16 base, so AdamW updates stay exact.
        model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    except ValueError as err:  # e.g. a target module the model does not have
        raise TrainError(f"cannot apply LoRA: {err}") from err
    # The adapter names the base as the user did (e.g. smollm2-135m), not by the cache path it was loaded from.
    model.peft_config["default"].base_model_name_or_path = config.base_model
    log.info("trainable parameters: %d of %d", *model.get_nb_trainable_parameters())
    return model


def _nf4(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    try:
        import bitsandbytes  # noqa: F401  (only checked for: transformers imports it itself)
    except ImportError as err:
        raise TrainError("method 'qlora' needs bitsandbytes: pip install bitsandbytes") from err
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype
    )


def save_weights(model: Model, path: Path) -> None:
    """What `save_pretrained` writes: the adapter for LoRA and QLoRA, the whole model for full fine-tuning."""
    if isinstance(model, PeftModel):
        # LoRA never trains the embeddings; saying so spares peft looking the base up by name to check.
        model.save_pretrained(path, save_embedding_layers=False)
    else:
        model.save_pretrained(path)


def causal_lm(model: Model) -> PreTrainedModel:
    """The transformers model under a PEFT wrapper (LoRA layers sit inside it), or the model itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model
