"""Checkpoints that survive a kill at any moment: written into a temporary directory, then renamed into place.

`checkpoints/step-00000040/` holds the weights as `save_pretrained` writes them (so a checkpoint is itself a
loadable adapter, for picking the best on a dev set) and `state.pt`: optimizer, scheduler, RNG, the progress so far
and the batch plan. A directory only ever appears under its final name complete, so the latest one is always whole.
Its files are fsynced before the rename and the rename after it, so this holds through a power cut too, not just a kill.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from adaptserve.train.config import TrainError
from adaptserve.train.model import Model, save_weights

log = logging.getLogger(__name__)

CONFIG = "train_config.json"
KEEP = 2  # checkpoints kept; older ones are deleted once a newer one is complete
_PREFIX = "step-"


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    memory: list[int] = field(default_factory=list)  # bytes in use after each step (see loop.memory_in_use)


def latest(root: Path) -> Path | None:
    done = sorted(root.glob(f"{_PREFIX}*")) if root.is_dir() else []
    return done[-1] if done else None


def save(
    root: Path,
    model: Model,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    data_hash: str,
    plan: list[list[int]],
    config: dict[str, Any],
) -> Path:
    final = root / f"{_PREFIX}{progress.step:08d}"
    tmp = root / f".tmp-{final.name}"
    save_weights(model, tmp)
    # The run's config beside the weights: scoring a checkpoint prompts it as the run trains (finqa.adapter_style).
    (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    state = {
        "progress": asdict(progress),
        "data_hash": data_hash,
        "plan": plan,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(state, tmp / "state.pt")
    _sync(tmp)
    os.replace(tmp, final)
    _sync(root)
    for old in sorted(root.glob(f"{_PREFIX}*"))[:-KEEP]:
        shutil.rmtree(old)
    log.info("checkpoint %s", final)
    return final


def save_final(model: Model, out: Path) -> None:
    """The finished weights into `out`, each file replaced whole: a kill mid-write leaves the old file or the new."""
    tmp = out / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(model, tmp)
    _sync(tmp)
    for path in tmp.iterdir():
        os.replace(path, out / path.name)
    tmp.rmdir()
    _sync(out)


def _sync(directory: Path) -> None:
    """fsync the files in a directory, then the directory itself (its entries: the names just renamed in)."""
    for path in directory.iterdir():
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def restore(
    path: Path,
    model: Model,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data_hash: str,
    plan: list[list[int]],
    batches_per_step: int,
) -> Progress:
    """Load a checkpoint into the freshly built run, which must have its data and, so far, its batches."""
    state: dict[str, Any] = torch.load(path / "state.pt", weights_only=True)
    progress = Progress(**state["progress"])
    done = progress.step * batches_per_step
    if state["data_hash"] != data_hash:
        raise TrainError(f"{path} was trained on other data than this run's (data hash {state['data_hash'][:12]})")
    if state["plan"][:done] != plan[:done]:
        raise TrainError(f"{path} was trained on other batches: the seed or batch sizes differ from this run's")
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    else:  # full fine-tuning: save_pretrained leaves out tied weights, hence strict=False
        model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    log.info("resumed from %s at step %d", path, progress.step)
    return progress


def clear_partial(root: Path) -> None:
    """Remove temporary directories a killed run left behind."""
    for tmp in root.glob(".tmp-*") if root.is_dir() else ():
        shutil.rmtree(tmp)
