"""An adapter directory as export reads it: its files checked, its tensor shapes and the base it records.

Torch-free (safetensors headers are read as numpy), so the server can look up a cached export without importing
torch; merging, which needs torch, lives in `merge`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from adaptserve.export.config import ExportError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAIN_REPORT = "train_report.json"
# PEFT saves LoRA factors as base_model.model.<module>.lora_A.weight (lora_embedding_A for embeddings).
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?:embedding_)?(?P<side>[AB])(?:\.weight)?$")


@dataclass(frozen=True)
class Adapter:
    path: Path
    recorded_base: str | None  # the base the adapter says it was trained on, if it says
    shapes: dict[str, tuple[int, ...]]  # tensor name in the safetensors file -> shape


def read_adapter(path: Path, weights: bool = True) -> Adapter:
    """Check the adapter's files are there and readable; a truncated or corrupt file fails here, not mid-export.
    `weights=False` reads the config and the recorded base only (no shapes): what serving a LoRA GGUF needs."""
    if not (path / ADAPTER_CONFIG).is_file():
        raise ExportError(f"{path}: not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    config = _read_json(path / ADAPTER_CONFIG)
    if config.get("peft_type") != "LORA":
        raise ExportError(f"{path}: only LoRA adapters can be exported, this one is {config.get('peft_type')!r}")
    report = path / TRAIN_REPORT
    recorded = (_read_json(report).get("base_model") if report.is_file() else None) or config.get("base_model_name_or_path")
    return Adapter(path, recorded, _shapes(path / ADAPTER_WEIGHTS) if weights else {})


def _shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    if not weights.is_file():
        raise ExportError(
            f"{weights.parent}: adapter weights {ADAPTER_WEIGHTS} are missing (an installed package carries a shipped "
            "adapter's LoRA GGUF only: serve it as @lora, or export from a repository checkout)"
        )
    try:  # the header lists every tensor's byte range, so a truncated file fails to open
        with safe_open(str(weights), framework="numpy") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ExportError(f"{weights}: unreadable, truncated or corrupt ({err})") from err
    if not any(LORA_KEY.match(key) for key in shapes):
        raise ExportError(f"{weights}: holds no LoRA weights")
    return shapes


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: unreadable ({err})") from err
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return data
