"""One thread for all of llama.cpp's computing in this process, and how many OpenMP threads it computes with.

llama.cpp's CPU backend splits each graph over OpenMP threads, and libgomp gives every thread that starts a parallel
region a worker team of its own. Once a process holds more OpenMP threads than cores, libgomp stops letting idle
workers spin between regions (100 spins instead of ~3 ms) and every llama_decode then waits for its workers to be
woken. With base and adapted each decoding on its own engine thread, 2 cores hold 3 such threads: single-client
decoding of either model fell from ~75 to ~57 tokens/s as soon as both had answered once. Every llama_decode here
(the engines, export checks, bench) therefore runs on this one thread: one team, however many models are loaded.

The team's size defaults to one thread per physical core this process may run on, as llama.cpp's own tools do.
llama-cpp-python's default is half the logical CPUs (a guess at hyper-threading): on a 2-core VM without it, that is
one thread, and `adaptserve serve` decoded at 42 tokens/s single-client instead of 60-71 with two (8 clients: 56-60
instead of 88-94), the load client running on the same two cores.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import llama_cpp
import psutil

P = ParamSpec("P")
T = TypeVar("T")

_here = threading.local()
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama", initializer=lambda: setattr(_here, "inside", True))


def run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)` on the llama.cpp thread, the caller waiting for it; at once if called from there."""
    if getattr(_here, "inside", False):
        return fn(*args, **kwargs)
    return _executor.submit(fn, *args, **kwargs).result()


def n_threads(requested: int | None = None) -> int:
    """`requested`, else one thread per physical core this process may run on (fewer if its CPU affinity says so)."""
    if requested:
        return requested
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS has none
    return min(psutil.cpu_count(logical=False) or allowed, allowed)


def load(path: Path | str, threads: int | None, **kwargs: Any) -> llama_cpp.Llama:
    """A Llama on `path` computing on `n_threads(threads)` threads, prompts and decoding alike; `kwargs` are the
    Llama's own (n_ctx, n_batch, lora_path, ...)."""
    n = n_threads(threads)
    return llama_cpp.Llama(model_path=str(path), n_threads=n, n_threads_batch=n, verbose=False, **kwargs)
