"""One thread for all of llama.cpp's computing in this process, and how many OpenMP threads it computes with.

llama.cpp's CPU backend splits each graph over OpenMP threads, and libgomp gives every thread that starts a parallel
region a worker team of its own. Once a process holds more OpenMP threads than cores, libgomp stops letting idle
workers spin between regions, and every llama_decode then waits for its workers to be woken: serving base and
adapted from two threads on 2 cores slowed decoding of both. So every llama_decode here (the engines, export checks,
bench) runs on this one thread, one team however many models are loaded, and the engines' schedulers run there too,
a step of each in turn (`attach`): a scheduler on a thread of its own, handing its decode calls over, made this
thread wait for the GIL, which the event loop usually held just then, before every decode step.

The team's size defaults to one thread per physical core this process may run on, as llama.cpp's own tools do;
llama-cpp-python's default, half the logical CPUs, is one thread on a 2-core machine without hyper-threading.

Every Llama here computes a row of a batch the same way however many rows share the call, so a sequence's output
does not depend on how many others decode beside it. llama.cpp's CPU backend breaks that in two ways, both turned
off here: it would repack Q4_0, Q4_K, Q8_0 and IQ4_NL weights for kernels that compute a row differently once
four or more rows share a call (see `_without_extra_buffers`), and it multiplies K-quant weights (Q4_K, Q6_K, ...) with
a tiled kernel once eight or more rows do (`GGML_CPU_TILED_MM`). What each costs: benchmarks/serving.md.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import llama_cpp
import psutil

from adaptserve.models import ModelSpec

P = ParamSpec("P")
T = TypeVar("T")

# ggml reads this once, at the process's first mat-mul, so it is set on import, before anything here can decode.
# The tiled K-quant kernel makes a sequence's logits depend on its neighbours once eight rows share a call; without
# it K-quant prompts are slower and batched decoding no slower (benchmarks/serving.md, "Batch invariance"). A value
# already in the environment wins.
os.environ.setdefault("GGML_CPU_TILED_MM", "0")


def _load_backends() -> None:
    """A portable build (GGML_BACKEND_DL, as in the Dockerfile) has no CPU backend until one is loaded, and
    llama-cpp-python never loads one (its issue #2069): load the best of the wheel's libggml-cpu-<variant>.so for this CPU.
    Through libllama's handle, which finds libllama's libggml: llama_cpp._ggml opens another copy, with its own registry."""
    ggml = llama_cpp.llama_cpp._lib
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    if ggml.ggml_backend_reg_count() == 0:  # a native build has its CPU backend built in
        ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load_all_from_path(str(Path(llama_cpp.__file__).parents[1] / "bin").encode())


_load_backends()

log = logging.getLogger(__name__)
_here = threading.local()


class _LlamaThread:
    """Runs the functions handed to it, then a step of every attached engine in turn, round after round while an
    engine has work; sleeps while there is nothing to do."""

    def __init__(self) -> None:
        self._wakeup = threading.Condition()
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()
        self._steps: list[Callable[[], bool]] = []
        self._busy = False  # an engine said it has more to do: step again without waiting
        self._thread: threading.Thread | None = None

    def call(self, fn: Callable[[], T]) -> T:
        done: Future[T] = Future()
        with self._wakeup:
            self._calls.append((fn, done))
            self._start()
            self._wakeup.notify()
        return done.result()

    def attach(self, step: Callable[[], bool]) -> None:
        with self._wakeup:
            self._steps.append(step)
            self._start()

    def detach(self, step: Callable[[], bool]) -> None:
        with self._wakeup:
            self._steps.remove(step)

    def wake(self) -> None:
        with self._wakeup:
            self._busy = True
            self._wakeup.notify()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llama", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        _here.inside = True
        while True:
            with self._wakeup:
                while not (self._calls or self._busy):
                    self._wakeup.wait()
                calls, self._busy = list(self._calls), False
                self._calls.clear()
            for fn, done in calls:
                try:
                    done.set_result(fn())
                except BaseException as err:  # the caller gets it, as from a ThreadPoolExecutor
                    done.set_exception(err)
            with self._wakeup:  # after the calls: a step one of them detached is not called again
                steps = list(self._steps)
            busy = False
            for step in steps:
                try:
                    busy = step() or busy
                except Exception:  # an engine's failure must not stop the others
                    log.exception("an engine step failed")
            if busy:
                with self._wakeup:
                    self._busy = True


_thread = _LlamaThread()


def run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)` on the llama.cpp thread, the caller waiting for it; at once if called from there."""
    if getattr(_here, "inside", False):
        return fn(*args, **kwargs)
    return _thread.call(functools.partial(fn, *args, **kwargs))


def attach(step: Callable[[], bool]) -> None:
    """Call `step()` on the llama.cpp thread, in turn with the other attached steps, for as long as it returns True
    or `wake()` is called; it must not block."""
    _thread.attach(step)


def detach(step: Callable[[], bool]) -> None:
    """Stop calling `step`; run from the llama.cpp thread (`run`) to be sure it is not running meanwhile."""
    _thread.detach(step)


def wake() -> None:
    """Step the attached engines now: one has new work."""
    _thread.wake()


def n_threads(requested: int | None = None) -> int:
    """`requested`, else one thread per physical core this process may run on (fewer if its CPU affinity says so)."""
    if requested:
        return requested
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS has none
    return min(psutil.cpu_count(logical=False) or allowed, allowed)


def load(path: Path | str, threads: int | None = None, **kwargs: Any) -> llama_cpp.Llama:
    """A Llama on `path` computing on `n_threads(threads)` threads, prompts and decoding alike; `kwargs` are the
    Llama's own (n_ctx, n_batch, lora_path, vocab_only, ...). Every llama.cpp model in this project opens here."""
    n = n_threads(threads)
    return llama_cpp.Llama(model_path=str(path), n_threads=n, n_threads_batch=n, verbose=False, **kwargs)


@dataclass
class _Shared:
    llm: llama_cpp.Llama
    users: int = 0


_shared: dict[tuple[str, int, str], _Shared] = {}
_shared_lock = threading.Lock()


def share(path: Path | str, threads: int | None = None, **kwargs: Any) -> llama_cpp.Llama:
    """`load`, or the Llama an earlier call made for the same file, threads and arguments: engines on one base (the
    base itself and the adapters applied to it per context) then hold one copy of its weights and vocabulary.
    Give it back with `unshare`."""
    key = (str(Path(path).resolve()), n_threads(threads), repr(sorted(kwargs.items())))
    with _shared_lock:
        if key not in _shared:
            _shared[key] = _Shared(load(path, threads, **kwargs))
        _shared[key].users += 1
        return _shared[key].llm


def unshare(llm: llama_cpp.Llama) -> None:
    """One user fewer of a Llama from `share`; the last one closes it."""
    with _shared_lock:
        key = next(k for k, shared in _shared.items() if shared.llm is llm)
        _shared[key].users -= 1
        if _shared[key].users == 0:
            del _shared[key]
            llm.close()


def load_lora(llm: llama_cpp.Llama, path: Path | str) -> llama_cpp.llama_adapter_lora_p:
    """A LoRA GGUF loaded for `llm`'s model, for contexts to apply (`KVSlots`); `llama_cpp.llama_adapter_lora_free`
    releases it (llama.cpp frees what is left with the model)."""
    adapter = llama_cpp.llama_adapter_lora_init(llm._model.model, str(path).encode())
    if not adapter:
        raise RuntimeError(f"llama.cpp could not load the LoRA GGUF {path} onto {Path(llm.model_path).name}")
    return adapter


def open_model(spec: ModelSpec, threads: int | None = None, **kwargs: Any) -> llama_cpp.Llama:
    """`load` for a registry entry that llama.cpp runs as it is: a GGUF, with its LoRA GGUF applied if it has one."""
    return load(spec.path, threads, lora_path=spec.lora, **kwargs)


def gguf_name(spec: ModelSpec) -> str:
    """The file(s) `open_model` reads, as reports name them."""
    return spec.path.name + (f" + {Path(spec.lora).name}" if spec.lora else "")


def _without_extra_buffers() -> llama_cpp.llama_model_params:
    """llama.cpp's default model parameters with `use_extra_bufts` off: weights stay as the GGUF stores them.

    The extra buffer types are CPU copies of the weights for special kernels: repacked Q4_0/Q4_K/Q8_0/IQ4_NL for
    AVX2/AVX-512, and on CPUs with AMX the AMX tiles. Off, for two reasons. The repacked kernels compute a row
    differently once four or more rows share a call, so a sequence's output would depend on its neighbours
    (benchmarks/serving.md). And the AMX buffer crashes the process: on a Xeon with AMX, a plain `Llama(...)` on
    SmolLM2's Q4_1 segfaults in `ggml_backend_amx_mul_mat` (docs/cpus.md has the reproduction).
    """
    params = _default_model_params()
    params.use_extra_bufts = False
    return params


# llama_cpp.Llama reads its model parameters from this function: replacing it here makes the policy hold for every
# Llama in a process that imported this module, llama-cpp-python's own server included (benchmarks/peer.py).
_default_model_params = llama_cpp.llama_cpp.llama_model_default_params
llama_cpp.llama_cpp.llama_model_default_params = _without_extra_buffers
