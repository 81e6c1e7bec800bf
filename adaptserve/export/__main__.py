"""`python -m adaptserve.export --adapter runs/train --formats hf gguf --quants q8_0 q4_k_m`: flags are ExportConfig's fields."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from adaptserve.cli import add_config_args, config_from_args
from adaptserve.export import ExportConfig, ExportError, export

log = logging.getLogger("adaptserve.export")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaptserve.export", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    add_config_args(parser, ExportConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = export(config_from_args(ExportConfig, args))
    except ExportError as err:
        log.error("%s", err)
        return 2
    log.info("report: %s", f"{report.output_dir}/export_report.json")
    return 0


raise SystemExit(main())
