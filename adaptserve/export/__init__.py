"""Export a LoRA adapter for cheap hardware: merged into its base as a Hugging Face directory, GGUF (f16, q8_0,
q4_k_m) for llama.cpp, or a bitsandbytes NF4 checkpoint for GPUs; each export is checked to still generate
what the unmerged adapter generates.

    from adaptserve.export import ExportConfig, export, ensure_gguf
    report = export(ExportConfig(adapter="runs/train", formats=["hf", "gguf"], quants=["q8_0", "q4_k_m"]))
    path = ensure_gguf("runs/train")  # cached merged q4_k_m GGUF, for the server

torch and transformers are imported on first use, so the CLI can list this command's flags without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adaptserve.export.cache import ensure_gguf, served
from adaptserve.export.config import FORMATS, QUANTS, ExportConfig, ExportError

if TYPE_CHECKING:
    from adaptserve.export.pipeline import ExportReport

__all__ = ["FORMATS", "QUANTS", "ExportConfig", "ExportError", "ensure_gguf", "export", "served"]


def export(config: ExportConfig) -> ExportReport:
    """Merge the adapter and write every requested format plus export_report.json; see `pipeline.export`."""
    config.validate()  # before the heavy imports, so a bad flag fails at once
    from adaptserve.export.pipeline import export as run

    return run(config)
