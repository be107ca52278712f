"""BEVT pretraining: stages `image` (BEVT-I), `video` (BEVT-V) and `joint` (BEVT).

Implements paper §3 "Training strategies" (the decoupled design: BEVT-I first, then
the joint stage initialised from it) and §4.1 "Implementation details" (the recipe).
Model: bevt.py; data: data.py; masks: masking.py; targets: tokenizer.py.

    # CPU demo on the synthetic set (prepared once, with its offline tokenizer), then both stages
    python tools/synthetic.py
    python train.py --preset cpu --stage image && python train.py --preset cpu --stage joint

    # one GPU, paper recipe (Swin-B), your data: the image stage, then the joint stage from it
    python train.py --stage image --image-root ImageNet/train --tokenizer dalle_encoder.pt
    python train.py --stage joint --video-root K400/ --video-list k400_train.txt \\
        --image-root ImageNet/train --tokenizer dalle_encoder.pt

    # one node, 8 GPUs (each stage); several CPU processes, nodes, SLURM and requeues: docs/gpu.md
    torchrun --standalone --nproc_per_node=8 train.py --stage image ...
    torchrun --standalone --nproc_per_node=8 train.py --stage joint ...

Global batch (§4.1): 2048 images (image stage), 256 clips + 2048 images (joint), 256 clips
(video stage); gradient accumulation makes it up from the per-process batch (printed at start).
A run depends on its seed and effective batch, not on the number of processes: `--resume` on
another number keeps the effective batch by changing the accumulation. Learning rate 5e-4 at
the paper's global batch, scaled linearly: lr = base_lr · effective_batch / paper_batch.

Outputs in --out/<stage>: `ckpt.pt` (latest, atomic, resumable with --resume auto), `final.pt`,
`metrics.jsonl`, `config.json`; `python tools/plot.py <out>/<stage>` draws the curves.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import inspect
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import bevt
import data
import masking
import swin3d
import tokenizer

# -----------------------------------------------------------------------------
# Configuration: the paper's recipe as defaults (§4.1), one preset for the CPU demo

PRECISIONS = ("auto", "bf16", "fp32")
DIST_TIMEOUT_MIN = 10.0   # a stuck rank fails the job in minutes, not after the backends' 30-minute default


@dataclass
class TrainConfig:
    stage: str = "joint"                  # image (BEVT-I) | video (BEVT-V) | joint (BEVT), §3
    preset: str = "paper"                 # paper (the §4.1 recipe) | cpu (the demo, scaled down)
    model: str = "base"                   # swin3d preset; Swin-B throughout the paper (§4.1)
    out: str = "runs/bevt"                # run root: each stage writes to <out>/<stage>
    init: str = ""                        # checkpoint to start from | scratch; joint: <out>/image/final.pt,
                                          # required unless scratch (random init is Table 6's ablation)
    resume: str = "auto"                  # auto: continue <out>/<stage>/ckpt.pt if there is one | no | a path
    overwrite: bool = False               # discard a previous run in <out>/<stage> and start again
    # --- data (paper §4.1)
    data: str = ""                        # the synthetic set (CPU preset; tools/synthetic.py); "" = data/synthetic
    video_root: str = ""                  # folder of videos (your data); the --video-list paths are relative to it
    video_list: str = ""                  # list file of the pretraining videos, "path label" a line
    image_root: str = ""                  # folder of images in ImageNet layout (your data)
    image_list: str = ""                  # optional list file of images under --image-root (else the folder is scanned)
    frames: int = 16                      # clip length T (§4.1)
    frame_interval: int = 8               # sampling rate: every 8th frame (paper §4.1)
    crop: int = 224                       # square crop, px; a multiple of 16 (one target code per 16x16 px)
    short_side: tuple = (256, 320)        # random short-side rescale range LO HI (paper §4.1)
    video_batch: int = 8                  # clips per process (paper §4.1: 8 clips + 64 images per GPU)
    image_batch: int = 64                 # images per process
    global_video_batch: int = 256         # effective batch in clips (§4.1: 256); sets the accumulation and lr
    global_image_batch: int = 2048        # effective batch in images (§4.1: 2048; the image stage's)
    image_cycles: int = 5                 # ImageNet cycled 5x per video epoch in the joint stage (paper §4.1)
    workers: int = 8                      # data loader processes per training process
    mask_strategy: str = "tube"           # video masks: masking.STRATEGIES (Table 8); images: block
    mask_ratio: float = masking.MASK_RATIO  # §3 "the masking ratio of each masked frame is 0.5"
    # --- targets (§3 "Tokenizer")
    tokenizer: str = ""                   # DALL-E encoder.pkl / converted .pt / offline tokenizer file
    vocab_size: int = bevt.VOCAB_SIZE     # codebook size: DALL-E's 8192 (appendix A); cpu: <data>/tokenizer_<V>.pt
    # --- optimisation (paper §4.1)
    epochs: int = 150                     # epochs of the stage's data (§4.1: 800 ImageNet, 150 K400)
    warmup_epochs: float = 10.0           # linear lr warm-up, then cosine
    lr: float = 5e-4                      # at the global batch; scaled linearly with the effective batch
    min_lr: float = 0.0                   # cosine to 0
    weight_decay: float = 0.05            # AdamW; none on relative tables, norms, biases, the mask token
    betas: tuple = (0.9, 0.999)           # AdamW
    clip_grad: float = 3.0                # gradient norm clipping; 0 = off (the norm is still logged)
    accum_steps: int = 0                  # 0 = derived from the global batch
    drop_path: float = 0.3                # Swin-B pretraining (paper §3 "BEVT encoders")
    lam: float = 1.0                      # λ of eq. 5: L = L_MIM + λ·L_MVM
    max_steps: int = 0                    # stop after this many optimizer steps (0 = the schedule's end)
    # --- runtime
    compile: bool = False                 # torch.compile the two streams (slow start, faster steps on GPUs)
    precision: str = "auto"               # auto (bf16 where the GPU/CPU computes it natively, else fp32) | bf16 | fp32
    tokenizer_precision: str = "fp32"     # DALL-E encoder: fp32 | bf16 | fp16 (tokenizer.Tokenizer.set_precision)
    grad_checkpointing: bool = False      # recompute each block's activations in the backward (less memory)
    dist_timeout: float = DIST_TIMEOUT_MIN  # minutes a collective waits for a dead or frozen rank
    seed: int = 0                         # base seed: data order, masks and augmentation; + rank for the model
    log_every: int = 10                   # optimizer steps between metrics.jsonl reads (one host sync)
    ckpt_every: int = 500                 # optimizer steps between checkpoints


# The CPU demo: everything scaled down so both stages run in minutes on 2 cores (the precision stays "auto").
CPU_PRESET = dict(
    model="cpu", frames=8, frame_interval=2, crop=112, short_side=(128, 160),
    video_batch=4, image_batch=16, global_video_batch=4, global_image_batch=16, image_cycles=1,
    workers=1, vocab_size=256, warmup_epochs=1.0, lr=2e-3,
    drop_path=0.0, log_every=10, ckpt_every=50,
)

STAGE_EPOCHS = {"image": 800, "video": 150, "joint": 150}   # §4.1
CPU_STAGE_EPOCHS = {"image": 20, "video": 8, "joint": 8}    # CPU demo: ~600 and ~400 steps


# -----------------------------------------------------------------------------
# Optimiser and schedule (paper §4.1)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """AdamW groups: no weight decay on norms and biases (1-D), relative position tables and the mask token."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("relative_position_bias_table", "mask_token")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Per-iteration linear warm-up, then cosine to min_lr (paper §4.1)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(t, 1.0)))


# -----------------------------------------------------------------------------
# One optimizer step: eq. 5's loss, L = L_MIM + λ·L_MVM, over the effective batch (§4.1), against the targets
# of the frozen tokenizer, which stays outside the trained model (§3 "Tokenizer")


def model_inputs(batch: dict, tok, device) -> dict:
    """A data.py batch -> BEVT.forward's arguments, on the training device.

    Pixels arrive as uint8 and are normalised here (data.normalize_batch). Targets (eqs. 3-4's z):
    the loader halves every crop with the tokenizer's own Lanczos (tokenizer.half_copy; §3: 112² for
    a 224² crop) and ships it as `<stream>_half`, uint8 (B, 3, T, S/2, S/2) or (N, 3, S/2, S/2); the
    frozen tokenizer encodes it (fp32, no_grad, whatever the autocast) into (B, T, S/16, S/16) or
    (N, S/16, S/16) codes.
    """
    out = {}
    for stream, key in (("video", "videos"), ("image", "images")):
        if stream in batch:
            out[key] = data.normalize_batch(batch[stream].to(device, non_blocking=True))
            out[f"{stream}_masks"] = batch[f"{stream}_mask"].to(device, non_blocking=True)
            out[f"{stream}_codes"] = tok.codes_of_copy(batch[f"{stream}_half"].to(device, non_blocking=True))
    return out


def train_step(model, batches: list, tok, rt: Runtime, clip_grad: float, hist: Optional[dict] = None):
    """One optimizer step's forward/backward (accumulate_gradients): BEVT.forward gives eq. 5's loss for whichever
    streams the batch holds, against the frozen tokenizer's codes. `hist`: rank 0's target histograms."""
    def forward(batch: dict) -> dict:
        inputs = model_inputs(batch, tok, rt.device)
        if hist is not None:
            count_targets(hist, inputs, tok.vocab_size)
        with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.bf16):
            return model(**inputs)
    return accumulate_gradients(model, batches, rt, clip_grad, forward)


def accumulate_gradients(model, batches: list, rt: Runtime, clip_grad: float, forward) -> tuple:
    """Forward/backward over the micro-batches of one optimizer step, then clip (both trainers, §4.1).

    `forward(batch)` returns the micro-batch's metrics, "loss" among them. Gradients are all-reduced
    only on the last micro-step; the others accumulate locally under no_sync(), which is what makes
    accumulation cheap under DDP. Each micro-batch's loss is divided by their number: the step's
    gradient is that of the mean over the effective batch. The gradient is clipped to a total norm of
    `clip_grad` (§4.1: 3.0; 0 = only measured, the SSv2 recipe's choice). Returns this rank's mean
    metrics and the synchronised gradient norm before clipping, as device tensors.
    """
    accum, sums = len(batches), {}
    for k, batch in enumerate(batches):
        with model.no_sync() if rt.ddp and k < accum - 1 else contextlib.nullcontext():
            out = forward(batch)
            (out["loss"] / accum).backward()
        for key, v in out.items():
            sums[key] = sums.get(key, 0.0) + v.detach().float() / accum
    # DDP / compile wrappers hold the same tensors; a bound of inf scales by exactly 1.
    return sums, torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad or math.inf)


# -----------------------------------------------------------------------------
# The training loop: batch, model, optimiser, resume, steps, checkpoints


class Batch(NamedTuple):
    """One optimizer step's samples: per process x world x accumulation = the effective batch."""
    per_process: dict         # {unit: samples per micro-batch}, the unit that sets the accumulation first
    unit: str                 # clips (video, joint) or images (image stage)
    accum: int
    eff: int                  # effective batch in `unit`
    lr: float                 # base lr scaled linearly: base_lr x eff / paper
    paper: int                # the recipe's global batch in `unit` (§4.1: 256 clips, 2048 images)
    note: str                 # what a resume changed


def plan_batch(cfg, per_process: dict, paper: int, flags: dict, world: int, claim: Claim) -> Batch:
    """The accumulation that makes up the recipe's global batch `paper` (both trainers); a resumed
    run keeps its checkpoint's effective batch on whatever number of processes (resume_accumulation)."""
    unit, per_proc = next(iter(per_process.items()))
    ck, note = claim.ck, ""
    if ck is None:
        accum = cfg.accum_steps or max(1, paper // (per_proc * world))
    else:
        # The run's own --accum-steps (the same command line, requeued) is no request to change it.
        request = cfg.accum_steps if cfg.accum_steps != ck["config"].get("accum_steps", 0) else 0
        accum, note = resume_accumulation(ck["batch"], per_process, world, request, flags, claim.source,
                                          lambda e: cfg.lr * e / paper)
    eff = per_proc * world * accum
    return Batch(per_process, unit, accum, eff, cfg.lr * eff / paper, paper, note)


def stage_init(cfg: TrainConfig) -> str:
    """The checkpoint a fresh run starts from ('' = random weights): --init, or for the joint stage
    the image stage's final.pt (§3, the decoupled design); without it a joint stage needs --init scratch."""
    if cfg.init:
        return "" if cfg.init == "scratch" else cfg.init
    default = os.path.join(cfg.out, "image", "final.pt")
    if cfg.stage == "joint" and not os.path.exists(default):
        raise ValueError(f"the joint stage starts from the image stage's {default}, which is not there: run "
                         f"python train.py --stage image first (the same --out and data flags), or pass --init "
                         f"scratch to train it from random weights (BEVT without the decoupled design, Table 6)")
    return default if cfg.stage == "joint" else ""


def build_model(cfg: TrainConfig, rt: Runtime, init: str) -> bevt.BEVT:
    """Encoder + decoders + head (bevt.py; the tokenizer stays outside), loaded from `init` if given."""
    swin = swin3d.get_config(cfg.model, drop_path_rate=cfg.drop_path, use_checkpoint=cfg.grad_checkpointing)
    model = bevt.BEVT(bevt.BEVTConfig(swin=swin, vocab_size=cfg.vocab_size, lam=cfg.lam))
    if init:
        if cfg.stage == "joint" and not cfg.init:
            log(rt.rank, f"joint stage: initialising from the image stage's {init}")
        report = model.load_released(init)
        if not any(k.startswith("encoder.") for k in report.loaded):
            raise ValueError(f"--init {init} holds no encoder weights ({len(report.unused)} keys, none of them the "
                             f"encoder's, e.g. {report.unused[:2]}); expected a BEVT or Video Swin checkpoint")
        log(rt.rank, report.describe(init))
    elif cfg.init == "scratch":
        log(rt.rank, "init: scratch (random weights)" + ("; without the image stage this is BEVT without the "
                                                         "decoupled design (Table 6)" if cfg.stage == "joint" else ""))
    model.set_stage(cfg.stage)                                          # freezes the stream a stage does not train
    model.to(rt.device)
    if cfg.compile:                                                     # after .to, before DDP (nanoGPT's order)
        model.compile_streams(dynamic=False)                            # one graph per input shape
    return model


def train(cfg: TrainConfig, rt: Runtime, data_root: str, tok_path: str, out_dir: str, claim: Claim) -> dict:
    """Pretrain one stage; returns the last logged metrics. Rank 0 alone prints and writes."""
    tok = tokenizer.load_tokenizer(tok_path, device=rt.device)          # frozen, no_grad, never in a checkpoint
    tokenizer.check_vocab(tok, cfg.vocab_size)
    tok.set_precision(cfg.tokenizer_precision)
    paper = cfg.global_image_batch if cfg.stage == "image" else cfg.global_video_batch
    clips, images = {"clips": cfg.video_batch}, {"images": cfg.image_batch}     # the unit setting the accum first
    b = plan_batch(cfg, {"image": images, "video": clips, "joint": {**clips, **images}}[cfg.stage], paper,
                   BATCH_FLAGS, rt.world, claim)
    loader = build_loader(cfg, data_root, rt.rank, rt.world, b.accum)
    steps_per_epoch = loader.steps_per_epoch                            # global steps: samples // effective batch
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    stop_at = min(total, cfg.max_steps) if cfg.max_steps else total
    if finished(claim, stop_at, out_dir, cfg, rt.rank):
        return {}
    raw = build_model(cfg, rt, claim.init)
    model = wrap_ddp(raw, rt.device) if rt.ddp else raw
    say_plan(rt, cfg, b, "--global-image-batch" if b.unit == "images" else "--global-video-batch", steps_per_epoch,
             total, warmup, f" (+ {cfg.image_batch * rt.world * b.accum} images)" if cfg.stage == "joint" else "")
    log(rt.rank, f"stage {cfg.stage}, model {cfg.model}: {swin3d.param_count(raw) / 1e6:.2f}M parameters; tokenizer "
                 f"{tok_path} ({tok.kind}, {tok.vocab_size} codes, {tok.precision}); device {rt.device}, "
                 f"{precision_note(cfg.precision, rt.bf16, rt.device)}{', compiled' if cfg.compile else ''}")
    opt = torch.optim.AdamW(param_groups(raw, cfg.weight_decay), lr=b.lr, betas=cfg.betas,
                            fused=rt.device.type == "cuda")

    # --- resume: model, optimiser, step, schedule and data position, RNG states
    step, stream, record = begin(claim, b, raw, opt, cfg, rt, out_dir, loader, stop_at, {"tokenizer": tok_path})

    # --- the loop: each optimizer step eq. 5 over the effective batch (train_step); rank 0 counts the targets
    hist = {}
    model.train()
    step_fn = functools.partial(train_step, model, tok=tok, rt=rt, clip_grad=cfg.clip_grad,
                                hist=hist if rt.rank == 0 else None)
    step, last = train_loop(raw, opt, stream, step, step_fn, cfg, rt, b, total, warmup, stop_at, out_dir, record,
                            f"bevt {cfg.stage}")
    if rt.rank == 0:
        finish(record, out_dir, raw, step, last, hist, getattr(loader, "skipped_total", 0))
    return last


def train_loop(raw, opt, stream, step: int, step_fn, cfg, rt: Runtime, b: Batch, total: int, warmup: int,
               stop_at: int, out_dir: str, record: dict, desc: str, ema=None) -> tuple:
    """Both trainers' loop from `step` to `stop_at`: the step's lr (warm-up + cosine, times a parameter group's
    `lr_scale`), `step_fn` (forward/backward of b.accum micro-batches, clipping), AdamW, the EMA, the log every
    log_every steps, checkpoints. Returns (the last step, the last logged metrics)."""
    bar = tqdm(total=stop_at, initial=step, desc=desc, dynamic_ncols=True, file=sys.stderr, disable=rt.rank != 0)
    steplog = StepLog(os.path.join(out_dir, "metrics.jsonl") if rt.rank == 0 else None, rt)
    speed, last = Throughput(), {}
    while step < stop_at:
        cur_lr = lr_at(step, total, warmup, b.lr, cfg.min_lr * b.eff / b.paper)
        for g in opt.param_groups:
            g["lr"] = cur_lr * g.get("lr_scale", 1.0)                 # finetuning: the layer-wise multiplier
        batches = stream.take(b.accum)
        sums, gnorm = step_fn(batches)
        speed.add(rt.world * sum(len(x["video" if "video" in x else "image"]) for x in batches))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update_parameters(raw)
        step += 1
        # Queued on the device; read (and checked for non-finite values) every log_every steps.
        steplog.add({"step": step, "epoch": stream.epoch, "lr": cur_lr}, {**sums, "grad_norm": gnorm})
        bar.update(1)
        save = step % cfg.ckpt_every == 0 or step == stop_at
        if step % cfg.log_every == 0 or save:          # flushed before any save: a non-finite step is never saved
            last = steplog.flush({f"{b.unit}_per_s": speed.rate()})[-1]
            bar.set_postfix({k: f"{last[k]:.3f}" for k in ("loss", "acc", "acc_mim", "acc_mvm") if k in last},
                            lr=f"{cur_lr:.2e}", **{f"{b.unit}/s": f"{speed.rate():.1f}"})
        if save:
            save_state(os.path.join(out_dir, "ckpt.pt"), raw, opt, step, stream, rt, b.accum, b.per_process, record,
                       **({"ema": ema.state_dict()} if ema is not None else {}))
    bar.close()
    return step, last


def run(cfg: TrainConfig) -> dict:
    """Find the data (before anything is written), set up the processes, claim the run folder, train."""
    data_root, tok_path = find_data(cfg)
    rt = setup_distributed(cfg.dist_timeout, cfg.precision)
    seed_everything(cfg.seed + rt.rank)                                 # seed = base + rank
    out_dir = os.path.join(cfg.out, cfg.stage)
    try:
        with claim_run_dir(out_dir, cfg, rt, lambda: stage_init(cfg)) as claim:
            return train(cfg, rt, data_root, tok_path, out_dir, claim)
    finally:
        if rt.ddp and dist.is_initialized():
            dist.destroy_process_group()


# =============================================================================
# Machinery: what running the method needs (not the method itself).
#
# -----------------------------------------------------------------------------
# The start and end of a run: the plan printed with its formulas, progress, checkpoints, the end


def say_plan(rt, cfg, b: Batch, flag: str, steps_per_epoch: int, total: int, warmup: int, more: str = "") -> None:
    """Both trainers' start-up lines: the batch and the learning rate with their formulas (§4.1), the schedule."""
    log(rt.rank, f"world {rt.world} x {b.per_process[b.unit]} {b.unit} x accum {b.accum} = effective batch {b.eff} "
                 f"{b.unit}{more}")
    log(rt.rank, f"lr = base_lr {cfg.lr:g} x effective {b.eff} / {flag} {b.paper} ({cfg.preset} preset) = "
                 f"{b.lr:.3g}; {steps_per_epoch} steps/epoch x {cfg.epochs} epochs = {total} steps, warm-up {warmup}")


class Throughput:
    """Samples per second over the last `window` steps, the first `warmup` (compilation, loader start) left out."""

    def __init__(self, window: int = 50, warmup: int = 2, clock=time.perf_counter):
        self.clock, self.warmup, self.steps, self.total = clock, warmup, 0, 0
        self.marks = collections.deque([(clock(), 0)], maxlen=window + 1)     # (time, samples so far)

    def add(self, samples: int) -> None:
        self.steps, self.total = self.steps + 1, self.total + samples
        if self.steps == self.warmup + 1:                      # measure from the end of the warm-up
            self.marks = collections.deque([self.marks[-1]], maxlen=self.marks.maxlen)
        self.marks.append((self.clock(), self.total))

    def rate(self) -> float:
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)


def save_state(path: str, model, opt, step: int, stream, rt, accum: int, per_process: dict, record, **extra) -> None:
    """Both trainers' ckpt.pt (all ranks call it: the RNG states are gathered; rank 0 writes); `extra`: an EMA."""
    rngs = [None] * rt.world if rt.ddp else [rng_state()]           # every rank's RNG states, in rank order
    if rt.ddp:
        dist.all_gather_object(rngs, rng_state())
    if rt.rank == 0:
        save_checkpoint(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), **extra, "step": step,
                               "epoch": stream.epoch, "epoch_step": stream.step, "world": rt.world,
                               "batch": batch_record(rt.world, accum, per_process), "rng": rngs,
                               "config": record}, keep_previous=True)


def finish(record: dict, out_dir: str, model, step: int, last: dict, hist: dict, skipped: int) -> None:
    """Rank 0 at the end: final.pt, the last metrics, the accuracy baselines (printed and logged)."""
    save_checkpoint(os.path.join(out_dir, "final.pt"), {"model": model.state_dict(), "step": step, "config": record})
    if last:
        print("final: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items()))
    baselines = {f"acc_{name}": {"uniform": 1.0 / record["vocab_size"], "majority": float(h.max() / h.sum())}
                 for name, h in sorted(hist.items()) if float(h.sum()) > 0}
    for key, b in baselines.items():                     # rank 0's targets: read the last steps' accuracy against these
        print(f"masked-token accuracy baselines ({key[4:]}): uniform 1/{record['vocab_size']} = {b['uniform']:.4f}, "
              f"always the most frequent code = {b['majority']:.4f}")
    if baselines:                                        # kept with the run, for tools/plot.py
        with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "baselines": baselines}) + "\n")
    print(f"curves: python tools/plot.py {out_dir}")
    if skipped:
        print(f"skipped {skipped} unreadable media files over the run (see the log above for their paths)")


# -----------------------------------------------------------------------------
# Command line: flags generated from TrainConfig, ranges checked once, one line per user error

CHOICES = {"stage": bevt.STAGES, "preset": ("paper", "cpu"), "precision": PRECISIONS,
           "tokenizer_precision": ("fp32", "bf16", "fp16"), "mask_strategy": tuple(masking.STRATEGIES)}
POSITIVE = ("frames", "frame_interval", "crop", "video_batch", "image_batch", "global_video_batch",
            "global_image_batch", "image_cycles", "vocab_size", "epochs", "lr", "log_every",
            "ckpt_every", "dist_timeout")
NON_NEGATIVE = ("workers", "warmup_epochs", "min_lr", "weight_decay", "clip_grad", "accum_steps", "lam",
                "max_steps")
FRACTIONS = {"mask_ratio": (0.0, 1.0), "drop_path": (0.0, 1.0)}   # half-open intervals [lo, hi)

# What a user's input can raise (bad paths, files, values, a full disk); anything else is a bug: its traceback.
USER_ERRORS = (ValueError, OSError, TimeoutError, pickle.UnpicklingError)


def field_help(cls) -> dict:
    """field name -> the comment on its line in the dataclass source and the comment-only lines under it."""
    helps, name = {}, None
    for line in inspect.getsource(cls).splitlines():
        field, more = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line), re.match(r"\s+#(?! ---)\s*(.*)$", line)
        if field:
            name, helps[field.group(1)] = field.group(1), field.group(2)
        elif more and name:
            helps[name] += " " + more.group(1)
        else:
            name = None
    return helps


def add_dataclass_flags(ap: argparse.ArgumentParser, cls, choices: dict, only=None, variants=None) -> None:
    """One flag per field of `cls` (or of `only`), default None to tell a given value from a preset's; --help gives
    each field's comment and its default under each of `variants` ({name: {field: value}}, e.g. the presets)."""
    defaults, helps = cls(), field_help(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        default = getattr(defaults, f.name)
        show = lambda v: " ".join(map(str, v)) if isinstance(v, tuple) else (v or "none") if isinstance(v, str) \
            else str(v)                                                              # noqa: E731
        values = {name: show(v.get(f.name, default)) for name, v in (variants or {}).items()}
        given = (f"default {show(default)}" if set(values.values()) <= {show(default)} else
                 "default: " + ", ".join(f"{name} {v}" for name, v in values.items()))
        text = f"{helps.get(f.name, '')} ({given})".replace("%", "%%")
        kw = (dict(action=argparse.BooleanOptionalAction) if isinstance(default, bool) else
              dict(type=type(default[0]), nargs=len(default)) if isinstance(default, tuple) else
              dict(type=type(default), choices=choices.get(f.name)))
        ap.add_argument("--" + f.name.replace("_", "-"), default=None, help=text, **kw)


def config_from(cls, args: dict, *layers: dict):
    """Both trainers' config: `cls`'s defaults <- each of `layers` (a recipe, a preset) <- the flags given."""
    cfg = dataclasses.asdict(cls())
    for layer in layers:
        cfg.update(layer)
    cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if v is not None})
    return cls(**cfg)


def check_ranges(cfg, positive=(), non_negative=(), fractions=None) -> None:
    """Raise a ValueError naming the first flag whose value is outside its range."""
    rules = ([(name, lambda v: v > 0, "> 0") for name in positive]
             + [(name, lambda v: v >= 0, ">= 0 (0 = off or automatic)") for name in non_negative]
             + [(name, lambda v, lo=lo, hi=hi: lo <= v < hi, f"in [{lo:g}, {hi:g})")
                for name, (lo, hi) in (fractions or {}).items()])
    for name, ok, want in rules:
        if not ok(getattr(cfg, name)):
            raise ValueError(f"--{name.replace('_', '-')} must be {want}, got {getattr(cfg, name)!r}")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block of 40 flags), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> Parser:
    """train.py's flags, generated from TrainConfig; --help gives each default under both presets."""
    ap = Parser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    epochs = lambda e: f"{e['image']} (image), {e['joint']} (video, joint)"      # noqa: E731
    add_dataclass_flags(ap, TrainConfig, CHOICES, variants={"paper": {"epochs": epochs(STAGE_EPOCHS)},
                                                            "cpu": {**CPU_PRESET, "epochs": epochs(CPU_STAGE_EPOCHS)}})
    return ap


def parse_args(argv=None) -> TrainConfig:
    """Defaults <- preset (and its stage's epochs) <- explicit flags; every check that needs only the flags."""
    ap = build_parser()
    args = vars(ap.parse_args(argv))
    cpu = args["preset"] == "cpu"
    epochs = (CPU_STAGE_EPOCHS if cpu else STAGE_EPOCHS)[args["stage"] or TrainConfig.stage]
    cfg = config_from(TrainConfig, args, CPU_PRESET if cpu else {}, {"epochs": epochs})
    try:
        check_ranges(cfg, POSITIVE, NON_NEGATIVE, FRACTIONS)
        lo, hi = cfg.short_side
        if not cfg.crop <= lo <= hi:
            raise ValueError(f"--short-side LO HI must satisfy crop {cfg.crop} <= LO <= HI, got {lo} {hi}")
        if cfg.crop % 16:
            raise ValueError(f"--crop must be a multiple of 16 (one target code per 16x16 px), got {cfg.crop}")
    except ValueError as e:
        ap.error(str(e))
    try:                 # the masks the stage will draw (data.py builds the same generators), before any data is read
        if cfg.stage != "video":
            masking.MaskGenerator("block", (cfg.crop, cfg.crop), mask_ratio=cfg.mask_ratio)
        if cfg.stage != "image":
            masking.MaskGenerator(cfg.mask_strategy, (cfg.frames, cfg.crop, cfg.crop), mask_ratio=cfg.mask_ratio)
    except ValueError as e:
        ap.error(f"--mask-ratio {cfg.mask_ratio} at --crop {cfg.crop}, --frames {cfg.frames}: {e}")
    return cfg


def run_cli(prog: str, fn, *args):
    """The one way every CLI ends on a user error (`PROG: error: ...`, exit 2) or Ctrl-C (exit 130): one line on
    stderr, after the open progress bars are closed (so that it starts a line of its own)."""
    try:
        return fn(*args)
    except (*USER_ERRORS, KeyboardInterrupt) as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        if dist.is_initialized() and not interrupted:
            dist.destroy_process_group()
        for bar in list(tqdm._instances):
            bar.close()
        print(f"{prog}: interrupted" if interrupted else f"{prog}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(130 if interrupted else 2) from None


# -----------------------------------------------------------------------------
# Data and processes: the synthetic set or your own, data.py's loader; DDP (nanoGPT style, gloo on CPU), precision


def find_data(cfg: TrainConfig) -> tuple:
    """(data root, tokenizer file), checked before anything is written: --tokenizer, or with the CPU
    preset and no data flags the synthetic set at --data (data/synthetic) and its tokenizer_<V>.pt."""
    own = bool(cfg.video_root or cfg.image_root)
    root = cfg.data or (os.path.dirname(os.path.abspath(cfg.out)) if own else "data/synthetic")
    if cfg.tokenizer:
        return root, cfg.tokenizer
    if cfg.preset != "cpu" or own:
        raise ValueError("--tokenizer is required" + (" with your own data" if cfg.preset == "cpu" else "") +
                         ": the DALL-E encoder.pkl, its converted .pt (python tools/tokenizer_tool.py convert), or "
                         "an offline tokenizer fitted on your images (python tools/tokenizer_tool.py fit --data DIR "
                         f"--vocab {cfg.vocab_size} --out tok.pt)")
    path = os.path.join(root, f"tokenizer_{cfg.vocab_size}.pt")
    if not os.path.isfile(path):
        what = "synthetic set" if not os.path.isdir(root) else f"tokenizer {path}"
        raise ValueError(f"no {what} at {root}: prepare it with python tools/synthetic.py --out {root}")
    return root, path


def data_config_from(cls, cfg, **renamed):
    """data.py's config `cls` from a trainer's: each field `cfg` holds, under its name or renamed[field]."""
    values = {f.name: getattr(cfg, renamed.get(f.name, f.name)) for f in dataclasses.fields(cls)
              if hasattr(cfg, renamed.get(f.name, f.name))}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})   # JSON lists -> tuples


def build_loader(cfg: TrainConfig, data_root: str, rank: int, world: int, accum: int):
    """data.py's loader for the stage, your data or the synthetic set's; `accum` micro-batches a step here."""
    dcfg = data_config_from(data.PretrainDataConfig, cfg, interval="frame_interval", video_mask="mask_strategy",
                            num_workers="workers")
    synthetic = not (cfg.video_root or cfg.image_root)
    video_root = cfg.video_root or os.path.join(data_root, "videos")
    video_ann = cfg.video_list or (os.path.join(data_root, "videos", "train_appearance.txt") if synthetic else None)
    image_root = cfg.image_root or (os.path.join(data_root, "images", "train") if synthetic else None)
    return data.build_pretrain_loader(cfg.stage, dcfg, video_ann=video_ann, video_root=video_root,
                                      image_root=image_root, image_ann=cfg.image_list or None,
                                      rank=rank, world_size=world, accum=accum, verbose=rank == 0)


class Runtime(NamedTuple):
    """Where this process runs: what every step, evaluation and logging function needs to know."""
    ddp: bool                 # one of several processes (torchrun): a DDP-wrapped model, collectives
    rank: int
    world: int
    device: torch.device
    bf16: bool                # the model runs under bf16 autocast (--precision, resolved for this device)


def setup_distributed(timeout_min: float = DIST_TIMEOUT_MIN, precision: str = "fp32") -> Runtime:
    """This process's Runtime: NCCL on CUDA, gloo on CPUs; the GPU is bound first (else NCCL guesses device 0)."""
    tasks = int(os.environ.get("SLURM_NTASKS", 1))
    if "SLURM_PROCID" in os.environ and tasks > 1 and "RANK" not in os.environ:
        raise ValueError(f"srun started {tasks} tasks without torchrun (RANK unset): each would run alone on the same "
                         f"--out; start one torchrun per node: srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES"
                         f" --nproc_per_node=GPUS --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 {sys.argv[0]} ...")
    ddp = int(os.environ.get("RANK", -1)) != -1
    timeout = datetime.timedelta(minutes=timeout_min)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if ddp and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", timeout=timeout, device_id=device)
    elif ddp:
        dist.init_process_group(backend="gloo", timeout=timeout)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True      # every step has the same shapes: tune the convolutions once
    return Runtime(ddp, rank, world, device, resolve_precision(precision, device))


def log(rank: int, *args) -> None:
    if rank == 0:
        print(*args, flush=True)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> DDP:
    """DDP as both trainers use it. No buffer broadcast: the only buffers are index tables no forward reads.
    find_unused_parameters=False: set_stage freezes what a stage does not train. Gradients are views into the
    all-reduce buckets (no second gradient-sized copy)."""
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               broadcast_buffers=False, find_unused_parameters=False, gradient_as_bucket_view=True)


def all_reduce_mean(x: torch.Tensor, ddp: bool) -> torch.Tensor:
    """The mean over ranks of a tensor on the training device (NCCL takes only GPU tensors, so a CPU
    tensor would pass the CPU tests and crash the first GPU step); nothing is read back to the host."""
    if not ddp:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x.div_(dist.get_world_size())


def all_gather_rows(x: torch.Tensor, ddp: bool) -> torch.Tensor:
    """Every rank's (n_r, ...) tensor concatenated along dim 0 in rank order (evaluation only: through the host)."""
    if not ddp:
        return x
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x.cpu())
    return torch.cat(parts).to(x.device)


def resolve_precision(precision: str, device: torch.device) -> bool:
    """--precision -> whether the step runs under bf16 autocast; auto: where the device computes bf16 natively
    (a CPU with AVX512-BF16, AMX-BF16 or ARM's BF16: torch's mkldnn check is true on any AVX512 CPU)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def precision_note(precision: str, bf16: bool, device: torch.device) -> str:
    """How --precision resolved, for the start-up line."""
    why = f": {device.type} {'has' if bf16 else 'lacks'} native bf16" if precision == "auto" else ""
    return f"{'bf16 autocast' if bf16 else 'fp32'} (--precision {precision}{why})"


def cpu_flags() -> set:
    """The CPU feature flags Linux reports (x86 `flags`, ARM `Features`); empty elsewhere."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        return set(f.read().split())
    return set()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# Checkpoints (atomic, checksummed, the previous one kept as a fallback; rank 0 writes) and resuming: the run
# folder (one run at a time, resumed by default, never wiped unasked; rank 0 decides), on any number of processes


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: torn, damaged, foreign or unsafe."""


def state_digest(obj) -> str:
    """A checksum of every tensor's bytes and every other value's repr, in a fixed order (flipped bits are
    caught, not trained on). The order is part of every checkpoint written so far: changing it would
    make all of them read as damaged."""
    h = hashlib.blake2b(digest_size=16)

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(f"K{k!r}".encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"V{x!r}".encode())
    walk(obj)
    return h.hexdigest()


def save_checkpoint(path: str, state: dict, keep_previous: bool = False) -> None:
    """`state` and its checksum, atomically (a kill leaves no half file); keep_previous: the old one -> .prev.pt."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save({**state, "checksum": state_digest(state)}, tmp)
    except (OSError, RuntimeError) as e:               # torch reports ENOSPC as "enforce fail at inline_container"
        if os.path.exists(tmp):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 20
        raise OSError(f"could not write the checkpoint {path} ({free:.0f} MB free on its disk): "
                      f"{str(e).splitlines()[0]}") from None
    if keep_previous and os.path.exists(path):
        os.replace(path, os.path.splitext(path)[0] + ".prev.pt")
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """A checkpoint loaded safely (swin3d.load_file) and its checksum verified; else a one-line CheckpointError."""
    try:
        ck = swin3d.load_file(path)                     # torn zip, text, a pickle that needs code: one line
        if not isinstance(ck, dict):
            raise ValueError(f"{path} is not a checkpoint of this project (it holds a {type(ck).__name__})")
        stored = ck.pop("checksum", None)
        if stored is not None and stored != state_digest(ck):
            raise ValueError(f"{path} is damaged: its contents do not match the checksum stored in it")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    except (RuntimeError, MemoryError) as e:            # an allocation that failed: one line, and the fallback runs
        why = " ".join(str(e).split())[:100]
        raise CheckpointError(f"{path} cannot be loaded ({type(e).__name__}: {why})") from None
    return ck


def load_for_resume(path: str, log_fn=print) -> tuple:
    """(checkpoint, the file read): `path`, or its `.prev.pt` when `path` is missing or damaged (said in one line)."""
    try:
        return load_checkpoint(path), path
    except CheckpointError as e:
        prev = os.path.splitext(path)[0] + ".prev.pt"                 # save_checkpoint's keep_previous
        if not os.path.exists(prev):
            raise
        ck = load_checkpoint(prev)
        log_fn(f"warning: {e}; resuming from the previous checkpoint {prev} (step {ck.get('step')})")
        return ck, prev


def rng_state() -> dict:
    """Every RNG the training process draws from, as tensors and ints (loads with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# Resuming on another number of processes (a requeued cluster job): data.py cuts every global batch from one
# epoch order and keys every random choice by (seed, epoch, index); a checkpoint records its batch (`batch_record`).
# What changes: the order in which gradients are summed (float rounding), and the per-process RNG, reseeded.
BATCH_FLAGS = {"clips": "--video-batch", "images": "--image-batch"}    # the per-process batch of each unit


def batch_record(world: int, accum: int, per_process: dict) -> dict:
    """A checkpoint's record of its batch (per_process: {unit: samples per micro-batch}, deciding unit first)."""
    return {"world": world, "accum": accum, "per_process": dict(per_process),
            "effective": {u: n * world * accum for u, n in per_process.items()}}


def resume_accumulation(saved: dict, per_process: dict, world: int, accum_flag: int, flags: dict, source: str,
                        lr_of) -> tuple:
    """(accumulation steps, a line on what changed) that keep the checkpoint's effective batch (every unit's) on
    `world` processes; accum_flag: a requested --accum-steps (0 = none). Else a one-line ValueError."""
    unit, b = next(iter(per_process.items()))
    kept = {u: saved["effective"].get(u) for u in per_process}
    accum = accum_flag or max(1, round(kept[unit] / (b * world)))        # exact when b x world divides it
    new = {u: n * world * accum for u, n in per_process.items()}
    show = lambda eff: " + ".join(f"{eff[u]} {u}" for u in per_process)  # noqa: E731
    if new != kept:
        why = (f"--accum-steps {accum_flag} would make it {show(new)}" if accum_flag else
               f"{world} process(es) x {show(per_process)} make {show(new)} at best (accumulation {accum})")
        raise ValueError(f"{source} was trained with an effective batch of {show(kept)} per step; {why}: keep it "
                         f"with other {', '.join(flags[u] for u in per_process)} or process counts (learning rate "
                         f"{lr_of(kept[unit]):.3g} at that batch)")
    moved = ", ".join([f"{name} {saved[key]} -> {v}" for name, key, v in
                       (("world", "world", world), ("accumulation", "accum", accum)) if saved[key] != v]
                      + [f"{flags[u]} {saved['per_process'].get(u)} -> {n}" for u, n in per_process.items()
                         if saved["per_process"].get(u) != n])
    return accum, (f"{moved}: effective batch {show(kept)} kept" if moved else "")


def begin(claim: Claim, b: Batch, model, opt, cfg, rt, out_dir: str, loader, stop_at: int, files: dict,
          ema=None) -> tuple:
    """Both trainers' start: the resumed state (model, optimiser, EMA, RNG; said in one line), config.json and
    metrics.jsonl (rank 0), the data position. Returns (step, EpochStream, the run's record)."""
    ck, step, epoch, epoch_step = claim.ck, 0, 0, 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if ema is not None and ck.get("ema"):
            ema.load_state_dict(ck["ema"])
        step, epoch, epoch_step = ck["step"], ck["epoch"], ck["epoch_step"]
        changed = changed_flags(ck["config"], cfg, ("resume", "overwrite", "max_steps"))
        log(rt.rank, f"resumed from {claim.source}: step {step}, epoch {epoch}, step {epoch_step} of the epoch"
            + (f"; {b.note}" if b.note else "") + (f"; changed flags: {changed}" if changed else ""))
    record = None if rt.rank else ck["config"] if ck and step >= stop_at else run_record(   # no step left: as it ran
        cfg, rt, files, accum_steps=b.accum, **{f"effective_{b.unit}": b.eff, "peak_lr": b.lr})
    if rt.rank == 0:
        start_log(out_dir, record, step if ck is not None else None)
    stream = EpochStream(loader, epoch, epoch_step)
    # The trainer's own RNGs (drop path, dropout): each rank's saved state on the same world size (bit for bit);
    # otherwise seeded from (seed, rank, step), the same law but other draws.
    if ck is not None and ck["world"] == rt.world and len(ck.get("rng", ())) == rt.world:
        set_rng_state(ck["rng"][rt.rank])
    elif ck is not None:
        seed_everything(masking.derive_seed(cfg.seed, rank=rt.rank, epoch=step))
        log(rt.rank, f"training RNG (drop path, dropout) reseeded per process from (seed {cfg.seed}, rank, step "
                     f"{step}): the checkpoint's {ck['world']} states do not map onto {rt.world} processes")
    return step, stream, record


def changed_flags(saved: dict, cfg, ignore=()) -> str:
    """"--lr 0.002 -> 0.0001, ...": the flags of `cfg` other than those a checkpoint's config `saved` records."""
    return ", ".join(f"--{k.replace('_', '-')} {v} -> {getattr(cfg, k)}" for k, v in saved.items() if k not in ignore
                     and hasattr(cfg, k) and (tuple(v) if isinstance(v, list) else v) != getattr(cfg, k))


def finished(claim: Claim, stop_at: int, out_dir: str, cfg, rank: int, files=("final.pt",)) -> bool:
    """A rerun of a finished run (`files` there, no step before stop_at) trains nothing, so writes nothing."""
    if claim.ck is None or claim.ck["step"] < stop_at or not set(files) <= set(claim.there):
        return False
    flags = changed_flags(claim.ck["config"], cfg, ("resume", "overwrite"))
    log(rank, f"the run in {out_dir} was already complete at step {claim.ck['step']}: nothing to do, nothing written"
        + (f"; flags not applied: {flags}" if flags else "") + " (--overwrite starts it again)")
    return True


RUN_FILES = ("ckpt.pt", "ckpt.prev.pt", "final.pt", "metrics.jsonl", "config.json", "curves.png", "eval.json")


@dataclass
class Claim(contextlib.AbstractContextManager):
    """Rank 0's decisions on a run folder, the same on every rank; leaving it releases the lock."""
    lock: Optional[data.FileLock]     # rank 0's lock on the folder (None on the other ranks)
    source: Optional[str]             # the checkpoint file resumed from; None: a fresh run
    ck: Optional[dict]
    init: str                         # a fresh run's checkpoint to start from ('' = random weights)
    there: tuple                      # the run files rank 0 found

    def __exit__(self, *exc) -> None:            # however the run ends
        if self.lock is not None:
            self.lock.release()


def claim_run_dir(out_dir: str, cfg, rt: Runtime, fresh_init=None) -> Claim:
    """Rank 0 decides, before anything is written: --resume auto continues ckpt.pt (or .prev.pt), --overwrite
    starts again, --resume no with a previous run there is an error (never a silent wipe), a fresh run starts
    from `fresh_init()`. It locks the folder and loads the checkpoint; one broadcast gives every rank the
    decision, or rank 0's error: all stop at once."""
    lock, error, decision = None, None, [None, None, "", ()]
    if rt.rank == 0:
        try:
            there = () if cfg.overwrite else tuple(n for n in RUN_FILES if os.path.exists(os.path.join(out_dir, n)))
            previous = [n for n in there if n in RUN_FILES[:4]]
            if cfg.resume == "no" and previous:
                raise ValueError(f"{out_dir} holds a previous run ({', '.join(previous)}); --resume auto continues it, "
                                 f"--overwrite discards it")
            if cfg.resume not in ("auto", "no") and not os.path.isfile(cfg.resume):
                raise ValueError(f"--resume {cfg.resume}: no such file")
            auto = os.path.join(out_dir, "ckpt.pt") if {"ckpt.pt", "ckpt.prev.pt"} & set(there) else None
            source = {"auto": auto, "no": None}.get(cfg.resume, cfg.resume)
            init = fresh_init() if source is None and fresh_init else ""
            if init and not os.path.isfile(init):
                raise ValueError(f"--init {init}: no such file")
            os.makedirs(out_dir, exist_ok=True)
            lock = data.FileLock(os.path.join(out_dir, "run.lock"))
            busy = lock.acquire()
            if busy is not None:
                lock = None
                raise ValueError(f"{out_dir} is in use by another run ({busy}); wait for it or choose another --out")
            for name in RUN_FILES if cfg.overwrite else ():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out_dir, name))
            ck, source = load_for_resume(source, lambda m: log(0, m)) if source else (None, None)
            decision = [None, source, init, there]
        except USER_ERRORS as e:
            error, decision[0] = e, str(e)
            if lock is not None:
                lock.release()
    if rt.ddp:
        dist.broadcast_object_list(decision, src=0)
    if decision[0] is not None:          # rank 0's own error there, a pointer to it elsewhere
        raise error or ValueError("rank 0 stopped with an error before training (its message is on rank 0's stderr)")
    _, source, init, there = decision
    if rt.rank != 0:
        ck = load_checkpoint(source) if source else None
    return Claim(lock, source, ck, init, tuple(there))


# -----------------------------------------------------------------------------
# The metrics log (metrics.jsonl: what tools/plot.py draws) and the data position


def run_record(cfg, rt: Runtime, files: dict, **resolved) -> dict:
    """config.json's and the checkpoints' "config": the flags as given (what a resume compares) and, under "resolved",
    what ran: precision, device, world size, torch, each file read ({name: path}) with its sha256, and `resolved`."""
    out = {"precision": "bf16" if rt.bf16 else "fp32", "device": str(rt.device), "world": rt.world,
           "torch": str(torch.__version__), **resolved}
    for name, path in files.items():
        path = os.path.join(path, "encoder.pkl") if os.path.isdir(path) else path     # tokenizer.load_tokenizer's rule
        with open(path, "rb") as f:
            out.update({name: os.path.abspath(path), f"{name}_sha256": hashlib.file_digest(f, "sha256").hexdigest()})
    return {**dataclasses.asdict(cfg), "resolved": out}


def start_log(out_dir: str, record: dict, resumed_step: Optional[int]) -> None:
    """Rank 0: config.json, and metrics.jsonl's rows up to a resumed checkpoint's step (later ones are redone)."""
    write_atomic(os.path.join(out_dir, "config.json"), json.dumps(record, indent=1))
    path = os.path.join(out_dir, "metrics.jsonl")
    rows = read_metrics(path) if resumed_step is not None and os.path.exists(path) else []
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows
                               if r["step"] <= resumed_step and "eval" not in r and "baselines" not in r))


def read_metrics(path: str) -> list:
    """The rows of a metrics.jsonl; a torn line (a full disk, a kill mid-write) is skipped."""
    rows = []
    with open(path, errors="replace") as f:                 # garbage bytes: a line that is not JSON
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class StepLog:
    """Per-step metrics: `add` queues a step's mean over ranks on the device; `flush` reads the queue in one
    transfer, appends it to metrics.jsonl (rank 0), and stops every rank at the same non-finite step."""

    def __init__(self, path: Optional[str], rt: Runtime):
        self.path, self.ddp, self.device = path, rt.ddp, rt.device
        self.pending = []                                      # (host fields, keys, device vector)

    def add(self, host: dict, metrics: dict) -> None:
        keys = sorted(metrics)
        vec = torch.stack([torch.as_tensor(metrics[k], device=self.device).float().reshape(()) for k in keys])
        self.pending.append((host, keys, all_reduce_mean(vec, self.ddp)))

    def flush(self, tail: Optional[dict] = None) -> list:
        if not self.pending:
            return []
        values = torch.stack([v for _, _, v in self.pending]).tolist()     # the one read-back
        rows = [{**host, **dict(zip(keys, vals))} for (host, keys, _), vals in zip(self.pending, values)]
        self.pending = []
        bad = next((i for i, vals in enumerate(values) if not all(map(math.isfinite, vals))), None)
        if bad is None and tail:
            rows[-1].update(tail)
        if self.path is not None:                              # the finite steps before a bad one are kept
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows[:bad])
        if bad is not None:
            raise SystemExit(f"non-finite loss {rows[bad].get('loss')} (gradient norm {rows[bad].get('grad_norm')}) "
                             f"at step {rows[bad]['step']}; stopping")
        return rows


def count_targets(hist: dict, inputs: dict, vocab: int) -> None:
    """Histogram of the masked target codes per stream (the majority-code baseline: a fairer chance than 1/vocab);
    weighted by the mask on the device (no boolean indexing, no read-back)."""
    for name, codes, mask in (("mvm", inputs.get("video_codes"), inputs.get("video_masks")),
                              ("mim", inputs.get("image_codes"), inputs.get("image_masks"))):
        if codes is None:
            continue
        if name == "mvm":
            mask = masking.target_mask(mask, codes.shape[1])                # (B, T, h, w)
        h = hist.setdefault(name, torch.zeros(vocab, dtype=torch.float64, device=codes.device))
        h.index_add_(0, codes.reshape(-1), mask.reshape(-1).to(h.dtype))


class EpochStream:
    """A loader's micro-batches across epochs from the position a checkpoint saves (`epoch`, `step` global steps
    into it); data.py's batches depend on (seed, epoch, global batch) alone, so any world size resumes there."""

    def __init__(self, loader, epoch: int = 0, step: int = 0):
        if step >= loader.steps_per_epoch:                        # saved right after an epoch's last step
            epoch, step = epoch + step // loader.steps_per_epoch, step % loader.steps_per_epoch
        self.loader, self.epoch, self.step = loader, epoch, step
        loader.set_epoch(epoch, step)
        self._it = iter(loader)

    def take(self, n: int) -> list:
        """The next global step's n micro-batches (n = the loader's accumulation)."""
        if self.step == self.loader.steps_per_epoch:                 # the epoch is done: the next one
            assert next(self._it, None) is None, "an epoch yielded more micro-batches than its steps"
            self.epoch, self.step = self.epoch + 1, 0
            self.loader.set_epoch(self.epoch, 0)
            self._it = iter(self.loader)
        out = [next(self._it) for _ in range(n)]
        self.step += 1
        return out


def main(argv=None) -> dict:
    """Command-line entry: user errors end in one line naming what was expected and what came, exit 2."""
    return run_cli("train.py", run, parse_args(argv))


if __name__ == "__main__":
    main()
