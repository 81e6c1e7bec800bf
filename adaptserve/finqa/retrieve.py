"""Lexical retrieval: keep the table and the few report sentences that share the most terms with the question.

A FinQA context is ~1000 tokens at the median, most of it text the question does not need; a small model learns
and answers better from the table plus two or three sentences. Sentences are scored with BM25 against the question,
with the record's own sentences as the collection (so a word is rare if few sentences of this report use it).
Numbers are terms too, normalised so that `$ 5,829` and `5829` match, which ties years and amounts in the
question to the sentences that state them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Sequence

from adaptserve.finqa.data import FinQARecord

K1, B = 1.5, 0.75  # the usual BM25 constants
_TERM = re.compile(r"[0-9]+(?:,[0-9]{3})*(?:\.[0-9]+)?|[a-z]+")
# Words that join any question to any sentence; scoring them would favour long sentences, not relevant ones.
_STOPWORDS = frozenset(
    "a an and are as at be by did do does for from had has have in is it its of on or that the this to was were "
    "what which who with how many much".split()
)


def terms(text: str) -> list[str]:
    """Lower-cased words and numbers (thousands separators dropped), stopwords removed."""
    found = (t.replace(",", "") for t in _TERM.findall(text.lower()))
    return [t for t in found if t not in _STOPWORDS]


def bm25_scores(query: str, sentences: Sequence[str]) -> list[float]:
    """BM25 score of each sentence for `query`, the sentences themselves being the collection."""
    docs = [Counter(terms(s)) for s in sentences]
    if not docs:
        return []
    avg_len = sum(sum(d.values()) for d in docs) / len(docs) or 1.0
    doc_freq = Counter(t for d in docs for t in d)
    scores = []
    for doc in docs:
        length = sum(doc.values())
        score = 0.0
        for term in set(terms(query)):
            tf = doc.get(term, 0)
            if tf:
                idf = math.log(1 + (len(docs) - doc_freq[term] + 0.5) / (doc_freq[term] + 0.5))
                score += idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * length / avg_len))
        scores.append(score)
    return scores


def retrieve_sentences(question: str, pre_text: Sequence[str], post_text: Sequence[str], k: int) -> tuple[list[str], list[str]]:
    """The `k` best-matching sentences (only those sharing a term with the question), split back into the
    text before and after the table and kept in their original order."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    # FinQA keeps one "." per table line it extracted from the PDF; those carry nothing.
    sentences = [
        (side, i, s) for side, text in enumerate((pre_text, post_text)) for i, s in enumerate(text) if any(c.isalnum() for c in s)
    ]
    scores = bm25_scores(question, [s for _, _, s in sentences])
    ranked = sorted(range(len(sentences)), key=lambda j: -scores[j])  # stable: ties keep the earlier sentence
    keep = sorted(j for j in ranked[:k] if scores[j] > 0)
    picked = [sentences[j] for j in keep]
    return [s for side, _, s in picked if side == 0], [s for side, _, s in picked if side == 1]


def reduce_record(record: FinQARecord, k: int) -> FinQARecord:
    """The record with its text cut to the `k` sentences that best match its question; the table stays whole.

    `finqa.build_prompt(reduce_record(record, 3), fewshot=[])` is the prompt an adapter trained with k=3 expects.
    """
    pre, post = retrieve_sentences(record.question, record.pre_text, record.post_text, k)
    return dataclasses.replace(record, pre_text=pre, post_text=post)
