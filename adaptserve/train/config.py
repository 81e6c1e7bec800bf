"""TrainConfig: every knob of a training run; each field is also a flag of `adaptserve train`."""

from __future__ import annotations

from dataclasses import dataclass, field

from adaptserve.models import DEFAULT_MODEL

METHODS = ("lora", "qlora", "full")
PRECISIONS = ("auto", "bf16", "fp32")
REPORTERS = ("none", "wandb", "tensorboard")


class TrainError(ValueError):
    """A training run that cannot start or continue: bad config, unreadable data, a missing optional package."""


@dataclass
class TrainConfig:
    base_model: str = field(
        default=DEFAULT_MODEL, metadata={"help": "model to adapt: built-in name, .gguf, HF directory or hub id"}
    )
    data: list[str] = field(
        default_factory=lambda: ["sample"],
        metadata={
            "help": "training data, one or more of: 'sample' (the shipped FinQA sample, for smoke runs), a FinQA "
            ".json/.jsonl file, an instruction .jsonl (instruction/input/output or messages), a FinQA directory "
            "or hub id (split 'train', or name one as SOURCE@SPLIT); append :START:END to take a slice, "
            "e.g. dev.json:300:"
        },
    )
    method: str = field(default="lora", metadata={"help": "lora, qlora (4-bit NF4 base, needs bitsandbytes) or full"})
    rank: int = field(default=16, metadata={"help": "LoRA rank"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (updates are scaled by alpha/rank)"})
    dropout: float = field(
        default=0.0,
        metadata={"help": "LoRA dropout; any dropout keeps a copy of each adapted layer's input, in activation memory"},
    )
    target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "modules LoRA adapts: all-linear, or names such as q_proj v_proj"},
    )
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (linear warmup, then cosine decay to a tenth of it)"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "fraction of the steps spent warming up linearly"})
    epochs: int = field(default=1, metadata={"help": "passes over the data (ignored when --max-steps is set)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps to run, overriding --epochs"})
    batch_size: int = field(default=4, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=2, metadata={"help": "micro-batches per optimizer step"})
    max_seq_len: int = field(default=768, metadata={"help": "longest example in tokens; longer ones are skipped"})
    retrieval_k: int = field(
        default=2, metadata={"help": "FinQA report sentences kept beside the table (BM25 against the question)"}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in the backward pass: far less memory, more time"}
    )
    low_memory: bool = field(
        default=False,
        metadata={
            "help": "CPU: gradient checkpointing plus an allocator that returns freed activations to the OS at once: "
            "far less peak RSS, flat over the run, at about half the speed (benchmarks/training.md)"
        },
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "bf16 (autocast; frozen weights stored in bf16), fp32, or auto: bf16 where the hardware "
            "computes it natively (CUDA, CPUs with AVX512-BF16/AMX), else fp32. Data-parallel processes train what "
            "one process does to 1e-4 in fp32, in bf16 only to a few 1e-3 of each step's loss"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed for initialisation, dropout and data order"})
    output_dir: str = field(default="runs/train", metadata={"help": "where the adapter, checkpoints and report go"})
    save_every: int = field(
        default=50, metadata={"help": "checkpoint every N optimizer steps and at the last (0: no checkpoints)"}
    )
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in --output-dir"})
    report_to: str = field(default="none", metadata={"help": "none, wandb or tensorboard"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch (default: torch's choice)"})

    def validate(self) -> None:
        checks = [
            (self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.report_to in REPORTERS, f"report_to must be one of {REPORTERS}, got {self.report_to!r}"),
            (bool(self.data), "data must name at least one source"),
            (bool(self.target_modules), "target_modules must name at least one module, or all-linear"),
            (self.max_steps is None or self.max_steps > 0, f"max_steps must be positive, got {self.max_steps}"),
            (self.epochs > 0, f"epochs must be positive, got {self.epochs}"),
            (self.rank > 0 and self.alpha > 0, f"rank and alpha must be positive, got {self.rank}, {self.alpha}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.batch_size > 0 and self.grad_accum > 0, "batch_size and grad_accum must be positive"),
            (self.max_seq_len > 1, f"max_seq_len must be at least 2, got {self.max_seq_len}"),
            (self.retrieval_k >= 0, f"retrieval_k must be >= 0, got {self.retrieval_k}"),
            (self.save_every >= 0, f"save_every must be >= 0, got {self.save_every}"),
            (self.threads is None or self.threads > 0, f"threads must be positive, got {self.threads}"),
        ]
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise TrainError("; ".join(errors))
