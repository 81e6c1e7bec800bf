"""Training: real (tiny) LoRA runs of SmolLM2-135M on CPU, a kill and resume, and the retrieval that shortens prompts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adaptserve import finqa
from adaptserve.finqa.retrieve import reduce_record, retrieve_sentences
from adaptserve.models.hf import base_dir
from adaptserve.train import TrainConfig, TrainError, train
from adaptserve.train.checkpoint import latest
from adaptserve.train.data import collate, encode, load_items, plan_batches
from adaptserve.train.model import load_tokenizer
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
# The shortest shipped FinQA examples, table only, so that a step takes seconds. One thread: on 2 cores shared with
# other work, two OpenMP threads wait on each other and run several times slower (benchmarks/training.md).
TINY = dict(data=["sample"], retrieval_k=0, max_seq_len=360, rank=4, alpha=8.0, batch_size=1, grad_accum=1, lr=1e-3, threads=1)


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return load_tokenizer("smollm2-135m")


@pytest.fixture
def chats(tmp_path: Path) -> Path:
    """Short instruction examples in both accepted forms, so that a step takes well under a second."""
    rows = [{"instruction": f"Add {a} and {b}.", "output": str(a + b)} for a, b in [(2, 3), (10, 7), (41, 1)]]
    rows += [
        {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
        for w in ("yes", "no", "maybe")
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_tiny_finqa_run_gives_a_loadable_adapter(tmp_path: Path) -> None:
    out = tmp_path / "run"
    report = train(TrainConfig(**TINY, max_steps=2, save_every=0, output_dir=str(out)))

    assert report.steps == 2 and len(report.loss_history) == 2 and report.final_loss > 0
    assert report.examples > 0 and report.tokens_per_second > 0 and report.peak_memory_bytes > 100 * 2**20
    assert report.data_hash == finqa.data_hash(finqa.load_finqa(None, "dev"))
    saved = json.loads((out / "train_report.json").read_text())
    assert saved["config"]["rank"] == 4 and saved["base_model"] == "smollm2-135m"
    assert saved["host"]["cores"] and "avx2" in saved["host"]["cpu_flags"]  # the kernel-deciding flags are recorded
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "tokenizer.json").is_file() and not (out / "checkpoints").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2-135m"

    base = AutoModelForCausalLM.from_pretrained(base_dir("smollm2-135m"))
    model = PeftModel.from_pretrained(base, str(out)).eval()
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "training left the adapter at its zero init"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 4, base.config.vocab_size) and torch.isfinite(logits).all()


def test_qlora_on_cpu_trains_an_adapter_for_the_float_base(tmp_path: Path) -> None:
    """QLoRA is meant for CUDA but bitsandbytes runs its NF4 layers on CPU too (slowly): one real step."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    report = train(TrainConfig(**{**TINY, "method": "qlora"}, max_steps=1, save_every=0, output_dir=str(out)))  # type: ignore[arg-type]
    assert report.method == "qlora" and report.steps == 1 and report.final_loss > 0
    # The adapter is plain LoRA weights: it loads onto the float base, which is how `adaptserve export` merges it.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir("smollm2-135m")), str(out))
    assert any(p.abs().sum() > 0 for name, p in model.named_parameters() if "lora_B" in name)


def test_killed_run_resumes_where_its_checkpoint_left_off(tmp_path: Path, chats: Path) -> None:
    steps = 8
    args = dict(
        data=[str(chats)], rank=4, alpha=8.0, batch_size=2, grad_accum=1, max_steps=steps, save_every=2, threads=1, seed=3
    )
    args["precision"] = "fp32"  # the losses are compared to 1e-4: pinned, whatever auto picks on this CPU
    out = tmp_path / "killed"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items() if k != "data"]
    cmd = [sys.executable, "-m", "adaptserve", "train", "--data", str(chats), *flags, "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while latest(out / "checkpoints") is None:
        assert proc.poll() is None, f"training exited early:\n{proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, "no checkpoint within 90 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest(out / "checkpoints")
    assert killed_at is not None
    done_before = int(killed_at.name.removeprefix("step-"))
    assert 2 <= done_before < steps, "the kill should land mid-run"

    with pytest.raises(TrainError, match="resume"):
        train(TrainConfig(**args, output_dir=str(out)))
    resumed = train(TrainConfig(**args, output_dir=str(out), resume=True))
    assert resumed.steps == steps and len(resumed.loss_history) == steps
    assert latest(out / "checkpoints").name == f"step-{steps:08d}"  # type: ignore[union-attr]
    assert len(list((out / "checkpoints").iterdir())) == 2  # the last two are kept
    # A checkpoint is scored as the run prompts: it carries the run's retrieval depth.
    assert finqa.adapter_style(latest(out / "checkpoints")) == finqa.PromptStyle(shots=0, sentences=TrainConfig().retrieval_k)

    # Optimizer, schedule, RNG and data order all carried over: the losses are those of an unbroken run.
    unbroken = train(TrainConfig(**args, output_dir=str(tmp_path / "unbroken")))
    assert resumed.loss_history == pytest.approx(unbroken.loss_history, rel=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(max_steps=0), "max_steps must be positive"),
        (dict(method="dpo"), "method must be one of"),
        (dict(base_model="no-such-model"), "unknown model"),
        (dict(data=["/nonexistent/train.json"]), "no such file"),
        (dict(data=["sample:1000:"]), "holds no examples"),
        (dict(max_seq_len=50), "no example fits max_seq_len=50"),
        (dict(target_modules=["no_such_proj"]), "cannot apply LoRA"),
    ],
)
def test_bad_input_fails_clearly(tmp_path: Path, change: dict[str, object], message: str) -> None:
    with pytest.raises(TrainError, match=message):
        train(TrainConfig(**{**TINY, **change, "output_dir": str(tmp_path / "out")}))  # type: ignore[arg-type]


def test_bad_data_and_missing_packages_fail_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(TrainError, match="ending in an assistant answer"):
        load_items([str(bad)])
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # importing it now raises ImportError
    with pytest.raises(TrainError, match="pip install bitsandbytes"):
        train(TrainConfig(**{**TINY, "method": "qlora", "output_dir": str(tmp_path / "q")}))  # type: ignore[arg-type]


def test_examples_score_only_the_answer(tokenizer, chats: Path) -> None:  # type: ignore[no-untyped-def]
    examples = encode(load_items([str(chats)]), tokenizer, retrieval_k=0, max_seq_len=512)
    first = examples[0]
    assert tokenizer.decode(first.prompt).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(first.answer) == "5<|im_end|>\n"
    batch = collate(examples[:3], tokenizer.pad_token_id)
    assert batch.input_ids[batch.predict.roll(1, dims=1)].tolist() == batch.targets.tolist()
    assert batch.tokens == sum(len(e) for e in examples[:3])


def test_batch_plan_covers_each_epoch_and_extends_stably() -> None:
    lengths = [5, 50, 7, 30, 12, 9, 41]
    short, long = plan_batches(lengths, 2, 0, 4), plan_batches(lengths, 2, 0, 10)
    assert long[:4] == short
    assert sorted(i for batch in long[:4] for i in batch) == list(range(7))  # one epoch: every example once


def test_retrieval_keeps_the_table_and_the_matching_sentences_in_order() -> None:
    pre = ["the company was founded in 1901 .", "net revenue was $ 5,829 million in 2015 .", "."]
    post = ["employees numbered 1200 .", "net revenue in 2014 was $ 5735 million ."]
    question = "what is the change in net revenue from 2014 to 2015?"
    assert retrieve_sentences(question, pre, post, 2) == ([pre[1]], [post[1]])
    assert retrieve_sentences(question, pre, post, 0) == ([], [])
    assert retrieve_sentences("what about 5829?", pre, post, 3) == ([pre[1]], [])  # numbers match across "5,829"

    record = finqa.load_finqa(None, "dev")[0]
    reduced = reduce_record(record, 2)
    assert reduced.table == record.table and len(reduced.pre_text) + len(reduced.post_text) <= 2
    kept = reduced.pre_text + reduced.post_text
    original = [s for s in record.pre_text + record.post_text if s in kept]
    assert kept == original


def test_low_memory_run_learns_exactly_what_a_plain_run_learns(tmp_path: Path, chats: Path) -> None:
    """Checkpointing recomputes the same activations and the allocator setting moves no numbers: same losses.
    In a subprocess, because the allocator setting lasts for the life of the process. fp32, pinned: the losses are
    compared to 1e-4."""
    flags = dict(data=[str(chats)], rank=4, alpha=8.0, batch_size=3, grad_accum=1, max_steps=2, save_every=0, threads=1)
    flags["precision"] = "fp32"
    plain = train(TrainConfig(**flags, output_dir=str(tmp_path / "plain")))  # type: ignore[arg-type]
    cmd = [sys.executable, "-m", "adaptserve", "train", "--data", str(chats), "--rank", "4", "--alpha", "8", "--batch-size", "3"]
    cmd += ["--grad-accum", "1", "--max-steps", "2", "--save-every", "0", "--threads", "1", "--low-memory", "--precision", "fp32"]
    subprocess.run([*cmd, "--output-dir", str(tmp_path / "low")], check=True, capture_output=True, timeout=300)
    low = json.loads((tmp_path / "low" / "train_report.json").read_text())
    assert low["config"]["low_memory"] and len(low["memory_history"]) == 2 and all(m > 0 for m in low["memory_history"])
    assert low["loss_history"] == pytest.approx(plain.loss_history, rel=1e-4)


def test_two_process_data_parallel_run_trains_what_one_process_does(tmp_path: Path, chats: Path) -> None:
    """`accelerate launch` with 2 CPU processes (gloo): each takes half of every batch, the gradients are summed,
    and the adapter (same files, same format) and losses match a single-process run of the same flags.

    In fp32, pinned: that is where the match holds to 1e-4. In bf16 (auto's pick on CPUs with native bf16) each
    process's batch shape rounds otherwise, and losses part by more than that (benchmarks/precision.md)."""
    flags = dict(data=[str(chats)], rank=4, alpha=8.0, batch_size=4, grad_accum=1, max_steps=2, save_every=0, threads=1)
    flags["precision"] = "fp32"
    single = train(TrainConfig(**flags, output_dir=str(tmp_path / "one")))  # type: ignore[arg-type]
    # --multi_gpu is accelerate's torchrun launcher, which on a machine without CUDA starts CPU processes (gloo);
    # its --cpu flag would start a single process unless MPI is set up.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "adaptserve"]
    cmd = [*launch, "train", "--data", str(chats), "--rank", "4", "--alpha", "8", "--batch-size", "4", "--grad-accum", "1"]
    cmd += ["--max-steps", "2", "--save-every", "0", "--threads", "1", "--precision", "fp32"]
    cmd += ["--output-dir", str(tmp_path / "two")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "train_report.json").read_text())
    assert two["world_size"] == 2 and two["train_tokens"] == single.train_tokens
    assert two["loss_history"] == pytest.approx(single.loss_history, rel=1e-4)
    one_files = {p.name for p in (tmp_path / "one").iterdir()}
    assert one_files == {p.name for p in (tmp_path / "two").iterdir()} and "adapter_model.safetensors" in one_files
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-4) for k in a)
