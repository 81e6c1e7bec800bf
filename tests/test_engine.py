"""The llama.cpp engine directly: stop strings, context budget, queue limits, batching, prefix cache, close."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator

import llama_cpp
import psutil
import pytest

from adaptserve import llama_thread
from adaptserve.export import served
from adaptserve.models import resolve
from adaptserve.serve.engine import EngineBusy, PromptTooLong, SamplingParams, StopMatcher, TextDelta
from adaptserve.serve.kvslots import MAX_FILLED_GAP, Feed, KVSlots, common_prefix
from adaptserve.serve.llama_engine import LlamaCppEngine
from adaptserve.serve.metrics import Metrics


@pytest.mark.parametrize(
    "pieces,stops,expected,cut",
    [
        (["Hello", " wor", "ld"], ["\n"], "Hello world", False),
        (["Hel", "lo\nUs", "er: hi"], ["\nUser:"], "Hello", True),
        (["a\n", "b"], ["\nUser:"], "a\nb", False),  # a held-back prefix that never completes comes out
        (["xSTO", "P"], ["STOP", "TOP"], "x", True),
    ],
)
def test_stop_matcher(pieces: list[str], stops: list[str], expected: str, cut: bool) -> None:
    matcher, out, hit = StopMatcher(stops), "", False
    for piece in pieces:
        text, hit = matcher.push(piece)
        out += text
        if hit:
            break
    if not hit:
        out += matcher.flush()
    assert (out, hit) == (expected, cut)


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    eng = LlamaCppEngine(resolve("smollm2-135m"), n_ctx=256, n_threads=2, queue_size=2, n_slots=2)
    yield eng
    eng.close()


def test_budget_follows_the_context(engine: LlamaCppEngine) -> None:
    prompt = engine.tokenize("hello " * 100)
    assert engine.budget(prompt, None) == 256 - len(prompt)
    with pytest.raises(PromptTooLong):
        engine.budget(prompt, 256)
    with pytest.raises(PromptTooLong):
        engine.budget(engine.tokenize("hello " * 300), None)


def test_full_queue_is_refused_not_dropped(engine: LlamaCppEngine) -> None:
    async def run() -> list[str]:
        params = SamplingParams(max_tokens=8, temperature=0)
        prompt = engine.chat_prompt([{"role": "user", "content": "Hi"}])
        accepted = [engine.submit(prompt, params) for _ in range(2)]
        # the worker may already have taken jobs off the queue into its slots; fill what is left, then one more is refused
        with pytest.raises(EngineBusy):
            for _ in range(engine.n_slots + 1):
                accepted.append(engine.submit(prompt, params))
        return [(await gen.collect()).text for gen in accepted]

    texts = asyncio.run(run())
    assert len(set(texts)) == 1 and texts[0]


def test_default_threads_are_one_per_physical_core() -> None:
    """llama-cpp-python alone would decode on half the logical CPUs: one thread on a 2-core machine."""
    cores = min(psutil.cpu_count(logical=False) or 1, len(os.sched_getaffinity(0)))
    eng = LlamaCppEngine(resolve("smollm2-135m"), n_ctx=64, n_slots=1)
    try:
        ctx = eng.slots.ctx.ctx  # the batched context the engine decodes on
        assert eng.n_threads == cores
        assert (llama_cpp.llama_n_threads(ctx), llama_cpp.llama_n_threads_batch(ctx)) == (cores, cores)
    finally:
        eng.close()


def test_engines_take_turns_on_the_one_llama_thread() -> None:
    """Two engines decode at once, a step of each in turn on one thread, which also runs (and reports) calls."""
    engines = [LlamaCppEngine(resolve("smollm2-135m"), n_ctx=64, n_slots=1) for _ in range(2)]

    async def run() -> list[str]:
        params = SamplingParams(max_tokens=8, temperature=0)
        prompt = engines[0].chat_prompt([{"role": "user", "content": "Hi"}])
        return [c.text for c in await asyncio.gather(*(e.complete(prompt, params) for e in engines))]

    try:
        first, second = asyncio.run(run())
        assert first == second and first
        assert llama_thread.run(threading.current_thread).name == "llama"
        with pytest.raises(ZeroDivisionError):
            llama_thread.run(divmod, 1, 0)
    finally:
        for eng in engines:
            eng.close()


def test_chat_template_comes_from_the_gguf(engine: LlamaCppEngine) -> None:
    prompt = engine.llm.detokenize(engine.chat_prompt([{"role": "user", "content": "Hi"}]), special=True).decode()
    assert "<|im_start|>user\nHi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")


# ---- continuous batching: one context, several slots, chunked prefill, prefix cache ----


def row_logits(slots: KVSlots, row: int) -> list[float]:
    """The logits of batch row `row` of the last decode, the whole vocabulary."""
    return llama_cpp.llama_get_logits_ith(slots.ctx.ctx, row)[: slots.n_vocab]


N_SLOTS = 8


@pytest.fixture(scope="module")
def batched() -> Iterator[LlamaCppEngine]:
    # A small prefill chunk, so long prompts take several steps beside running streams (and copies pay off early).
    # The default K/V cache (8-bit); the adapter fixtures below run both cache types.
    eng = LlamaCppEngine(resolve("smollm2-135m"), n_ctx=512, n_threads=2, queue_size=256, n_slots=N_SLOTS, prefill_chunk=32)
    yield eng
    eng.close()


def _adapter_engine(kv_cache: str) -> LlamaCppEngine:
    spec = served(resolve("smollm2-135m-finqa"), "q4_k_m")
    return LlamaCppEngine(spec, n_ctx=512, n_threads=2, queue_size=256, n_slots=N_SLOTS, prefill_chunk=32, kv_cache=kv_cache)


@pytest.fixture(scope="module")
def adapter_batched() -> Iterator[LlamaCppEngine]:
    """The served adapter's q4_k_m (K-quant weights, the kernels the base's Q4_1 never meets), with an f16 K/V cache:
    attention by matrix products, flash attention off."""
    eng = _adapter_engine("f16")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def adapter_batched_q8_cache() -> Iterator[LlamaCppEngine]:
    """The same with the default 8-bit K/V cache, which computes attention with llama.cpp's flash-attention kernel."""
    eng = _adapter_engine("q8_0")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def lora_batched(batched: LlamaCppEngine) -> Iterator[LlamaCppEngine]:
    """The adapter as the server runs it beside its base: its LoRA, in Q8_0, applied to the base's shared weights."""
    spec = served(resolve("smollm2-135m-finqa"), "lora")
    eng = LlamaCppEngine(spec, n_ctx=512, n_threads=2, queue_size=256, n_slots=N_SLOTS, prefill_chunk=32)
    yield eng
    eng.close()


GREEDY = SamplingParams(max_tokens=24, temperature=0)


def chat(engine: LlamaCppEngine, text: str, system: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": system}] if system else []
    return engine.chat_prompt([*messages, {"role": "user", "content": text}])


def mixed_requests(engine: LlamaCppEngine) -> list[tuple[list[int], SamplingParams]]:
    """Eight prompts of 5 to ~300 tokens with 6 to 40 completion tokens: two with a stop string, one seeded sample."""
    long_text = "The ledger lists revenue, costs, taxes and dividends for every quarter. " * 20
    return [
        (engine.tokenize("Once upon a time"), SamplingParams(max_tokens=40, temperature=0)),
        (chat(engine, "Name three colors."), GREEDY),
        (chat(engine, f"Summarize: {long_text}"), SamplingParams(max_tokens=16, temperature=0)),
        (engine.tokenize("Count from 1 to 20: 1, 2, 3,"), SamplingParams(max_tokens=30, temperature=0, stop=("12",))),
        (chat(engine, "Write a haiku about ledgers."), SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=7)),
        (engine.tokenize("def fibonacci(n):"), SamplingParams(max_tokens=6, temperature=0)),
        (chat(engine, "What is 17 * 23?", system="You are a careful accountant."), GREEDY),
        (engine.tokenize(long_text + "In total,"), SamplingParams(max_tokens=20, temperature=0, stop=(".",))),
    ]


async def stream_text(engine: LlamaCppEngine, prompt: list[int], params: SamplingParams, cancel_after: int | None) -> str:
    """Read the stream delta by delta; with `cancel_after`, hang up after that many deltas, as a client would."""
    events, parts = engine.submit(prompt, params).events(), []
    async for event in events:
        if isinstance(event, TextDelta):
            parts.append(event.text)
            if len(parts) == cancel_after:
                break
    await events.aclose()
    return "".join(parts)


def wait_idle(engine: LlamaCppEngine, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (engine.slots_busy or engine.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (engine.slots_busy, engine.queue_depth) == (0, 0)


def assert_kv_matches_slots(engine: LlamaCppEngine) -> None:
    """No leaked cells: each slot's KV holds exactly the tokens the engine thinks it caches."""
    for slot in engine.slots.slots:
        assert llama_cpp.llama_memory_seq_pos_max(engine.slots.ctx.memory, slot.seq_id) == len(slot.cached) - 1


@pytest.mark.parametrize("engine", ["batched", "adapter_batched", "adapter_batched_q8_cache", "lora_batched"])
def test_batched_output_matches_running_alone(engine: str, request: pytest.FixtureRequest) -> None:
    batched: LlamaCppEngine = request.getfixturevalue(engine)
    requests = mixed_requests(batched)
    cancel_after = {2: 3, 5: 1}  # these two clients hang up early
    streamed = {0, 3, 4}  # these read delta by delta; the rest collect

    async def together() -> list[str]:
        async def one(i: int) -> str:
            prompt, params = requests[i]
            if i in streamed or i in cancel_after:
                return await stream_text(batched, prompt, params, cancel_after.get(i))
            return (await batched.complete(prompt, params)).text

        return await asyncio.gather(*(one(i) for i in range(len(requests))))

    async def alone() -> list[str]:
        return [(await batched.complete(prompt, params)).text for prompt, params in requests]

    cancelled = batched.requests_cancelled
    concurrent = asyncio.run(together())
    wait_idle(batched)
    expected = asyncio.run(alone())
    assert all(expected)
    for i, (got, want) in enumerate(zip(concurrent, expected, strict=True)):
        if i in cancel_after:
            assert got and want.startswith(got), (i, got, want)
        else:
            assert got == want, (i, got, want)
    assert batched.requests_cancelled == cancelled + len(cancel_after)
    assert_kv_matches_slots(batched)


def test_prompts_are_cut_on_one_grid_whatever_the_cache_or_the_neighbours(
    adapter_batched: LlamaCppEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the f16 cache a token's K/V depends on how many tokens of its sequence share its call (kvslots.py):
    every prompt chunk must sit in one cell of the grid cut at multiples of prefill_chunk, beside other prompts,
    after a copy, and after a full or partial cache hit."""
    batched = adapter_batched
    assert not batched.slots.cut_anywhere
    chunks: list[tuple[int, int]] = []  # (position of the first token, tokens) of each multi-token feed
    decode = batched.slots.decode

    def recording(feeds: list[Feed]) -> list[int]:
        chunks.extend((len(f.slot.cached), len(f.tokens)) for f in feeds if len(f.tokens) > 1)
        return decode(feeds)

    monkeypatch.setattr(batched.slots, "decode", recording)
    requests = mixed_requests(batched)
    extended = (requests[2][0] + batched.tokenize(" And the taxes?", add_bos=False), GREEDY)  # a partial hit

    async def together() -> None:
        await asyncio.gather(*(batched.complete(prompt, params) for prompt, params in [*requests, extended]))

    asyncio.run(together())
    asyncio.run(together())  # every prompt cached now
    size = batched.prefill_chunk
    assert chunks and all(start % size == 0 and n <= size for start, n in chunks), chunks


def open_slots(model: str, n_slots: int, n_ctx: int, kv_cache: str) -> tuple[llama_cpp.Llama, KVSlots]:
    """KVSlots on `model` as the server runs it, an adapter in its @form (a LoRA applied to the base's weights)."""
    spec = served(resolve(model), "q4_k_m")
    llm = llama_thread.load(spec.path, 2, n_ctx=64)
    lora = llama_thread.load_lora(llm, spec.lora) if spec.lora else None
    return llm, KVSlots(llm, n_slots, n_ctx=n_ctx, max_batch=64, kv_cache=kv_cache, lora=lora)


@pytest.mark.parametrize("model", ["smollm2-135m", "smollm2-135m-finqa", "smollm2-135m-finqa@lora"])
def test_an_8bit_cache_gives_a_prompt_the_same_logits_however_its_calls_cut_it(model: str) -> None:
    """What lets the 8-bit cache reuse a prefix of any length (kvslots.py): a 200-token prompt decoded in 64-token
    calls, and cut after 1, 30 or 63 tokens, or with one-token calls in it, gives bit-identical logits and the same
    greedy continuation (with an f16 cache the one-token calls move the logits; benchmarks/serving.md)."""
    llm, slots = open_slots(model, 1, n_ctx=512, kv_cache="q8_0")
    prompt = llm.tokenize(b"Net revenue was $5,829 million in 2015 against $5,735 million in 2014. " * 12)[:200]
    (slot,) = slots.slots

    def run(cuts: list[int]) -> tuple[list[float], list[int]]:
        slots.reset(slot)
        start, row = 0, -1
        for end in [*cuts, len(prompt)]:
            for at in range(start, end, 64):
                (row,) = slots.decode([Feed(slot, prompt[at : min(at + 64, end)], logits=min(at + 64, end) == len(prompt))])
            start = end
        logits = row_logits(slots, row)
        tokens = [int(slots.logits(row).argmax())]
        for _ in range(8):
            (row,) = slots.decode([Feed(slot, tokens[-1:], logits=True)])
            tokens.append(int(slots.logits(row).argmax()))
        return logits, tokens

    try:
        whole = run([])
        for cuts in ([1], [30], [63, 127], [5, 6, 7, 8], [100, 101]):
            assert run(cuts) == whole, cuts
    finally:
        slots.close()
        llm.close()


@pytest.mark.parametrize("form", ["q4_k_m", "lora"])
@pytest.mark.parametrize("kv_cache", ["f16", "q8_0"])
@pytest.mark.parametrize("repeats", [2, 4, 12])
def test_logits_do_not_depend_on_the_sequences_beside_one(repeats: int, kv_cache: str, form: str) -> None:
    """The adapter's q4_k_m holds Q4_K, Q6_K and Q8_0 weights, which llama.cpp would multiply with kernels that change
    a row's numbers once four rows (repacked weights) or eight rows (tiled K-quant kernel) share a call: a sequence's
    logits must be the same bit for bit with 0 or 7 short sequences decoding beside it, in that step and in the next
    (which reads the K/V the step wrote). Left on, repacking fails the 2-repeat prompt, the tiled kernel both (on some
    other prompts, such as the 1-repeat one, neither kernel's rounding happened to reach the logits). The 8-bit
    cache computes attention with flash attention, which with an f16 cache changes a row's numbers once its
    sequence spans 512 cells (the 12-repeat prompt, 396 tokens, in 512-cell views; benchmarks/serving.md). The
    LoRA form holds its factors in Q8_0: in f16 they moved the 2-repeat prompt's logits by 0.8 from one row beside it."""
    llm, slots = open_slots(f"smollm2-135m-finqa@{form}", 8, n_ctx=1024, kv_cache=kv_cache)
    prompt = llm.tokenize(b"Revenue rose from 5,735 to 5,829 million dollars in 2019; costs fell by 12%." * repeats)

    def two_steps(beside: int) -> list[list[float]]:
        for slot in slots.slots:
            slots.reset(slot)
        first, *others = slots.slots[: beside + 1]
        for start in range(0, len(prompt), 64):
            slots.decode([Feed(first, prompt[start : start + 64], logits=False)])
        for slot in others:
            slots.decode([Feed(slot, prompt[: 4 + slot.seq_id], logits=False)])
        rows = []
        for token in (1000, 2000):
            (row, *_) = slots.decode([Feed(s, (token,), logits=True) for s in (first, *others)])
            rows.append(row_logits(slots, row))
        return rows

    try:
        assert two_steps(7) == two_steps(0)
    finally:
        slots.close()
        llm.close()


def test_a_gap_between_decoding_slots_is_filled_and_leaves_no_trace(batched: LlamaCppEngine) -> None:
    slots = KVSlots(batched.llm, 3, n_ctx=64, max_batch=16)
    try:
        first, idle, last = slots.slots
        for slot in slots.slots:
            slots.decode([Feed(slot, batched.tokenize(f"Slot {slot.seq_id} reads the ledger"), logits=False)])
        held = len(idle.cached)
        step = [Feed(first, (1000,), logits=True), Feed(last, (1000,), logits=True)]
        assert [f.slot for f in slots._gap_fillers(step)] == [idle]  # the step runs as one block of three
        beside = row_logits(slots, slots.decode(step)[1])
        assert llama_cpp.llama_memory_seq_pos_max(slots.ctx.memory, idle.seq_id) == held - 1 == len(idle.cached) - 1
        slots._truncate(last, len(last.cached) - 1)  # drop the step's token, then decode it with nothing beside it
        (row,) = slots.decode([Feed(last, (1000,), logits=True)])
        assert row_logits(slots, row) == beside  # bit for bit
        slots.decode([Feed(idle, batched.tokenize(" and the notes below it", add_bos=False), logits=False)])
        assert slots._gap_fillers(step) == []  # longer than both: filling it would widen the step's attention
    finally:
        slots.close()


def test_a_long_gap_between_decoding_slots_runs_as_a_second_pass(batched: LlamaCppEngine) -> None:
    slots = KVSlots(batched.llm, MAX_FILLED_GAP + 3, n_ctx=64, max_batch=16)
    try:
        first, *idle, last = slots.slots
        for slot in slots.slots:
            slots.decode([Feed(slot, batched.tokenize(f"Slot {slot.seq_id} reads the ledger"), logits=False)])
        held = [len(s.cached) for s in idle]
        step = [Feed(first, (1000,), logits=True), Feed(last, (1000,), logits=True)]
        assert slots._gap_fillers(step) == []  # more rows than a pass costs: two passes instead
        beside = row_logits(slots, slots.decode(step)[1])
        slots._truncate(last, len(last.cached) - 1)
        (row,) = slots.decode([Feed(last, (1000,), logits=True)])
        assert row_logits(slots, row) == beside
        assert [len(s.cached) for s in idle] == held  # untouched by the step
    finally:
        slots.close()


def test_a_new_prompt_goes_next_to_the_busy_slots_unless_a_prefix_elsewhere_saves_a_chunk(batched: LlamaCppEngine) -> None:
    slots = KVSlots(batched.llm, 4, n_ctx=256, max_batch=64)
    try:
        busy, _ = slots.acquire(batched.tokenize("Another request"), align=64)
        prompt = batched.tokenize("The ledger of the lighthouse keeper " * 20)
        far = slots.slots[3]
        slots.decode([Feed(far, prompt[:8], logits=False)])
        far.reusable = 8
        slot, kept = slots.acquire(prompt, align=64)
        assert (busy.seq_id, slot.seq_id, kept) == (0, 1, 0)  # 8 tokens cached in slot 3 are not worth a gap
        slots.release(slot)
        slots.decode([Feed(far, prompt[8:72], logits=False)])
        far.reusable = 72
        assert slots.acquire(prompt, align=64) == (far, 72)  # 72 are
    finally:
        slots.close()


def test_cancel_frees_the_slot_at_once(batched: LlamaCppEngine) -> None:
    wait_idle(batched)
    generated = batched.tokens_generated
    text = asyncio.run(stream_text(batched, chat(batched, "Write a long story."), SamplingParams(max_tokens=400), 2))
    wait_idle(batched, timeout=2)
    assert text and batched.tokens_generated - generated < 20  # far short of 400


def test_many_requests_leave_no_slot_or_kv_behind(batched: LlamaCppEngine) -> None:
    async def run() -> list[str]:
        async def one(i: int) -> str:
            prompt = batched.tokenize(f"Request {i}: the number after {i} is")
            params = SamplingParams(max_tokens=1 + i % 4, temperature=0.7 if i % 2 else 0, seed=i)
            return await stream_text(batched, prompt, params, cancel_after=1 if i % 5 == 0 else None)

        return await asyncio.gather(*(one(i) for i in range(200)))

    cancelled = batched.requests_cancelled
    texts = asyncio.run(run())
    wait_idle(batched)
    assert len(texts) == 200 and sum(bool(t) for t in texts) >= 160
    assert batched.requests_cancelled - cancelled <= 40  # at most the 40 that hung up (a one-token reply may end first)
    assert_kv_matches_slots(batched)
    metrics = Metrics()
    metrics.watch_engine("m", batched)
    text = metrics.render().decode()
    assert 'adaptserve_engine_slots_busy{model="m"} 0.0' in text
    assert f'adaptserve_engine_slots{{model="m"}} {float(N_SLOTS)}' in text


def new_system_prompt() -> str:
    """A system prompt no slot holds yet, long enough that copying another slot's cells beats recomputing them."""
    return f"You answer questions about report {time.time_ns()}. " + "Numbers are in millions of dollars. " * 12


def cached_during(engine: LlamaCppEngine, run: Callable[[], object]) -> tuple[int, object]:
    before = engine.cached_prompt_tokens
    result = run()
    return engine.cached_prompt_tokens - before, result


def test_repeated_system_prompt_hits_the_prefix_cache(batched: LlamaCppEngine) -> None:
    system = new_system_prompt()
    n_system = len(chat(batched, "", system)) - len(chat(batched, ""))
    assert n_system > 2 * batched.prefill_chunk
    first = chat(batched, "What was revenue?", system)
    second = chat(batched, "What were costs?", system)
    cold, _ = cached_during(batched, lambda: asyncio.run(batched.complete(first, GREEDY)))
    warm, alone = cached_during(batched, lambda: asyncio.run(batched.complete(second, GREEDY)).text)
    assert cold < n_system <= warm  # the second reuses the first's cells in the same slot

    async def beside_a_running_request() -> str:
        # the first occupies the slot holding the system prompt; the second gets a copy of its cells
        running = batched.submit(first, SamplingParams(max_tokens=64, temperature=0)).events()
        await anext(running)
        text = (await batched.complete(second, GREEDY)).text
        await running.aclose()
        return text

    copied, beside = cached_during(batched, lambda: asyncio.run(beside_a_running_request()))
    assert copied >= n_system and beside == alone
    wait_idle(batched)
    assert_kv_matches_slots(batched)
    metrics = Metrics()
    metrics.watch_engine("m", batched)
    ratio = next(
        line for line in metrics.render().decode().splitlines() if line.startswith("adaptserve_engine_prefix_cache_hit_ratio{")
    )
    assert 0 < float(ratio.rsplit(" ", 1)[1]) < 1


def test_an_8bit_cache_reuses_a_prefix_of_any_length(batched: LlamaCppEngine) -> None:
    """So a hit is not rounded down to the prefill grid: a second question on the same system prompt reuses every
    token the two prompts share, where the f16 cache would round that down to a multiple of prefill_chunk."""
    assert batched.slots.cut_anywhere
    system = new_system_prompt()
    while True:
        first, second = chat(batched, "What was revenue?", system), chat(batched, "What were costs?", system)
        if (shared := common_prefix(first, second)) % batched.prefill_chunk:
            break
        system += " Thanks."  # the shared part happens to end on the grid: move it off
    asyncio.run(batched.complete(first, GREEDY))
    warm, _ = cached_during(batched, lambda: asyncio.run(batched.complete(second, GREEDY)))
    assert warm == shared
    wait_idle(batched)
    assert_kv_matches_slots(batched)


@pytest.mark.parametrize("round_", range(3))  # several rounds: each starts from what the last left in the slots
def test_requests_arriving_together_compute_a_shared_prefix_once(batched: LlamaCppEngine, round_: int) -> None:
    system = new_system_prompt()
    n_system = len(chat(batched, "", system)) - len(chat(batched, ""))
    questions = ("What was revenue?", "What were costs?", "What was the margin?", "Who audits it?")
    prompts = [chat(batched, q, system) for q in questions]

    async def together() -> list[str]:
        return [c.text for c in await asyncio.gather(*(batched.complete(p, GREEDY) for p in prompts))]

    copied, texts = cached_during(batched, lambda: asyncio.run(together()))
    assert copied >= 3 * n_system  # the first computed it; the others waited for it, then copied it
    assert texts == [asyncio.run(batched.complete(p, GREEDY)).text for p in prompts]
    wait_idle(batched)
    assert_kv_matches_slots(batched)


def test_an_adapter_is_applied_to_its_base_s_shared_weights(batched: LlamaCppEngine, lora_batched: LlamaCppEngine) -> None:
    """Served beside its base, the adapter decodes on the base's Llama (one copy of the weights and vocabulary) with
    its LoRA set on its own batched context only: it writes a FinQA program where the base writes prose. Closing
    one engine leaves the shared weights to the other."""
    assert lora_batched.llm is batched.llm
    question = "what was the percentage change in revenue from 2018 to 2019?\n| | 2019 | 2018 |\n| revenue | 5829 | 5735 |"
    messages = [{"role": "user", "content": question}]
    ours = asyncio.run(lora_batched.complete(lora_batched.chat_prompt(messages), GREEDY)).text
    base = asyncio.run(batched.complete(batched.chat_prompt(messages), GREEDY)).text
    assert ours.startswith("subtract(") and not base.startswith("subtract("), (ours, base)
    other = LlamaCppEngine(served(resolve("smollm2-135m-finqa"), "lora"), n_ctx=256, n_threads=2, n_slots=1)
    assert other.llm is batched.llm
    other.close()
    assert asyncio.run(lora_batched.complete(lora_batched.chat_prompt(messages), GREEDY)).text == ours


def test_auto_serves_an_adapter_on_its_base_only_where_the_base_is_served_too() -> None:
    """ "auto" (the server's default): the LoRA on the base's GGUF when the base is served beside it, else merged."""
    adapter, base = resolve("smollm2-135m-finqa"), resolve("smollm2-135m")
    beside = served(adapter, "auto", beside=[base.location])
    assert (beside.location, beside.lora is not None) == (base.location, True)
    alone = served(adapter, "auto")
    assert alone.lora is None and alone.path.name.endswith("-q4_k_m.gguf")
    assert served(resolve("smollm2-135m-finqa@q8_0"), "auto", beside=[base.location]).lora is None  # its @form wins
