"""The training loop: AdamW on the trainable parameters, warmup + cosine schedule, loss on answer tokens only."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import resource
import time
from functools import partial
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm

from adaptserve import finqa
from adaptserve.models.hf import use_bf16
from adaptserve.train import checkpoint
from adaptserve.train.config import TrainConfig, TrainError
from adaptserve.train.data import Batch, collate, encode, load_items, plan_batches
from adaptserve.train.distributed import World, join
from adaptserve.train.model import Model, causal_lm, load_model, load_tokenizer
from adaptserve.train.report import Tracker, TrainReport

log = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0
MIN_LR_FRACTION = 0.1  # the cosine decays to this fraction of the peak learning rate


def answer_loss(model: Model, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy over the answer tokens.

    The LM head runs only on the rows that predict an answer token (~20 of ~450 per example): a full-vocabulary
    head over every position would cost more time and memory than the rest of the model on a CPU.
    """
    lm = causal_lm(model)
    # Right padding under a causal mask: no real token ever attends to padding, so no attention mask is needed.
    hidden = lm.get_decoder()(input_ids=batch.input_ids, use_cache=False).last_hidden_state
    logits = lm.get_output_embeddings()(hidden[batch.predict])
    return F.cross_entropy(logits.float(), batch.targets, reduction="sum")


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def total_steps(config: TrainConfig, examples: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return config.epochs * math.ceil(math.ceil(examples / config.batch_size) / config.grad_accum)


def train(config: TrainConfig) -> TrainReport:
    """Adapt `config.base_model` on `config.data`; writes the adapter, tokenizer, report and loss plot to output_dir."""
    started = time.perf_counter()
    config.validate()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)  # every process of a data-parallel run starts from the same adapter
    world, device = join()
    if config.low_memory and device.type == "cpu":
        release_freed_memory()
    out = Path(config.output_dir)
    ckpt_root = out / "checkpoints"
    if checkpoint.latest(ckpt_root) is not None and not config.resume:
        raise TrainError(f"{out} holds checkpoints of an earlier run: pass resume to continue it, or another output_dir")
    if world.main:
        checkpoint.clear_partial(ckpt_root)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(config.base_model)
    items = load_items(config.data)
    examples = encode(items, tokenizer, config.retrieval_k, config.max_seq_len)
    steps = total_steps(config, len(examples))
    plan = plan_batches([len(e) for e in examples], config.batch_size, config.seed, steps * config.grad_accum)
    data_hash = finqa.data_hash(items)
    tracker = Tracker(config if world.main else dataclasses.replace(config, report_to="none"), out)

    bf16 = use_bf16(config.precision, device)
    model = load_model(config, device, bf16)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    warmup = int(config.warmup_ratio * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, warmup=warmup, total=steps))
    progress = checkpoint.Progress()
    if config.resume and (last := checkpoint.latest(ckpt_root)) is not None:
        progress = checkpoint.restore(last, model, optimizer, scheduler, data_hash, plan, config.grad_accum)

    bar = tqdm(total=steps, initial=progress.step, desc="train", unit="step", disable=not world.main)
    while progress.step < steps:
        tick = time.perf_counter()
        micro = plan[progress.step * config.grad_accum : (progress.step + 1) * config.grad_accum]
        shares = [share for indices in micro if (share := world.shard(indices))]
        batches = [collate([examples[i] for i in share], tokenizer.pad_token_id) for share in shares]
        # the whole step's tokens, every process's share included: the mean and the summed gradients run over them
        answer_tokens = sum(len(examples[i].answer) for indices in micro for i in indices)
        loss, grad_norm = _step(model, batches, answer_tokens, params, device, bf16, world)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        seconds, tokens = time.perf_counter() - tick, sum(len(examples[i]) for indices in micro for i in indices)
        progress.step += 1
        progress.losses.append(loss)
        progress.tokens += tokens
        progress.seconds += seconds
        progress.memory.append(memory_in_use(device))
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / seconds:.0f}")
        tracker.log(
            progress.step,
            {
                "loss": loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_second": tokens / seconds,
                "memory_bytes": progress.memory[-1],
            },
        )
        if world.main and config.save_every and (progress.step % config.save_every == 0 or progress.step == steps):
            checkpoint.save(ckpt_root, model, optimizer, scheduler, progress, data_hash, plan, dataclasses.asdict(config))
    bar.close()
    tracker.close()

    peak, peak_kind = peak_memory(device)
    report = TrainReport(
        output_dir=str(out),
        base_model=config.base_model,
        method=config.method,
        precision="bf16" if bf16 else "fp32",
        device=str(device),
        steps=progress.step,
        examples=len(examples),
        skipped=len(items) - len(examples),
        data_hash=data_hash,
        train_tokens=progress.tokens,
        train_seconds=round(progress.seconds, 3),
        tokens_per_second=round(progress.tokens / progress.seconds, 1),
        wall_seconds=round(time.perf_counter() - started, 3),
        peak_memory_bytes=peak,
        peak_memory_kind=peak_kind,
        final_loss=progress.losses[-1],
        loss_history=progress.losses,
        memory_history=progress.memory,
        config=dataclasses.asdict(config),
        versions={"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        world_size=world.size,
    )
    if world.main:
        checkpoint.save_final(model, out)
        tokenizer.save_pretrained(out)
        report.write(out)
    world.close()
    log.info(
        "done: %d steps, final loss %.4f, %.0f tokens/s; adapter in %s",
        report.steps,
        report.final_loss,
        report.tokens_per_second,
        out,
    )
    return report


def _step(
    model: Model,
    batches: list[Batch],
    answer_tokens: int,
    params: list[torch.nn.Parameter],
    device: torch.device,
    bf16: bool,
    world: World,
) -> tuple[float, float]:
    """Accumulate the gradients of one optimizer step (summed over all processes) and clip them; returns
    (mean answer-token loss, grad norm). The mean runs over the whole step's `answer_tokens`, not per micro-batch."""
    total = 0.0
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = answer_loss(model, batch.to(device)) / answer_tokens
        loss.backward()
        total += loss.item()
    world.sum_grads(params)
    return world.sum(total, device), torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM).item()


def release_freed_memory() -> None:
    """Have glibc give every freed block of 1 MiB or more back to the OS at once.

    By default glibc raises its mmap threshold to the largest block freed so far (up to its 32 MiB limit), so
    activation tensors land in the heap, and a heap fragmented by tensors of a dozen sizes never shrinks: RSS settles
    well above what is live (benchmarks/training.md). A fixed threshold keeps it at what is live, at the price of a
    page fault per page of every new activation tensor.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        log.warning("low_memory: no glibc here, the allocator is left as it is")
        return
    m_mmap_threshold = -3  # from malloc.h
    if not libc.mallopt(m_mmap_threshold, 1 << 20):
        log.warning("low_memory: glibc refused the mmap threshold")


def memory_in_use(device: torch.device) -> int:
    """Bytes in use now: CUDA's allocated memory on a GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as statm:  # fields in pages: size, resident, ...
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak bytes: CUDA's allocator peak on a GPU, the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"  # Linux counts KiB
