"""ServeConfig: everything `adaptserve serve` takes; each field is also a flag of `adaptserve serve`."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp

from adaptserve.models import ADAPTER_QUANTS, AUTO, UnknownModelError, default_models, resolve
from adaptserve.serve.engine import DEFAULT_CTX, DEFAULT_PREFILL_CHUNK, DEFAULT_SLOTS
from adaptserve.serve.kvslots import DEFAULT_KV_CACHE, KV_CACHE_TYPES

BACKENDS = ("auto", "llama.cpp", "transformers")
PRECISIONS = ("auto", "nf4", "bf16", "fp32")  # how the transformers backend holds a base's weights
_TRANSFORMERS_DEPS = ("torch", "transformers", "peft")


class ServeConfigError(ValueError):
    """A server that cannot start as configured; the message lists every bad field."""


@dataclass
class ServeConfig:
    """`create_app(ServeConfig(...))` is `adaptserve serve` from Python."""

    models: list[str] = field(
        default_factory=default_models,
        metadata={
            "help": "models to serve: built-in names, shipped adapters (name@quant picks the form), .gguf files, "
            "Hugging Face or adapter directories, or hub ids; the first answers requests that name no model"
        },
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "TCP port to listen on"})
    n_ctx: int = field(default=DEFAULT_CTX, metadata={"help": "context window of each slot, in tokens (prompt + completion)"})
    n_threads: int | None = field(default=None, metadata={"help": "CPU threads per model; unset: one per physical core"})
    max_tokens_cap: int = field(
        default=2048, metadata={"help": "largest max_tokens a request may ask for; also the cap when it asks for none"}
    )
    queue_size: int = field(
        default=64, metadata={"help": "requests that may wait per model while all its slots are busy; more get a 503"}
    )
    n_slots: int = field(default=DEFAULT_SLOTS, metadata={"help": "requests per model decoded together (continuous batching)"})
    prefill_chunk: int = field(
        default=DEFAULT_PREFILL_CHUNK,
        metadata={"help": "prompt tokens a decode step takes beside the running sequences (llama.cpp backend)"},
    )
    kv_cache: str = field(
        default=DEFAULT_KV_CACHE,
        metadata={
            "help": "how the llama.cpp backend stores each slot's K/V: q8_0, or f16 at twice the memory for faster "
            "prompt processing (docs/serving.md, 'The K/V cache type')"
        },
    )
    ui: bool = field(default=True, metadata={"help": "serve the Gradio chat and FinQA UI at /ui"})
    adapter_quant: str = field(
        default=AUTO,
        metadata={
            "help": "how llama.cpp serves an adapter: lora, its LoRA applied at run time to its base's weights, "
            "which a served base shares (one copy in memory); or merged into its base and quantized to f16, q8_0 "
            "or q4_k_m (once, then cached; faster to decode, a second copy of the weights); auto: lora where the "
            "base is served too, else q4_k_m. One adapter can pick its own with a suffix: name@q8_0"
        },
    )
    backend: str = field(
        default="auto",
        metadata={
            "help": "auto, llama.cpp or transformers; auto: transformers (4-bit NF4, adapters unmerged) with "
            "CUDA, llama.cpp without"
        },
    )
    adapter_dir: list[str] = field(
        default_factory=list,
        metadata={
            "help": "directories POST /admin/adapters may load adapters from (transformers backend); none: runtime loading is off"
        },
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "transformers backend: how the base is held, nf4, bf16 or fp32; auto: nf4 on CUDA, fp32 on CPU "
            "(a request's greedy text is the same alone and in a mixed batch in fp32 only; bf16 is faster where the "
            "CPU computes it natively, without that promise)"
        },
    )
    api_keys: list[str] = field(
        default_factory=list,
        repr=False,  # never in a log line or a traceback
        metadata={
            "flag": "--api-key",
            "help": "require 'Authorization: Bearer KEY' on /v1/* and /admin/*; repeat for several keys, or set "
            "$ADAPTSERVE_API_KEYS (comma-separated). /health, /metrics and the /ui are not behind it",
        },
    )
    cors_origins: list[str] = field(
        default_factory=list,
        metadata={"flag": "--cors-origin", "help": "a browser origin allowed to call the API (CORS); repeatable"},
    )
    max_body_bytes: int = field(
        default=1 << 20, metadata={"help": "largest request body in bytes; a larger one gets a 413 before it is read"}
    )
    request_timeout: float = field(
        default=300.0,
        metadata={"help": "seconds from queueing to the last token; past it the request is cancelled (0: no limit)"},
    )
    shutdown_timeout: float = field(
        default=10.0,
        metadata={"help": "seconds running requests get to finish after SIGTERM; then they fail cleanly"},
    )

    ray: str | None = field(
        default=None,
        metadata={
            "flag": "--ray",
            "const": "local",
            "help": "serve as Ray Serve deployments on the Ray cluster at ADDRESS (auto: the one `ray start` began "
            "on this node); --ray alone starts a local cluster (docs/cluster.md)",
        },
    )
    replicas: int = field(default=1, metadata={"help": "with --ray: model replicas, each holding the base model"})
    min_replicas: int | None = field(
        default=None, metadata={"help": "with --ray: autoscale from this many replicas (needs --max-replicas)"}
    )
    max_replicas: int | None = field(
        default=None, metadata={"help": "with --ray: autoscale up to this many replicas; set, it replaces --replicas"}
    )
    target_ongoing_requests: float = field(
        default=4.0, metadata={"help": "with --ray and autoscaling: ongoing requests per replica the autoscaler aims at"}
    )
    max_models_per_replica: int = field(
        default=2,
        metadata={
            "help": "with --ray: models besides the base (which stays resident) a replica holds; the least recently "
            "used is unloaded to load another"
        },
    )

    def validate(self) -> None:
        """Fail before any model loads, naming every bad field at once."""
        errors = [message for ok, message in self._checks() if not ok]
        errors += self._model_errors()
        if errors:
            raise ServeConfigError("; ".join(errors))

    def _checks(self) -> list[tuple[bool, str]]:
        max_slots = llama_cpp.llama_max_parallel_sequences()
        return [
            (1 <= self.port <= 65535, f"port must be between 1 and 65535, got {self.port}"),
            (bool(self.host), "host must not be empty"),
            (self.n_ctx > 0, f"n_ctx must be positive, got {self.n_ctx}"),
            (self.n_threads is None or self.n_threads > 0, f"n_threads must be positive, got {self.n_threads}"),
            (self.max_tokens_cap > 0, f"max_tokens_cap must be positive, got {self.max_tokens_cap}"),
            (self.queue_size > 0, f"queue_size must be positive, got {self.queue_size}"),
            (1 <= self.n_slots <= max_slots, f"n_slots must be between 1 and {max_slots}, got {self.n_slots}"),
            (self.prefill_chunk > 0, f"prefill_chunk must be positive, got {self.prefill_chunk}"),
            (self.kv_cache in KV_CACHE_TYPES, f"kv_cache must be one of {list(KV_CACHE_TYPES)}, got {self.kv_cache!r}"),
            (
                self.adapter_quant in (AUTO, *ADAPTER_QUANTS),
                f"adapter_quant must be one of {[AUTO, *ADAPTER_QUANTS]}, got {self.adapter_quant!r}",
            ),
            (self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}"),
            (
                self.backend != "transformers" or all(importlib.util.find_spec(m) for m in _TRANSFORMERS_DEPS),
                "backend transformers needs torch, transformers and peft: pip install 'adaptserve[train]'",
            ),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (all(Path(d).is_dir() for d in self.adapter_dir), f"adapter_dir must name directories, got {self.adapter_dir}"),
            (all(self.api_keys), "an API key must not be empty"),
            (self.max_body_bytes > 0, f"max_body_bytes must be positive, got {self.max_body_bytes}"),
            (self.request_timeout >= 0, f"request_timeout must be >= 0, got {self.request_timeout}"),
            (self.shutdown_timeout >= 0, f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}"),
            *self._ray_checks(),
        ]

    def _ray_checks(self) -> list[tuple[bool, str]]:
        lo, hi = self.min_replicas, self.max_replicas
        return [
            (self.ray is None or bool(self.ray), "ray must name a cluster address"),
            (
                self.ray is None or importlib.util.find_spec("ray") is not None,
                "--ray needs Ray Serve: pip install 'adaptserve[ray]'",
            ),
            (self.replicas >= 1, f"replicas must be positive, got {self.replicas}"),
            (lo is None or hi is not None, "min_replicas needs max_replicas"),
            (hi is None or hi >= 1, f"max_replicas must be positive, got {hi}"),
            (lo is None or hi is None or 0 <= lo <= hi, f"min_replicas must be between 0 and max_replicas, got {lo}"),
            (self.target_ongoing_requests > 0, f"target_ongoing_requests must be positive, got {self.target_ongoing_requests}"),
            (self.max_models_per_replica >= 1, f"max_models_per_replica must be positive, got {self.max_models_per_replica}"),
        ]

    def _model_errors(self) -> list[str]:
        """resolve() names files and checks they exist; it loads nothing."""
        if not self.models:
            return ["models must name at least one model"]
        errors = []
        for ref in self.models:
            try:
                resolve(ref)
            except UnknownModelError as err:
                errors.append(str(err))
        return errors
