"""KV slots: one llama.cpp context with a KV stream per concurrent sequence, and what each stream holds.

Every setting here keeps a sequence's output the same token for token whether it runs alone or beside others (the
engine tests compare logits bit for bit; what each setting guards against and costs is measured in
benchmarks/serving.md, "Batch invariance"):

- One KV stream per slot (`kv_unified=False`): in a unified cache the sequences' cells interleave and attention sums
  them in another order.
- K/V stored at 8 bits by default (`DEFAULT_KV_CACHE`, q8_0): half the memory of f16, which is what lets base and
  adapted serve in under 600 MB at the default slots. llama.cpp quantizes V only with flash attention; with a
  quantized cache its CPU kernel sends every query row through the same per-row loop, which keeps the output batch
  invariant but processes prompts more slowly. With the f16 cache flash attention stays off: its f16 paths make a
  sequence's logits depend on its neighbours in a step and on how its own prompt was chunked.
- With the f16 cache a token's K/V depends on how many tokens of its sequence share its decode call, so a prompt is
  cut on one grid, at multiples of `align` (the engine's prefill chunk) counted from its first token: the engine
  decodes whole grid chunks, and a cached or copied prefix is reused only down to a multiple of it. With the 8-bit
  cache any cut gives the same K/V, and a prefix is reused at any length (`cut_anywhere`). A finished request keeps
  only its prompt's cells for reuse.
- Weights as the GGUF stores them, multiplied by one kernel whatever the row count (`llama_thread.load`).
- Consecutive slot ids: llama.cpp puts sequences into one micro-batch only while their ids run consecutively, so a
  decode step fills a short gap of idle slots with placeholder tokens, removed right after, rather than pay a
  second pass over the weights (`MAX_FILLED_GAP`).

A slot keeps its prompt's K/V after its request ends: that is the prefix cache. A new prompt goes to the free
slot holding the longest prefix of it, or to the free slot next to the busy ones where that saves less than a
prefill chunk (so busy slots stay packed), or gets a copy of another slot's cells when that one holds a much longer
prefix (a shared system prompt or FinQA exemplars still in use by a running request).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field

import llama_cpp
import numpy as np
from llama_cpp import _internals

from adaptserve import llama_thread

# K/V storage types a KVSlots takes: llama.cpp's own default, and 8-bit at half its size (see the module docstring).
KV_CACHE_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
DEFAULT_KV_CACHE = "q8_0"
# Idle slots between decoding ones that a step fills with placeholder rows rather than split into a second pass:
# every placeholder row costs time, so filling wins for gaps of one or two slots and loses for longer ones
# (benchmarks/serving.md, "Which gaps to fill").
MAX_FILLED_GAP = 2


def kv_cache_kwargs(name: str) -> dict[str, int | bool]:
    """llama_cpp.Llama's arguments for the KV_CACHE_TYPES entry `name` (ValueError for any other name): its type for
    K and V, and flash attention where the cache is quantized, since llama.cpp keeps a quantized V only with it."""
    if name not in KV_CACHE_TYPES:
        raise ValueError(f"kv_cache must be one of {list(KV_CACHE_TYPES)}, got {name!r}")
    return {"type_k": KV_CACHE_TYPES[name], "type_v": KV_CACHE_TYPES[name], "flash_attn": name != "f16"}


@dataclass
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose K/V sit in this stream at positions 0..n-1
    reusable: int = 0  # how many of those a later prompt may reuse: the ones decoded as part of a prompt
    busy: bool = False

    def prefix(self, prompt: Sequence[int]) -> int:
        """How much of `prompt` this slot holds in reusable cells."""
        return common_prefix(self.cached[: self.reusable], prompt)


@dataclass(frozen=True)
class Feed:
    """Tokens to append to a slot's sequence in one decode; `logits`: sample after the last of them; `every`:
    logits after each of them (rows in token order, the last one the row decode() returns)."""

    slot: Slot
    tokens: Sequence[int]
    logits: bool
    every: bool = False


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class KVSlots:
    """`n_slots` sequences of up to `n_ctx` tokens each, `max_batch` tokens per llama_decode at most, their K/V
    stored as `kv_cache` (a key of KV_CACHE_TYPES), computed with the LoRA adapter `lora` (`llama_thread.load_lora`)
    applied where one is given."""

    def __init__(
        self,
        llm: llama_cpp.Llama,
        n_slots: int,
        n_ctx: int,
        max_batch: int,
        kv_cache: str = DEFAULT_KV_CACHE,
        lora: llama_cpp.llama_adapter_lora_p | None = None,
    ) -> None:
        if not 1 <= n_slots <= llama_cpp.llama_max_parallel_sequences():
            raise ValueError(f"n_slots must be between 1 and {llama_cpp.llama_max_parallel_sequences()}")
        # Start from the Llama's own settings (threads, RoPE) and change only what batching needs.
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx, params.n_seq_max = n_ctx * n_slots, n_slots
        params.n_batch = params.n_ubatch = max_batch  # llama.cpp splits a call by sequence only, never for size
        params.kv_unified = False
        cache = kv_cache_kwargs(kv_cache)
        params.type_k, params.type_v = cache["type_k"], cache["type_v"]
        flash = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if cache["flash_attn"] else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.flash_attn_type = flash
        self.kv_cache = kv_cache
        self.cut_anywhere = kv_cache != "f16"  # a prompt's K/V is the same however its calls cut it (module docstring)
        params.swa_full = True  # sliding-window models (Gemma 3) must keep old cells, or a cached prefix goes stale
        self.ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        if lora is not None:  # llama.cpp applies a LoRA per context: the model's other contexts do not see it
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(lora)
            if llama_cpp.llama_set_adapters_lora(self.ctx.ctx, adapters, 1, (ctypes.c_float * 1)(1.0)) != 0:
                raise RuntimeError("llama.cpp could not apply the LoRA adapter")
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self.ctx.ctx)
        self.n_vocab = llm.n_vocab()
        self._batch = _internals.LlamaBatch(n_tokens=max_batch, embd=0, n_seq_max=1, verbose=False)
        self.slots = [Slot(i) for i in range(n_slots)]
        # Written by the scheduler only; read by /metrics.
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0

    @property
    def busy(self) -> int:
        return sum(s.busy for s in self.slots)

    def has_free(self) -> bool:
        return self.busy < len(self.slots)

    def acquire(self, prompt: Sequence[int], align: int, reuse: bool = True) -> tuple[Slot, int]:
        """A free slot for `prompt`, and how much of it the slot already holds: below len(prompt), so that the last
        token is decoded again (its logits start the reply), and a multiple of `align` unless the cache is
        `cut_anywhere`, so that the rest is cut as it would be from an empty slot.

        The slot is the one holding the longest prefix, unless slots are busy and it saves under `align` tokens
        over the free slot next to them: a step over a gap pays for it at every token of the reply, a prefix once.

        llama.cpp copies across streams only in full, so a copy moves a whole slot's buffer (about as long as a
        decode step; benchmarks/serving.md); it is done only when it saves at least `align` tokens of prefill, or
        when the slot holds the whole prompt (the n choices of one request). Without `reuse` the whole prompt is
        decoded again (its logits are wanted at every position).
        """
        held = {s.seq_id: s.prefix(prompt) for s in self.slots}
        free = [s for s in self.slots if not s.busy]
        slot = max(free, key=lambda s: (held[s.seq_id], -s.seq_id))
        if (packed := self._next_to_busy(free)) is not None and held[slot.seq_id] < held[packed.seq_id] + align:
            slot = packed
        keep = held[slot.seq_id]
        donor = max(self.slots, key=lambda s: held[s.seq_id])
        shared = held[donor.seq_id]
        if reuse and (shared >= keep + align or shared == len(prompt) > keep + 1):
            llama_cpp.llama_memory_seq_cp(self.ctx.memory, donor.seq_id, slot.seq_id, -1, -1)
            slot.cached, keep = list(donor.cached), shared
        keep = min(keep, len(prompt) - 1) if reuse else 0
        keep -= 0 if self.cut_anywhere else keep % align
        self._truncate(slot, keep)
        slot.busy, slot.reusable = True, len(prompt) if len(prompt) > 1 else 0
        self.prompt_tokens += len(prompt)
        self.cached_prompt_tokens += keep
        return slot, keep

    def _next_to_busy(self, free: list[Slot]) -> Slot | None:
        """The free slot in a gap between busy ones, else the nearest to them (the lowest on a tie); None when no
        slot is busy. A decode step pays for a gap with placeholder rows or a second pass over the weights."""
        busy = [s.seq_id for s in self.slots if s.busy]
        if not busy:
            return None
        lo, hi = min(busy), max(busy)
        return min(free, key=lambda s: (max(lo - s.seq_id, s.seq_id - hi, 0), s.seq_id))

    def release(self, slot: Slot) -> None:
        """The slot takes new requests. Its prompt's cells stay as a prefix cache; the reply's are freed now."""
        self._truncate(slot, min(slot.reusable, len(slot.cached)))
        slot.busy = False

    def reset(self, slot: Slot) -> None:
        """Forget what a slot holds (after a failed decode its cells cannot be trusted)."""
        self._truncate(slot, 0)
        self.release(slot)

    def _truncate(self, slot: Slot, n: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.ctx.memory, slot.seq_id, n, -1)
        del slot.cached[n:]

    def decode(self, feeds: Sequence[Feed]) -> list[int]:
        """Append every feed's tokens in one llama_decode; returns each feed's logits row (-1 where not asked).

        The rows are valid until the next call.
        """
        placeholders = self._gap_fillers(feeds)
        held = [len(f.slot.cached) for f in placeholders]
        batch = sorted([*feeds, *placeholders], key=lambda f: f.slot.seq_id)
        try:
            rows = dict(zip((f.slot.seq_id for f in batch), self._decode(batch), strict=True))
        finally:
            for feed, n in zip(placeholders, held, strict=True):
                self._truncate(feed.slot, n)
        return [rows[f.slot.seq_id] for f in feeds]

    def _gap_fillers(self, feeds: Sequence[Feed]) -> list[Feed]:
        """One-token feeds for the short runs of idle slots (MAX_FILLED_GAP at most) between a decode step's
        sequences, so that they and the sequences around them make one pass.

        Only a step of one token per sequence is filled: llama.cpp micro-batches sequences together only when each
        has as many tokens. A run with a slot holding more cells than every decoding one is left as it is (the
        step's attention spans the longest stream in it, so its filler could cost more than the second pass), and
        so is a run with a full slot.
        """
        if len(feeds) < 2 or any(len(f.tokens) != 1 for f in feeds):
            return []
        ids = {f.slot.seq_id for f in feeds}
        longest = min(max(len(f.slot.cached) for f in feeds), self.n_ctx - 1)
        fillers: list[Slot] = []
        gap: list[Slot] = []
        for slot in self.slots[min(ids) : max(ids) + 1]:
            if slot.seq_id not in ids:
                gap.append(slot)
                continue
            if len(gap) <= MAX_FILLED_GAP and all(len(s.cached) <= longest for s in gap):
                fillers += gap
            gap = []
        return [Feed(s, (0,), logits=False) for s in fillers]

    def _decode(self, feeds: Sequence[Feed]) -> list[int]:
        batch, rows, n = self._batch.batch, [], 0
        for feed in feeds:
            start = len(feed.slot.cached)
            for i, token in enumerate(feed.tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, start + i, 1
                batch.seq_id[n][0], batch.logits[n] = feed.slot.seq_id, feed.every
                n += 1
            batch.logits[n - 1] = feed.logits or feed.every
            rows.append(n - 1 if feed.logits or feed.every else -1)
        batch.n_tokens = n
        if (rc := llama_thread.run(llama_cpp.llama_decode, self.ctx.ctx, batch)) != 0:
            raise RuntimeError(f"llama_decode returned {rc} for {n} tokens over {len(feeds)} sequences")
        for feed in feeds:
            feed.slot.cached.extend(feed.tokens)
        return rows

    def logits(self, row: int) -> np.ndarray:
        """Logits row `row` of the last decode, read in place: valid until the next decode."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx.ctx, row), shape=(self.n_vocab,))

    def close(self) -> None:
        self._batch.close()
        self.ctx.close()
