"""Engine log-probabilities (`TokenLogprob`) in OpenAI's two response shapes: chat's list of token objects, and the
completions API's parallel lists with character offsets."""

from __future__ import annotations

from collections.abc import Sequence

from adaptserve.serve.engine import TokenLogprob
from adaptserve.serve.schema import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=_text(e.piece),
                logprob=e.logprob if e.logprob is not None else 0.0,
                bytes=list(e.piece),
                top_logprobs=[TopLogprob(token=_text(p), logprob=lp, bytes=list(p)) for _, p, lp in e.top],
            )
            for e in entries
        ]
    )


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    """`offset`: characters of text before the first entry's token (earlier stream chunks)."""
    offsets, seen = [], b""
    for e in entries:
        offsets.append(offset + len(seen.decode("utf-8", errors="ignore")))
        seen += e.piece
    return CompletionLogprobs(
        tokens=[_text(e.piece) for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{_text(p): lp for _, p, lp in e.top} if e.logprob is not None else None for e in entries],
        text_offset=offsets,
    )


def mean_logprob(entries: Sequence[TokenLogprob]) -> float:
    """What best_of ranks choices by: the mean log-probability of their tokens (-inf for an empty choice)."""
    scores = [e.logprob for e in entries if e.logprob is not None]
    return sum(scores) / len(scores) if scores else float("-inf")
