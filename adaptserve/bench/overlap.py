"""Overlap of generated answers with reference answers: ROUGE-L F1 (rouge-score, Porter-stemmed) and BLEU
(sacrebleu, 0-100, its default 13a tokenization). Both are computed locally; HF `evaluate` would fetch its metric
scripts from the hub."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import sacrebleu
from rouge_score import rouge_scorer


@cache  # one scorer (and its stemmer) for every answer
def _rouge() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def scores(text: str, reference: str | None) -> tuple[float | None, float | None]:
    """(ROUGE-L F1, sentence BLEU) of `text` against `reference`; (None, None) without one, never a stand-in 0."""
    if reference is None:
        return None, None
    rouge = _rouge().score(target=reference, prediction=text)["rougeL"].fmeasure
    return rouge, sacrebleu.sentence_bleu(text, [reference]).score


def corpus_bleu(pairs: Sequence[tuple[str, str]]) -> float:
    """One BLEU over all (text, reference) pairs, n-gram counts pooled: BLEU is a corpus metric, and sentence BLEUs
    of short answers are mostly zero n-gram matches smoothed over."""
    return sacrebleu.corpus_bleu([text for text, _ in pairs], [[reference for _, reference in pairs]]).score
