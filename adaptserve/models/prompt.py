"""The prompt contract between training and serving: the text an adapter is trained on is the text it is served.

A model with a chat template renders the messages with it; the template writes its own special tokens. A model
without one gets a plain transcript, one `Role: content` line per message and then "Assistant:", tokenized with
the tokenizer's BOS (as llama.cpp adds it). The answer follows the transcript after a space and ends in EOS, and
generation stops where the model would start the user's next turn.

Each engine renders a template with its own machinery (llama.cpp's Jinja2 formatter, the tokenizer's
`apply_chat_template`) and passes it here as a `Template`; everything else comes from this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is an optional dependency; only its types are named here
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Message = dict[str, str]
Template = Callable[[Sequence[Message]], str]  # a chat template: messages -> text ending where the answer begins
ANSWER_CUE = "Assistant:"
PLAIN_STOPS = ("\nUser:",)  # without them a template-less model goes on to write the user's next turn


def transcript(messages: Sequence[Message]) -> str:
    """The plain transcript of `messages`, ending in the cue for the assistant's answer."""
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + ANSWER_CUE


def render(messages: Sequence[Message], template: Template | None) -> str:
    """The prompt text for `messages`: the chat template's, or the plain transcript for a model without one."""
    return transcript(messages) if template is None else template(messages)


def adds_bos(chat: bool) -> bool:
    """Whether tokenizing a prompt adds the BOS token: plain text needs it, a chat template writes its own."""
    return not chat


def stop_strings(chat: bool) -> tuple[str, ...]:
    """Where a chat reply ends besides EOS: a template marks the end itself, a plain transcript does not."""
    return () if chat else PLAIN_STOPS


def plain_answer(answer: str, eos_token: str) -> str:
    """The training target after a plain prompt (a transcript, or FinQA's text ending in "Program:")."""
    return f" {answer}{eos_token}"


def hf_template(tokenizer: PreTrainedTokenizerBase) -> Template | None:
    """The tokenizer's chat template with the generation prompt added; None if it has none."""
    if not tokenizer.chat_template:
        return None
    return lambda messages: tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every token that ends generation: the generation config's EOS ids and the tokenizer's EOS."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
