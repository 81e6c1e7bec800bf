"""Sampling one sequence's next token from its logits row with llama.cpp's samplers.

The chain is llama.cpp's own, in its order (logit bias, penalties, then top-p, temperature and the draw, or greedy),
leaving out what would do nothing. A grammar is checked the way llama.cpp's common sampler does it: the token the
chain picks is kept when the grammar accepts it, and only otherwise is the grammar applied to the whole vocabulary
and the chain run again. Applying a grammar to every token of a large vocabulary costs far more than a decode step.
"""

from __future__ import annotations

import ctypes
import os
import random
import tempfile
import threading

import llama_cpp
import numpy as np

from adaptserve.serve.engine import InvalidGrammar, SamplingParams

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)
_STDERR = threading.Lock()


def grammar_sampler(vocab: llama_cpp.llama_vocab_p, grammar: str) -> llama_cpp.llama_sampler_p:
    """llama.cpp's grammar sampler for a GBNF grammar, or InvalidGrammar with llama.cpp's reason. Its parser writes
    the reason to stderr, so stderr is read while it runs."""
    with _STDERR, tempfile.TemporaryFile() as errors:
        saved = os.dup(2)
        os.dup2(errors.fileno(), 2)
        try:
            sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if sampler:
            return sampler
        errors.seek(0)
        lines = [line.strip() for line in errors.read().decode(errors="replace").splitlines() if line.strip()]
    reason = next((line.split("error parsing grammar: ", 1)[1] for line in lines if "error parsing grammar: " in line), None)
    raise InvalidGrammar(f"the grammar does not parse: {reason or (lines[0] if lines else 'no reason given')}")


def grammar_reason(vocab: llama_cpp.llama_vocab_p, grammar: str) -> str | None:
    """Why llama.cpp cannot parse `grammar`, or None when it can."""
    try:
        llama_cpp.llama_sampler_free(grammar_sampler(vocab, grammar))
    except InvalidGrammar as err:
        return str(err)
    return None


def _chain(params: SamplingParams, n_vocab: int, limit: int) -> llama_cpp.llama_sampler_p | None:
    """The chain for these settings; None for plain greedy (an argmax of the row)."""
    plain_greedy = params.greedy and not (params.logit_bias or params.presence_penalty or params.frequency_penalty)
    if plain_greedy:
        return None
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if params.logit_bias:
        bias = (llama_cpp.llama_logit_bias * len(params.logit_bias))(*params.logit_bias)
        add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), bias))
    if params.presence_penalty or params.frequency_penalty:  # over the completion's tokens, fed back by accept()
        add(chain, llama_cpp.llama_sampler_init_penalties(n_vocab, limit, 1.0, params.frequency_penalty, params.presence_penalty))
    if params.greedy:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
    add(chain, llama_cpp.llama_sampler_init_dist(params.seed if params.seed is not None else random.getrandbits(32)))
    return chain


class Sampler:
    """One sequence's sampler: its chain, its grammar (if any) and their state (penalty history, grammar stack)."""

    def __init__(self, params: SamplingParams, vocab: llama_cpp.llama_vocab_p, n_vocab: int, limit: int) -> None:
        self.chain = _chain(params, n_vocab, limit)
        self.grammar = grammar_sampler(vocab, params.grammar) if params.grammar is not None else None
        self._candidates = np.empty(n_vocab, dtype=_TOKEN_DATA) if self.chain or self.grammar else None

    def sample(self, logits: np.ndarray) -> int:
        """The next token from a logits row (left as it is); the chain and the grammar take it in."""
        if self._candidates is None:
            return int(logits.argmax())
        token = self._pick(logits, grammar=False)
        if self.grammar is not None and not self._allows(token):
            token = self._pick(logits, grammar=True)
        for sampler in (self.chain, self.grammar):
            if sampler is not None:
                llama_cpp.llama_sampler_accept(sampler, token)
        return token

    def _pick(self, logits: np.ndarray, grammar: bool) -> int:
        if self.chain is None and not grammar:
            return int(logits.argmax())
        candidates = self._candidates
        assert candidates is not None
        candidates["id"] = np.arange(len(candidates), dtype=np.int32)
        candidates["logit"], candidates["p"] = logits, 0.0
        array = llama_cpp.llama_token_data_array(
            candidates.ctypes.data_as(llama_cpp.llama_token_data_p), len(candidates), -1, False
        )
        if grammar:
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
        if self.chain is None:  # greedy under a grammar: the best token it leaves
            return int(candidates["id"][candidates["logit"].argmax()])
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(array))
        return int(array.data[array.selected].id)

    def _allows(self, token: int) -> bool:
        one = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 1.0, 0.0))
        array = llama_cpp.llama_token_data_array(one, 1, -1, False)
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
        return bool(np.isfinite(one[0].logit))

    def close(self) -> None:
        for sampler in (self.chain, self.grammar):
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)
        self.chain = self.grammar = None
