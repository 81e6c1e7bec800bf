"""Command line: one sub-command per config dataclass; each flag is a field of that dataclass.

`adaptserve serve --models smollm2-135m --port 8000` is `serve(ServeConfig(models=[...], port=8000))`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from adaptserve.models import BUILTINS, UnknownModelError

log = logging.getLogger("adaptserve")


def _base_type(tp: Any) -> Any:
    """int | None -> int; list[str] -> list[str] stays (handled by the caller)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_config_args(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """A flag per field: --field-name, or the field's metadata "flag"; a list field with its own (singular) flag
    is repeatable, `--api-key A --api-key B`, where other lists take their items after one flag."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        tp = _base_type(hints[f.name])
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "hidden" if not f.repr else default  # secrets (repr=False) stay out of --help too
        # argparse %-formats help strings, so a literal "%" in a field's help would crash --help
        help_text = (f.metadata.get("help", "") + f" (default: {shown})").replace("%", "%%")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text, dest=f.name)
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            # a "flag" in metadata names one value per use (--api-key a --api-key b); otherwise several per use,
            # and repeatable too (--adapter-dir a --adapter-dir b). None: the field's default applies
            single = "flag" in f.metadata
            action, nargs = ("append", None) if single else ("extend", "+")
            parser.add_argument(flag, type=item, nargs=nargs, action=action, default=None, help=help_text, dest=f.name)
        elif "const" in f.metadata:  # the flag alone means `const`: `--ray` or `--ray ADDRESS`
            parser.add_argument(flag, type=tp, nargs="?", const=f.metadata["const"], default=default, help=help_text, dest=f.name)
        else:
            parser.add_argument(flag, type=tp, default=default, help=help_text, dest=f.name)


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)}
    return config_cls(**{name: value for name, value in given.items() if value is not None})


def _serve(args: argparse.Namespace) -> None:
    from adaptserve.serve import ServeConfig, serve

    serve(config_from_args(ServeConfig, args))


def _train(args: argparse.Namespace) -> None:
    from adaptserve.train import TrainConfig, train

    report = train(config_from_args(TrainConfig, args))
    log.info(
        "adapter written to %s (final loss %.4f, %.0f tokens/s)", report.output_dir, report.final_loss, report.tokens_per_second
    )


def _export(args: argparse.Namespace) -> None:
    from adaptserve.export import ExportConfig, export

    report = export(config_from_args(ExportConfig, args))
    log.info("exports written to %s", report.output_dir)


def _bench(args: argparse.Namespace) -> None:
    from adaptserve.bench import BenchConfig, bench

    config = config_from_args(BenchConfig, args)
    bench(config)
    log.info("report in %s", Path(config.out) / "report.md")


def _models(_: argparse.Namespace) -> None:
    for name, builtin in BUILTINS.items():
        sys.stdout.write(f"{name:16} {builtin.description}\n")


def build_parser() -> argparse.ArgumentParser:
    from adaptserve.bench.config import BenchConfig
    from adaptserve.export.config import ExportConfig
    from adaptserve.serve.config import ServeConfig
    from adaptserve.train.config import TrainConfig

    parser = argparse.ArgumentParser(prog="adaptserve", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: list[tuple[str, str, type | None, Callable[[argparse.Namespace], None]]] = [
        ("train", "train a LoRA/QLoRA adapter (or fully fine-tune) on FinQA or instruction data", TrainConfig, _train),
        ("export", "merge an adapter into its base and write HF, GGUF (f16/q8_0/q4_k_m) or 4-bit exports", ExportConfig, _export),
        ("serve", "serve models over an OpenAI-compatible HTTP API with a chat UI at /ui", ServeConfig, _serve),
        ("bench", "base vs adapted: FinQA accuracy, evaluation prompts, latency and throughput over HTTP", BenchConfig, _bench),
        ("models", "list the built-in models", None, _models),
    ]
    for name, help_text, config_cls, run in commands:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if config_cls is not None:
            add_config_args(cmd, config_cls)
        cmd.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except (UnknownModelError, FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    return 0
