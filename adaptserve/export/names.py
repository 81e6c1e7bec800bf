"""Names an export and the server's export cache agree on: the report file, the base an adapter goes on, the stem."""

from __future__ import annotations

from pathlib import Path

from adaptserve.export.adapter import Adapter
from adaptserve.export.config import ExportConfig
from adaptserve.models import DEFAULT_MODEL

REPORT = "export_report.json"  # written last by every export: its presence says the export is whole


def base_ref(config: ExportConfig, adapter: Adapter) -> str:
    """The base to merge into: the configured one, else the one the adapter records, else the default model."""
    return config.base_model or adapter.recorded_base or DEFAULT_MODEL


def default_name(config: ExportConfig) -> str:
    """The exports' file name stem when none is configured: the adapter directory's name."""
    return Path(config.adapter).resolve().name
