"""Verify: does an export still generate what the unmerged adapter generates?

Every backend gets the same prompt token ids (from the exported tokenizer), so a disagreement is the weights'
doing, not the tokenizer's; whether llama.cpp tokenizes the prompt text to those same ids is checked apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adaptserve import finqa, llama_thread
from adaptserve.models.prompt import Message, adds_bos, hf_template, render

N_PROMPTS = 3


@dataclass(frozen=True)
class Prompt:
    text: str  # rendered with the chat template, or the plain transcript without one
    ids: list[int]
    add_bos: bool  # whether `ids` got a BOS the text does not spell out (no chat template to add one)


@dataclass(frozen=True)
class Agreement:
    exact: float  # fraction of prompts whose first N greedy tokens equal the reference's
    mean_prefix: float  # mean length, in tokens, of the prefix shared with the reference
    prefix_lengths: list[int]


def default_messages(style: finqa.PromptStyle) -> list[list[Message]]:
    """Questions from the shipped FinQA test sample, in the form the adapter was trained on (and is served with)."""
    records = finqa.load_finqa(split="test")[:N_PROMPTS]
    return [finqa.record_prompt(r, style, chat=True) for r in records]


def encode(tokenizer: PreTrainedTokenizerBase, conversations: Sequence[list[Message]]) -> list[Prompt]:
    """Each conversation rendered and tokenized as the served model gets it (`adaptserve.models.prompt`)."""
    template = hf_template(tokenizer)
    add_bos = adds_bos(template is not None)
    prompts = []
    for messages in conversations:
        text = render(messages, template)
        prompts.append(Prompt(text, tokenizer(text, add_special_tokens=add_bos)["input_ids"], add_bos))
    return prompts


@torch.inference_mode()
def greedy_hf(
    model: PreTrainedModel, prompts: Sequence[Prompt], n: int, eos: set[int], progress: str | None = None
) -> list[list[int]]:
    """Greedy tokens of each prompt, up to `n` or EOS; a progress bar titled `progress`, if given."""
    outputs = []
    for prompt in tqdm(prompts, desc=progress, disable=progress is None):
        ids = torch.tensor([prompt.ids], device=model.device)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            num_beams=1,
            eos_token_id=sorted(eos) or None,
            pad_token_id=min(eos, default=None),
        )
        outputs.append(_until_eos(out[0, len(prompt.ids) :].tolist(), eos))
    return outputs


def greedy_gguf(
    path: Path,
    prompts: Sequence[Prompt],
    n: int,
    eos: set[int],
    threads: int | None,
    lora: Path | None = None,
    progress: str | None = None,
) -> tuple[list[list[int]], bool]:
    """Greedy tokens from llama.cpp (with `lora` applied to the model, if given), and whether it tokenizes every
    prompt's text to the same ids; a progress bar titled `progress`, if given."""
    n_ctx = max(len(p.ids) for p in prompts) + n + 8
    llm = llama_thread.load(path, threads, lora_path=str(lora) if lora else None, n_ctx=n_ctx)
    try:
        same_ids = all(llm.tokenize(p.text.encode("utf-8"), add_bos=p.add_bos, special=True) == p.ids for p in prompts)
        outputs = [
            llama_thread.run(_greedy_llama, llm, prompt.ids, n, eos)
            for prompt in tqdm(prompts, desc=progress, disable=progress is None)
        ]
    finally:
        llm.close()
    return outputs, same_ids


def _greedy_llama(llm: llama_cpp.Llama, prompt: list[int], n: int, eos: set[int]) -> list[int]:
    # The sampler settings LlamaCppEngine uses at temperature 0: greedy, no penalties.
    tokens = llm.generate(prompt, temp=0.0, top_k=0, min_p=0.0, repeat_penalty=1.0)
    out: list[int] = []
    for token in tokens:
        out.append(token)
        if token in eos or len(out) >= n:
            break
    tokens.close()
    return out


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    return next((tokens[: i + 1] for i, t in enumerate(tokens) if t in eos), tokens)


def agreement(reference: Sequence[list[int]], outputs: Sequence[list[int]]) -> Agreement:
    prefixes = [_common_prefix(r, o) for r, o in zip(reference, outputs, strict=True)]
    exact = sum(r == o for r, o in zip(reference, outputs, strict=True)) / len(reference)
    return Agreement(exact, sum(prefixes) / len(prefixes), prefixes)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
