"""BEVT pretraining: stages `image` (BEVT-I), `video` (BEVT-V) and `joint` (BEVT).

Implements paper §3 "Training strategies" and §4.1 "Implementation details",
as pinned down in ../shared/DESIGN.md §6. Model: bevt.py; data: data.py;
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

Global batch (paper): 2048 images (image stage), 256 clips + 2048 images
(joint), 256 clips (video stage). Per process: 64 images, 8 clips + 64
images, 8 clips; gradient accumulation makes up the rest (printed at start).
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
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import bevt
import data
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
    # --- data (DESIGN §6)
    data: str = ""                        # synthetic data folder (CPU preset), generated on first use
    video_root: str = ""
    video_list: str = ""
    image_root: str = ""
    image_list: str = ""
    frames: int = 16                      # clip length T (§4.1)
    frame_interval: int = 8               # DESIGN §6
    crop: int = 224
    short_side: tuple = (256, 320)        # random short-side rescale range (DESIGN §6)
    video_batch: int = 8                  # clips per process (DESIGN §6: 8 clips + 64 images per GPU)
    image_batch: int = 64                 # images per process
    global_video_batch: int = 256         # §4.1 batch size 256 clips
    global_image_batch: int = 2048        # §4.1 batch size 2048 images
    image_cycles: int = 5                 # ImageNet cycled 5x per video epoch in the joint stage (DESIGN §6)
    workers: int = 8
    mask_strategy: str = "tube"           # masking.STRATEGIES; Table 8
    mask_ratio: float = 0.5               # §3 "the masking ratio of each masked frame is 0.5"
    # --- targets (§3 "Tokenizer")
    tokenizer: str = ""                   # DALL-E encoder.pkl / converted .pt / offline tokenizer file
    vocab_size: int = 8192                # DALL-E codebook
    tokenizer_vocab: int = 8192           # offline tokenizer fitted on first use (CPU preset)
    # --- optimisation (DESIGN §6)
    epochs: int = 150                     # joint/video: 150 K400 epochs; image: 800 ImageNet epochs
    warmup_epochs: float = 10.0
    lr: float = 5e-4                      # at the paper's global batch
    min_lr: float = 0.0                   # cosine to 0
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.999)
    clip_grad: float = 3.0
    accum_steps: int = 0                  # 0 = derived from the global batch
    drop_path: float = 0.3                # Swin-B pretraining (DESIGN §2)
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


def add_dataclass_flags(ap: argparse.ArgumentParser, cls, choices: dict) -> None:
    """One flag per dataclass field, default None so that explicitly given values can be told
    apart from preset values; --help shows each field's comment and default, and enumerated
    fields list their choices (a wrong one is rejected by argparse)."""
    defaults, helps = cls(), field_help(cls)
    for f in dataclasses.fields(cls):
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
    import masking
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


def setup_distributed(timeout_min: float = DIST_TIMEOUT_MIN):
    """(ddp, rank, world, device): NCCL on CUDA, gloo on CPUs, one process per device.

    Under torchrun (RANK set) each process binds its GPU *before* creating the
    process group (NCCL otherwise guesses device 0 for its first collectives),
    and passes it as `device_id`, which lets NCCL connect eagerly. `timeout_min`
    bounds how long a collective waits for a rank that died or froze.
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
    return ddp, rank, world, device


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
# Optimiser and schedule (DESIGN §6)


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
    """Per-iteration linear warm-up, then cosine to min_lr (DESIGN §6)."""
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
        kept = [json.dumps(r) + "\n" for r in read_metrics(path) if r["step"] <= resumed_step and "eval" not in r]
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
    """The micro-batches of a loader in order across epochs, with the position a checkpoint saves.

    `epoch` and `micro` (batches taken from the current epoch) are exactly what
    a resumed run passes back in. An epoch's batches (order, crops, masks) are a
    function of (seed, rank, epoch) alone (data.EpochLoader.set_epoch), so
    resuming replays the interrupted epoch and skips the first `micro` batches.
    Skipping decodes them again: seconds here, minutes late in a Kinetics epoch.
    """

    def __init__(self, loader, epoch: int = 0, micro: int = 0):
        self.loader, self.epoch, self.micro = loader, epoch, micro
        self._it = self._start(epoch, micro)

    def _start(self, epoch: int, skip: int):
        self.loader.set_epoch(epoch)
        it = iter(self.loader)
        for _ in range(skip):
            next(it)
        return it

    def take(self, n: int) -> list:
        """The next n micro-batches (one optimizer step's worth), crossing into the next epoch if needed."""
        out = []
        for _ in range(n):
            try:
                batch = next(self._it)
            except StopIteration:                                     # end of an epoch
                self.epoch, self.micro = self.epoch + 1, 0
                self._it = self._start(self.epoch, 0)
                batch = next(self._it)
            self.micro += 1
            out.append(batch)
        return out


# -----------------------------------------------------------------------------
# Targets: the frozen tokenizer, outside the trained model (STYLE 17)


def model_inputs(batch: dict, tok, device) -> dict:
    """A data.py batch -> BEVT.forward's arguments, on the training device.

    Pixels arrive as uint8 and are normalised here (data.normalize_batch); the
    targets are the frozen tokenizer's codes of the half-size copy (eqs. 3-4's
    z), computed in fp32 and no_grad whatever the step's autocast.
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
        if rank == 0 and not os.path.exists(path) and not os.access(data_root, os.W_OK):
            raise ValueError(f"cannot write the offline tokenizer to {path}: {data_root} is not writable "
                             f"(pass --tokenizer, or a writable --data)")   # checked before minutes of fitting
        if rank == 0 and not os.path.exists(path):
            print(f"fitting the offline tokenizer ({cfg.tokenizer_vocab} codes) on {data_root}/images/train ...")
            tok = tokenizer.fit_from_dir(os.path.join(data_root, "images", "train"), cfg.tokenizer_vocab,
                                         size=cfg.crop, seed=cfg.seed, iters=10, max_patches=50_000, verbose=False)
            tok.save(path)
        if ddp:
            dist.barrier()
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


def build_loader(cfg: TrainConfig, data_root: str, rank: int, world: int):
    """data.py's loader for the stage; your data via --video-root/--video-list/--image-root/--image-list,
    or the synthetic set (clips: appearance train list; images: its ImageNet-style tree)."""
    dcfg = data.PretrainDataConfig(
        frames=cfg.frames, interval=cfg.frame_interval, crop=cfg.crop, short_side=tuple(cfg.short_side),
        video_mask=cfg.mask_strategy, mask_ratio=cfg.mask_ratio, video_batch=cfg.video_batch,
        image_batch=cfg.image_batch, num_workers=cfg.workers, seed=cfg.seed)
    synthetic = not (cfg.video_root or cfg.image_root)
    video_root = cfg.video_root or os.path.join(data_root, "videos")
    video_ann = cfg.video_list or (os.path.join(data_root, "videos", "train_appearance.txt") if synthetic else None)
    image_root = cfg.image_root or (os.path.join(data_root, "images", "train") if synthetic else None)
    return data.build_pretrain_loader(cfg.stage, dcfg, video_ann=video_ann, video_root=video_root,
                                      image_root=image_root, image_ann=cfg.image_list or None,
                                      rank=rank, world_size=world, verbose=rank == 0)


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


def train_step(model, raw, batches: list, tok, device, ddp: bool, bf16: bool, clip_grad: float,
               hist: Optional[dict] = None):
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
        inputs = model_inputs(batch, tok, device)
        if hist is not None:
            count_targets(hist, inputs, tok.vocab_size)
        ctx = model.no_sync() if ddp and k < accum - 1 else contextlib.nullcontext()
        with ctx:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(**inputs)
            (out["loss"] / accum).backward()
        for key, v in out.items():
            sums[key] = sums.get(key, 0.0) + v.detach().float() / accum
    gnorm = clip_gradients(list(raw.parameters()), clip_grad)
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
    """

    def __init__(self, path: Optional[str], ddp: bool, device: torch.device):
        self.path, self.ddp, self.device = path, ddp, device
        self.pending = []                                      # (host fields, keys, device vector)

    def add(self, host: dict, metrics: dict) -> None:
        keys = sorted(metrics)
        vec = torch.stack([torch.as_tensor(metrics[k], device=self.device).float().reshape(()) for k in keys])
        self.pending.append((host, keys, all_reduce_mean(vec, self.ddp)))

    def flush(self) -> list:
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
        if self.path is not None:                              # the finite steps before a bad one are kept
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        if bad is not None:
            raise SystemExit(f"non-finite loss {bad.get('loss')} (gradient norm {bad.get('grad_norm')}) "
                             f"at step {bad['step']}; stopping")
        return rows


RUN_FILES = ("ckpt.pt", "ckpt.prev.pt", "final.pt", "metrics.jsonl", "config.json")


def claim_run_dir(out_dir: str, cfg, rank: int, ddp: bool):
    """Lock the run folder (rank 0) and decide what happens to a previous run in it.

    --resume auto (default): continue its ckpt.pt (or ckpt.prev.pt) when there is one.
    --overwrite: discard its files and start again. --resume no with a previous
    run there: an error, never a silent wipe. A second process on the same
    folder gets an error naming the first. Returns (lock, checkpoint path or None).
    """
    lock = None
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise ValueError(f"--out: cannot write to {out_dir}")
        lock = data.FileLock(os.path.join(out_dir, "run.lock"))
        busy = lock.acquire()
        if busy is not None:
            raise ValueError(f"{out_dir} is in use by another run ({busy}); wait for it or choose another --out")
        if cfg.overwrite:
            for name in RUN_FILES:
                if os.path.exists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
    if ddp:
        dist.barrier()                                                  # rank 0 has cleaned up
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
    """Command-line entry: user errors end in one line naming what was expected and what came, exit 2."""
    cfg = parse_args(argv)
    try:
        return run(cfg)
    except USER_ERRORS as e:
        if dist.is_initialized():
            dist.destroy_process_group()
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def run(cfg: TrainConfig) -> dict:
    ddp, rank, world, device = setup_distributed(cfg.dist_timeout)
    seed_everything(cfg.seed + rank)                               # seed = base + rank
    out_dir = os.path.join(cfg.out, cfg.stage)
    lock, resume = claim_run_dir(out_dir, cfg, rank, ddp)
    try:
        return train(cfg, ddp, rank, world, device, out_dir, resume)
    finally:
        if lock is not None:
            lock.release()


def train(cfg: TrainConfig, ddp: bool, rank: int, world: int, device, out_dir: str, resume: Optional[str]) -> dict:
    bf16 = resolve_precision(cfg.precision, device)

    # --- data and targets
    data_root = build_data_root(cfg, rank, ddp)
    tok, tok_path = resolve_tokenizer(cfg, data_root, rank, ddp, device)
    tok.set_precision(cfg.tokenizer_precision)
    loader = build_loader(cfg, data_root, rank, world)

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
        loaded_encoder = [k for k in raw.encoder.state_dict() if "encoder." + k not in report.missing
                          and not k.endswith("relative_position_index")]      # re-derived, never loaded
        if not loaded_encoder:
            raise ValueError(f"--init {init} holds no encoder weights ({len(report.unused)} keys, none of them the "
                             f"encoder's, e.g. {report.unused[:2]}); expected a BEVT or Video Swin checkpoint")
        log(rank, f"init from {init}: {len(report.missing)} missing keys {report.missing[:6]}"
                  f"{'...' if len(report.missing) > 6 else ''}; {len(report.unused)} unused keys {report.unused[:6]}")
    raw.set_stage(cfg.stage)
    raw.to(device)
    if cfg.compile:                                                     # after .to, before DDP (nanoGPT's order)
        raw.compile_streams(dynamic=False)                              # one graph per input shape
    model = wrap_ddp(raw, device) if ddp else raw

    # --- batch, learning rate, schedule (printed with their formulas)
    per_proc = cfg.image_batch if cfg.stage == "image" else cfg.video_batch
    paper_batch = cfg.global_image_batch if cfg.stage == "image" else cfg.global_video_batch
    accum = cfg.accum_steps or max(1, paper_batch // (per_proc * world))
    eff = per_proc * world * accum
    lr = cfg.lr * eff / paper_batch
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch < 1:
        raise ValueError(f"an epoch has {len(loader)} batches per process, fewer than the {accum} micro-batches of "
                         f"one step (--accum-steps); use more data or a smaller accumulation")
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    unit = "images" if cfg.stage == "image" else "clips"
    log(rank, f"stage {cfg.stage}: world {world} x {per_proc} {unit} x accum {accum} = effective batch {eff} "
              f"{unit}" + (f" (+ {cfg.image_batch * world * accum} images)" if cfg.stage == "joint" else ""))
    log(rank, f"lr = base_lr {cfg.lr:g} x effective {eff} / paper batch {paper_batch} = {lr:.3g}; "
              f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs = {total} steps, warm-up {warmup}")
    log(rank, f"model {cfg.model}: {swin3d.param_count(raw) / 1e6:.2f}M parameters; tokenizer {tok_path} "
              f"({tok.kind}, {tok.vocab_size} codes, {tok.precision}); device {device}, "
              f"{precision_note(cfg.precision, bf16, device)}{', compiled' if cfg.compile else ''}")
    opt = torch.optim.AdamW(param_groups(raw, cfg.weight_decay), lr=lr, betas=cfg.betas,
                            fused=device.type == "cuda")

    # --- resume: model, optimiser, step, data position, RNG states
    step, epoch, micro = 0, 0, 0
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    ck = None
    if resume is not None:
        ck = load_for_resume(resume, lambda m: log(rank, m))
        if ck.get("world") != world:
            raise ValueError(f"{resume} was written by {ck.get('world')} processes; resume with the same number, "
                             f"got {world}")
        raw.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, epoch, micro = ck["step"], ck["epoch"], ck["micro"]
        changed = {k: (v, getattr(cfg, k)) for k, v in ck.get("config", {}).items()
                   if k not in ("resume", "overwrite", "max_steps") and hasattr(cfg, k)
                   and (tuple(v) if isinstance(v, list) else v) != getattr(cfg, k)}
        log(rank, f"resumed from {resume}: step {step}, epoch {epoch}, batch {micro} of the epoch"
            + ("; changed flags: " + ", ".join(f"--{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in changed.items())
               if changed else ""))
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if rank == 0:
        start_log(out_dir, cfg, step if ck is not None else None)
    steplog = StepLog(metrics_path if rank == 0 else None, ddp, device)

    stream = EpochStream(loader, epoch, micro)
    if ck is not None:
        set_rng_state(ck["rng"][rank])
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
        sums, gnorm = train_step(model, raw, batches, tok, device, ddp, bf16, cfg.clip_grad,
                                 hist if rank == 0 else None)
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
            rows = steplog.flush()                 # before any save: a non-finite step is never checkpointed
            last = rows[-1]
            if rank == 0:
                rate = seen * world / max(time.time() - t0, 1e-9)
                last[f"{unit}_per_s"] = rate
                shown = {"loss": f"{last['loss']:.3f}"}
                shown.update({k[4:]: f"{last[k]:.3f}" for k in ("acc_mim", "acc_mvm") if k in last})
                bar.set_postfix(**shown, lr=f"{cur_lr:.2e}", **{f"{unit}/s": f"{rate:.1f}"})
        if save:
            rngs = all_rng_states(ddp, world)
            if rank == 0:
                save_checkpoint(ckpt_path, {"model": raw.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                            "epoch": stream.epoch, "micro": stream.micro, "world": world, "rng": rngs,
                                            "config": dataclasses.asdict(cfg)}, keep_previous=True)
    if rank == 0:
        bar.close()
        save_checkpoint(os.path.join(out_dir, "final.pt"), {"model": raw.state_dict(), "step": step,
                                                            "config": dataclasses.asdict(cfg)})
        if last:
            print("final: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items()))
        else:
            print(f"the run in {out_dir} was already complete at step {step}: nothing to do "
                  f"(--overwrite starts it again)")
        for name, h in sorted(hist.items()):
            # Rank 0's targets of this run; the last steps' accuracy is to be read against these.
            print(f"masked-token accuracy baselines ({name}): uniform 1/{cfg.vocab_size} = {1 / cfg.vocab_size:.4f}, "
                  f"always the most frequent code = {float(h.max() / h.sum()):.4f}")
        skipped = getattr(loader, "skipped_total", 0)
        if skipped:
            print(f"skipped {skipped} unreadable media files over the run (see the log above for their paths)")
    if ddp:
        dist.destroy_process_group()
    return last


if __name__ == "__main__":
    main()
