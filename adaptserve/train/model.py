"""The model being trained: the base model, wrapped for the method (LoRA, QLoRA or full fine-tuning)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

from adaptserve.models import UnknownModelError, hf
from adaptserve.train.config import TrainConfig, TrainError

log = logging.getLogger(__name__)

Model = PreTrainedModel | PeftModel


def _base_dir(ref: str) -> str:
    """`adaptserve.models.hf.base_dir`, an unknown reference failing as a TrainError."""
    try:
        return hf.base_dir(ref)
    except UnknownModelError as err:
        raise TrainError(str(err)) from err


def load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(_base_dir(ref))
    except OSError as err:  # a hub id that is not in the local cache, with the hub offline or unreachable
        raise TrainError(f"cannot load the tokenizer of {ref!r}: {err}") from err
    if tokenizer.pad_token_id is None:  # padding is never attended to or scored, any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: TrainConfig, device: torch.device, bf16: bool) -> Model:
    """The base model prepared for `config.method`: trainable parameters in fp32, frozen ones in bf16 if `bf16`."""
    path = _base_dir(config.base_model)
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
        return hf.nf4_config(compute_dtype)
    except hf.MissingPackageError as err:
        raise TrainError(f"method 'qlora': {err}") from err


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
