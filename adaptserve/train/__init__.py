"""Training: adapt a base model to a task with LoRA, QLoRA or full fine-tuning, on CPU or GPU.

    from adaptserve.train import TrainConfig, train
    report = train(TrainConfig(data=["train.json", "dev.json:300:"], output_dir="runs/finqa", max_steps=200))

The loop itself (torch, transformers, peft) is imported on first use, so that the CLI can build its flags from
TrainConfig without paying for those imports.
"""

import os

from adaptserve.train.config import TrainConfig, TrainError
from adaptserve.train.report import TrainReport


def train(config: TrainConfig) -> TrainReport:
    """Run `config`; see adaptserve.train.loop.train."""
    if config.low_memory:
        # Transparent huge pages for torch's large CPU tensors: one page fault per 2 MiB instead of one per 4 KiB when
        # freed activations are unmapped and mapped again (loop.release_freed_memory). torch reads this once, at its
        # first allocation, so it only takes effect where torch was not imported yet (the CLI); elsewhere low_memory
        # just runs slower.
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from adaptserve.train.loop import train as run

    return run(config)


__all__ = ["TrainConfig", "TrainError", "TrainReport", "train"]
