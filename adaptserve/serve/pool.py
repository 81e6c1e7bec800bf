"""The served models by id, on the backend the config picks: loading, runtime adapters, and submitting a request
with the server's error mapping. The HTTP routes and the UI both go through one `ModelPool`."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

from adaptserve import finqa
from adaptserve.models import ModelSpec, resolve
from adaptserve.serve.config import ServeConfig
from adaptserve.serve.engine import (
    Engine,
    EngineBusy,
    Generation,
    InvalidGrammar,
    InvalidPrompt,
    PromptTooLong,
    SamplingParams,
)
from adaptserve.serve.errors import APIError, invalid, overloaded
from adaptserve.serve.metrics import Metrics

if TYPE_CHECKING:
    from adaptserve.serve.hf_engine import HFBase


def pick_backend(choice: str) -> str:
    """The backend `choice` names; auto: transformers where CUDA is, else llama.cpp."""
    if choice != "auto":
        return choice
    return "transformers" if _has_cuda() else "llama.cpp"


def _has_cuda() -> bool:
    if not Path("/proc/driver/nvidia/version").exists():  # no NVIDIA driver: spares importing torch (seconds)
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class ModelPool:
    """The served models by id. Requests can only name these: no path from a request reaches the filesystem.
    `config` is a validated one (ServeConfig.validate); nothing loads until load()."""

    def __init__(self, specs: list[ModelSpec], config: ServeConfig, metrics: Metrics) -> None:
        self.specs, self.config, self.metrics = specs, config, metrics
        self.backend = pick_backend(config.backend)
        self.engines: dict[str, Engine] = {}
        self.finqa_styles: dict[str, finqa.PromptStyle] = {}
        self.bases: dict[str, HFBase] = {}  # transformers backend: one loaded base per base location
        self.adapters: dict[str, HFBase] = {}  # transformers backend: served adapter name -> the base it is on

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def adapter_names(self) -> list[str]:
        """Served names that are LoRA adapters on a shared transformers base (loadable and unloadable)."""
        return list(self.adapters)

    def adapter_source(self, name: str) -> tuple[str, Path]:
        """The base an adapter is served on, and the directory it was loaded from."""
        base = self.adapters[name]
        return base.spec.name, base.adapters[name]

    def load(self) -> None:
        for spec in self.specs:
            self.load_one(spec.name)

    def load_one(self, name: str) -> None:
        """Load the served model `name` unless it is loaded (a Ray Serve replica loads adapters on first use)."""
        spec = next(s for s in self.specs if s.name == name)
        if name in self.engines:
            return
        if self.backend == "transformers":
            self._load_hf(spec)
            return
        from adaptserve.serve.llama_engine import LlamaCppEngine

        engine = LlamaCppEngine(
            self._runnable(spec),
            self.config.n_ctx,
            self.config.n_threads,
            self.config.queue_size,
            n_slots=self.config.n_slots,
            prefill_chunk=self.config.prefill_chunk,
            kv_cache=self.config.kv_cache,
        )
        self.engines[name] = engine
        self.metrics.watch_engine(name, engine)

    def unload(self, name: str, timeout: float) -> None:
        """Stop serving `name` (llama.cpp backend): its requests get `timeout` seconds to finish, then fail cleanly."""
        engine = self.engines.pop(name)
        self.metrics.unwatch_engine(name)
        engine.drain(timeout)
        deadline = time.monotonic() + timeout
        while (engine.slots_busy or engine.queue_depth) and time.monotonic() < deadline:
            time.sleep(0.05)
        engine.close()

    def _runnable(self, spec: ModelSpec) -> ModelSpec:
        """An adapter is served on its base's GGUF as a LoRA GGUF, sharing the base's weights where the base is
        served too, or merged into it (see export.served)."""
        if spec.format != "adapter":
            return spec
        from adaptserve.export import served

        self.finqa_styles[spec.name] = finqa.adapter_style(spec.path)
        bases = [s.location for s in self.specs if s.format == "gguf"]
        return served(spec, self.config.adapter_quant, self.config.n_threads, beside=bases)

    def _load_hf(self, spec: ModelSpec) -> None:
        """A base, or an adapter on the base it records: N adapters of a base cost that base once in memory."""
        from adaptserve.serve.hf_engine import recorded_base

        if spec.format != "adapter":
            self._serve_hf(self._hf_base(spec), spec, None)
            return
        base = self._hf_base(resolve(recorded_base(spec.path)))
        base.load_adapter(spec.name, spec.path)
        self._serve_hf(base, spec, spec.name)

    def _serve_hf(self, base: HFBase, spec: ModelSpec, adapter: str | None) -> None:
        from adaptserve.serve.hf_engine import HFEngine

        if adapter is not None:
            self.finqa_styles[spec.name] = finqa.adapter_style(spec.path)
            self.adapters[spec.name] = base
        self.engines[spec.name] = HFEngine(base, spec, adapter)
        self.metrics.watch_engine(spec.name, self.engines[spec.name])

    def _hf_base(self, spec: ModelSpec) -> HFBase:
        from adaptserve.serve.hf_engine import HFBase

        if spec.location not in self.bases:
            c = self.config
            self.bases[spec.location] = HFBase(spec, c.n_ctx, c.queue_size, c.n_slots, c.n_threads, precision=c.precision)
        return self.bases[spec.location]

    def add_adapter(self, name: str, path: Path) -> None:
        """Serve the adapter at `path` as `name`, on the loaded base it was trained for (runtime loading)."""
        from adaptserve.serve.hf_engine import AdapterError

        if self.backend != "transformers":
            raise AdapterError("adapters load at runtime only on the transformers backend (serve --backend transformers)")
        base = self._base_for(path)
        spec = ModelSpec(name, "adapter", str(path), f"PEFT adapter {path.name}, loaded at runtime")
        base.load_adapter(name, path)
        self._serve_hf(base, spec, name)
        self.specs.append(spec)

    def _base_for(self, path: Path) -> HFBase:
        """The one loaded base, or the one the adapter records; check_adapter then compares shapes."""
        from adaptserve.serve.hf_engine import AdapterError, recorded_base

        if len(self.bases) == 1:
            return next(iter(self.bases.values()))
        recorded = recorded_base(path)
        for base in self.bases.values():
            if recorded in (base.spec.name, base.spec.location):
                return base
        raise AdapterError(f"adapter {path.name} records base {recorded!r}, which this server does not serve")

    def remove_adapter(self, name: str) -> None:
        del self.engines[name]
        base = self.adapters.pop(name)
        self.specs = [s for s in self.specs if s.name != name]
        self.finqa_styles.pop(name, None)
        self.metrics.unwatch_engine(name)
        base.unload_adapter(name)

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        self.engines.clear()

    def start(self, engine: Engine, prompt: list[int], params: SamplingParams) -> Generation:
        """Submit with the server's error mapping: a too-long prompt is the client's fault, a full queue is not."""
        if params.max_tokens is None:  # "up to the end of the context", but never past the server's cap
            room = max(engine.n_ctx - len(prompt), 0)  # 0 lets budget() raise the context error
            params = dataclasses.replace(params, max_tokens=min(room, self.config.max_tokens_cap) or None)
        try:
            # /metrics counts every finished generation, whoever asked for it (HTTP or UI)
            return engine.submit(
                prompt, params, lambda f: self.metrics.record_generation(engine.name, f), self.config.request_timeout
            )
        except PromptTooLong as err:
            raise invalid(str(err), "context_length_exceeded", "messages") from None
        except InvalidPrompt as err:
            raise invalid(str(err), param="prompt") from None
        except InvalidGrammar as err:
            raise invalid(str(err), "invalid_grammar", "grammar") from None
        except EngineBusy as err:
            raise overloaded(err) from None

    def drain(self, timeout: float) -> None:
        for engine in self.engines.values():
            engine.drain(timeout)

    def finqa_style(self, name: str) -> finqa.PromptStyle:
        return self.finqa_styles.get(name, finqa.BASE_STYLE)

    def get(self, name: str | None) -> Engine:
        return self.engines[self.spec(name).name]

    def spec(self, name: str | None) -> ModelSpec:
        """The served model `name` (the first when None), or a 404 that lists the served ones."""
        name = name or self.names[0]
        for spec in self.specs:
            if spec.name == name and name in self.engines:
                return spec
        raise APIError(
            404,
            f"model {name!r} does not exist; served models: {self.names}",
            "invalid_request_error",
            "model_not_found",
            "model",
        )
