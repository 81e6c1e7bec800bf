"""BenchConfig: what `adaptserve bench` measures and where it writes; each field is also a flag."""

from __future__ import annotations

from dataclasses import dataclass, field

from adaptserve.bench.accuracy import mode_options
from adaptserve.models import default_models
from adaptserve.serve.kvslots import DEFAULT_KV_CACHE, kv_cache_kwargs

LLAMA_CPP = "llama.cpp"
PRECISION = {"transformers-nf4": "nf4", "transformers-bf16": "bf16", "transformers-fp32": "fp32"}  # -> serve --precision
BACKENDS = (LLAMA_CPP, *PRECISION)
GPU_BACKENDS = ("transformers-nf4", "transformers-bf16")  # what `auto` adds where CUDA is


def variant(model: str, backend: str) -> str:
    """A model on a backend, as files and report rows name it: the model alone for GGUF on llama.cpp (or `--url`)."""
    return model if backend in (LLAMA_CPP, "url") else f"{model}.{backend}"


class BenchError(ValueError):
    """A bench run that cannot start: bad config, unreadable inputs, a server that does not answer."""


@dataclass
class BenchConfig:
    models: list[str] = field(
        default_factory=default_models,
        metadata={"help": "variants to compare: model ids (base and adapted; an adapter@q8_0 or @f16 picks its GGUF type)"},
    )
    finqa: str = field(default="sample@test", metadata={"help": "FinQA file for accuracy, or sample@SPLIT (the shipped sample)"})
    limit: int | None = field(default=None, metadata={"help": "first N FinQA records (default: all)"})
    prompts: str = field(
        default="builtin",
        metadata={"help": "evaluation prompt JSONL (id, prompt, optional expect_any and reference); builtin: the shipped set"},
    )
    backends: list[str] = field(
        default_factory=lambda: ["auto"],
        metadata={
            "help": f"{', '.join(BACKENDS)}; auto: {LLAMA_CPP}, plus {' and '.join(GPU_BACKENDS)} where CUDA is "
            "(reported as skipped where not). A transformers backend named here runs on CPU too"
        },
    )
    url: str | None = field(
        default=None, metadata={"help": "an OpenAI-compatible server to load-test; unset: start our own on loopback"}
    )
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8], metadata={"help": "client counts to load-test at"})
    requests: int = field(default=16, metadata={"help": "requests per concurrency level (at least the concurrency)"})
    max_tokens: int = field(default=64, metadata={"help": "output tokens per load-test and prompt-set request"})
    pp: int = field(default=512, metadata={"help": "prompt tokens of the llama-bench style prompt-processing test"})
    tg: int = field(default=128, metadata={"help": "tokens of the llama-bench style generation test"})
    repeats: int = field(default=3, metadata={"help": "repeats of the pp/tg tests (mean and spread reported)"})
    threads: int | None = field(default=None, metadata={"help": "llama.cpp threads, for our server and in-process runs"})
    kv_cache: str = field(
        default=DEFAULT_KV_CACHE,
        metadata={"help": "K/V cache type (serve --kv-cache) of our llama.cpp server, and of every in-process run beside it"},
    )
    ppl: str | None = field(
        default=None,
        metadata={"help": "text file for each variant's perplexity, measured as llama-perplexity does (unset: skip)"},
    )
    ppl_ctx: int = field(default=512, metadata={"help": "tokens per perplexity chunk; the second half of each is scored"})
    ppl_chunks: int | None = field(
        default=None, metadata={"help": "score only the first N chunks, as llama-perplexity's --chunks (default: all)"}
    )
    accuracy: bool = field(default=True, metadata={"help": "measure FinQA accuracy (in process, as the server prompts)"})
    finqa_modes: list[str] = field(
        default_factory=lambda: ["greedy", "grammar", "vote-5", "vote-8"],
        metadata={
            "help": "how FinQA questions are answered, side by side: greedy (free decoding), grammar (held to FinQA's "
            "program grammar), vote-K (K programs, majority answer, vote share as confidence)"
        },
    )
    normalize: bool = field(
        default=True, metadata={"help": "rewrite report-style numbers into FinQA's form first, as /v1/finqa does"}
    )
    out: str = field(default="runs/bench", metadata={"help": "where results.json, report.md and the plots go"})

    def validate(self) -> None:
        errors = []
        if not self.models:
            errors.append("models must name at least one model")
        if unknown := [b for b in self.backends if b not in (*BACKENDS, "auto")]:
            errors.append(f"unknown backends {unknown}: choose from auto, {', '.join(BACKENDS)}")
        if self.url and self.backends != ["auto"]:
            errors.append("backends: --url measures that one server over HTTP; leave backends at auto")
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            errors.append(f"concurrency levels must be positive, got {self.concurrency}")
        if self.requests < 1 or self.max_tokens < 1:
            errors.append("requests and max_tokens must be positive")
        if self.pp < 1 or self.tg < 1 or self.repeats < 2:
            errors.append("pp and tg must be positive and repeats at least 2 (for a spread)")
        if self.limit is not None and self.limit < 1:
            errors.append(f"limit must be positive, got {self.limit}")
        for mode in self.finqa_modes:
            try:
                mode_options(mode)
            except ValueError as err:
                errors.append(str(err))
        if not self.finqa_modes:
            errors.append("finqa_modes must name at least one mode")
        if self.ppl_ctx < 3:  # a chunk scores ppl_ctx - ppl_ctx // 2 - 1 tokens: none below 3
            errors.append(f"ppl_ctx must be at least 3, got {self.ppl_ctx}")
        if self.ppl_chunks is not None and self.ppl_chunks < 1:
            errors.append(f"ppl_chunks must be positive, got {self.ppl_chunks}")
        if self.threads is not None and self.threads < 1:
            errors.append(f"threads must be positive, got {self.threads}")
        try:
            kv_cache_kwargs(self.kv_cache)
        except ValueError as err:
            errors.append(str(err))
        if errors:
            raise BenchError("; ".join(errors))
