"""The export run: adapter -> merged float32 model -> each requested format, each verified -> moved into place.

Everything is built in a hidden staging directory inside the output directory and `os.replace`d into place only
once every format is written and checked, export_report.json last; a failure before that deletes the staging
directory, leaving no half-written file and any earlier export untouched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from adaptserve import finqa
from adaptserve.export import gguf, merge, native, verify
from adaptserve.export.adapter import read_adapter
from adaptserve.export.config import ExportConfig
from adaptserve.export.names import REPORT, base_ref, default_name
from adaptserve.models import resolve
from adaptserve.models.prompt import eos_ids

log = logging.getLogger(__name__)


@dataclass
class ArtifactReport:
    format: str  # hf | gguf | bnb4 | lora-gguf
    quant: str | None  # the GGUF type, for gguf
    path: str
    bytes: int
    seconds: float  # time to produce it: merge + save, conversion, quantization
    exact: float | None = None  # fraction of prompts whose first N greedy tokens equal the unmerged adapter's
    mean_prefix: float | None = None  # mean tokens agreeing with the unmerged adapter before the first difference
    prefix_lengths: list[int] = field(default_factory=list)
    tokenizer_match: bool | None = None  # gguf: llama.cpp tokenizes every prompt to the Hugging Face ids


@dataclass
class ExportReport:
    adapter: str
    base_model: str
    output_dir: str
    verify_tokens: int
    verify_prompts: int
    adapter_changes_output: int | None  # prompts where the adapter's greedy output differs from the bare base's
    seconds: float
    artifacts: list[ArtifactReport]


@dataclass(frozen=True)
class _Reference:
    prompts: list[verify.Prompt]
    tokens: list[list[int]]  # the unmerged adapter's greedy output per prompt


def export(config: ExportConfig) -> ExportReport:
    """Merge `config.adapter` into its base and write every format of `config.formats` to `config.output_dir`."""
    config.validate()
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    adapter = read_adapter(Path(config.adapter))
    base = base_ref(config, adapter)
    model, base_location = merge.load_base(base)
    merge.check_fits(model, adapter, base)
    tokenizer = merge.load_tokenizer(adapter, base_location)
    eos = eos_ids(model, tokenizer)
    adapted = merge.attach(model, adapter)
    reference, changed = _reference(adapted, tokenizer, config, eos) if config.verify_tokens else (None, None)

    name, out = config.name or default_name(config), Path(config.output_dir).resolve()
    artifacts: list[tuple[Path, ArtifactReport]] = []
    with _staging(out) as stage:
        tick = time.perf_counter()
        merge.save_hf(adapted.merge_and_unload(), tokenizer, stage / "hf")
        del adapted, model  # the exports are checked from disk from here on
        log.info("merged and saved in %.1fs", time.perf_counter() - tick)
        if "hf" in config.formats:
            artifacts.append(_hf_artifact(stage / "hf", out, time.perf_counter() - tick, reference, config, eos))
        if "gguf" in config.formats:
            artifacts += _gguf_artifacts(stage, out, name, tokenizer.chat_template, reference, config, eos)
        if "bnb4" in config.formats:
            artifacts.append(_bnb4_artifact(stage, out, tokenizer, reference, config, eos))
        if "lora-gguf" in config.formats:
            artifacts.append(_lora_gguf_artifact(adapter.path, base, stage, out, name, reference, config, eos))
        report = ExportReport(
            str(adapter.path.resolve()),
            base,
            str(out),
            config.verify_tokens,
            len(reference.prompts) if reference else 0,
            changed,
            time.perf_counter() - started,
            [a for _, a in artifacts],
        )
        (stage / REPORT).write_text(json.dumps(dataclasses.asdict(report), indent=2) + "\n", encoding="utf-8")
        for staged, artifact in artifacts:
            _publish(staged, Path(artifact.path), stage)
        _publish(stage / REPORT, out / REPORT, stage)  # last: its presence says the artifacts beside it are complete
    log.info("exported %s to %s in %.1fs", adapter.path, out, report.seconds)
    return report


def _reference(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, config: ExportConfig, eos: set[int]
) -> tuple[_Reference, int]:
    """The unmerged adapter's greedy tokens (what every export must reproduce), and on how many prompts the
    adapter changes the base's output: if on none, agreement would say nothing about the merge."""
    conversations = [[{"role": "user", "content": p}] for p in config.verify_prompts] or verify.default_messages(
        finqa.adapter_style(Path(config.adapter))
    )
    prompts = verify.encode(tokenizer, conversations)
    tokens = verify.greedy_hf(model, prompts, config.verify_tokens, eos)
    with model.disable_adapter():
        bare = verify.greedy_hf(model, prompts, config.verify_tokens, eos)
    changed = sum(t != b for t, b in zip(tokens, bare, strict=True))
    if not changed:
        log.warning("the adapter does not change the base's greedy output on any verify prompt")
    return _Reference(prompts, tokens), changed


def _hf_artifact(
    staged: Path, out: Path, seconds: float, reference: _Reference | None, config: ExportConfig, eos: set[int]
) -> tuple[Path, ArtifactReport]:
    artifact = ArtifactReport("hf", None, str(out / staged.name), _size(staged), seconds)
    if reference:
        _score(artifact, reference, verify.greedy_hf(_load_hf(staged), reference.prompts, config.verify_tokens, eos))
    return staged, artifact


def _load_hf(path: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _gguf_artifacts(
    stage: Path,
    out: Path,
    name: str,
    chat_template: str | None,
    reference: _Reference | None,
    config: ExportConfig,
    eos: set[int],
) -> list[tuple[Path, ArtifactReport]]:
    f16 = stage / f"{name}-f16.gguf"
    tick = time.perf_counter()
    gguf.convert(stage / "hf", f16, name)
    seconds = {"f16": time.perf_counter() - tick}
    artifacts = []
    for quant in config.quants:
        path = stage / f"{name}-{quant}.gguf"
        if quant != "f16":
            tick = time.perf_counter()
            native.quantize(f16, path, quant, config.threads)
            seconds[quant] = time.perf_counter() - tick
        gguf.check_gguf(path, chat_template, eos)
        artifact = ArtifactReport("gguf", quant, str(out / path.name), _size(path), seconds[quant])
        if reference:
            tokens, artifact.tokenizer_match = verify.greedy_gguf(
                path, reference.prompts, config.verify_tokens, eos, config.threads
            )
            if not artifact.tokenizer_match:
                log.warning("%s: llama.cpp tokenizes the verify prompts differently from the trained tokenizer", path.name)
            _score(artifact, reference, tokens)
        log.info("gguf %s: %.1f MB in %.1fs", quant, artifact.bytes / 1e6, artifact.seconds)
        artifacts.append((path, artifact))
    return artifacts


def _bnb4_artifact(
    stage: Path, out: Path, tokenizer: PreTrainedTokenizerBase, reference: _Reference | None, config: ExportConfig, eos: set[int]
) -> tuple[Path, ArtifactReport]:
    tick = time.perf_counter()
    model = merge.save_bnb4(stage / "hf", tokenizer, stage / "bnb4")
    artifact = ArtifactReport("bnb4", None, str(out / "bnb4"), _size(stage / "bnb4"), time.perf_counter() - tick)
    if reference:
        _score(artifact, reference, verify.greedy_hf(model, reference.prompts, config.verify_tokens, eos))
    return stage / "bnb4", artifact


def _lora_gguf_artifact(
    adapter: Path,
    base: str,
    stage: Path,
    out: Path,
    name: str,
    reference: _Reference | None,
    config: ExportConfig,
    eos: set[int],
) -> tuple[Path, ArtifactReport]:
    """The adapter alone; verified by llama.cpp applying it to the base's GGUF, where the base is one."""
    path = stage / f"{name}-lora.gguf"
    tick = time.perf_counter()
    gguf.convert_lora(adapter, stage / "hf", path)  # the merged directory has the base's config and tensor names
    artifact = ArtifactReport("lora-gguf", None, str(out / path.name), _size(path), time.perf_counter() - tick)
    spec = resolve(base)
    if reference and spec.format == "gguf":
        tokens, artifact.tokenizer_match = verify.greedy_gguf(
            spec.path, reference.prompts, config.verify_tokens, eos, config.threads, lora=path
        )
        _score(artifact, reference, tokens)
    elif reference:
        log.info("lora-gguf: the base %s is not a GGUF; llama.cpp needs one to apply the adapter to, not verified", base)
    return path, artifact


def _score(artifact: ArtifactReport, reference: _Reference, tokens: list[list[int]]) -> None:
    agreement = verify.agreement(reference.tokens, tokens)
    artifact.exact, artifact.mean_prefix = agreement.exact, agreement.mean_prefix
    artifact.prefix_lengths = agreement.prefix_lengths
    log.info(
        "%s%s agrees with the adapter on %.0f%% of prompts, %.1f tokens on average",
        artifact.format,
        f" {artifact.quant}" if artifact.quant else "",
        100 * agreement.exact,
        agreement.mean_prefix,
    )


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden temp directory inside `out` (same filesystem, so os.replace is a rename), always removed."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".export-"))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with suppress(OSError):  # only if still empty
                out.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)


def _publish(staged: Path, final: Path, stage: Path) -> None:
    """Move a staged artifact into place. rename cannot replace a non-empty directory, so an older one is
    first moved into the staging directory, which is deleted afterwards."""
    if final.is_dir():
        os.replace(final, stage / f".old-{final.name}")
    os.replace(staged, final)
