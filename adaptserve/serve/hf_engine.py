"""transformers engine: one base model in memory, any number of LoRA adapters on it, picked per request.

`HFBase` owns the model, the tokenizer, one request queue and a worker thread. Every served name (the base itself,
each adapter) is an `HFEngine`: a thin view that tags its requests with its adapter and otherwise presents the
same `Engine` interface as `LlamaCppEngine`, so the HTTP layer cannot tell the backends apart. N adapters cost one base
in memory, as in LoRAX or vLLM's multi-LoRA.

Batching is static: the worker takes up to `n_slots` waiting requests, left-pads their prompts into one prefill,
then decodes them together, one token per row per forward pass, until each has finished; finished rows leave the
batch (and the KV cache) at once. A batch may mix the base and several adapters: the batch's adapters are all
active, and each one's input is masked to its own rows (`HFBase.route`), so every row gets its own adapter in the
same forward pass.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch.utils.hooks import RemovableHandle
from transformers import AutoModelForCausalLM, AutoTokenizer, Cache, PreTrainedModel

from adaptserve.export.adapter import read_adapter
from adaptserve.export.config import ExportError
from adaptserve.export.merge import check_fits
from adaptserve.models import BUILTINS, ModelSpec
from adaptserve.models.hf import base_dir, nf4_config
from adaptserve.models.prompt import adds_bos, eos_ids, hf_template, render
from adaptserve.serve.config import PRECISIONS
from adaptserve.serve.engine import (
    DEFAULT_CTX,
    DEFAULT_SLOTS,
    SHUTTING_DOWN,
    Engine,
    Failed,
    Finished,
    Generation,
    InvalidGrammar,
    Job,
    JobQueue,
    Output,
    SamplingParams,
    TokenLogprob,
    WindowDetokenizer,
    completion_budget,
    logprobs_of,
)

log = logging.getLogger(__name__)

# After the first request of a batch arrives, wait this long for others sent at the same moment: a whole batch
# runs for seconds, and without it concurrent clients that resubmit together get split into lopsided batches.
GATHER_SECONDS = 0.01
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterError(ValueError):
    """An adapter that cannot be served on this base: wrong files, another base, a bad or taken name."""


@dataclass
class _Row:
    """One request in the running batch: its output, and its own RNG, so that a seeded request repeats whatever it
    is batched with."""

    out: Output
    generator: torch.Generator | None
    history: list[int] = field(default_factory=list)  # tokens sampled so far, for penalties

    @property
    def job(self) -> Job:
        return self.out.job


def device_default() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base_model(location: str, device: torch.device, precision: str = "auto") -> PreTrainedModel:
    """`precision` auto: 4-bit NF4 on CUDA, fp32 on CPU. A directory saved in NF4 already (export's bnb4) loads as
    it is, whatever `precision` says.

    fp32 on every CPU, even one that computes bf16 natively (AVX512-BF16/AMX): the promise that a request's greedy
    text is the same alone as in a mixed batch is made (and tested) in fp32. In bf16 another batch shape rounds
    otherwise, and a row can part at a near-tie (seen on an AMX Xeon, and in AVX2's emulated bf16). bf16 stays
    available by name, without that promise; benchmarks/precision.md has the measurements."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    config = Path(location) / "config.json"
    if config.is_file() and "quantization_config" in config.read_text():
        return AutoModelForCausalLM.from_pretrained(location, device_map={"": device}).eval()
    if precision == "auto":
        precision = "nf4" if device.type == "cuda" else "fp32"
    if precision == "nf4":
        nf4 = nf4_config(torch.bfloat16)
        # the layers bitsandbytes leaves unquantized (embeddings, norms) in the compute dtype too, not fp32
        return AutoModelForCausalLM.from_pretrained(
            location, device_map={"": device}, quantization_config=nf4, dtype=torch.bfloat16
        ).eval()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(location, dtype=dtype).to(device).eval()


def recorded_base(path: Path) -> str:
    """The base model an adapter directory says it was trained on."""
    try:
        adapter = read_adapter(path)
    except ExportError as err:
        raise AdapterError(str(err)) from None
    if not adapter.recorded_base:
        raise AdapterError(f"adapter {path} does not record its base model (base_model_name_or_path)")
    return adapter.recorded_base


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, history: list[int]) -> int:
    """One token from one row of logits, after the request's logit bias and its penalties on the tokens of its
    completion so far (`history`): greedy at temperature 0, else nucleus sampling at that temperature."""
    if not params.plain:
        logits = logits.float().clone()
        for token, bias in params.logit_bias:
            logits[token] += bias
        if history:
            seen, counts = torch.tensor(history, device=logits.device).unique(return_counts=True)
            logits[seen] -= params.frequency_penalty * counts + params.presence_penalty
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p  # the most likely token always stays
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


class HFBase:
    """One transformers base model, its LoRA adapters, and the queue and worker that batch their requests."""

    def __init__(
        self,
        spec: ModelSpec,
        n_ctx: int = DEFAULT_CTX,
        queue_size: int = 64,
        n_slots: int = DEFAULT_SLOTS,
        n_threads: int | None = None,
        device: torch.device | None = None,
        precision: str = "auto",
    ) -> None:
        if n_threads is not None:
            # Process-wide. On a busy CPU fewer threads than cores can be far faster: torch's threads spin-wait on
            # each other, and one descheduled thread stalls every matmul (benchmarks/serving.md).
            torch.set_num_threads(n_threads)
        self.spec = spec
        self.device = device or device_default()
        location = base_dir(spec.location)  # a GGUF is dequantized once into a cached HF copy
        self.model: PreTrainedModel | PeftModel = load_base_model(location, self.device, precision)
        self.tokenizer = AutoTokenizer.from_pretrained(location)
        config = self.model.config
        self.n_ctx = min(n_ctx, getattr(config, "max_position_embeddings", n_ctx))
        self.n_vocab: int = self.model.get_output_embeddings().weight.shape[0]  # the logits' width
        self.n_slots = n_slots
        self._template = hf_template(self.tokenizer)
        self._eos = eos_ids(self.model, self.tokenizer)
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(self._eos))
        self.adapters: dict[str, Path] = {}
        # Held by the worker for a whole forward pass and by adapter loading/unloading: peft changes the modules.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a batch ends: its adapters may be unloaded
        self._active: set[str | None] = set()  # adapters the running batch uses
        self._routing: frozenset[str | None] | None = None  # the adapters the LoRA layers are set up for (route)
        self._row_masks: dict[str, torch.Tensor] = {}  # in a mixed batch, each adapter's rows (_mask_rows)
        self._hooks: dict[str, list[RemovableHandle]] = {}
        self._jobs = JobQueue(spec.name, queue_size)
        self._stopping = threading.Event()
        self.slots_busy = 0
        # Written by the worker only; read by /metrics.
        self.tokens_generated = 0
        self.requests_cancelled = 0
        self.prompt_tokens = 0
        self._worker = threading.Thread(target=self._work, name=f"hf-engine-{spec.name}", daemon=True)
        self._worker.start()
        log.info("loaded %s on %s (%s) slots=%d n_ctx=%d", spec.name, self.device, self.model.dtype, n_slots, self.n_ctx)

    # ---- adapters ----

    def check_adapter(self, path: Path) -> None:
        """Refuse an adapter made for another base: by the base it records, then by its tensor shapes."""
        recorded = recorded_base(path)
        if recorded in BUILTINS and recorded != self.spec.name:
            raise AdapterError(f"adapter {path} was trained on {recorded!r}, this server's base is {self.spec.name!r}")
        try:
            check_fits(self._base_model(), read_adapter(path), self.spec.name)
        except ExportError as err:
            raise AdapterError(str(err)) from None

    def load_adapter(self, name: str, path: Path) -> None:
        """Attach a PEFT LoRA adapter (safetensors only) under `name`; requests can use it once this returns."""
        if not ADAPTER_NAME.match(name):
            raise AdapterError(f"adapter name {name!r} must match {ADAPTER_NAME.pattern}")
        if name in self.adapters:
            raise AdapterError(f"adapter {name!r} is loaded already")
        self.check_adapter(path)
        with self._lock:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=name, use_safetensors=True)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name, use_safetensors=True)
            self.model.eval()
            self._routing = None  # the next batch sets the layers up afresh
            layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
            mask = functools.partial(self._mask_rows, name)
            self._hooks[name] = [m.lora_A[name].register_forward_pre_hook(mask) for m in layers if name in m.lora_A]
            # Masking lora_A's input keeps an adapter off other rows only for plain LoRA on linear layers: a variant
            # (DoRA) also rescales the base output, and an embedding LoRA has no lora_A module to hook.
            if any(name in m.lora_variant or name in m.lora_embedding_A for m in layers):
                self._detach(name)
                raise AdapterError(f"adapter {path}: only plain LoRA on linear layers is served (no DoRA, no embeddings)")
            self.adapters[name] = path
        log.info("adapter %s loaded from %s on %s", name, path, self.spec.name)

    def unload_adapter(self, name: str) -> None:
        """Detach an adapter once no running batch uses it; requests for it still queued fail when taken."""
        with self._idle:
            self._idle.wait_for(lambda: name not in self._active)
            del self.adapters[name]
            self._detach(name)
        log.info("adapter %s unloaded from %s", name, self.spec.name)

    def _detach(self, name: str) -> None:
        """Remove an adapter's modules; without the last one the model is the bare base again, as it was loaded."""
        assert isinstance(self.model, PeftModel)
        for handle in self._hooks.pop(name):
            handle.remove()
        if len(self.model.peft_config) > 1:
            self.model.delete_adapter(name)
        else:
            self.model = self.model.unload()
        self._routing = None

    def _base_model(self) -> PreTrainedModel:
        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    # ---- prompt side: the caller's thread, tokenizer only ----

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_bos)["input_ids"]

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Messages rendered as `adaptserve.models.prompt` says: the tokenizer's chat template, else the plain
        transcript (as LlamaCppEngine renders them)."""
        try:
            text = render(messages, self._template)
        except jinja2.TemplateError as err:  # the HTTP layer turns ValueError into a 400
            raise ValueError(str(err)) from None
        return self.tokenize(text, add_bos=adds_bos(self.has_chat_template))

    def budget(self, prompt: list[int], max_tokens: int | None) -> int:
        return completion_budget(prompt, max_tokens, self.n_ctx)

    # ---- request side ----

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        adapter: str | None,
        on_finish: Callable[[Finished], None] | None = None,
        timeout: float | None = None,
    ) -> Generation:
        self.budget(prompt, params.max_tokens)
        generation = Generation(asyncio.get_running_loop(), on_finish, timeout)
        self._jobs.put(Job(list(prompt), params, generation.put, generation.cancelled, adapter))
        return generation

    @property
    def queue_depth(self) -> int:
        return self._jobs.qsize()

    def drain(self, timeout: float) -> None:
        """Refuse new requests; those running or queued may finish within `timeout` seconds, then fail cleanly."""
        self._jobs.drain(timeout)

    def close(self) -> None:
        """Stop after the step in hand (running requests fail) and drop queued ones; safe to call twice."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._jobs.fail_queued()
        self._jobs.wake()
        self._worker.join(timeout=30)
        log.info("closed %s", self.spec.name)

    # ---- worker thread ----

    def _work(self) -> None:
        while not self._stopping.is_set():
            jobs = self._take()
            if self._jobs.past_deadline():
                for job in jobs:
                    job.emit(SHUTTING_DOWN)
                continue
            with self._lock:
                for job in [j for j in jobs if j.adapter is not None and j.adapter not in self.adapters]:
                    job.emit(Failed(f"adapter {job.adapter!r} was unloaded"))
                    jobs.remove(job)
                self._active = {job.adapter for job in jobs}
            if not jobs:
                continue
            rows = [self._row(job) for job in jobs]
            self.slots_busy = len(rows)
            try:
                with torch.inference_mode():
                    self._run(rows)
            except Exception as err:  # a failed forward pass fails its batch, not the worker
                log.exception("batch failed on %s", self.spec.name)
                for row in rows:
                    if not row.out.done:
                        row.out.fail(Failed(f"{type(err).__name__}: {err}"))
            with self._idle:
                self._active = set()
                self._idle.notify_all()
            self.slots_busy = 0

    def _take(self) -> list[Job]:
        """Up to n_slots live jobs: wait for one, then take whatever else arrives within GATHER_SECONDS."""
        jobs: list[Job] = []
        deadline = None
        while len(jobs) < self.n_slots:
            try:
                job = self._jobs.get(timeout=None if deadline is None else max(deadline - time.perf_counter(), 0))
            except queue.Empty:
                break
            if job is None:  # close() is waking us
                break
            if job.cancelled.is_set():
                self.requests_cancelled += 1
                continue
            jobs.append(job)
            deadline = deadline or time.perf_counter() + GATHER_SECONDS
        return jobs

    def _row(self, job: Job) -> _Row:
        generator = None
        if job.params.temperature > 0:
            generator = torch.Generator(self.device)
            generator.manual_seed(job.params.seed if job.params.seed is not None else random.getrandbits(63))
        detokenizer = WindowDetokenizer(functools.partial(self.tokenizer.decode, skip_special_tokens=True))
        out = Output(job, self.budget(job.prompt, job.params.max_tokens), detokenizer, time.perf_counter())
        return _Row(out, generator)

    def _forward(self, rows: Sequence[_Row], every: bool = False, **inputs: Any) -> tuple[torch.Tensor, Cache]:
        """Logits of every row (rows x positions x vocabulary; the last position only unless `every`), each row
        through its own adapter, and the KV cache. Under the lock: peft rewires modules when an adapter loads."""
        with self._lock:
            if isinstance(self.model, PeftModel):
                self.route([r.job.adapter for r in rows])
            out = self.model(**inputs, use_cache=True, logits_to_keep=0 if every else 1)
        return out.logits, out.cache

    def _piece(self, token: int) -> bytes:
        return self.tokenizer.decode([token]).encode()

    def _echo(self, rows: list[_Row], logits: torch.Tensor, width: int) -> None:
        """The prompt log-probabilities of the rows that asked for them, from the prefill's logits at every position
        (prompts are left-padded to `width`)."""
        for i, row in enumerate(rows):
            params, prompt = row.job.params, row.job.prompt
            if params.echo:
                predicted = logits[i, width - len(prompt) : width - 1].float().cpu().numpy()
                later = logprobs_of(predicted, prompt[1:], params.logprobs or 0, self._piece)
                row.out.prompt_logprobs([TokenLogprob(prompt[0], self._piece(prompt[0]), None), *later])

    def route(self, wanted: list[str | None]) -> None:
        """Set the LoRA layers up for a batch whose rows want these adapters (None: the base): all off for a batch
        on the base alone; else the batch's adapters active, and where rows differ, each adapter's input masked to
        its own rows, which costs less than peft's per-row routing (`adapter_names`: an index of every LoRA layer's
        input per adapter per call; benchmarks/serving.md). Switching adapters walks the modules, so it happens
        only when the next batch wants others. Public for measuring a step as the worker routes it; call it only
        while no batch runs."""
        adapters = frozenset(wanted)
        if adapters != self._routing:
            assert isinstance(self.model, PeftModel)
            if adapters == {None}:
                self.model.base_model.disable_adapter_layers()
            else:
                self.model.base_model.enable_adapter_layers()
                self.model.base_model.set_adapter(sorted(a for a in adapters if a is not None))
            self._routing = adapters
        rows_differ = len(adapters) > 1  # else every row is on one adapter, or all on the base: nothing to mask
        self._row_masks = {
            a: torch.tensor([w == a for w in wanted], device=self.device).view(-1, 1, 1)  # rows x 1 x 1
            for a in adapters
            if a is not None and rows_differ
        }

    def _mask_rows(self, adapter: str, _: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Forward pre-hook of each of the adapter's lora_A layers: in a mixed batch, the input of other rows is
        zeroed, so the adapter's update B(A(x)) adds exactly 0 there (lora_A has no bias)."""
        mask = self._row_masks.get(adapter)
        return None if mask is None else (args[0] * mask, *args[1:])

    def _run(self, rows: list[_Row]) -> None:
        """Prefill the rows' prompts together (left-padded), then decode a token per row per step until all end."""
        width = max(len(r.job.prompt) for r in rows)
        ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.job.prompt)
            ids[i, width - n :] = torch.tensor(row.job.prompt)
            mask[i, width - n :] = 1
            self.prompt_tokens += n
        mask = mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        echo = any(r.job.params.echo for r in rows)
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask, "position_ids": positions}
        logits, cache = self._forward(rows, every=echo, **inputs)
        if echo:
            self._echo(rows, logits, width)
        logits = logits[:, -1]
        live = list(range(len(rows)))  # batch row -> index into rows
        while True:
            tokens = [sample(logits[b], rows[r].job.params, rows[r].generator, rows[r].history) for b, r in enumerate(live)]
            going = [self._advance(rows[r], token, logits[b]) for b, (r, token) in enumerate(zip(live, tokens, strict=True))]
            keep = [b for b, on in enumerate(going) if on]
            if not keep or self._stopping.is_set() or self._jobs.past_deadline():
                break
            if len(keep) < len(live):  # finished rows leave the batch and the cache
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                live, tokens = [live[b] for b in keep], [tokens[b] for b in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)
            positions = positions[:, -1:] + 1
            step = torch.tensor(tokens, device=self.device)[:, None]
            logits, cache = self._forward(
                [rows[r] for r in live], input_ids=step, attention_mask=mask, position_ids=positions, cache=cache
            )
            logits = logits[:, -1]
        for r in live:  # the server is going away
            if not rows[r].out.done:
                rows[r].out.fail(SHUTTING_DOWN)

    def _advance(self, row: _Row, token: int, logits: torch.Tensor) -> bool:
        """Take a token sampled from `logits`; returns whether the row goes on."""
        if row.job.cancelled.is_set():
            self.requests_cancelled += 1
            row.out.finish("cancelled")
            return False
        k = row.job.params.logprobs
        logprob = None if k is None else logprobs_of(logits.float().cpu().numpy(), [token], k, self._piece)[0]
        if token in self._eos:
            row.out.end(logprob)
            row.out.finish("stop")
        else:
            self.tokens_generated += 1
            row.history.append(token)
            reason = row.out.add(token, logprob)
            if reason is not None:
                row.out.finish(reason)
        return not row.out.done


class HFEngine(Engine):
    """A served model name on an `HFBase`: the base itself (`adapter=None`) or one of its adapters. Slot and token
    counters are the shared base's."""

    def __init__(self, base: HFBase, spec: ModelSpec, adapter: str | None) -> None:
        self.base, self.spec, self.adapter = base, spec, adapter
        self.name = spec.name

    @property
    def has_chat_template(self) -> bool:
        return self.base.has_chat_template

    @property
    def n_ctx(self) -> int:
        return self.base.n_ctx

    @property
    def n_vocab(self) -> int:
        return self.base.n_vocab

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.base.tokenize(text, add_bos)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.base.tokenizer.decode(list(tokens))

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return self.base.chat_prompt(messages)

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        on_finish: Callable[[Finished], None] | None = None,
        timeout: float | None = None,
    ) -> Generation:
        if params.grammar is not None and (reason := self.grammar_error(params.grammar)):
            raise InvalidGrammar(reason)
        return self.base.submit(prompt, params, self.adapter, on_finish, timeout)

    def drain(self, timeout: float) -> None:
        self.base.drain(timeout)

    def grammar_error(self, grammar: str) -> str | None:
        return "grammar-constrained output needs the llama.cpp backend (serve --backend llama.cpp)"

    def tokenizer_info(self) -> dict[str, Any]:
        tokenizer = self.base.tokenizer
        return {
            "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token,
            "pad_token": tokenizer.pad_token,
            "chat_template": tokenizer.chat_template,
            "model_max_length": self.base.n_ctx,
        }

    def describe(self) -> dict[str, Any]:
        base = self.base
        return {
            "backend": "transformers",
            "base": base.spec.name,
            "adapter": self.adapter,
            "device": str(base.device),
            "dtype": str(base.model.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads() if base.device.type == "cpu" else None,
            "n_slots": base.n_slots,
            "n_ctx": base.n_ctx,
            "chat_template": base.has_chat_template,
        }

    @property
    def queue_depth(self) -> int:
        return self.base.queue_depth

    @property
    def n_slots(self) -> int:
        return self.base.n_slots

    @property
    def slots_busy(self) -> int:
        return self.base.slots_busy

    @property
    def prompt_tokens(self) -> int:
        return self.base.prompt_tokens

    @property
    def cached_prompt_tokens(self) -> int:
        return 0  # no prefix cache in this engine

    @property
    def tokens_generated(self) -> int:
        return self.base.tokens_generated

    @property
    def requests_cancelled(self) -> int:
        return self.base.requests_cancelled

    def close(self) -> None:
        """Closes the shared base: only for shutting the whole server down (unloading an adapter is the base's)."""
        self.base.close()
