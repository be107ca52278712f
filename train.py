"""BEVT pretraining: stages `image` (BEVT-I), `video` (BEVT-V) and `joint` (BEVT).

Implements paper §3 "Training strategies" and §4.1 "Implementation details".
Model: bevt.py; data: data.py;
masks: masking.py; targets: tokenizer.py.

    # CPU demo on the embedded synthetic data (generated, and the offline
    # tokenizer fitted, on first use): image stage, then joint stage
    python train.py --preset cpu --stage image && python train.py --preset cpu --stage joint

    # the same on 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node=2 train.py --preset cpu --stage joint

    # one GPU, paper recipe (Swin-B), your data
    python train.py --stage joint --video-root K400/ --video-list k400_train.txt \\
        --image-root ImageNet/train --tokenizer dalle_encoder.pt

    # one node, 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --stage joint ...

    # 4 nodes x 8 GPUs (run on every node, NODE = 0..3)
    torchrun --nnodes=4 --node_rank=$NODE --master_addr=$HOST --master_port=29500 \\
        --nproc_per_node=8 train.py --stage joint ...

    # the job requeued on 2 nodes: --nnodes=2, otherwise the same command; the checkpoint's
    # effective batch is kept with accumulation 2 (README, "Running under SLURM")

Global batch (paper): 2048 images (image stage), 256 clips + 2048 images
(joint), 256 clips (video stage). Per process: 64 images, 8 clips + 64
images, 8 clips; gradient accumulation makes up the rest (printed at start).
Every global batch is cut from one epoch order for all processes, and every
sample's crops and masks are keyed by (seed, epoch, index), so a run depends on
its seed and effective batch, not on the number of processes: `--resume` on
another number keeps the effective batch by changing the accumulation.
Learning rate 5e-4 at the paper's global batch, scaled linearly with the
effective batch: lr = base_lr · effective_batch / paper_batch.

Outputs in --out: `ckpt.pt` (latest, atomic, resumable with --resume auto),
`final.pt`, `metrics.jsonl`, `config.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import bevt
import data
import masking
import swin3d

# -----------------------------------------------------------------------------
# Configuration: the paper's recipe as defaults, one preset for the CPU demo

PRECISIONS = ("auto", "bf16", "fp32")
DIST_TIMEOUT_MIN = 10.0   # a stuck rank fails the job in minutes, not after the backends' 30-minute default


@dataclass
class TrainConfig:
    stage: str = "joint"                  # image (BEVT-I) | video (BEVT-V) | joint (BEVT), §3
    preset: str = "paper"                 # paper | cpu
    model: str = "base"                   # swin3d preset; Swin-B throughout the paper (§4.1)
    out: str = "runs/bevt"
    init: str = ""                        # checkpoint to start from; joint: defaults to <out>/image/final.pt
    resume: str = "auto"                  # auto: continue <out>/<stage>/ckpt.pt if there is one | no | a path
    overwrite: bool = False               # discard a previous run in <out>/<stage> and start again
    allow_batch_change: bool = False      # resume on a world size that cannot keep the effective batch: go on with the nearest one, lr rescaled
    # --- data (paper §4.1)
    data: str = ""                        # synthetic data folder (CPU preset), generated on first use
    video_root: str = ""
    video_list: str = ""
    image_root: str = ""
    image_list: str = ""
    # --image-root without --image-list: rank 0 lists the folder once per run into this file, the other
    # ranks read it, and later runs reuse it while the folder is unchanged (data.list_image_folder_once).
    image_list_cache: str = ""            # list file of --image-root (one scan per run); "" = <out>/image_list.txt
    frames: int = 16                      # clip length T (§4.1)
    frame_interval: int = 8               # paper §4.1
    crop: int = 224
    short_side: tuple = (256, 320)        # random short-side rescale range (paper §4.1)
    video_batch: int = 8                  # clips per process (paper §4.1: 8 clips + 64 images per GPU)
    image_batch: int = 64                 # images per process
    global_video_batch: int = 256         # §4.1 batch size 256 clips
    global_image_batch: int = 2048        # §4.1 batch size 2048 images
    image_cycles: int = 5                 # ImageNet cycled 5x per video epoch in the joint stage (paper §4.1)
    workers: int = 8
    mask_strategy: str = "tube"           # masking.STRATEGIES; Table 8
    mask_ratio: float = masking.MASK_RATIO  # §3 "the masking ratio of each masked frame is 0.5"
    # --- targets (§3 "Tokenizer")
    tokenizer: str = ""                   # DALL-E encoder.pkl / converted .pt / offline tokenizer file
    vocab_size: int = bevt.VOCAB_SIZE     # DALL-E codebook, 8192 (appendix A)
    tokenizer_vocab: int = bevt.VOCAB_SIZE  # offline tokenizer fitted on first use (CPU preset)
    # --- optimisation (paper §4.1)
    epochs: int = 150                     # joint/video: 150 K400 epochs; image: 800 ImageNet epochs
    warmup_epochs: float = 10.0
    lr: float = 5e-4                      # at the paper's global batch
    min_lr: float = 0.0                   # cosine to 0
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.999)
    clip_grad: float = 3.0
    accum_steps: int = 0                  # 0 = derived from the global batch
    drop_path: float = 0.3                # Swin-B pretraining (paper §3 "BEVT encoders")
    lam: float = 1.0                      # eq. 5
    max_steps: int = 0                    # stop after this many optimizer steps (0 = the schedule's end)
    # --- runtime
    compile: bool = False
    precision: str = "auto"               # auto (bf16 where the GPU/CPU computes it natively, else fp32) | bf16 | fp32
    tokenizer_precision: str = "fp32"     # DALL-E encoder: fp32 | bf16 | fp16 (tokenizer.Tokenizer.set_precision)
    grad_checkpointing: bool = False
    dist_timeout: float = DIST_TIMEOUT_MIN  # minutes a collective waits for a dead or frozen rank
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500                 # optimizer steps


# The CPU demo: everything scaled down so both stages run in minutes on 2 cores.
CPU_PRESET = dict(
    model="cpu", frames=8, frame_interval=2, crop=112, short_side=(128, 160),
    video_batch=4, image_batch=16, global_video_batch=4, global_image_batch=16, image_cycles=1,
    workers=1, tokenizer_vocab=256, vocab_size=256, warmup_epochs=1.0, lr=2e-3,
    drop_path=0.0, log_every=10, ckpt_every=50,
    # precision stays "auto": bf16 autocast on CPUs with native bf16 (AVX512-BF16 / AMX), where the
    # demo's joint step ran 1.22x faster than fp32 (tests/bench_train.py --cases cpu, idle 2 cores).
)

STAGE_EPOCHS = {"image": 800, "video": 150, "joint": 150}   # §4.1
CPU_STAGE_EPOCHS = {"image": 20, "video": 8, "joint": 8}    # CPU demo: ~600 and ~400 steps


# Valid values, checked when the flags are parsed (a bad value is one line naming it, exit 2).
CHOICES = {"stage": bevt.STAGES, "preset": ("paper", "cpu"), "precision": PRECISIONS,
           "tokenizer_precision": ("fp32", "bf16", "fp16"), "mask_strategy": None}   # None: filled below
POSITIVE = ("frames", "frame_interval", "crop", "video_batch", "image_batch", "global_video_batch",
            "global_image_batch", "image_cycles", "vocab_size", "tokenizer_vocab", "epochs", "lr", "log_every",
            "ckpt_every", "dist_timeout")
NON_NEGATIVE = ("workers", "warmup_epochs", "min_lr", "weight_decay", "clip_grad", "accum_steps", "lam",
                "max_steps")
FRACTIONS = {"mask_ratio": (0.0, 1.0), "drop_path": (0.0, 1.0)}   # open/half-open intervals, below


class FlagError(ValueError):
    """A flag value out of its range: reported as one line, exit 2."""


def field_help(cls) -> dict:
    """field name -> the comment on its line in the dataclass source: its meaning and paper source."""
    import inspect
    import re
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def add_dataclass_flags(ap: argparse.ArgumentParser, cls, choices: dict, only=None) -> None:
    """One flag per dataclass field, default None so that explicitly given values can be told
    apart from preset values; --help shows each field's comment and default, and enumerated
    fields list their choices (a wrong one is rejected by argparse). `only`: the subset of
    fields a subcommand uses (e.g. finetune.py extract), so its --help lists no others."""
    defaults, helps = cls(), field_help(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = helps.get(f.name, "")
        if isinstance(default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                            help=f"{text} (default {default})")
        elif isinstance(default, tuple):
            ap.add_argument(flag, type=type(default[0]), nargs=len(default), default=None,
                            help=f"{text} (default {' '.join(map(str, default))})")
        else:
            ap.add_argument(flag, type=type(default), default=None, choices=choices.get(f.name),
                            help=f"{text} (default {default!r})")


def check_ranges(cfg, positive=(), non_negative=(), fractions=None) -> None:
    """Raise FlagError naming the first flag whose value is outside its range."""
    def bad(name, want):
        return FlagError(f"--{name.replace('_', '-')} must be {want}, got {getattr(cfg, name)!r}")
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise bad(name, "> 0")
    for name in non_negative:
        if not getattr(cfg, name) >= 0:
            raise bad(name, ">= 0 (0 = off or automatic)")
    for name, (lo, hi) in (fractions or {}).items():
        if not lo <= getattr(cfg, name) < hi:
            raise bad(name, f"in [{lo:g}, {hi:g})")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block of 40 flags), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None) -> TrainConfig:
    """argparse generated from TrainConfig: every field is a flag with its paper default."""
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(ap, TrainConfig, {**CHOICES, "mask_strategy": tuple(masking.STRATEGIES)})
    args = vars(ap.parse_args(argv))
    defaults = TrainConfig()
    preset, stage = args["preset"] or defaults.preset, args["stage"] or defaults.stage
    cfg = dict(dataclasses.asdict(defaults))
    if preset == "cpu":
        cfg.update(CPU_PRESET, epochs=CPU_STAGE_EPOCHS[stage])
    else:
        cfg["epochs"] = STAGE_EPOCHS[stage]
    cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if v is not None})
    cfg = TrainConfig(**cfg)
    try:
        check_ranges(cfg, POSITIVE, NON_NEGATIVE, FRACTIONS)
        lo, hi = cfg.short_side
        if not cfg.crop <= lo <= hi:
            raise FlagError(f"--short-side LO HI must satisfy crop {cfg.crop} <= LO <= HI, got {lo} {hi}")
        if cfg.crop % 16:
            raise FlagError(f"--crop must be a multiple of 16 (one target code per 16x16 px), got {cfg.crop}")
        if not all(0 <= b < 1 for b in cfg.betas):
            raise FlagError(f"--betas must be two numbers in [0, 1), got {cfg.betas}")
    except FlagError as e:
        ap.error(str(e))
    return cfg


# -----------------------------------------------------------------------------
# Distributed set-up (nanoGPT style, with gloo on CPU)


class Runtime(NamedTuple):
    """Where this process runs: what every step, evaluation and logging function needs to know."""
    ddp: bool                 # one of several processes (torchrun): a DDP-wrapped model, collectives
    rank: int
    world: int
    device: torch.device
    bf16: bool                # the model runs under bf16 autocast (--precision, resolved for this device)


def setup_distributed(timeout_min: float = DIST_TIMEOUT_MIN, precision: str = "fp32") -> Runtime:
    """The Runtime of this process: NCCL on CUDA, gloo on CPUs, one process per device.

    Under torchrun (RANK set) each process binds its GPU *before* creating the
    process group (NCCL otherwise guesses device 0 for its first collectives),
    and passes it as `device_id`, which lets NCCL connect eagerly. `timeout_min`
    bounds how long a collective waits for a rank that died or froze.
    `precision` (--precision) is resolved for the device (resolve_precision).
    """
    ddp = int(os.environ.get("RANK", -1)) != -1
    timeout = datetime.timedelta(minutes=timeout_min)
    if ddp:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", timeout=timeout, device_id=device)
        else:
            device = torch.device("cpu")
            dist.init_process_group(backend="gloo", timeout=timeout)
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True      # every step has the same shapes: tune the convolutions once
    return Runtime(ddp, rank, world, device, resolve_precision(precision, device))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The trained module itself, from under its DDP and torch.compile wrappers (same parameters)."""
    model = model.module if isinstance(model, DDP) else model
    return getattr(model, "_orig_mod", model)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> DDP:
    """DistributedDataParallel as both trainers use it.

    broadcast_buffers=False: the only buffers are the relative-position index
    tables (24 int64 tables in Swin-B, 29.5 MB for window (8,7,7), 118 MB for
    (16,7,7)), which the default would re-broadcast from rank 0 in every forward,
    although no forward reads them (it uses indices derived per window) and
    there is no BatchNorm. find_unused_parameters=False: set_stage freezes the
    stream a stage does not train, so every trainable parameter gets a gradient.
    """
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               broadcast_buffers=False, find_unused_parameters=False)


def all_reduce_mean(x: torch.Tensor, ddp: bool) -> torch.Tensor:
    """The mean over ranks of a tensor that lives on the training device.

    Every cross-rank reduction of metrics goes through here: NCCL takes only
    GPU tensors (gloo takes both), so a tensor built on the CPU would work in
    the CPU tests and crash the first GPU step. Asynchronous on GPUs: nothing
    is read back to the host.
    """
    if not ddp:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x.div_(dist.get_world_size())


def all_gather_rows(x: torch.Tensor, ddp: bool) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) device tensor along dim 0, in rank order (n_r may differ)."""
    if not ddp:
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]                     # one read-back: evaluation only, never in a step
    pad = x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))
    parts = [x.new_empty((max(sizes), *x.shape[1:])) for _ in range(world)]
    dist.all_gather(parts, torch.cat([x, pad]))
    return torch.cat([p[:m] for p, m in zip(parts, sizes)])


def resolve_precision(precision: str, device: torch.device) -> bool:
    """--precision -> whether the step runs under bf16 autocast (True) or in fp32 (False)."""
    if precision not in PRECISIONS:
        raise SystemExit(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return bf16_supported(device)
    return precision == "bf16"


def precision_note(precision: str, bf16: bool, device: torch.device) -> str:
    """How --precision resolved, for the start-up line."""
    what = "bf16 autocast" if bf16 else "fp32"
    if precision != "auto":
        return f"{what} (--precision {precision})"
    return f"{what} (--precision auto: {device.type} {'has' if bf16 else 'lacks'} native bf16)"


def bf16_supported(device: torch.device) -> bool:
    """Does this device compute in bf16 natively?

    CUDA: compute capability >= 8 (Ampere on). CPU: the x86 AVX512-BF16 or
    AMX-BF16 instructions, or ARM's BF16 extension, read from /proc/cpuinfo.
    (torch's own mkldnn check is true on any AVX512 CPU, which converts bf16
    but has no bf16 dot products; there bf16 is no faster than fp32.) Other
    systems: False, i.e. fp32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags() -> set:
    """The CPU feature flags Linux reports (x86 `flags`, ARM `Features`); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(f.read().split())
    except OSError:
        return set()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# Optimiser and schedule (paper §4.1)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """AdamW groups: no weight decay on relative position tables, norms, biases and the mask token."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Per-iteration linear warm-up, then cosine to min_lr (paper §4.1)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(t, 1.0)))


# -----------------------------------------------------------------------------
# Checkpoints: atomic, complete, rank 0 only


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: torn, damaged, foreign or unsafe."""


def state_digest(obj) -> str:
    """A checksum of everything in a checkpoint: every tensor's bytes and every other value's repr,
    in a fixed order. Stored in the file by save_checkpoint, recomputed by load_checkpoint, so
    flipped bits in a tensor are caught, not trained on."""
    h = hashlib.blake2b(digest_size=16)

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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
    """Write `state` plus its checksum atomically (rank 0 only).

    The file is written under a temporary name unique to this process and
    renamed over `path`, so a killed run never leaves a half-written checkpoint
    and two writers never share a temporary file. keep_previous: the file being
    replaced becomes `<name>.prev.pt`, the fallback if the new one turns out damaged.
    A failed write (a full disk) removes the temporary file and names the path.
    """
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
        os.replace(path, previous_path(path))
    os.replace(tmp, path)


def previous_path(path: str) -> str:
    return path[:-3] + ".prev.pt" if path.endswith(".pt") else path + ".prev"


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


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint safely (weights_only) and verify its checksum; CheckpointError if it cannot be used."""
    try:
        ck = swin3d.load_file(path)                     # torn zip, text, a pickle that needs code: one line
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"{path} is not a checkpoint of this project (it holds a {type(ck).__name__})")
    stored = ck.pop("checksum", None)
    if stored is not None and stored != state_digest(ck):
        raise CheckpointError(f"{path} is damaged: its contents do not match the checksum stored in it")
    return ck


def load_for_resume(path: str, log_fn=print) -> dict:
    """The checkpoint to resume from: `path`, or its `.prev.pt` when `path` is missing or damaged
    (the fallback is named in one line)."""
    prev = previous_path(path)
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        if not os.path.exists(prev):
            raise
        ck = load_checkpoint(prev)
        log_fn(f"warning: {e}; resuming from the previous checkpoint {prev} (step {ck.get('step')})")
        return ck


def all_rng_states(ddp: bool, world: int) -> list:
    """Every rank's rng_state(), in rank order (a collective under DDP: call it on all ranks)."""
    if not ddp:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


# -----------------------------------------------------------------------------
# Resuming on another number of processes (a requeued cluster job)
#
# A run is a function of its seed and its effective batch (the samples of one
# optimizer step over all processes), not of the process count: data.py cuts
# every global batch from one epoch order shared by all processes, and keys
# every random choice of a sample by (seed, epoch, index). A checkpoint records
# the batch it was trained with (`batch_record`); a resume on another world
# size keeps that effective batch by changing the accumulation steps, and the
# model, optimizer, step, schedule and data position carry over. What changes:
# the order in which gradients are summed (float rounding), and the trainer's
# own per-process RNG (drop path), which is reseeded per rank.

BATCH_FLAGS = {"clips": "--video-batch", "images": "--image-batch"}    # the per-process batch of each unit


def batch_record(world: int, accum: int, per_process: dict) -> dict:
    """A checkpoint's record of its batch. per_process: {unit: samples per micro-batch}, the unit that
    decides the accumulation first (clips, then images in the joint stage)."""
    return {"world": world, "accum": accum, "per_process": dict(per_process),
            "effective": {u: n * world * accum for u, n in per_process.items()}}


def saved_batch(ck: dict, config_keys: dict, accum_of) -> dict:
    """The batch record of checkpoint `ck`. A checkpoint written before records existed: rebuilt from
    its world, its config (config_keys: unit -> config field of its per-process batch) and
    accum_of(config, world), the accumulation that trainer derived."""
    if "batch" in ck:
        return ck["batch"]
    c, w = ck.get("config", {}), ck.get("world", 1)
    return batch_record(w, accum_of(c, w), {u: c[k] for u, k in config_keys.items()})


def _sizes(values: list) -> str:
    """[1, 2, 4] -> '1, 2 or 4'."""
    return ", ".join(map(str, values[:-1])) + " or " + str(values[-1]) if len(values) > 1 else str(values[0])


def resume_accumulation(saved: dict, per_process: dict, world: int, accum_flag: int, allow_change: bool,
                        flags: dict, source: str, lr_of) -> tuple:
    """(accumulation steps, a line on what changed) for resuming `source` on `world` processes.

    per_process: {unit: samples per micro-batch now}, the deciding unit first.
    The checkpoint's effective batch (every unit's) is kept when per-process x
    world divides it: accumulation = effective / (per-process x world).
    accum_flag: an --accum-steps that differs from the checkpoint's own (0 =
    none); it is followed when it keeps the batch. Anything else is a
    ValueError (one line: the sizes that keep the batch, and the flag), unless
    allow_change: then the run goes on with the nearest effective batch (or the
    one accum_flag gives) and the learning rate lr_of(effective) rescaled.
    """
    unit, b = next(iter(per_process.items()))
    kept = {u: saved["effective"].get(u) for u in per_process}
    want = kept[unit]

    def effective(a: int) -> dict:
        return {u: n * world * a for u, n in per_process.items()}

    def show(eff: dict) -> str:
        return " + ".join(f"{eff[u]} {u}" for u in per_process)

    def moved(a: int) -> str:                        # what differs from the checkpoint's batch
        out = [f"{name} {saved[key]} -> {v}" for name, key, v in
               (("world", "world", world), ("accumulation", "accum", a)) if saved[key] != v]
        return ", ".join(out + [f"{flags[u]} {saved['per_process'].get(u)} -> {n}" for u, n in per_process.items()
                                if saved["per_process"].get(u) != n])

    was = (f"{saved['world']} process(es) x {show(saved['per_process'])} x accumulation {saved['accum']}")
    accum = accum_flag or (want // (b * world) if want % (b * world) == 0 else 0)
    if accum and effective(accum) == kept:
        return accum, (f"{moved(accum)}: effective batch {show(kept)} kept" if moved(accum) else "")
    near = accum or max(1, round(want / (b * world)))
    new = effective(near)
    lr_text = (f"learning rate {lr_of(want):.3g} -> {lr_of(new[unit]):.3g}" if new[unit] != want
               else "learning rate unchanged")
    go_on = f"--allow-batch-change goes on with {show(new)} per step ({lr_text})"
    if allow_change:
        return near, f"{moved(near)}: effective batch {show(kept)} -> {show(new)}, {lr_text} (--allow-batch-change)"
    if accum_flag:
        raise ValueError(f"--accum-steps {accum_flag} would change the effective batch of {source} from {show(kept)} "
                         f"to {show(new)} per step; leave it out to keep the batch, or {go_on}")
    if not accum:
        # The sizes that would keep it: per-process batches on this many processes, process counts with this batch.
        batches = [n for n in range(1, want // world + 1) if want % (n * world) == 0]
        worlds = [w for w in range(1, want // b + 1) if want % (b * w) == 0]
        on_this = (f"{flags[unit]} {_sizes(batches)} on {world} process(es)" if batches
                   else f"no {flags[unit]} on {world} process(es)")
        with_this = (f"{_sizes(worlds)} process(es) with {flags[unit]} {b}" if worlds
                     else f"no process count with {flags[unit]} {b}")
        raise ValueError(f"{source} was trained with an effective batch of {show(kept)} ({was}), which {world} "
                         f"process(es) x {b} {unit} cannot make up; sizes that keep it: {on_this}, or {with_this}; "
                         f"or {go_on}")
    u = next(u for u in per_process if effective(accum)[u] != kept[u])         # another unit (joint: images)
    fit = kept[u] // (world * accum) if kept[u] % (world * accum) == 0 else None
    raise ValueError(f"{source} was trained with {show(kept)} per step ({was}); {world} process(es) x accumulation "
                     f"{accum} make {show(effective(accum))}: "
                     + (f"{flags[u]} {fit} keeps it" if fit else f"no {flags[u]} keeps it on {world} process(es)")
                     + f"; or {go_on}")


BATCH_CONFIG_KEYS = {"clips": "video_batch", "images": "image_batch"}    # TrainConfig field of each unit


def stage_batches(cfg) -> dict:
    """{unit: samples per micro-batch} of a pretraining stage, the unit that sets the accumulation first."""
    if cfg.stage == "image":
        return {"images": cfg.image_batch}
    if cfg.stage == "video":
        return {"clips": cfg.video_batch}
    return {"clips": cfg.video_batch, "images": cfg.image_batch}


def resume_position(ck: dict, saved: dict, unit: str, eff: int, steps_per_epoch: int) -> tuple:
    """(step, epoch, step of the epoch) to resume checkpoint `ck` at, with effective batch `eff` now.

    The same effective batch: the checkpoint's own. A changed one (--allow-batch-change):
    the epoch and the samples taken from it are kept, re-expressed in steps of the new
    batch (rounded down: at most eff - 1 samples are seen twice), and so is the step
    count (epochs x steps per epoch + that), so the schedule resumes at the same point
    of its epochs. Checkpoints written before `epoch_step` existed saved micro-batches."""
    epoch = ck["epoch"]
    epoch_step = ck["epoch_step"] if "epoch_step" in ck else ck.get("micro", 0) // saved["accum"]
    old = saved["effective"][unit]
    if old == eff:
        return ck["step"], epoch, epoch_step
    epoch_step = epoch_step * old // eff                                 # samples taken // the new batch
    return epoch * steps_per_epoch + epoch_step, epoch, epoch_step


def resume_rng(ck: dict, saved: dict, seed: int, rank: int, world: int, step: int, log_fn) -> None:
    """The trainer's own RNG streams (python, numpy, torch: drop path, dropout) on a resume.

    The same world size: every rank gets its saved state back, so the run goes on
    bit for bit. Another world size: the ranks are other processes now, so each
    is seeded from (seed, rank, step); a model that draws at random (drop path > 0)
    then draws other numbers than an uninterrupted run would, from the same law.
    (The data's randomness is per sample and carries over either way.)"""
    if saved["world"] == world and len(ck.get("rng", ())) == world:
        set_rng_state(ck["rng"][rank])
        return
    seed_everything(masking.derive_seed(seed, rank=rank, epoch=step))
    log_fn(f"training RNG (drop path, dropout) reseeded per process from (seed {seed}, rank, step {step}): "
           f"the checkpoint's {saved['world']} states do not map onto {world} processes")


def start_log(out_dir: str, cfg, resumed_step: Optional[int]) -> str:
    """Rank 0, before the loop: write config.json and prepare metrics.jsonl, whose path it returns.

    A fresh run (resumed_step None) starts an empty log. A resumed run keeps the
    training rows up to its checkpoint's step: a killed run may have logged steps
    after its last checkpoint, and they are redone now (evaluation rows go too).
    """
    write_atomic(os.path.join(out_dir, "config.json"), json.dumps(dataclasses.asdict(cfg), indent=1))
    path = os.path.join(out_dir, "metrics.jsonl")
    kept = []
    if resumed_step is not None and os.path.exists(path):
        kept = [json.dumps(r) + "\n" for r in read_metrics(path)              # training rows up to the checkpoint
                if r["step"] <= resumed_step and "eval" not in r and "baselines" not in r]
    write_atomic(path, "".join(kept))
    return path


def read_metrics(path: str) -> list:
    """The rows of a metrics.jsonl; a torn line (a full disk, a kill mid-write) is skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class EpochStream:
    """The micro-batches of a training loader in order across epochs, with the position a checkpoint saves.

    The position is (`epoch`, `step`): global steps taken from the current
    epoch. An epoch's global batches (order, crops, masks) are a function of
    the seed, the epoch and the global batch alone (data.GlobalBatchSampler,
    data._RobustDataset), not of the process count, so a resumed run, on any
    number of processes, starts the interrupted epoch at `step` and gets the
    same global batches; the skipped ones are not decoded again.
    """

    def __init__(self, loader, epoch: int = 0, step: int = 0):
        if step >= loader.steps_per_epoch:                        # saved right after an epoch's last step
            epoch, step = epoch + step // loader.steps_per_epoch, step % loader.steps_per_epoch
        self.loader, self.epoch, self.step = loader, epoch, step
        self._it = self._start(epoch, step)

    def _start(self, epoch: int, step: int):
        self.loader.set_epoch(epoch, step)
        return iter(self.loader)

    def take(self, n: int) -> list:
        """The next global step's n micro-batches (n = the loader's accumulation)."""
        if self.step == self.loader.steps_per_epoch:                 # the epoch is done: the next one
            assert next(self._it, None) is None, "an epoch yielded more micro-batches than its steps"
            self.epoch, self.step = self.epoch + 1, 0
            self._it = self._start(self.epoch, 0)
        out = [next(self._it) for _ in range(n)]
        self.step += 1
        return out


# -----------------------------------------------------------------------------
# Targets: the frozen tokenizer, outside the trained model


def model_inputs(batch: dict, tok, device) -> dict:
    """A data.py batch -> BEVT.forward's arguments, on the training device.

    Pixels arrive as uint8 and are normalised here (data.normalize_batch).
    Targets (eqs. 3-4's z), the one path from pixels to codes: the loader
    halves every crop with the tokenizer's own Lanczos (tokenizer.half_copy,
    called by data.PretrainTransform; §3 "Tokenizer": 112² for a 224² crop) and
    ships it as `<stream>_tok`, uint8 (B, 3, T, S/2, S/2) or (N, 3, S/2, S/2);
    here the frozen tokenizer encodes it (Tokenizer.codes_of_copy, fp32,
    no_grad, whatever the step's autocast) into (B, T, S/16, S/16) or (N, S/16, S/16) codes.
    """
    out = {}
    for stream, key in (("video", "videos"), ("image", "images")):
        if stream in batch:
            out[key] = data.normalize_batch(batch[stream].to(device, non_blocking=True))
            out[f"{stream}_masks"] = batch[f"{stream}_mask"].to(device, non_blocking=True)
            out[f"{stream}_codes"] = tok.codes_of_copy(batch[f"{stream}_tok"].to(device, non_blocking=True))
    return out


def resolve_tokenizer(cfg: TrainConfig, data_root: str, rank: int, ddp: bool, device):
    """Load --tokenizer, or (CPU preset) fit the offline tokenizer on the synthetic images once."""
    import tokenizer
    path = cfg.tokenizer
    if not path:
        if cfg.preset != "cpu" or cfg.video_root or cfg.image_root:
            raise ValueError("--tokenizer is required" + (" with your own data" if cfg.preset == "cpu" else "") +
                             ": the DALL-E encoder.pkl, its converted .pt (python tokenizer.py convert), or an "
                             "offline tokenizer fitted on your images (python tokenizer.py fit --data DIR "
                             f"--vocab {cfg.vocab_size} --out tok.pt)")
        path = os.path.join(data_root, f"tokenizer_{cfg.tokenizer_vocab}.pt")
        error = None
        if rank == 0 and not os.path.exists(path):
            try:
                if not os.access(data_root, os.W_OK):         # checked before minutes of fitting
                    raise ValueError(f"cannot write the offline tokenizer to {path}: {data_root} is not writable "
                                     f"(pass --tokenizer, or a writable --data)")
                print(f"fitting the offline tokenizer ({cfg.tokenizer_vocab} codes) on {data_root}/images/train ...")
                tok = tokenizer.fit_from_dir(os.path.join(data_root, "images", "train"), cfg.tokenizer_vocab,
                                             size=cfg.crop, seed=cfg.seed, iters=10, max_patches=50_000,
                                             verbose=False)
                tok.save(path)
            except USER_ERRORS as e:
                error = e
        share_rank0_outcome(error, rank, ddp, device)       # the barrier: the file is there, or every rank stops
    tok = tokenizer.load_tokenizer(path, device=device)
    tokenizer.check_vocab(tok, cfg.vocab_size)
    return tok, path


def build_data_root(cfg: TrainConfig, rank: int, ddp: bool) -> str:
    """The synthetic data folder (CPU preset without data flags): generated on first use, once."""
    if cfg.video_root or cfg.image_root:
        return cfg.data or os.path.dirname(os.path.abspath(cfg.out))
    root = cfg.data or "data/synthetic"
    if not os.path.exists(os.path.join(root, data.DONE_NAME)):   # any complete synthetic set is used as it is
        data.ensure_synthetic(root, seed=0, verbose=rank == 0)   # concurrent ranks: one generates, all wait
    return root


def data_config_from(cls, cfg, **renamed):
    """data.py's config `cls` (PretrainDataConfig, FinetuneDataConfig) from a trainer's config:
    every field of `cls` that `cfg` holds, under the same name or under renamed[field]; the
    others keep data.py's defaults. One source for each number: the trainer's flags."""
    values = {}
    for f in dataclasses.fields(cls):
        src = renamed.get(f.name, f.name)
        if hasattr(cfg, src):
            v = getattr(cfg, src)
            values[f.name] = tuple(v) if isinstance(v, list) else v     # JSON / argparse lists -> tuples
        elif f.name in renamed:
            raise AttributeError(f"{type(cfg).__name__} has no field {src!r} for {cls.__name__}.{f.name}")
    return cls(**values)


def build_loader(cfg: TrainConfig, data_root: str, rank: int, world: int, accum: int):
    """data.py's loader for the stage; your data via --video-root/--video-list/--image-root/--image-list,
    or the synthetic set (clips: appearance train list; images: its ImageNet-style tree). Each
    global step is world x accum x the per-process batch; this process gets its `accum` micro-batches."""
    dcfg = data_config_from(data.PretrainDataConfig, cfg, interval="frame_interval", video_mask="mask_strategy",
                            num_workers="workers")
    synthetic = not (cfg.video_root or cfg.image_root)
    video_root = cfg.video_root or os.path.join(data_root, "videos")
    video_ann = cfg.video_list or (os.path.join(data_root, "videos", "train_appearance.txt") if synthetic else None)
    image_root = cfg.image_root or (os.path.join(data_root, "images", "train") if synthetic else None)
    image_ann = cfg.image_list or None
    if image_ann is None and image_root and cfg.stage != "video":       # a folder: scanned once, by rank 0
        image_ann = data.list_image_folder_once(image_root, cfg.image_list_cache or
                                                os.path.join(cfg.out, "image_list.txt"), rank=rank)
    return data.build_pretrain_loader(cfg.stage, dcfg, video_ann=video_ann, video_root=video_root,
                                      image_root=image_root, image_ann=image_ann,
                                      rank=rank, world_size=world, accum=accum, verbose=rank == 0)


def log(rank: int, *args) -> None:
    if rank == 0:
        print(*args, flush=True)


# -----------------------------------------------------------------------------
# The training loop


def count_targets(hist: dict, inputs: dict, vocab: int) -> None:
    """Histogram of the masked target codes per stream, for the majority-code baseline:
    the accuracy of always predicting the most frequent code (a fairer "chance" than 1/vocab).

    Kept on the device with index_add_ (weights = the mask), so it needs no
    boolean indexing and no read-back; the trainer reads it once, at the end.
    """
    for name, codes, mask in (("mvm", inputs.get("video_codes"), inputs.get("video_masks")),
                              ("mim", inputs.get("image_codes"), inputs.get("image_masks"))):
        if codes is None:
            continue
        if name == "mvm":
            mask = bevt.target_mask(mask, codes.shape[1])                # (B, T, h, w)
        h = hist.setdefault(name, torch.zeros(vocab, dtype=torch.float64, device=codes.device))
        h.index_add_(0, codes.reshape(-1), mask.reshape(-1).to(h.dtype))


def clip_gradients(params: list, clip_grad: float) -> torch.Tensor:
    """Clip to a total norm of `clip_grad` (> 0), or only measure it (0 = no clipping, the
    SSv2 recipe's choice); returns the norm before clipping, on the device."""
    params = [p for p in params if p.grad is not None]
    if clip_grad > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip_grad)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def train_step(model, batches: list, tok, rt: Runtime, clip_grad: float, hist: Optional[dict] = None):
    """Forward/backward over the micro-batches of one optimizer step, then clip (§4.1).

    Gradients are all-reduced only on the last micro-step; the others accumulate
    locally under no_sync(), which is what makes accumulation cheap under DDP.
    Each micro-batch's loss is divided by their number, so the step's gradient
    is that of the mean over the effective batch. Returns this rank's mean
    metrics and the (global, synchronised) gradient norm before clipping, all
    as tensors on the device: nothing in here waits for the GPU.
    """
    accum, sums = len(batches), {}
    for k, batch in enumerate(batches):
        inputs = model_inputs(batch, tok, rt.device)
        if hist is not None:
            count_targets(hist, inputs, tok.vocab_size)
        ctx = model.no_sync() if rt.ddp and k < accum - 1 else contextlib.nullcontext()
        with ctx:
            with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.bf16):
                out = model(**inputs)
            (out["loss"] / accum).backward()
        for key, v in out.items():
            sums[key] = sums.get(key, 0.0) + v.detach().float() / accum
    gnorm = clip_gradients(list(model.parameters()), clip_grad)      # DDP / compile wrappers: the same tensors
    return sums, gnorm


class StepLog:
    """Per-step metrics, kept on the device and read back once per log interval.

    `add` all-reduces a step's metrics to their mean over ranks (on the device,
    asynchronously) and queues them; `flush` reads all queued steps in one
    transfer, appends them to metrics.jsonl (rank 0) and returns them. The
    non-finite check runs in `flush` on those all-reduced values, so a NaN on
    one rank stops every rank at the same step with the same message, instead
    of one rank leaving while the others wait in the next collective. Call
    `flush` before saving a checkpoint, so that a non-finite step is never saved.
    `flush(tail)` adds host-side fields (the throughput so far) to the last row.
    """

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
        rows, bad = [], None
        for (host, keys, _), vals in zip(self.pending, values):
            row = {**host, **dict(zip(keys, vals))}
            if not all(math.isfinite(v) for v in vals):
                bad = row
                break
            rows.append(row)
        self.pending = []
        if rows and bad is None and tail:
            rows[-1].update(tail)
        if self.path is not None:                              # the finite steps before a bad one are kept
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        if bad is not None:
            raise SystemExit(f"non-finite loss {bad.get('loss')} (gradient norm {bad.get('grad_norm')}) "
                             f"at step {bad['step']}; stopping")
        return rows


RUN_FILES = ("ckpt.pt", "ckpt.prev.pt", "final.pt", "metrics.jsonl", "config.json", "curves.png")


def share_rank0_outcome(error: Optional[BaseException], rank: int, ddp: bool, device) -> None:
    """The barrier after work that only rank 0 does (claiming the run folder, fitting the tokenizer).

    One broadcast tells every rank whether rank 0 failed, so that all of them stop
    at once with the same kind of one-line error. With a plain barrier, when rank
    0 raised before reaching it, the other ranks would wait in it until
    --dist-timeout (NCCL), or end in a traceback once rank 0's connections close
    (gloo). torchrun stops its local workers when one fails; ranks on other
    nodes, or ranks started by srun, are not stopped.
    """
    if ddp:
        failed = torch.tensor([error is not None], dtype=torch.int32, device=device)   # NCCL takes no CPU tensors
        dist.broadcast(failed, src=0)
        if failed.item() and rank != 0:
            raise ValueError("rank 0 stopped with an error before training (its message is on rank 0's stderr)")
    if error is not None:
        raise error


def claim_run_dir(out_dir: str, cfg, rt: Runtime):
    """Lock the run folder (rank 0) and decide what happens to a previous run in it.

    --resume auto (default): continue its ckpt.pt (or ckpt.prev.pt) when there is one.
    --overwrite: discard its files and start again. --resume no with a previous
    run there: an error, never a silent wipe. A second process on the same
    folder gets an error naming the first, on every rank. Returns (lock,
    checkpoint path or None).
    """
    lock, error = None, None
    if rt.rank == 0:
        try:
            os.makedirs(out_dir, exist_ok=True)
            if not os.access(out_dir, os.W_OK):
                raise ValueError(f"--out: cannot write to {out_dir}")
            # Under SLURM the lock names the job: a requeued job (same id, other nodes) takes over its own lock.
            job = os.environ.get("SLURM_JOB_ID")
            lock = data.FileLock(os.path.join(out_dir, "run.lock"), job=f"slurm-{job}" if job else None)
            busy = lock.acquire()
            if busy is not None:
                lock = None
                raise ValueError(f"{out_dir} is in use by another run ({busy}); wait for it or choose another --out")
            if cfg.overwrite:
                for name in RUN_FILES:
                    if os.path.exists(os.path.join(out_dir, name)):
                        os.remove(os.path.join(out_dir, name))
        except USER_ERRORS as e:
            error = e
            if lock is not None:
                lock.release()
    share_rank0_outcome(error, rt.rank, rt.ddp, rt.device)            # rank 0 has cleaned up, or all stop
    ckpt = os.path.join(out_dir, "ckpt.pt")
    if cfg.resume == "auto":
        found = [p for p in (ckpt, previous_path(ckpt)) if os.path.exists(p)]
        return lock, (ckpt if found else None)
    if cfg.resume != "no":
        if not os.path.isfile(cfg.resume):
            raise ValueError(f"--resume {cfg.resume}: no such file")
        return lock, cfg.resume
    there = [n for n in RUN_FILES[:4] if os.path.exists(os.path.join(out_dir, n))]
    if there:
        raise ValueError(f"{out_dir} holds a previous run ({', '.join(there)}); --resume auto continues it, "
                         f"--overwrite discards it")
    return lock, None


# What a user's input can raise (bad paths, files, values, a full disk); anything else is a bug
# and keeps its traceback.
USER_ERRORS = (ValueError, OSError, TimeoutError, pickle.UnpicklingError)


def main(argv=None) -> dict:
    """Command-line entry: user errors end in one line naming what was expected and what came, exit 2.
    `python train.py plot RUN_DIR ... --out cmp.png` draws runs' curves instead (plot_main)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plot"]:
        return plot_main(argv[1:])
    cfg = parse_args(argv)
    return run_cli("train.py", run, cfg)


def run_cli(prog: str, fn, *args):
    """The one way every command line (train.py, finetune.py, tools/*.py) ends on a user error:
    one line `PROG: error: ...` on stderr and exit 2; on Ctrl-C one line and exit 130."""
    try:
        return fn(*args)
    except USER_ERRORS as e:
        if dist.is_initialized():
            dist.destroy_process_group()
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def run(cfg: TrainConfig) -> dict:
    rt = setup_distributed(cfg.dist_timeout, cfg.precision)
    seed_everything(cfg.seed + rt.rank)                            # seed = base + rank
    out_dir = os.path.join(cfg.out, cfg.stage)
    lock, resume = claim_run_dir(out_dir, cfg, rt)
    try:
        return train(cfg, rt, out_dir, resume)
    finally:
        if lock is not None:
            lock.release()


def train(cfg: TrainConfig, rt: Runtime, out_dir: str, resume: Optional[str]) -> dict:
    ddp, rank, world, device, bf16 = rt

    # --- data and targets
    data_root = build_data_root(cfg, rank, ddp)
    tok, tok_path = resolve_tokenizer(cfg, data_root, rank, ddp, device)
    tok.set_precision(cfg.tokenizer_precision)

    # --- batch: per process x world x accumulation = the effective batch (printed below). A
    # resumed run keeps its checkpoint's effective batch, on whatever number of processes.
    per_process = stage_batches(cfg)                                    # {unit: samples per micro-batch}
    unit, per_proc = next(iter(per_process.items()))
    paper_key = "global_image_batch" if cfg.stage == "image" else "global_video_batch"
    paper_batch = getattr(cfg, paper_key)

    def derived_accum(c: dict, w: int) -> int:       # the accumulation of config c on w processes
        return c.get("accum_steps") or max(1, c[paper_key] // (c[BATCH_CONFIG_KEYS[unit]] * w))

    ck, saved, batch_note = None, None, ""
    if resume is None:
        accum = derived_accum(dataclasses.asdict(cfg), world)
    else:
        ck = load_for_resume(resume, lambda m: log(rank, m))
        saved = saved_batch(ck, {u: BATCH_CONFIG_KEYS[u] for u in per_process}, derived_accum)
        # The run's own --accum-steps (the same command line, requeued) is no request to change it.
        request = cfg.accum_steps if cfg.accum_steps != ck.get("config", {}).get("accum_steps", 0) else 0
        accum, batch_note = resume_accumulation(saved, per_process, world, request, cfg.allow_batch_change,
                                                BATCH_FLAGS, resume, lambda e: cfg.lr * e / paper_batch)
    eff = per_proc * world * accum
    lr = cfg.lr * eff / paper_batch
    loader = build_loader(cfg, data_root, rank, world, accum)

    # --- model: encoder + decoders + head; the tokenizer stays outside it
    swin = swin3d.get_config(cfg.model, drop_path_rate=cfg.drop_path, use_checkpoint=cfg.grad_checkpointing)
    raw = bevt.BEVT(bevt.BEVTConfig(swin=swin, vocab_size=cfg.vocab_size, lam=cfg.lam))
    init = cfg.init
    if not init and cfg.stage == "joint" and resume is None:
        default = os.path.join(cfg.out, "image", "final.pt")
        init = default if os.path.exists(default) else ""
        log(rank, f"joint stage: initialising from the image stage's {default}" if init else
            f"joint stage: no image-stage checkpoint at {default}; starting from scratch (BEVT without the "
            "decoupled design, cf. Table 6)")
    if init and resume is None:
        report = raw.load_released(init)
        if not any(k.startswith("encoder.") for k in report.loaded):
            raise ValueError(f"--init {init} holds no encoder weights ({len(report.unused)} keys, none of them the "
                             f"encoder's, e.g. {report.unused[:2]}); expected a BEVT or Video Swin checkpoint")
        log(rank, report.describe(init))
    raw.set_stage(cfg.stage)
    raw.to(device)
    if cfg.compile:                                                     # after .to, before DDP (nanoGPT's order)
        raw.compile_streams(dynamic=False)                              # one graph per input shape
    model = wrap_ddp(raw, device) if ddp else raw

    # --- learning rate, schedule (printed with their formulas)
    steps_per_epoch = loader.steps_per_epoch                            # global steps: samples // effective batch
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    log(rank, f"stage {cfg.stage}: world {world} x {per_proc} {unit} x accum {accum} = effective batch {eff} "
              f"{unit}" + (f" (+ {cfg.image_batch * world * accum} images)" if cfg.stage == "joint" else ""))
    log(rank, f"lr = base_lr {cfg.lr:g} x effective {eff} / paper batch {paper_batch} = {lr:.3g}; "
              f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs = {total} steps, warm-up {warmup}")
    log(rank, f"model {cfg.model}: {swin3d.param_count(raw) / 1e6:.2f}M parameters; tokenizer {tok_path} "
              f"({tok.kind}, {tok.vocab_size} codes, {tok.precision}); device {device}, "
              f"{precision_note(cfg.precision, bf16, device)}{', compiled' if cfg.compile else ''}")
    opt = torch.optim.AdamW(param_groups(raw, cfg.weight_decay), lr=lr, betas=cfg.betas,
                            fused=device.type == "cuda")

    # --- resume: model, optimiser, step, schedule and data position, RNG states
    step, epoch, epoch_step = 0, 0, 0
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if ck is not None:
        raw.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, epoch, epoch_step = resume_position(ck, saved, unit, eff, steps_per_epoch)
        changed = {k: (v, getattr(cfg, k)) for k, v in ck.get("config", {}).items()
                   if k not in ("resume", "overwrite", "max_steps", "allow_batch_change") and hasattr(cfg, k)
                   and (tuple(v) if isinstance(v, list) else v) != getattr(cfg, k)}
        log(rank, f"resumed from {resume}: step {step}, epoch {epoch}, step {epoch_step} of the epoch"
            + (f"; {batch_note}" if batch_note else "")
            + ("; changed flags: " + ", ".join(f"--{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in changed.items())
               if changed else ""))
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if rank == 0:
        start_log(out_dir, cfg, step if ck is not None else None)
    steplog = StepLog(metrics_path if rank == 0 else None, rt)
    curves_title = f"BEVT {cfg.stage} stage, {cfg.model} ({out_dir})"

    stream = EpochStream(loader, epoch, epoch_step)
    if ck is not None:
        resume_rng(ck, saved, cfg.seed, rank, world, step, lambda m: log(rank, m))
    stop_at = min(total, cfg.max_steps) if cfg.max_steps else total
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=stop_at, initial=step, desc=f"bevt {cfg.stage}", dynamic_ncols=True, file=sys.stdout)
    model.train()
    t0, seen = time.time(), 0
    last, hist = {}, {}
    while step < stop_at:
        cur_lr = lr_at(step, total, warmup, lr, cfg.min_lr * eff / paper_batch)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        batches = stream.take(accum)
        sums, gnorm = train_step(model, batches, tok, rt, cfg.clip_grad, hist if rank == 0 else None)
        seen += sum(len(b["video" if "video" in b else "image"]) for b in batches)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        # Queued on the device; read (and checked for non-finite values) every log_every steps.
        steplog.add({"step": step, "epoch": stream.epoch, "lr": cur_lr}, {**sums, "grad_norm": gnorm})
        if bar is not None:
            bar.update(1)
        save = step % cfg.ckpt_every == 0 or step == stop_at
        if step % cfg.log_every == 0 or save:
            rate = seen * world / max(time.time() - t0, 1e-9)   # samples per second since this process began
            rows = steplog.flush({f"{unit}_per_s": rate})   # before any save: a non-finite step is never saved
            last = rows[-1]
            if rank == 0:
                shown = {"loss": f"{last['loss']:.3f}"}
                shown.update({k[4:]: f"{last[k]:.3f}" for k in ("acc_mim", "acc_mvm") if k in last})
                bar.set_postfix(**shown, lr=f"{cur_lr:.2e}", **{f"{unit}/s": f"{rate:.1f}"})
        if save:
            rngs = all_rng_states(ddp, world)
            if rank == 0:
                save_checkpoint(ckpt_path, {"model": raw.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                            "epoch": stream.epoch, "epoch_step": stream.step, "world": world,
                                            "batch": batch_record(world, accum, per_process), "rng": rngs,
                                            "config": dataclasses.asdict(cfg)}, keep_previous=True)
                note = save_curves(out_dir, accuracy_baselines(hist, cfg.vocab_size), title=curves_title)
                if note:
                    bar.write(note)
    if rank == 0:
        bar.close()
        save_checkpoint(os.path.join(out_dir, "final.pt"), {"model": raw.state_dict(), "step": step,
                                                            "config": dataclasses.asdict(cfg)})
        if last:
            print("final: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items()))
        else:
            print(f"the run in {out_dir} was already complete at step {step}: nothing to do "
                  f"(--overwrite starts it again)")
        baselines = accuracy_baselines(hist, cfg.vocab_size)
        for key, b in baselines.items():
            # Rank 0's targets of this run; the last steps' accuracy is to be read against these.
            print(f"masked-token accuracy baselines ({key[4:]}): uniform 1/{cfg.vocab_size} = {b['uniform']:.4f}, "
                  f"always the most frequent code = {b['majority']:.4f}")
        if baselines:                                    # kept with the run, for `train.py plot` later
            with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "baselines": baselines}) + "\n")
        note = save_curves(out_dir, baselines, title=curves_title)
        print(note or f"curves: {os.path.join(out_dir, 'curves.png')}")
        skipped = getattr(loader, "skipped_total", 0)
        if skipped:
            print(f"skipped {skipped} unreadable media files over the run (see the log above for their paths)")
    if ddp:
        dist.destroy_process_group()
    return last


# =============================================================================
# Tools. The method ends above; below are the tools around it.
#
# -----------------------------------------------------------------------------
# Tools: pictures of a run (training curves from metrics.jsonl, Pillow only)
#
#     python train.py plot runs/cpu/image runs/cpu/joint --out cmp.png [--smooth 20]
#
# One PNG, panels on a shared step axis: loss (total and per stream), masked-token
# accuracy per stream with its two "chance" baselines, finetuning accuracy (train and
# validation top-1), learning rate, gradient norm. A panel or series is drawn only
# where the rows hold it: the image stage has no acc_mvm, so its accuracy panel has
# one line, never a flat line of zeros. One run: colour = series. Several runs:
# colour = run (legend at the top), line style = series (legend in each panel).
# Noisy series are drawn as a trailing mean over `smooth` steps, the per-step values
# faint behind them. Only Pillow and numpy: no plotting library to install.

CURVE_W = 1400                      # picture width: two columns of panels
CURVE_PANEL_H = 360                 # height of one row of panels
CURVE_HEADER_H = 48                 # title line
CURVE_RUN_LINE_H = 26               # one line of run names below the title

# (panel title, y-axis label, ((row key, legend label), ...)) in drawing order.
CURVE_PANELS = (
    ("loss", "loss", (("loss", "total"), ("loss_mim", "MIM (image)"), ("loss_mvm", "MVM (video)"))),
    ("masked-token accuracy", "accuracy (%)", (("acc_mim", "MIM (image)"), ("acc_mvm", "MVM (video)"))),
    ("classification accuracy", "top-1 (%)", (("acc", "train"),)),   # + validation top-1 from the eval rows
    ("learning rate", "learning rate", (("lr", "lr"),)),
    ("gradient norm", "norm before clipping", (("grad_norm", "gradient norm"),)),
)
CURVE_PERCENT = ("acc_mim", "acc_mvm", "acc")   # logged as fractions, drawn in % (the eval rows' top-1 already is)
CURVE_RAW = ("lr",)                             # exact values: never smoothed

# One run: a fixed colour per series, so the same stream has the same colour in every picture.
SERIES_COLOURS = {"loss": (40, 40, 40), "loss_mim": (31, 119, 180), "loss_mvm": (255, 127, 14),
                  "acc_mim": (31, 119, 180), "acc_mvm": (255, 127, 14), "acc": (44, 160, 44),
                  "lr": (148, 103, 189), "grad_norm": (140, 86, 75)}
VAL_COLOURS = ((214, 39, 40), (23, 190, 207), (227, 119, 194), (188, 189, 34))
# Several runs: a colour per run (the tab10 palette without its grey), cycled past nine runs.
RUN_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
               (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207))
# Several runs: the line style tells the series apart (pixels on, pixels off; None = solid), the same
# in every panel: total solid, MIM long dashes, MVM short dashes.
SERIES_DASH = {"loss_mim": (10, 5), "loss_mvm": (3, 3), "acc_mim": (10, 5), "acc_mvm": (3, 3)}
BASELINE_DASH = (5, 5)
BASELINE_GREY = (110, 110, 110)
MARKERS = ("circle", "square", "triangle", "diamond")


def accuracy_baselines(hist: dict, vocab: int) -> dict:
    """The two "chance" levels of the masked-token accuracy, per stream, from the target histograms
    of count_targets: {"acc_mim": {"uniform": 1/vocab, "majority": share of the most frequent code}}."""
    return {f"acc_{name}": {"uniform": 1.0 / vocab, "majority": float(h.max() / h.sum())}
            for name, h in sorted(hist.items()) if float(h.sum()) > 0}


def curve_data(rows: list) -> dict:
    """Split the rows of one metrics.jsonl into what the picture draws.

    Returns {"train": {key: (steps, values)}, "val": {(weights, mode): (steps, top1 %)},
    "baselines": {acc key: {name: fraction}}}. Training rows are the rows without
    "eval" and "baselines"; a step logged twice (a log appended to by a resumed run
    that start_log did not trim) keeps its later row, and so do the evaluation rows.
    Values that are not finite numbers are dropped, point by point.
    """
    train_rows, evals, baselines = [], {}, {}
    for r in rows:
        if not isinstance(r.get("step"), (int, float)):
            continue
        if isinstance(r.get("baselines"), dict):
            baselines = r["baselines"]                          # the last one is the run's final word
        elif isinstance(r.get("eval"), dict):
            evals[r["step"]] = r["eval"]
        else:
            while train_rows and train_rows[-1]["step"] >= r["step"]:
                train_rows.pop()                                 # superseded by a resumed run
            train_rows.append(r)

    def finite(pairs):
        pairs = [(s, float(v)) for s, v in pairs
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        return (np.array([s for s, _ in pairs], dtype=np.float64), np.array([v for _, v in pairs], dtype=np.float64))

    out = {"train": {}, "val": {}, "baselines": {}}
    for _, _, keys in CURVE_PANELS:
        for key, _ in keys:
            s, v = finite((r["step"], r.get(key)) for r in train_rows)
            if len(s):                                           # absent from every row: no series at all
                out["train"][key] = (s, v * 100 if key in CURVE_PERCENT else v)
    pairs = {}
    for step in sorted(evals):
        for weights, modes in evals[step].items():
            for mode, m in (modes.items() if isinstance(modes, dict) else ()):
                if isinstance(m, dict):
                    pairs.setdefault((weights, mode), []).append((step, m.get("top1")))
    for wm, p in pairs.items():
        s, v = finite(p)
        if len(s):
            out["val"][wm] = (s, v)
    for key, b in baselines.items():
        if isinstance(b, dict):
            b = {k: float(v) for k, v in b.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            if b:
                out["baselines"][key] = b
    return out


def moving_average(steps: np.ndarray, values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` steps: at step s, the mean of the values logged at
    steps in (s - window, s]. Counted in steps, not rows, so a log written every 10 steps
    is smoothed over the same stretch of training as one written every step."""
    if window <= 1 or len(values) == 0:
        return values
    csum = np.concatenate([[0.0], np.cumsum(values)])
    hi = np.arange(1, len(values) + 1)
    lo = np.searchsorted(steps, steps - window, side="right")   # first row inside the window
    return (csum[hi] - csum[lo]) / (hi - lo)


def nice_ticks(lo: float, hi: float, target: int = 5, expand: bool = True, min_step: float = 0.0):
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi].

    expand=True widens the limits to the outer ticks (the y axes); expand=False keeps
    [lo, hi] and returns the ticks inside it (the step axis, whose ticks are whole
    steps: min_step=1). Returns (ticks, lo, hi).
    """
    if not hi - lo > 1e-12 * max(1.0, abs(lo), abs(hi)):        # one value: a band around it
        pad = abs(hi) * 0.05
        lo, hi = (lo - pad, hi + pad) if pad else (0.0, 1.0)     # all zeros (accuracy at step 1): 0..1
    raw = (hi - lo) / target
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    if step < min_step:
        step = min_step
    elif min_step >= 1 and step != int(step):                    # 2.5 steps: no such step
        step = 2 * step if step * 2 == int(step * 2) else math.ceil(step)
    if expand:
        lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    ticks = [k * step for k in range(first, last + 1)]
    return ticks, lo, hi


def tick_labels(ticks: list) -> list:
    """Labels with as few decimals as the ticks need; scientific notation for tiny or huge values."""
    if not ticks:
        return []
    big = max(abs(t) for t in ticks)
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else big or 1.0
    d = next((d for d in range(7) if all(abs(round(t, d) - t) <= step * 1e-6 for t in ticks)), 7)
    if d <= 4 and big < 1e6:
        return [f"{t:.{d}f}".replace("-0", "0") if round(t, d) == 0 else f"{t:.{d}f}" for t in ticks]
    out = []
    for t in ticks:                                              # 2.5e-05 -> 2.5e-5, 1e+06 -> 1e6
        m, e = f"{t:.3e}".split("e")
        out.append("0" if abs(t) < step * 1e-6 else f"{m.rstrip('0').rstrip('.')}e{int(e)}")
    return out


_FONTS = {}


def curve_font(size: int, bold: bool = False):
    """DejaVu Sans (installed on most Linux systems) or Pillow's own scalable font (Pillow >= 10.1)."""
    if (size, bold) not in _FONTS:
        from PIL import ImageFont
        font = None
        for name in (("DejaVuSans-Bold.ttf", "DejaVuSans.ttf") if bold else ("DejaVuSans.ttf",)):
            try:
                font = ImageFont.truetype(name, size)
                break
            except OSError:
                pass
        if font is None:
            try:
                font = ImageFont.load_default(size=size)
            except TypeError:                                    # Pillow < 10.1: the small bitmap font
                font = ImageFont.load_default()
        _FONTS[size, bold] = font
    return _FONTS[size, bold]


def _text_size(draw, s: str, font) -> tuple:
    x0, y0, x1, y1 = draw.textbbox((0, 0), s, font=font)
    return x1 - x0, y1 - y0


def _text(draw, xy, s: str, font, fill, align: str = "left", valign: str = "top", halo: int = 0) -> tuple:
    """Text placed by its ink box (no anchors: the bitmap fallback font has none); returns the box.
    halo > 0: a white outline of that width, to stay readable where it crosses a line."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), s, font=font)
    w, h = x1 - x0, y1 - y0
    x = xy[0] - {"left": 0, "center": w / 2, "right": w}[align]
    y = xy[1] - {"top": 0, "middle": h / 2, "bottom": h}[valign]
    halo_kw = {"stroke_width": halo, "stroke_fill": (255, 255, 255)} if halo else {}
    draw.text((x - x0, y - y0), s, font=font, fill=fill, **halo_kw)
    return (x, y, x + w, y + h)


def _polyline(draw, pts: list, fill, width: int, dash=None) -> None:
    """A polyline, solid or dashed (dash = (on, off) pixels along its length)."""
    if len(pts) == 1:
        x, y = pts[0]
        r = max(2, width + 1)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)    # one row: a dot, not nothing
        return
    if dash is None:
        draw.line(pts, fill=fill, width=width, joint="curve" if width > 1 and len(pts) < 3000 else None)
        return
    # Resample at 1-pixel steps along the line and keep the "on" part of each period.
    p = np.asarray(pts, dtype=np.float64)
    seg = np.hypot(*(p[1:] - p[:-1]).T)                          # (n-1,) segment lengths
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    if arc[-1] == 0:
        return
    t = np.arange(0.0, arc[-1] + 1.0, 1.0)
    xs, ys = np.interp(t, arc, p[:, 0]), np.interp(t, arc, p[:, 1])
    on = (t % (dash[0] + dash[1])) < dash[0]
    edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(np.int8), [0]])))   # starts, ends of runs
    for a, b in zip(edges[::2], edges[1::2]):
        if b - a >= 2:
            draw.line(list(zip(xs[a:b], ys[a:b])), fill=fill, width=width)


def _marker(draw, x: float, y: float, shape: str, fill, r: int = 5) -> None:
    outline = tuple(int(c * 0.6) for c in fill)
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=outline)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill, outline=outline)
    elif shape == "triangle":
        draw.polygon([(x, y - r - 1), (x + r + 1, y + r), (x - r - 1, y + r)], fill=fill, outline=outline)
    else:
        draw.polygon([(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)], fill=fill, outline=outline)


def _faint(colour: tuple, alpha: float = 0.28) -> tuple:
    """The colour at `alpha` over white: the per-step values behind a smoothed line."""
    return tuple(int(round(255 - alpha * (255 - c))) for c in colour)


def draw_curves(runs: dict, path: str, title: str = "", baselines: Optional[dict] = None, smooth: int = 20) -> dict:
    """Draw the metrics rows of one or more runs ({name: rows}) into one PNG at `path`.

    `baselines` ({"acc_mim": {"uniform": 0.0039, "majority": 0.031}, ...}, fractions)
    are drawn as labelled dashed lines in the accuracy panel, together with those of
    each run's own {"step", "baselines"} row. The PNG is written to a temporary file
    in the same folder and renamed, so a reader never sees half a picture. Returns
    what was drawn: {"size", "runs": {name: colour (None: one run, colour = series)},
    "panels": [{"title", "box" (plot area, pixels), "xrange", "yrange" (its data limits),
    "series": [{"run", "key", "label", "colour", "n" points}], "baselines": [...]}]}.
    """
    from PIL import Image, ImageDraw
    smooth = max(1, int(smooth))
    names = list(runs)
    data_ = {n: curve_data(runs[n]) for n in names}
    several = len(names) > 1
    run_colour = {n: RUN_COLOURS[i % len(RUN_COLOURS)] for i, n in enumerate(names)}

    # --- what to draw: panels, their series and the shared step range
    panels = []
    for ptitle, ylabel, keys in CURVE_PANELS:
        series = []
        for key, label in keys:
            for n in names:
                if key in data_[n]["train"]:
                    s, v = data_[n]["train"][key]
                    series.append({"run": n, "key": key, "label": label, "s": s, "v": v, "marker": None,
                                   "smooth": key not in CURVE_RAW and smooth > 1})
        if ptitle == "classification accuracy":
            wms = sorted({wm for n in names for wm in data_[n]["val"]},
                         key=lambda wm: (wm[0] != "model", wm[0], wm[1] != "normal", wm[1]))
            for i, wm in enumerate(wms):
                for n in names:
                    if wm in data_[n]["val"]:
                        s, v = data_[n]["val"][wm]
                        series.append({"run": n, "key": f"val_top1/{wm[0]}/{wm[1]}",
                                       "label": f"val top-1 ({wm[0]}, {wm[1]})", "s": s, "v": v,
                                       "marker": MARKERS[i % len(MARKERS)], "val_index": i, "smooth": False})
        if not series:
            continue                                             # nothing of this panel in any row
        for sr in series:
            if several:
                sr["colour"] = run_colour[sr["run"]]
                sr["dash"] = SERIES_DASH.get(sr["key"])
            else:
                sr["colour"] = (SERIES_COLOURS[sr["key"]] if sr["marker"] is None
                                else VAL_COLOURS[sr["val_index"] % len(VAL_COLOURS)])
                sr["dash"] = None
            sr["line"] = moving_average(sr["s"], sr["v"], smooth) if sr["smooth"] else sr["v"]
        # The image stage logs loss == loss_mim (and the video stage loss == loss_mvm when λ = 1):
        # two identical lines would hide each other. One run: the total stays, its legend says
        # "= MIM". Several runs: the stream's line stays, in the style of the other runs' MIM.
        for n in names:
            mine = {sr["key"]: sr for sr in series if sr["run"] == n}
            streams = [k for k in ("loss_mim", "loss_mvm") if k in mine]
            if "loss" in mine and len(streams) == 1:
                a, b = mine["loss"], mine[streams[0]]
                if len(a["s"]) == len(b["s"]) and np.allclose(a["v"], b["v"], rtol=1e-6, atol=1e-9):
                    series.remove(a if several else b)
                    a["label"] = f"total (= {b['label'].split()[0]})"
        bl = []
        if ptitle == "masked-token accuracy":
            bl = _collect_baselines(baselines, data_, names, {sr["key"] for sr in series}, several, run_colour)
        panels.append({"title": ptitle, "ylabel": ylabel, "series": series, "baselines": bl})
    if not panels:
        raise ValueError(f"nothing to draw: no training or evaluation rows in {', '.join(names) or 'no runs'}")
    all_steps = np.concatenate([sr["s"] for p in panels for sr in p["series"]])
    xmax = float(all_steps.max())
    xmin = float(all_steps.min())
    xmin = 0.0 if xmin >= 0 and xmin <= 0.1 * xmax else xmin    # start at 0 unless the log starts late
    if xmax - xmin < 1:                                          # one step: centre it
        xmin, xmax = max(0.0, xmin - 1), xmin + 1
    xticks, _, _ = nice_ticks(xmin, xmax, target=6, expand=False, min_step=1)
    xlab = [f"{t / 1000:g}k" if t else "0" for t in xticks] if xmax >= 10000 else [f"{t:g}" for t in xticks]

    # --- canvas: title, run legend, panel grid
    img = Image.new("RGB", (CURVE_W, 10), "white")
    draw = ImageDraw.Draw(img)
    f_title, f_panel, f_small = curve_font(22, True), curve_font(16, True), curve_font(13)
    f_tick, f_label = curve_font(13), curve_font(14)
    run_lines, x = [[]], 16                                      # wrap the run names into lines
    for n in names:
        w = 34 + _text_size(draw, n, f_label)[0] + 24
        if x + w > CURVE_W - 16 and run_lines[-1]:
            run_lines.append([])
            x = 16
        run_lines[-1].append((x, n))
        x += w
    header = CURVE_HEADER_H + CURVE_RUN_LINE_H * len(run_lines)
    cols = 2
    rows_n = (len(panels) + cols - 1) // cols
    W, H = CURVE_W, header + rows_n * CURVE_PANEL_H
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    _text(draw, (16, 12), title or "training curves", f_title, (0, 0, 0))
    for li, line in enumerate(run_lines):
        y = CURVE_HEADER_H + li * CURVE_RUN_LINE_H + 10
        for x, n in line:
            if several:
                draw.line([(x, y), (x + 26, y)], fill=run_colour[n], width=4)
                _text(draw, (x + 34, y), n, f_label, (0, 0, 0), valign="middle")
            else:
                _text(draw, (x, y), f"run: {n}", f_label, (70, 70, 70), valign="middle")

    # Legends first (their height sets the top margin of every panel, so the plots line up).
    pw_outer = W // cols
    left, right, bottom = 86, 24, 54
    plot_w = pw_outer - left - right
    for p in panels:
        p["legend"] = _legend_entries(p, several)
        p["legend_rows"] = _legend_layout(draw, p["legend"], f_small, plot_w)
    n_leg = min(3, max(len(p["legend_rows"]) for p in panels))
    top = 34 + 20 * n_leg + 6
    plot_h = CURVE_PANEL_H - top - bottom

    record = {"size": (W, H), "runs": dict(run_colour) if several else {n: None for n in names}, "panels": []}
    for pi, p in enumerate(panels):
        ox, oy = (pi % cols) * pw_outer, header + (pi // cols) * CURVE_PANEL_H
        x0, y0 = ox + left, oy + top
        x1, y1 = x0 + plot_w, y0 + plot_h
        # y range: every smoothed point, the per-step values but for the top and bottom 1 %
        # (a few wild steps must not flatten the curve; they are clipped), evaluation
        # markers and baselines.
        vals = []
        for sr in p["series"]:
            vals.append(sr["line"])
            vals.append(np.quantile(sr["v"], [0.01, 0.99]) if sr["smooth"] else sr["v"])
        vals.append(np.array([b["value"] for b in p["baselines"]], dtype=np.float64))
        allv = np.concatenate(vals)
        lo, hi = float(allv.min()), float(allv.max())
        if p["title"] in ("learning rate", "masked-token accuracy", "classification accuracy"):
            lo = min(lo, 0.0)                                    # rates and accuracies read from 0
        yticks, ylo, yhi = nice_ticks(lo, hi, target=5, expand=True)

        def X(s):
            return (np.asarray(s, dtype=np.float64) - xmin) / (xmax - xmin) * (plot_w - 1)

        def Y(v):
            return (plot_h - 1) - (np.asarray(v, dtype=np.float64) - ylo) / (yhi - ylo) * (plot_h - 1)

        # The plot area is drawn on its own image and pasted: lines leaving it are clipped.
        plot = Image.new("RGB", (plot_w, plot_h), "white")
        pd = ImageDraw.Draw(plot)
        for t in yticks:
            pd.line([(0, float(Y(t))), (plot_w, float(Y(t)))], fill=(232, 232, 232))
        for t in xticks:
            pd.line([(float(X(t)), 0), (float(X(t)), plot_h)], fill=(232, 232, 232))
        for sr in p["series"]:                                   # per-step values, faint, beneath everything
            if sr["smooth"] and len(sr["v"]) > 1:
                pd.line(list(zip(X(sr["s"]), Y(sr["v"]))), fill=_faint(sr["colour"], 0.18 if several else 0.28),
                        width=1)
        for b in p["baselines"]:
            yb = float(Y(b["value"]))
            _polyline(pd, [(0, yb), (plot_w - 1, yb)], b["colour"], 1, BASELINE_DASH)
        for sr in p["series"]:
            if sr["marker"] is None:
                xs, ys = X(sr["s"]), Y(sr["line"])
                stride = max(1, len(xs) // (2 * plot_w))         # more points than pixels: thin them out
                idx = np.r_[np.arange(0, len(xs) - 1, stride), len(xs) - 1] if stride > 1 else slice(None)
                _polyline(pd, list(zip(xs[idx], ys[idx])), sr["colour"], 2, sr["dash"])
        # Baseline labels last, in a thin white outline: readable across a line, hiding only its glyphs' pixels.
        _baseline_labels(pd, p["baselines"], [float(Y(b["value"])) for b in p["baselines"]], plot_w - 8, f_small)
        img.paste(plot, (x0, y0))
        # Evaluation markers and labels go on the main image, so a marker at the last step shows whole.
        for sr in p["series"]:
            if sr["marker"] is not None:
                xs, ys = X(sr["s"]) + x0, Y(sr["v"]) + y0
                if len(xs) > 1:
                    draw.line(list(zip(xs, ys)), fill=sr["colour"], width=1)
                for xm, ym in zip(xs, ys):
                    _marker(draw, float(xm), float(ym), sr["marker"], sr["colour"])
        # Frame, ticks, tick labels, axis labels.
        draw.rectangle([x0 - 1, y0 - 1, x1, y1], outline=(90, 90, 90))
        for t, s in zip(yticks, tick_labels(yticks)):
            yt = y0 + float(Y(t))
            draw.line([(x0 - 6, yt), (x0 - 1, yt)], fill=(90, 90, 90))
            _text(draw, (x0 - 9, yt), s, f_tick, (40, 40, 40), align="right", valign="middle")
        for t, s in zip(xticks, xlab):
            xt = x0 + float(X(t))
            draw.line([(xt, y1), (xt, y1 + 5)], fill=(90, 90, 90))
            _text(draw, (xt, y1 + 9), s, f_tick, (40, 40, 40), align="center")
        _text(draw, ((x0 + x1) / 2, y1 + 29), "step", f_label, (40, 40, 40), align="center")
        _vertical_text(img, p["ylabel"], f_label, ox + 10, (y0 + y1) / 2)
        # Title (with the smoothing window where there is one) and the legend rows.
        tb = _text(draw, (x0, oy + 10), p["title"], f_panel, (0, 0, 0))
        if any(sr["smooth"] for sr in p["series"]):
            _text(draw, (tb[2] + 10, tb[3]), f"lines: mean of the last {smooth} steps; faint: every step",
                  f_small, (110, 110, 110), valign="bottom")
        for li, row in enumerate(p["legend_rows"][:n_leg]):
            ly = oy + 34 + 20 * li + 8
            for lx, e in row:
                ex = x0 + lx
                if e["marker"]:
                    _marker(draw, ex + 13, ly, e["marker"], e["colour"], r=4)
                else:
                    _polyline(draw, [(ex, ly), (ex + 26, ly)], e["colour"], 2, e["dash"])
                _text(draw, (ex + 32, ly), e["label"], f_small, (40, 40, 40), valign="middle")
        record["panels"].append({
            "title": p["title"], "box": (x0, y0, x1, y1), "xrange": (xmin, xmax), "yrange": (ylo, yhi),
            "series": [{"run": sr["run"], "key": sr["key"], "label": sr["label"], "colour": sr["colour"],
                        "n": len(sr["s"])} for sr in p["series"]],
            "baselines": [{k: b[k] for k in ("key", "name", "value", "label")} for b in p["baselines"]]})

    # Atomic write: a temporary file in the same folder (same file system), then a rename.
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return record


def _collect_baselines(given: Optional[dict], data_: dict, names: list, keys: set, several: bool,
                       run_colour: dict) -> list:
    """The baselines of the drawn accuracy series: the `baselines` argument and each run's own row.

    The same (kind, value) for both streams (uniform 1/vocab, one vocabulary) is one
    line; a value that only some of several runs have is drawn in the first one's colour.
    """
    found = {}                                                   # (key, name, value %) -> runs (None: given)
    sources = [(None, given or {})] + [(n, data_[n]["baselines"]) for n in names]
    for run, b in sources:
        for key, kinds in b.items():
            if key not in keys or not isinstance(kinds, dict):
                continue                                         # a stream that is not drawn has no baseline
            for name, v in kinds.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    found.setdefault((key, name, round(100.0 * v, 6)), []).append(run)
    merged = {}                                                  # (name, value) -> keys
    for key, name, value in found:
        merged.setdefault((name, value), []).append(key)
    out = []
    for (name, value), ks in sorted(merged.items(), key=lambda kv: kv[0][1]):
        runs_ = {r for k in ks for r in found[(k, name, value)]}
        stream = "" if len(ks) > 1 or len(keys) == 1 else f" {ks[0][4:].upper()}"
        colour = BASELINE_GREY
        if several and len(runs_) == 1 and None not in runs_:
            colour = run_colour[next(iter(runs_))]               # one run's own: in its colour
        out.append({"key": "+".join(sorted(ks)), "name": name, "value": value, "colour": colour,
                    "label": f"{name}{stream} {value:.2f}%"})
    return out


def _baseline_labels(draw, bl: list, ys: list, x_right: float, font) -> None:
    """Labels just above their lines, right-aligned, pushed up where two would overlap."""
    floor_ = None
    for b, y in sorted(zip(bl, ys), key=lambda t: -t[1]):       # lowest line first
        h = _text_size(draw, b["label"], font)[1]
        bottom = y - 3 if floor_ is None else min(y - 3, floor_ - 3)
        bottom = max(bottom, h + 4)                              # inside the plot
        _text(draw, (x_right, bottom), b["label"], font, b["colour"], align="right", valign="bottom", halo=2)
        floor_ = bottom - h - 1


def _legend_entries(p: dict, several: bool) -> list:
    """One entry per drawn series; with several runs, one per series kind in black (colour = run)."""
    out, seen = [], set()
    for sr in p["series"]:
        ident = sr["key"] if several else (sr["key"], sr["run"])
        if ident in seen:
            continue
        seen.add(ident)
        colour = (40, 40, 40) if several else sr["colour"]
        label = sr["label"]
        if sr["marker"] is not None and not several:             # the latest evaluation, in numbers
            label += f": {sr['v'][-1]:.1f}"
        out.append({"label": label, "colour": colour, "dash": sr["dash"], "marker": sr["marker"]})
    if len(out) == 1 and out[0]["label"] in ("total", "lr", "gradient norm"):
        return []                                                # the panel title says it all
    return out


def _legend_layout(draw, entries: list, font, width: int) -> list:
    rows, x = [[]], 0
    for e in entries:
        w = 32 + _text_size(draw, e["label"], font)[0] + 22
        if x + w > width and rows[-1]:
            rows.append([])
            x = 0
        rows[-1].append((x, e))
        x += w
    return rows


def _vertical_text(img, s: str, font, x: float, y_mid: float, fill=(40, 40, 40)) -> None:
    """Text rotated 90° (bottom to top), its left edge at x, centred on y_mid."""
    from PIL import Image, ImageDraw
    probe = ImageDraw.Draw(img)
    x0, y0, x1, y1 = probe.textbbox((0, 0), s, font=font)
    mask = Image.new("L", (x1 - x0 + 2, y1 - y0 + 2), 0)
    ImageDraw.Draw(mask).text((1 - x0, 1 - y0), s, font=font, fill=255)
    mask = mask.rotate(90, expand=True)
    top = int(y_mid - mask.size[1] / 2)
    img.paste(fill, (int(x), top, int(x) + mask.size[0], top + mask.size[1]), mask)


def plot_runs(run_dirs: list, out: str, smooth: int = 20, title: str = "", baselines: Optional[dict] = None) -> dict:
    """Read <dir>/metrics.jsonl of each run folder and draw them together into `out`."""
    runs = {}
    for d in run_dirs:
        path = os.path.join(d, "metrics.jsonl")
        if not os.path.isfile(path):
            raise ValueError(f"{d}: no metrics.jsonl there; expected the folder of a run, e.g. runs/bevt/joint")
        name = os.path.normpath(d)
        k = 2
        while name in runs:                                      # the same folder twice: keep both
            name = f"{os.path.normpath(d)} ({k})"
            k += 1
        runs[name] = read_metrics(path)
    return draw_curves(runs, out, title=title, baselines=baselines, smooth=smooth)


def save_curves(run_dir: str, baselines: Optional[dict] = None, smooth: Optional[int] = None,
                title: str = "") -> Optional[str]:
    """Redraw <run_dir>/curves.png from its metrics.jsonl (rank 0, at a checkpoint and at the end).

    smooth=None: 20 steps, or 1/300 of the steps logged so far when that is more, so
    that a run of 100k steps (hundreds of steps per pixel) still shows a line, not a
    band. A picture that cannot be drawn (no rows yet, a full disk) must not stop a
    training run: the reason is returned (None when drawn) for the caller to print.
    """
    try:
        rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        if smooth is None:
            smooth = max(20, int(max((r["step"] for r in rows), default=0)) // 300)
        draw_curves({os.path.normpath(run_dir): rows}, os.path.join(run_dir, "curves.png"), title=title,
                    baselines=baselines, smooth=smooth)
    except (ValueError, OSError) as e:
        return f"curves.png not drawn: {e}"
    return None


def plot_main(argv=None) -> dict:
    """`python train.py plot RUN_DIR [RUN_DIR ...] --out cmp.png [--smooth N]`."""
    ap = Parser(prog="train.py plot", description="Draw the training curves of one or more runs "
                "(the folders holding their metrics.jsonl) into one PNG.")
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folder holding a metrics.jsonl, "
                    "e.g. runs/bevt/joint; several are overlaid in distinct colours")
    ap.add_argument("--out", required=True, help="the PNG to write (written atomically)")
    ap.add_argument("--smooth", type=int, default=20, help="trailing mean over this many steps for the noisy "
                    "series (1 = no smoothing; default 20)")
    ap.add_argument("--title", default="", help="title of the picture (default: training curves)")
    a = ap.parse_args(argv)
    if a.smooth < 1:
        ap.error(f"--smooth must be >= 1, got {a.smooth}")
    try:
        record = plot_runs(a.run_dirs, a.out, smooth=a.smooth, title=a.title)
    except (ValueError, OSError) as e:
        print(f"train.py plot: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(f"wrote {a.out}: {len(record['panels'])} panels ({', '.join(p['title'] for p in record['panels'])}), "
          f"{len(a.run_dirs)} run(s)")
    return record


if __name__ == "__main__":
    main()
