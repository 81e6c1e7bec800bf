"""What a run reports: train_report.json, loss.png, and live metrics for wandb or tensorboard."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptserve.host import cpu_info
from adaptserve.train.config import TrainConfig, TrainError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainReport:
    output_dir: str
    base_model: str
    method: str
    precision: str  # the one used, after "auto" was settled
    device: str
    steps: int
    examples: int  # examples trained on
    skipped: int  # examples longer than max_seq_len
    data_hash: str  # finqa.data_hash of the items, before tokenizing
    train_tokens: int  # prompt and answer tokens processed, padding excluded, over all resumed runs
    train_seconds: float  # time in the training loop, over all resumed runs
    tokens_per_second: float
    wall_seconds: float  # this run alone, loading included
    peak_memory_bytes: int
    peak_memory_kind: str  # "cuda_max_allocated" or "process_max_rss"
    final_loss: float
    loss_history: list[float]  # mean answer-token loss of each optimizer step
    memory_history: list[int]  # bytes in use after each step, of the kind of peak_memory_kind
    config: dict[str, Any]
    versions: dict[str, str]
    world_size: int = 1  # processes that trained it together, data-parallel (torchrun / accelerate launch)
    host: dict[str, Any] = dataclasses.field(default_factory=cpu_info)  # the CPU and its kernel-deciding flags

    def write(self, out: Path) -> None:
        (out / "train_report.json").write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        plot_run(self.loss_history, self.memory_history, out / "loss.png")


def plot_run(losses: list[float], memory: list[int], path: Path) -> None:
    """The loss curve, and below it the memory in use: a run that leaks or fragments shows a rising line."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True, height_ratios=(2, 1))
    top.plot(range(1, len(losses) + 1), losses, linewidth=1)
    top.set(ylabel="answer-token loss", title="training loss")
    bottom.plot(range(1, len(memory) + 1), [m / 2**30 for m in memory], linewidth=1, color="tab:orange")
    bottom.set(xlabel="step", ylabel="memory in use (GiB)", ylim=(0, None))
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class Tracker:
    """Sends step metrics to wandb or tensorboard, or nowhere (report_to=none)."""

    def __init__(self, config: TrainConfig, out: Path) -> None:
        self.kind = config.report_to
        try:
            if self.kind == "wandb":
                import wandb

                self.run = wandb.init(project="adaptserve", dir=str(out), config=dataclasses.asdict(config))
            elif self.kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError as err:
            package = "wandb" if self.kind == "wandb" else "tensorboard"
            raise TrainError(f"report_to={self.kind} needs its package: pip install {package}") from err

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.kind == "wandb":
            self.run.log(metrics, step=step)
        elif self.kind == "tensorboard":
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.kind == "wandb":
            self.run.finish()
        elif self.kind == "tensorboard":
            self.writer.close()
