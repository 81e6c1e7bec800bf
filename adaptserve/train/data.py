"""Training data: sources -> items (FinQA records or chats) -> token ids split into prompt and answer -> batches.

The loss is on the answer only, so every example keeps the two apart. Prompts are rendered exactly as the server
renders them at inference (`adaptserve.models.prompt`): the model's chat template, or for a model without one
plain text (FinQA's completion prompt ending in "Program:", a `User:`/`Assistant:` transcript otherwise).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from adaptserve import finqa
from adaptserve.models.prompt import Message, Template, adds_bos, hf_template, plain_answer, render
from adaptserve.train.config import TrainError

log = logging.getLogger(__name__)

SAMPLE = "sample"  # the data source naming the FinQA sample shipped inside the package
# SOURCE, then optionally @SPLIT, then optionally :START:END (either bound may be empty), e.g. dev.json:300:
_SOURCE = re.compile(r"^(?P<source>.+?)(?:@(?P<split>[\w.-]+))?(?::(?P<start>-?\d*):(?P<end>-?\d*))?$")


@dataclass(frozen=True)
class Chat:
    """An instruction example as chat messages; the last one is the assistant answer the loss is on."""

    messages: list[Message]


Item = finqa.FinQARecord | Chat


@dataclass(frozen=True)
class Example:
    prompt: list[int]
    answer: list[int]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.answer)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (batch, width), right-padded
    predict: torch.Tensor  # (batch, width) bool: positions whose next token is an answer token
    targets: torch.Tensor  # (answer tokens,) the next tokens at `predict`, in row-major order
    tokens: int  # real (unpadded) tokens

    def to(self, device: torch.device) -> Batch:
        return replace(
            self, input_ids=self.input_ids.to(device), predict=self.predict.to(device), targets=self.targets.to(device)
        )


def load_items(sources: Sequence[str]) -> list[Item]:
    """Every item of every source, in order; see TrainConfig.data for the source forms."""
    items: list[Item] = []
    for spec in sources:
        match = _SOURCE.match(spec)
        assert match is not None  # the pattern accepts any non-empty string
        rows = _load_source(match["source"], match["split"])
        start, end = (int(b) if b else None for b in (match["start"], match["end"]))
        picked = rows[start:end]
        if not picked:
            raise TrainError(f"data source {spec!r} holds no examples ({len(rows)} before slicing)")
        log.info("data %s: %d examples", spec, len(picked))
        items += picked
    return items


def _load_source(source: str, split: str | None) -> list[Item]:
    try:
        if source == SAMPLE:
            return list(finqa.load_finqa(None, split or "dev"))
        path = Path(source)
        rows = _json_rows(path) if path.is_file() else []
        if rows and isinstance(rows[0], dict) and ("messages" in rows[0] or "instruction" in rows[0]):
            return [_chat(row, f"{path} example {i}") for i, row in enumerate(rows)]
        return list(finqa.load_finqa(source, split or "train"))
    except finqa.FinQADataError as err:
        raise TrainError(f"data {source!r}: {err}") from err


def _json_rows(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        rows = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TrainError(f"{path}: cannot read JSON: {err}") from err
    if not isinstance(rows, list):
        raise TrainError(f"{path}: expected a JSON list of examples, got {type(rows).__name__}")
    return rows


def _chat(row: Any, where: str) -> Chat:
    """{"messages": [...]} as is, or Alpaca's {"instruction", "input", "output"} as one user/assistant turn."""
    if isinstance(row, dict) and "messages" in row:
        messages = row["messages"]
    elif isinstance(row, dict) and isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    else:
        raise TrainError(f"{where}: expected 'messages', or 'instruction' and 'output' strings")
    well_formed = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )
    if not well_formed or len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise TrainError(f"{where}: messages must be {{role, content}} strings ending in an assistant answer")
    return Chat([{"role": m["role"], "content": m["content"]} for m in messages])


def encode(items: Sequence[Item], tokenizer: PreTrainedTokenizerBase, retrieval_k: int, max_seq_len: int) -> list[Example]:
    """Token ids of each item; those longer than max_seq_len are left out (and counted in the log)."""
    examples = [_encode(item, tokenizer, retrieval_k) for item in items]
    kept = [e for e in examples if len(e) <= max_seq_len]
    if len(kept) < len(examples):
        log.warning("skipped %d of %d examples longer than max_seq_len=%d", len(examples) - len(kept), len(examples), max_seq_len)
    if not kept:
        shortest = min(len(e) for e in examples)
        raise TrainError(f"no example fits max_seq_len={max_seq_len} (the shortest has {shortest} tokens)")
    return kept


def _encode(item: Item, tokenizer: PreTrainedTokenizerBase, retrieval_k: int) -> Example:
    template = hf_template(tokenizer)
    prompt, answer = _texts(item, tokenizer, template, retrieval_k)
    return Example(
        tokenizer(prompt, add_special_tokens=adds_bos(template is not None))["input_ids"],
        tokenizer(answer, add_special_tokens=False)["input_ids"],
    )


def _texts(item: Item, tokenizer: PreTrainedTokenizerBase, template: Template | None, retrieval_k: int) -> tuple[str, str]:
    """(prompt, answer) text of an item, the answer ending where generation should stop."""
    if isinstance(item, finqa.FinQARecord):
        # The very prompt the server gives an adapter (zero-shot, `retrieval_k` sentences): train as you serve.
        style = finqa.PromptStyle(shots=0, sentences=retrieval_k)
        prompt = finqa.record_prompt(item, style, chat=template is not None)
        if isinstance(prompt, str):
            return prompt, plain_answer(item.program, tokenizer.eos_token)
        messages = [*prompt, {"role": "assistant", "content": item.program}]
    else:
        messages = item.messages
    prompt = render(messages[:-1], template)
    if template is None:
        return prompt, plain_answer(messages[-1]["content"], tokenizer.eos_token)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise TrainError("the chat template renders the answer turn in a way that changes the prompt before it")
    return prompt, full[len(prompt) :]


def plan_batches(lengths: Sequence[int], batch_size: int, seed: int, count: int) -> list[list[int]]:
    """`count` micro-batches of example indices, epoch after epoch.

    Each epoch shuffles the examples, sorts windows of 64 batches by length so that batches pad little, and
    shuffles the batch order so that lengths still mix over time. Epoch e depends only on (seed, e), so a longer
    plan starts with the same batches as a shorter one.
    """
    window = batch_size * 64
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < count:
        rng = random.Random(f"{seed}/{epoch}")
        order = rng.sample(range(len(lengths)), len(lengths))
        epoch_batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lengths.__getitem__)
            epoch_batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(epoch_batches)
        batches += epoch_batches
        epoch += 1
    return batches[:count]


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    predict = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, e in enumerate(examples):
        input_ids[row, : len(e)] = torch.tensor(e.prompt + e.answer)
        predict[row, len(e.prompt) - 1 : len(e) - 1] = True  # the position before each answer token predicts it
    targets = torch.tensor([t for e in examples for t in e.answer])
    return Batch(input_ids, predict, targets, sum(len(e) for e in examples))
