"""The transformers engine: one real SmolLM2 base with the shipped FinQA LoRA, adapters picked per request in one
batch, the server on `--backend transformers` with runtime adapter loading, and adapters it must refuse."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file

from adaptserve import finqa
from adaptserve.models import ADAPTERS_DIR, resolve
from adaptserve.models.hf import base_dir
from adaptserve.serve.engine import SamplingParams
from adaptserve.serve.hf_engine import AdapterError, HFBase, HFEngine, load_base_model
from tests.conftest import Server

FINQA = "smollm2-135m-finqa"
SHIPPED = ADAPTERS_DIR / FINQA
GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def base() -> Iterator[HFBase]:
    """fp32, named: the tests on it hold texts to bit-level agreement (mixed batch vs alone, adapter copies), which
    the engine promises in fp32 only; auto is fp32 on CPU too, but a test should not depend on what auto picks."""
    engine = HFBase(resolve("smollm2-135m"), n_ctx=2048, n_slots=4, n_threads=1, device=torch.device("cpu"), precision="fp32")
    engine.load_adapter(FINQA, SHIPPED)
    yield engine
    engine.close()


def finqa_chat(engine: HFEngine, record: finqa.FinQARecord) -> list[int]:
    style = finqa.adapter_style(SHIPPED)
    messages = finqa.task_prompt(record.question, record.table, record.pre_text, record.post_text, style, chat=True)
    assert isinstance(messages, list)
    return engine.chat_prompt(messages)


def batched_and_alone(base: HFBase) -> tuple[list[str], list[str]]:
    """Greedy texts of base and adapter requests (two FinQA questions first, then two plain prompts) queued in one
    go, so they run as one batch, and of the same requests one at a time."""
    plain, adapted = HFEngine(base, resolve("smollm2-135m"), None), HFEngine(base, resolve(FINQA), FINQA)
    record = finqa.load_finqa(split="test")[0]
    requests = [
        (adapted, finqa_chat(adapted, record)),
        (plain, finqa_chat(plain, record)),
        (plain, plain.tokenize("The capital of France is")),
        (adapted, adapted.chat_prompt([{"role": "user", "content": "Name three colors."}])),
    ]

    async def together() -> list[str]:
        generations = [engine.submit(prompt, GREEDY) for engine, prompt in requests]  # queued in one go: one batch
        return [(await g.collect()).text for g in generations]

    async def alone() -> list[str]:
        return [(await engine.complete(prompt, GREEDY)).text for engine, prompt in requests]

    return asyncio.run(together()), asyncio.run(alone())


def test_mixed_batch_matches_each_request_alone(base: HFBase) -> None:
    """Base and adapter requests in one batch: each gets the greedy text it gets alone, and they differ."""
    batched, single = batched_and_alone(base)
    assert batched == single
    assert "(" in batched[0] and batched[0] != batched[1]  # the adapter writes a program, the base does not


def test_adapter_loaded_after_a_base_only_batch_still_applies(base: HFBase, tmp_path: Path) -> None:
    """A batch on the base alone turns the LoRA layers off (HFBase.route); an adapter loaded after it, in a mixed
    batch beside the base, must still be applied, not silently skipped."""
    plain, adapted = HFEngine(base, resolve("smollm2-135m"), None), HFEngine(base, resolve(FINQA), FINQA)
    prompt = finqa_chat(adapted, finqa.load_finqa(split="test")[0])
    expected = asyncio.run(adapted.complete(prompt, GREEDY)).text
    asyncio.run(plain.complete(prompt, GREEDY))
    base.load_adapter("finqa-2", Path(shutil.copytree(SHIPPED, tmp_path / "finqa-2")))
    try:
        second = HFEngine(base, resolve(FINQA), "finqa-2")

        async def mixed() -> list[str]:
            generations = [second.submit(prompt, GREEDY), plain.submit(prompt, GREEDY)]
            return [(await g.collect()).text for g in generations]

        copy, unadapted = asyncio.run(mixed())
        assert copy == expected and unadapted != expected
    finally:
        base.unload_adapter("finqa-2")


def test_sampling_stops_and_lengths(base: HFBase) -> None:
    engine = HFEngine(base, resolve("smollm2-135m"), None)
    prompt = engine.tokenize("Once upon a time")
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=11)

    async def run() -> list:
        return [
            await engine.complete(prompt, p) for p in (seeded, seeded, SamplingParams(max_tokens=40, temperature=0, stop=(",",)))
        ]

    first, second, stopped = asyncio.run(run())
    assert first.text == second.text and first.finish.finish_reason == "length" and first.finish.completion_tokens == 10
    assert stopped.finish.finish_reason == "stop" and "," not in stopped.text


def test_leaving_a_stream_cancels_its_row_only(base: HFBase) -> None:
    """A client gone after two pieces: its row leaves the batch at the next token, the row beside it runs on."""
    engine = HFEngine(base, resolve("smollm2-135m"), None)
    long = SamplingParams(max_tokens=200, temperature=0)
    cancelled = base.requests_cancelled

    async def run() -> int:
        left, stays = engine.submit(engine.tokenize("Count: one, two,"), long), engine.submit(engine.tokenize("Hi"), GREEDY)
        pieces = 0
        async for _ in left.events():
            pieces += 1
            if pieces == 2:
                break
        return (await stays.collect()).finish.completion_tokens

    assert asyncio.run(run()) == GREEDY.max_tokens
    assert base.requests_cancelled == cancelled + 1


def write_lora(path: Path, recorded_base: str, fan_in: int, fan_out: int, **config_changes: Any) -> Path:
    """A real PEFT LoRA directory whose q_proj factors have the given sizes."""
    path.mkdir(parents=True)
    config = json.loads((SHIPPED / "adapter_config.json").read_text())
    config |= {"base_model_name_or_path": recorded_base, "r": 8, **config_changes}
    (path / "adapter_config.json").write_text(json.dumps(config))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{key}.lora_A.weight": torch.zeros(8, fan_in), f"{key}.lora_B.weight": torch.zeros(fan_out, 8)},
        path / "adapter_model.safetensors",
    )
    return path


def test_adapter_for_another_base_is_refused(base: HFBase, tmp_path: Path) -> None:
    gemma = write_lora(tmp_path / "gemma", "gemma3-270m", 640, 1024)  # Gemma 3 270M's q_proj
    with pytest.raises(AdapterError, match="trained on 'gemma3-270m'"):
        base.load_adapter("gemma-lora", gemma)
    unnamed = write_lora(tmp_path / "other", "org/other-model", 640, 1024)  # a base we cannot name: shapes decide
    with pytest.raises(AdapterError, match="does not fit base"):
        base.load_adapter("other-lora", unnamed)
    assert list(base.adapters) == [FINQA]


def test_lora_variant_or_embedding_lora_is_refused(base: HFBase, tmp_path: Path) -> None:
    """DoRA also rescales the base output, and an embedding LoRA has no lora_A layer to mask, so neither would stay
    off other rows of a mixed batch: refused, and the base goes on serving as before."""
    dora = write_lora(tmp_path / "dora", "smollm2-135m", 576, 576, use_dora=True)
    embedding = write_lora(tmp_path / "embedding", "smollm2-135m", 576, 576, target_modules=["q_proj", "embed_tokens"])
    for name, path in (("dora", dora), ("embedding", embedding)):
        with pytest.raises(AdapterError, match="only plain LoRA on linear layers"):
            base.load_adapter(name, path)
    assert list(base.adapters) == [FINQA]
    test_mixed_batch_matches_each_request_alone(base)


def test_cpu_auto_precision_is_fp32() -> None:
    """auto holds the base in fp32 on every CPU, native bf16 (AMX) or not: batch invariance is promised in fp32."""
    assert load_base_model(base_dir("smollm2-135m"), torch.device("cpu")).dtype == torch.float32


def test_bf16_base_serves_a_mixed_batch() -> None:
    """bf16 is served when named, adapters included, but not held to batch invariance: another batch shape rounds
    otherwise, and a row can part from its text alone at a near-tie (seen on an AMX Xeon, and in AVX2's emulated bf16
    on the FinQA prompt through the base: benchmarks/precision.md). What holds is asserted: each row's answer, far
    from any tie, alone and in the batch. Short prompts: emulated bf16 (AVX2) is slow."""
    base = HFBase(resolve("smollm2-135m"), n_ctx=512, n_slots=2, n_threads=1, device=torch.device("cpu"), precision="bf16")
    try:
        assert base.model.dtype == torch.bfloat16
        base.load_adapter(FINQA, SHIPPED)
        plain, adapted = HFEngine(base, resolve("smollm2-135m"), None), HFEngine(base, resolve(FINQA), FINQA)
        requests = [
            (plain, plain.tokenize("The capital of France is")),
            (adapted, adapted.chat_prompt([{"role": "user", "content": "What is 12 plus 30?"}])),
        ]
        params = SamplingParams(max_tokens=4, temperature=0)

        async def together() -> list[str]:
            generations = [engine.submit(prompt, params) for engine, prompt in requests]
            return [(await g.collect()).text for g in generations]

        async def alone() -> list[str]:
            return [(await engine.complete(prompt, params)).text for engine, prompt in requests]

        for capital, program in (asyncio.run(together()), asyncio.run(alone())):
            assert "Paris" in capital and program.startswith("add("), (capital, program)
    finally:
        base.close()


@pytest.fixture(scope="module")
def hf_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    tmp = tmp_path_factory.mktemp("hf-server")
    allowed = tmp / "adapters"
    shutil.copytree(SHIPPED, allowed / "finqa-copy")
    srv = Server(
        [
            "--backend",
            "transformers",
            "--models",
            "smollm2-135m",
            FINQA,
            "--adapter-dir",
            str(allowed),
            "--no-ui",
            "--n-threads",
            "1",
            "--precision",  # the FinQA texts of two adapter copies are compared exactly
            "fp32",
        ],
        tmp,
    )
    yield srv, allowed
    srv.stop()


def test_server_serves_base_and_adapter_and_loads_adapters(hf_server: tuple[Server, Path]) -> None:
    srv, _ = hf_server
    record = finqa.load_finqa(split="test")[0]
    ask = {"question": record.question, "pre_text": record.pre_text, "table": record.table, "post_text": record.post_text}
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["smollm2-135m", FINQA]
        shipped = c.post("/v1/finqa", json={**ask, "model": FINQA}).json()
        assert shipped["program"] and shipped["error"] is None, shipped
        hi = {"model": FINQA, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
        chat = c.post("/v1/chat/completions", json=hi)
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] <= 8
        stream = c.post("/v1/chat/completions", json={**hi, "stream": True}).text
        events = [line.removeprefix("data: ") for line in stream.splitlines() if line.startswith("data: ")]
        streamed = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
        assert events[-1] == "[DONE]" and streamed == chat.json()["choices"][0]["message"]["content"]

        r = c.post("/admin/adapters", json={"name": "finqa-2", "path": "finqa-copy"})
        assert r.status_code == 201, r.json()
        assert r.json()["base"] == "smollm2-135m"
        assert [a["id"] for a in c.get("/admin/adapters").json()["data"]] == [FINQA, "finqa-2"]
        assert c.post("/v1/finqa", json={**ask, "model": "finqa-2"}).json()["raw"] == shipped["raw"]
        assert c.post("/admin/adapters", json={"name": "finqa-2", "path": "finqa-copy"}).status_code == 409

        assert 'adaptserve_engine_slots{model="finqa-2"} 4.0' in c.get("/metrics").text
        assert c.delete("/admin/adapters/finqa-2").status_code == 204
        assert 'adaptserve_engine_slots{model="finqa-2"}' not in c.get("/metrics").text  # its request counts stay
        gone = c.post("/v1/finqa", json={**ask, "model": "finqa-2"})
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        assert c.delete("/admin/adapters/finqa-2").status_code == 404
        assert c.delete("/admin/adapters/smollm2-135m").status_code == 404  # a base is not an adapter


def test_server_refuses_unsafe_adapters(hf_server: tuple[Server, Path], tmp_path: Path) -> None:
    srv, allowed = hf_server
    outside = tmp_path / "outside"
    shutil.copytree(SHIPPED, outside)
    (allowed / "link-out").symlink_to(outside, target_is_directory=True)
    pickled = allowed / "pickled"
    shutil.copytree(SHIPPED, pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04N.")  # a pickle: loading it could run code
    write_lora(allowed / "gemma", "gemma3-270m", 640, 1024)
    cases = [
        ({"name": "x", "path": "../outside"}, "path_not_allowed"),
        ({"name": "x", "path": str(outside)}, "path_not_allowed"),
        ({"name": "x", "path": "link-out"}, "path_not_allowed"),
        ({"name": "x", "path": "pickled"}, "unsafe_format"),
        ({"name": "x", "path": "gemma"}, "invalid_adapter"),
        ({"name": "../etc", "path": "finqa-copy"}, "invalid_value"),
    ]
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        for body, code in cases:
            r = c.post("/admin/adapters", json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == code, (body, r.json())
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["smollm2-135m", FINQA]
    assert srv.alive()


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
)
def test_nf4_base_with_adapters(device: str) -> None:
    """The base in NF4 (bitsandbytes: the CUDA default, slow but real on CPU): the adapter still writes programs,
    and a mixed batch matches running alone. On CUDA only the FinQA rows must: the GPU kernels (bitsandbytes' 4-bit
    matmul, attention) sum in another order for another batch shape, and plain chat text parts at near-ties (H200,
    2026-11-27: "Name three colors." through the adapter gave "...blue, green" alone, "...and purple" in the batch)."""
    base = HFBase(resolve("smollm2-135m"), n_ctx=2048, n_threads=1, device=torch.device(device), precision="nf4")
    try:
        assert "4bit" in type(base.model.model.layers[0].self_attn.q_proj).__name__
        base.load_adapter(FINQA, SHIPPED)
        batched, single = batched_and_alone(base)
        rows = 2 if device == "cuda" else len(single)
        assert batched[:rows] == single[:rows]
        assert "(" in batched[0] and batched[0] != batched[1]
    finally:
        base.close()


def test_unknown_backend_is_a_cli_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "adaptserve", "serve", "--backend", "vllm"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "backend must be one of" in out.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: bitsandbytes NF4 export")
def test_gpu_serves_the_bnb4_export(tmp_path: Path) -> None:
    """The export issue's merged NF4 checkpoint loads as it is (no second quantization) and answers like the adapter."""
    from adaptserve.export import ExportConfig, export

    export(ExportConfig(adapter=str(SHIPPED), output_dir=str(tmp_path), formats=["bnb4"], verify_tokens=0))
    spec = resolve(str(tmp_path / "bnb4"))
    base = HFBase(spec, n_ctx=2048)
    try:
        engine = HFEngine(base, spec, None)
        text = asyncio.run(engine.complete(finqa_chat(engine, finqa.load_finqa(split="test")[0]), GREEDY)).text
        assert "(" in text, text  # the merged adapter writes a program
    finally:
        base.close()
