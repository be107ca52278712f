"""BEVT finetuning and evaluation: a pretrained encoder -> an evaluated video classifier.

Implements the paper's §4.1 finetuning protocol and §4.2 "Deeper dataset
analysis" (the temporal-dependency test of Table 2), with the released
finetuning configs' recipes. Model: swin3d.py; data: data.py; pretraining:
train.py (whose distributed, schedule and checkpoint helpers this file imports).

    video (B, 3, T, H, W) -> Video Swin encoder -> final-normed F4 (B, T/2, H/32, W/32, 8C)
        -> average pool over (T', H', W') -> (B, 8C) -> Dropout(0.5) -> Linear(8C -> classes)

    # CPU demo (~3 min on 2 cores): the demo pretraining (runs/bevt/joint/final.pt) finetuned on
    # the synthetic set (python tools/synthetic.py) for its appearance and its motion labels,
    # then a Table-2-style table; the same on 2 CPU processes (gloo)
    python finetune.py --preset cpu
    torchrun --standalone --nproc_per_node=2 finetune.py --preset cpu

    # the released K400 recipe on one GPU; SSv2 (window 16x7x7, backbone lr x0.1, EMA) on 8
    python finetune.py --recipe k400 --init bevt_pretrain.pth --video-root K400/videos \\
        --train-list k400_train.txt --val-list k400_val.txt
    torchrun --standalone --nproc_per_node=8 finetune.py --recipe ssv2 --init bevt_pretrain.pth ...

    # Table 2 on a finetuned model: no training, three evaluations
    python finetune.py --recipe ssv2 --init runs/finetune/ssv2/final.pt --eval-only \\
        --eval-mode normal,single-frame,shuffle --video-root ... --val-list ...

--init takes any encoder checkpoint (train.py's, the released BEVT and Video Swin
ones; torchvision's and 2D Swin ones after tools/convert_checkpoint.py) or `scratch`. Outputs in
--out/<task>: ckpt.pt (resumable with --resume auto), final.pt (and final_ema.pt),
metrics.jsonl, config.json and eval.json (metrics, confusion matrices). Around the
method: tools/plot.py and tools/confusion.py draw a run folder; tools/extract.py,
probe.py, predict.py and tables.py give frozen features, linear probe and k-NN,
single-video predictions and the mini Tables 1, 2 and 8.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import bevt
import data
import swin3d
# Same logic as pretraining, imported rather than duplicated (nanoGPT-style helpers in train.py).
from train import (DIST_TIMEOUT_MIN, PRECISIONS, Claim, Parser, Runtime, accumulate_gradients, add_dataclass_flags,
                   all_gather_rows, begin, check_ranges, claim_run_dir, config_from, data_config_from, finished, log,
                   param_groups, plan_batch, precision_note, run_cli, save_checkpoint, say_plan, seed_everything,
                   setup_distributed, train_loop, wrap_ddp, write_atomic)

# -----------------------------------------------------------------------------
# Configuration: the released recipes as defaults, a CPU preset for the demo

EVAL_MODES = ("normal", "single-frame", "shuffle")     # Table 2: Normal / Single-frame / Random-Shuffling


@dataclass
class FinetuneConfig:
    recipe: str = "k400"                  # k400 | ssv2 | diving48: the released finetuning configs (defaults below)
    preset: str = "paper"                 # paper (the recipe) | cpu (the demo, scaled down)
    model: str = "base"                   # swin3d preset; Swin-B throughout the paper (§4.1)
    init: str = ""                        # encoder checkpoint: train.py's, the released BEVT / Video Swin ones,
                                          # converted ones (tools/convert_checkpoint.py) | scratch; cpu: the demo's
    out: str = "runs/finetune"            # run root: each label set writes to <out>/<task>
    resume: str = "auto"                  # auto: continue <out>/<task>/ckpt.pt if there is one | no | a path
    overwrite: bool = False               # discard a previous run in <out>/<task> and start again
    eval_only: bool = False               # evaluate --init as it is (a finetuned checkpoint), no training
    # --- data: your lists, or the synthetic set (no --train-list)
    data: str = ""                        # the synthetic set (python tools/synthetic.py); default data/synthetic
    task: str = "both"                    # synthetic labels: appearance | motion | both (Table 2's two columns)
    video_root: str = ""                  # video folder the lists' paths are relative to
    train_list: str = ""                  # list file of the training videos, "path label" a line
    val_list: str = ""                    # list file of the validation videos (evaluated), "path label" a line
    classes: str = ""                     # optional file of class names, one a line (saved with the model)
    num_classes: int = 0                  # 0 = the recipe's (K400 400, SSv2 174, Diving48 48) or the synthetic list's
    sampling: str = "dense"               # dense (K400: 32 x 2) | uniform (SSv2: one frame per segment)
    frames: int = 32                      # paper §4.1-4.2: 32 frames
    frame_interval: int = 2               # sampling rate (dense sampling): K400 every 2nd frame
    crop: int = 224                       # square crop, px
    short_side: int = 256                 # train/val resize (released Resize(-1, 256))
    test_short_side: int = 224            # test resize before ThreeCrop (released)
    test_clips: int = 4                   # K400: 4 clips x 3 crops; SSv2: 1 x 3 (paper §4.1-4.2)
    test_crops: int = 3                   # crops per clip at test time (ThreeCrop)
    rrc_scale: tuple = (0.08, 1.0)        # RandomResizedCrop area range (released default)
    flip: float = 0.5                     # K400 0.5; SSv2 0 (left/right matters)
    randaug_n: int = 0                    # RandAugment: operations per clip (SSv2: 4; 0 = off)
    randaug_m: int = 7                    # RandAugment: magnitude, 0-10 (SSv2: 7)
    erase: float = 0.0                    # SSv2: random erasing 0.25
    batch_size: int = 8                   # clips per process (released videos_per_gpu=8)
    eval_batch_size: int = 1              # released val/test videos_per_gpu=1
    global_batch: int = 256               # K400: 8 GPUs x 8 clips x accumulation 4 (paper §4.1-4.2)
    workers: int = 4                      # data loader processes per training process
    # --- model
    window: tuple = (8, 7, 7)             # K400 (8,7,7); SSv2 (16,7,7), tables interpolated (paper §4.1-4.2)
    drop_path: float = 0.3                # K400 0.3, SSv2 0.4 (paper §3 "BEVT encoders")
    dropout: float = 0.5                  # before the classifier (paper §4.1-4.2, released I3DHead dropout_ratio)
    # --- optimisation (paper §4.1-4.2)
    epochs: int = 60                      # epochs of the training list
    warmup_epochs: float = 2.5            # linear lr warm-up, then cosine
    lr: float = 3e-4                      # at the recipe's global batch; scaled linearly with the effective batch
    min_lr: float = 0.0                   # cosine to 0
    weight_decay: float = 0.001           # K400 0.001, SSv2 0.05; none on relative tables, norms, biases
    betas: tuple = (0.9, 0.999)           # AdamW
    layer_decay: float = 0.9              # K400 layer-wise lr decay; 1 = off
    backbone_lr_mult: float = 1.0         # SSv2: backbone lr x0.1
    label_smoothing: float = 0.0          # SSv2: 0.1
    ema: float = 0.0                      # EMA decay of the weights (SSv2: 0.9998 = 1 - mmcv EMAHook momentum); 0 = off
    clip_grad: float = 40.0               # K400 40; SSv2 none (0)
    accum_steps: int = 0                  # 0 = global_batch / (batch_size * world)
    max_steps: int = 0                    # stop after this many optimizer steps (0 = the schedule's end)
    # --- evaluation
    eval_mode: str = "normal"             # comma-separated subset of normal,single-frame,shuffle (Table 2)
    eval_split: str = "test"              # views of each --val-list video: test = clips x crops, softmax averaged;
                                          # val = one centre clip
    # --- runtime
    compile: bool = False                 # torch.compile the classifier (slow start, faster steps on GPUs)
    precision: str = "auto"               # auto (bf16 where the GPU/CPU computes it natively, else fp32) | bf16 | fp32
    grad_checkpointing: bool = False      # recompute each block's activations in the backward (less memory)
    dist_timeout: float = DIST_TIMEOUT_MIN  # minutes a collective waits for a dead or frozen rank
    seed: int = 0                         # base seed: data order and augmentation; + rank for the model
    log_every: int = 10                   # optimizer steps between metrics.jsonl reads (one host sync)
    ckpt_every: int = 500                 # optimizer steps between checkpoints


# The released configs (paper §4.1-4.2): swin_base_patch244_window877_bevt_finetune_k400.py and
# swin_base_patch244_window1677_bevt_finetune_ssv2.py.
RECIPES = {
    "k400": dict(sampling="dense", frames=32, frame_interval=2, flip=0.5, randaug_n=0, erase=0.0,
                 test_clips=4, window=(8, 7, 7), drop_path=0.3, lr=3e-4, weight_decay=0.001, layer_decay=0.9,
                 backbone_lr_mult=1.0, label_smoothing=0.0, ema=0.0, clip_grad=40.0,
                 global_batch=8 * 8 * 4),           # 8 GPUs x 8 clips x update_interval 4
    "ssv2": dict(sampling="uniform", frames=32, frame_interval=1, flip=0.0, randaug_n=4, randaug_m=7,
                 erase=0.25, test_clips=1, window=(16, 7, 7), drop_path=0.4, lr=5e-4, weight_decay=0.05,
                 layer_decay=1.0, backbone_lr_mult=0.1, label_smoothing=0.1, ema=0.9998, clip_grad=0.0,
                 global_batch=8 * 8 * 8),           # 8 GPUs x 8 clips x update_interval 8
}
# Diving48 (§4.2, Tables 1, 2, 4): no released config. Like SSv2 its labels need time
# (Table 2: 84.0 -> 13.8 single-frame), so it takes the SSv2 recipe with 48 classes;
# a dive's class does not change under a left-right flip, so flipping is kept.
RECIPES["diving48"] = dict(RECIPES["ssv2"], flip=0.5)
# Class counts, used for your data when --num-classes is not given (§4.1 "Datasets").
RECIPE_CLASSES = {"k400": 400, "ssv2": 174, "diving48": 48}

# The CPU demo: the cpu Swin preset (C=32) on 8-frame 112-px clips of the synthetic set, both
# label sets and all three evaluations in minutes on 2 cores; one recipe for both label sets, so
# that Table 2's columns differ only in the labels. The cpu model starts near its small init, where
# its MLPs are almost linear: the recipe's slowing parts (layer decay, label smoothing, dropout,
# drop path) are off and the lr is 1e-3. Frames: 8 with interval 4, the whole 32-frame video, in
# which the object moves 8-14 px between sampled frames, more than a 4-px patch.
CPU_PRESET = dict(
    model="cpu", sampling="dense", frames=8, frame_interval=4, crop=112, short_side=128, test_short_side=112,
    test_clips=1, test_crops=3, rrc_scale=(0.5, 1.0), randaug_n=0, erase=0.0, batch_size=8, eval_batch_size=8,
    global_batch=8, workers=2, window=(8, 7, 7), drop_path=0.0, dropout=0.0, epochs=20, warmup_epochs=1.0,
    lr=1e-3, weight_decay=0.05, layer_decay=1.0, backbone_lr_mult=1.0, label_smoothing=0.0, ema=0.99,
    clip_grad=5.0, eval_mode="normal,single-frame,shuffle", log_every=5, ckpt_every=50)
CPU_INIT = "runs/bevt/joint/final.pt"     # train.py's CPU demo output (default --out runs/bevt)
SYNTHETIC_TASKS = ("appearance", "motion")


CHOICES = {"recipe": ("k400", "ssv2", "diving48"), "preset": ("paper", "cpu"), "precision": PRECISIONS,
           "task": SYNTHETIC_TASKS + ("both",), "sampling": ("dense", "uniform"), "eval_split": ("val", "test")}
POSITIVE = ("frames", "frame_interval", "crop", "short_side", "test_short_side", "test_clips", "test_crops",
            "batch_size", "eval_batch_size", "global_batch", "epochs", "lr", "log_every", "ckpt_every", "dist_timeout")
NON_NEGATIVE = ("num_classes", "workers", "warmup_epochs", "min_lr", "weight_decay", "label_smoothing", "clip_grad",
                "accum_steps", "max_steps", "randaug_n", "randaug_m")
FRACTIONS = {"flip": (0.0, 1.0 + 1e-9), "erase": (0.0, 1.0 + 1e-9), "drop_path": (0.0, 1.0), "dropout": (0.0, 1.0),
             "ema": (0.0, 1.0), "layer_decay": (1e-9, 1.0 + 1e-9), "backbone_lr_mult": (1e-9, 1.0 + 1e-9)}


def resolve_config(args: dict) -> FinetuneConfig:
    """Defaults <- recipe <- preset <- explicit flags, then range checks (a ValueError names the flag)."""
    cfg = config_from(FinetuneConfig, args, RECIPES[args.get("recipe") or FinetuneConfig.recipe],
                      CPU_PRESET if args.get("preset") == "cpu" else {})
    check_ranges(cfg, POSITIVE, NON_NEGATIVE, FRACTIONS)
    parse_eval_modes(cfg.eval_mode)                             # raises on an unknown mode
    return cfg


def build_parser() -> Parser:
    """finetune.py's flags from FinetuneConfig; --help gives each default under every recipe and the cpu preset."""
    ap = Parser(prog="finetune.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(ap, FinetuneConfig, CHOICES, variants={**RECIPES, "cpu": CPU_PRESET})
    return ap


def parse_args(argv=None) -> FinetuneConfig:
    ap = build_parser()
    args = vars(ap.parse_args(argv))
    try:
        return resolve_config(args)
    except ValueError as e:                                   # one line naming the bad value, exit 2
        ap.error(str(e))


def parse_eval_modes(spec: str) -> tuple:
    modes = tuple(x.strip() for x in spec.split(",") if x.strip())
    bad = [m for m in modes if m not in EVAL_MODES]
    if bad or not modes:
        raise ValueError(f"unknown --eval-mode {','.join(bad) or spec!r}; expected a comma-separated subset of "
                         f"{','.join(EVAL_MODES)}")
    return modes


# -----------------------------------------------------------------------------
# The classifier: encoder + average pool + dropout + linear (paper §4.1-4.2)


class VideoClassifier(nn.Module):
    """Video Swin encoder -> mean over (T', H', W') of the final-normed F4 -> Dropout -> Linear.

    The released I3DHead: AdaptiveAvgPool3d((1,1,1)) on the backbone's normed
    output, dropout 0.5, fc_cls (init normal std 0.01, bias 0... here
    trunc-normal 0.02 like every Linear of the project; the head is trained
    from scratch either way). The pretraining-only parts of the encoder (the
    image stream's patch embedding and the mask token) are removed, so the
    parameter count is the paper's (Swin-B + 400-class head: 88.05M) and DDP
    needs no find_unused_parameters.
    """

    def __init__(self, swin: swin3d.SwinConfig, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.encoder = swin3d.SwinTransformer3D(swin)
        self.encoder.patch_embed_2d = None      # image stream: pretraining only (paper §4.1-4.2 "drop image embedding")
        self.encoder.mask_token = None          # masked modelling only
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.num_features, num_classes)
        swin3d._init_weights(self.head)
        self.num_classes = num_classes

    def features(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, 3, T, H, W) -> pooled (B, 8C)."""
        f4 = self.encoder(video).f4_norm                     # (B, T/2, H/32, W/32, 8C), channels last
        return f4.mean(dim=(1, 2, 3))                        # (B, 8C): global average over (T', H', W')

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(video)))     # (B, classes) logits


def build_model(cfg: FinetuneConfig, num_classes: int) -> VideoClassifier:
    swin = swin3d.get_config(cfg.model, window_size=tuple(cfg.window), drop_path_rate=cfg.drop_path,
                             use_checkpoint=cfg.grad_checkpointing)
    return VideoClassifier(swin, num_classes, cfg.dropout)


# -----------------------------------------------------------------------------
# Optimiser: layer-wise lr decay (K400) or a backbone multiplier (SSv2)


def layer_lr_scales(model: VideoClassifier, layer_decay: float, backbone_mult: float = 1.0) -> dict:
    """Parameter name -> lr multiplier.

    Layer-wise decay, generalising the released K400 config's table (written out
    for Swin-B there): the head x1; the final norm and the last block x d; then
    each block and each patch-merging layer going down one more power of d;
    the patch embedding lowest. Swin-B: 24 blocks + 3 merging layers, the
    patch embedding at d^28; Swin-T (2,2,6,2): d^16. Then every encoder
    parameter is multiplied by `backbone_mult` (SSv2: 0.1; the head is not).

    Differs from the released code: mmcv matches its custom keys in reverse
    alphabetical order, so the generic 'norm' and 'relative_position_bias_table'
    keys match before the per-layer keys and those parameters keep lr x1 (and
    with SSv2's 'backbone' x0.1 likewise). Here every parameter of a layer gets
    the layer's multiplier, which is what layer-wise decay means (BEiT).
    """
    depths = model.encoder.config.depths
    # Top-down list of the layer prefixes below the final norm: blocks of the last stage,
    # then the merging layer below them, then that stage's blocks, ... then the patch embedding.
    order = []
    for i in reversed(range(len(depths))):
        if i < len(depths) - 1:
            order.append(f"encoder.layers.{i}.downsample.")    # merges stage i into stage i+1
        order += [f"encoder.layers.{i}.blocks.{j}." for j in reversed(range(depths[i]))]
    order.append("encoder.patch_embed.")
    exponent = {p: k + 1 for k, p in enumerate(order)}         # last block: d^1, like the final norm
    exponent["encoder.norm."] = 1
    scales = {}
    for name, _ in model.named_parameters():
        if name.startswith("head."):
            scales[name] = 1.0                                  # the head: x1, no backbone multiplier
        else:
            (layer,) = [p for p in exponent if name.startswith(p)]     # every parameter in exactly one layer
            scales[name] = layer_decay ** exponent[layer] * backbone_mult
    return scales


def finetune_param_groups(model: VideoClassifier, weight_decay: float, layer_decay: float = 1.0,
                          backbone_mult: float = 1.0) -> list:
    """AdamW groups, one per (lr multiplier, decay / no decay), with `lr_scale` read by the schedule.

    The decay / no-decay split is train.param_groups' rule (no weight decay on relative
    tables, norms and biases), reused as it is.
    """
    no_decay = {id(p) for p in param_groups(model, weight_decay)[1]["params"]}
    scales = layer_lr_scales(model, layer_decay, backbone_mult)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if id(p) in no_decay else weight_decay
        g = groups.setdefault((scales[name], wd), {"params": [], "weight_decay": wd, "lr_scale": scales[name]})
        g["params"].append(p)
    return sorted(groups.values(), key=lambda g: (-g["lr_scale"], g["weight_decay"]))


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """Exponential moving average of the weights (the SSv2 recipe's mmcv EMAHook, momentum 2e-4).

    ema = d·ema + (1 − d)·θ after every optimizer step, with d warmed up as
    min(decay, (1 + n)/(10 + n)) at the n-th update (TF ExponentialMovingAverage's
    num_updates), so that short runs (the CPU demo) do not average in the random
    init. torch's AveragedModel holds the averaged copy and n; its first update
    copies the weights (n = 0, done here: the average starts at the weights the
    finetune starts from), and buffers (relative indices) follow the model.
    Differs from the released code: mmcv's EMAHook updates every iteration
    (micro-batch), with a fixed momentum; here once per optimizer step.
    """
    @torch.no_grad()
    def update(ema_params: list, params: list, n: torch.Tensor) -> None:
        n = n.double()                                             # on the parameters' device: no read-back
        keep = torch.clamp((1 + n) / (10 + n), max=decay)          # d
        for e, p in zip(ema_params, params):
            e.lerp_(p, (1 - keep).to(e.dtype))                     # e + (1 − d)(p − e)
    ema = AveragedModel(model, multi_avg_fn=update)
    ema.update_parameters(model)
    return ema.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# Data: your lists or the synthetic set (its appearance labels stand in for K400, its motion labels for SSv2)


class Task(NamedTuple):
    name: str
    root: str
    train_list: str
    val_list: str
    num_classes: int
    classes: Optional[list]
    flip: float


def read_names(path: str) -> list:
    """Class names, one a line."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def resolve_tasks(cfg: FinetuneConfig) -> list:
    """Your data (one task) or the synthetic set (appearance and/or motion). Raises before anything is written."""
    if cfg.train_list or cfg.val_list:
        if not cfg.video_root or not cfg.val_list or (not cfg.train_list and not cfg.eval_only):
            raise ValueError("your data needs --video-root, --val-list and (unless --eval-only) --train-list")
        classes = read_names(cfg.classes) if cfg.classes else None
        n = cfg.num_classes or (len(classes) if classes else RECIPE_CLASSES[cfg.recipe])
        if classes and len(classes) != n:
            raise ValueError(f"class count mismatch: {cfg.classes} names {len(classes)} classes, the model has {n}")
        return [Task(cfg.recipe, cfg.video_root, cfg.train_list, cfg.val_list, n, classes, cfg.flip)]
    root = cfg.data or "data/synthetic"
    vids = os.path.join(root, "videos")
    tasks = []
    for name in (SYNTHETIC_TASKS if cfg.task == "both" else (cfg.task,)):
        files = [os.path.join(vids, f"{kind}_{name}.txt") for kind in ("classes", "train", "val")]
        if not all(os.path.isfile(p) for p in files):
            raise ValueError(f"no synthetic set at {root} (no {files[0]}); prepare it with "
                             f"python tools/synthetic.py --out {root}")
        classes = read_names(files[0])
        # A left-right flip turns "left" into "right": no flip for motion labels (as SSv2, paper §4.1-4.2).
        flip = 0.0 if name == "motion" else cfg.flip
        tasks.append(Task(name, vids, files[1], files[2], cfg.num_classes or len(classes), classes, flip))
    return tasks


def check_classes(ann: str, root: str, num_classes: int, train: bool) -> None:
    """One-line error when the annotation list's labels do not fit the class count."""
    labels = [l for _, l in data.read_annotations(ann, root)]
    lo, hi = min(labels), max(labels)
    if lo < 0 or hi >= num_classes or (train and hi + 1 != num_classes):
        raise ValueError(f"class count mismatch: {ann} has labels {lo}..{hi} ({hi + 1} classes) but the model "
                         f"has {num_classes} classes (--num-classes / the recipe)")


def data_config(cfg: FinetuneConfig) -> data.FinetuneDataConfig:
    """The data side of the recipe: FinetuneDataConfig's fields taken from the flags of the same name."""
    return data_config_from(data.FinetuneDataConfig, cfg, interval="frame_interval", num_workers="workers")


# -----------------------------------------------------------------------------
# The finetuning loop: AdamW, warm-up + cosine (scaled per layer), accumulation, clipping, EMA


def train_step(model, batches: list, rt: Runtime, clip_grad: float, smoothing: float):
    """One optimizer step's forward/backward (train.accumulate_gradients): mean cross-entropy and accuracy."""
    def forward(batch: dict) -> dict:
        video = batch["video"].to(rt.device, non_blocking=True)       # (B, 3, T, H, W)
        label = batch["label"].to(rt.device, non_blocking=True)       # (B,)
        with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.bf16):
            logits = model(video)
        # Label smoothing (SSv2 recipe, 0.1): the released LabelSmoothing blending is
        # y·(1 − ε) + ε/K, which is exactly F.cross_entropy's label_smoothing.
        loss = F.cross_entropy(logits.float(), label, label_smoothing=smoothing)
        return {"loss": loss, "acc": (logits.argmax(-1) == label).float().mean()}
    return accumulate_gradients(model, batches, rt, clip_grad, forward)


def train(cfg: FinetuneConfig, task: Task, raw: VideoClassifier, model: nn.Module, ema: Optional[AveragedModel],
          rt: Runtime, out_dir: str, claim: Claim, init: str) -> Optional[int]:
    """Finetune one label set from `init` in train.py's loop (train.train_loop); `model` is `raw` compiled and
    DDP-wrapped, or `raw`. Returns the last step, None for a finished run."""
    b = plan_batch(cfg, {"clips": cfg.batch_size}, cfg.global_batch, {"clips": "--batch-size"}, rt.world, claim)
    dcfg = dataclasses.replace(data_config(cfg), flip=task.flip)
    loader = data.build_finetune_loader("train", dcfg, ann=task.train_list, root=task.root, rank=rt.rank,
                                        world_size=rt.world, accum=b.accum, verbose=rt.rank == 0)
    steps_per_epoch = loader.steps_per_epoch                          # global steps: samples // effective batch
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    stop_at = min(total, cfg.max_steps) if cfg.max_steps else total
    if finished(claim, stop_at, out_dir, cfg, rt.rank, ("final.pt", "eval.json")):
        return None
    say_plan(rt, cfg, b, "--global-batch", steps_per_epoch, total, warmup)
    opt = build_optimizer(cfg, raw, b.lr, rt)
    step, stream, record = begin(claim, b, raw, opt, cfg, rt, out_dir, loader, stop_at,
                                 {"init": init} if init != "scratch" else {}, ema=ema)
    model.train()
    step_fn = functools.partial(train_step, model, rt=rt, clip_grad=cfg.clip_grad, smoothing=cfg.label_smoothing)
    step, _ = train_loop(raw, opt, stream, step, step_fn, cfg, rt, b, total, warmup, stop_at, out_dir, record,
                         f"finetune {task.name}", ema)
    if rt.rank == 0:
        save_final(out_dir, record, task, raw, ema, step)
    return step


def build_optimizer(cfg: FinetuneConfig, raw: VideoClassifier, lr: float, rt: Runtime) -> torch.optim.AdamW:
    """AdamW over finetune_param_groups, its multipliers said in one line."""
    groups = finetune_param_groups(raw, cfg.weight_decay, cfg.layer_decay, cfg.backbone_lr_mult)
    lo, hi = min(g["lr_scale"] for g in groups), max(g["lr_scale"] for g in groups)
    log(rt.rank, f"lr multipliers: layer decay {cfg.layer_decay:g}, backbone x{cfg.backbone_lr_mult:g} -> "
                 f"{lo:.3g} (patch embedding) .. {hi:.3g} (head); weight decay {cfg.weight_decay:g}; label smoothing "
                 f"{cfg.label_smoothing:g}; EMA {cfg.ema:g}; grad clip {cfg.clip_grad:g}")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), fused=rt.device.type == "cuda")


# -----------------------------------------------------------------------------
# Evaluation: multi-view testing, the temporal probes of Table 2 (paper §4.2), metrics


def temporal_probe(video: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Table 2 on a batch (B, [V,] 3, T, H, W): per sample, 'single-frame' repeats one random frame T times,
    'shuffle' permutes the frames (data.single_frame / data.shuffle_frames); a sample's views share the draw."""
    if mode == "normal":
        return video
    fn = {"single-frame": data.single_frame, "shuffle": data.shuffle_frames}[mode]
    return torch.stack([fn(v, generator) for v in video])


def average_views(logits: torch.Tensor, views: int) -> torch.Tensor:
    """Logits (B·V, K), sample-major -> class probabilities (B, K): softmax per view, then the mean
    over the V views (released AvgConsensus on softmax scores, test_cfg average_clips='prob')."""
    return logits.float().view(-1, views, logits.shape[-1]).softmax(-1).mean(1)


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """top-1, top-5 (top-k with k = min(5, classes)), mean class accuracy (over the classes present),
    and the confusion matrix (rows = true class, columns = prediction)."""
    pred = probs.argmax(-1)
    topk = probs.topk(min(5, num_classes), dim=-1).indices
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    conf.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    present = conf.sum(1) > 0
    per_class = conf.diag()[present].double() / conf.sum(1)[present].double()
    return {"top1": float((pred == labels).double().mean()) * 100,
            "top5": float((topk == labels[:, None]).any(1).double().mean()) * 100,
            "mean_class": float(per_class.mean()) * 100, "n": int(labels.numel()),
            "confusion": conf.tolist()}


@torch.no_grad()
def predict(model: nn.Module, loader, mode: str, seed: int, rt: Runtime,
            progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a val/test loader once over this process's shard: probs (n, K), labels (n,), sample index (n,)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)               # the same probes every evaluation
    probs, labels, index = [], [], []
    for batch in tqdm(loader, desc=f"eval {mode}", leave=False, dynamic_ncols=True, file=sys.stderr,
                      disable=not progress):
        video = temporal_probe(batch["video"], mode, gen)
        views = video.shape[1] if video.dim() == 6 else 1
        flat = video.reshape(-1, *video.shape[-4:]).to(rt.device, non_blocking=True)   # (B·V, 3, T, H, W)
        with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.bf16):
            logits = model(flat)
        probs.append(average_views(logits, views))                  # (B, K), left on the device
        labels.append(batch["label"])
        index.append(batch["index"])
    return torch.cat(probs), torch.cat(labels).to(rt.device), torch.cat(index).to(rt.device)


def gather_predictions(probs: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                       ddp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' predictions (device tensors, gathered on the device), on the CPU in sample order;
    the repeats DistributedSampler pads in are dropped by sample index."""
    probs, labels, index = (all_gather_rows(t, ddp).cpu() for t in (probs, labels, index))
    order, first = torch.unique(index, return_inverse=True)
    keep = torch.full((len(order),), len(index), dtype=torch.long).scatter_reduce_(
        0, first, torch.arange(len(index)), reduce="amin")               # first occurrence of each index
    return probs[keep], labels[keep]


def evaluate(model: nn.Module, loader, modes: tuple, seed: int, rt: Runtime, num_classes: int) -> dict:
    """mode -> metrics over the whole (deduplicated) evaluation set, on every rank."""
    out = {}
    for mode in modes:
        loader.set_epoch(0)
        probs, labels, index = predict(model, loader, mode, seed, rt, progress=rt.rank == 0)
        p, y = gather_predictions(probs, labels, index, rt.ddp)
        out[mode] = classification_metrics(p, y, num_classes)
    return out


def report(cfg: FinetuneConfig, task: Task, results: dict, out_dir: str, step: int) -> None:
    """Rank 0: one line per evaluation; the metrics appended to metrics.jsonl; eval.json with the
    confusion matrices and the class names."""
    views = f"{cfg.test_clips} clips x {cfg.test_crops} crops" if cfg.eval_split == "test" else "1 centre clip"
    for which, res in results.items():
        for mode, m in res.items():
            top5 = f"top-5 {m['top5']:.1f}  " if task.num_classes > 5 else ""     # top-5 of <= 5 classes: 100
            print(f"[{task.name}] {which} {mode:12s} ({views}, {m['n']} val videos): top-1 {m['top1']:.1f}  "
                  f"{top5}mean class {m['mean_class']:.1f}")
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "eval": {w: {k: {x: y for x, y in m.items() if x != "confusion"}
                                                       for k, m in r.items()} for w, r in results.items()}}) + "\n")
    write_atomic(os.path.join(out_dir, "eval.json"), json.dumps({"step": step, "split": cfg.eval_split, "views": views,
                                                               "classes": task.classes, "results": results}))
    print(f"curves: python tools/plot.py {out_dir}")


def table2(results: dict, which: str = "model") -> str:
    """Table-2-style rows: task, normal, single-frame (drop), shuffled (drop), top-1 %."""
    lines = [f"{'labels':12s} {'Normal':>8s} {'Single-frame':>16s} {'Random-Shuffling':>18s}"]
    for task, res in results.items():
        n, *probes = (res[which].get(mode, {}).get("top1") for mode in ("normal", "single-frame", "shuffle"))
        cells = ["-" if v is None else f"{v:.1f}" + ("" if n is None else f" ({v - n:+.1f})") for v in probes]
        lines.append(f"{task:12s} {'-' if n is None else f'{n:.1f}':>8s} {cells[0]:>16s} {cells[1]:>18s}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The run: each label set finetuned (unless --eval-only) and evaluated, then Table 2


def main(argv=None) -> dict:
    """Command-line entry: a user error ends in one line naming what was expected and what came, exit 2."""
    return run_cli("finetune.py", run, parse_args(argv))


def run(cfg: FinetuneConfig) -> dict:
    tasks = resolve_tasks(cfg)
    init = init_path(cfg)                                      # a missing --init: an error before anything runs
    rt = setup_distributed(cfg.dist_timeout, cfg.precision)
    t0 = time.time()
    results = {t.name: run_task(cfg, t, rt, init) for t in tasks}
    if rt.rank == 0:
        for which in ("model", "ema"):
            if all(which in r for r in results.values()):
                print(f"\nTable 2 style: top-1 % on the val list ({which} weights), {len(results)} label set(s), "
                      f"{time.time() - t0:.0f} s in all (paper: K400 80.6 / 65.3 / 77.8, SSv2 66.3 / 6.3 / 19.0)")
                print(table2(results, which))
    if rt.ddp:
        dist.destroy_process_group()
    return results


def run_task(cfg: FinetuneConfig, task: Task, rt: Runtime, init: str) -> dict:
    """Finetune `init` (unless --eval-only) and evaluate it on one label set; returns {'model': metrics, 'ema': ...}."""
    seed_everything(cfg.seed + rt.rank)                           # seed = base + rank
    out_dir = os.path.join(cfg.out, task.name)
    with claim_run_dir(out_dir, cfg, rt) as claim:
        modes = parse_eval_modes(cfg.eval_mode)
        check_classes(task.val_list, task.root, task.num_classes, train=False)
        if not cfg.eval_only:
            check_classes(task.train_list, task.root, task.num_classes, train=True)
        raw, model, ema = prepare_model(cfg, task.num_classes, rt, init)
        log(rt.rank, f"task {task.name}: {task.num_classes} classes; model {cfg.model} window {tuple(cfg.window)}: "
                     f"{swin3d.param_count(raw) / 1e6:.2f}M parameters; device {rt.device}, "
                     f"{precision_note(cfg.precision, rt.bf16, rt.device)}{', compiled' if cfg.compile else ''}")
        dcfg = dataclasses.replace(data_config(cfg), flip=task.flip)
        val_loader = data.build_finetune_loader(cfg.eval_split, dcfg, ann=task.val_list, root=task.root,
                                                rank=rt.rank, world_size=rt.world, verbose=False)
        step = train(cfg, task, raw, model, ema, rt, out_dir, claim, init) if not cfg.eval_only else 0
        if step is None:                                       # a finished run, rerun: its results as on file
            with open(os.path.join(out_dir, "eval.json")) as f:
                return json.load(f)["results"]
        # The model and, alongside, its EMA.
        nets = {"model": model, **({"ema": ema.module} if ema is not None else {})}
        results = {w: evaluate(m, val_loader, modes, cfg.seed + 1, rt, task.num_classes) for w, m in nets.items()}
        if rt.rank == 0:
            report(cfg, task, results, out_dir, step)
        return results


def prepare_model(cfg: FinetuneConfig, num_classes: int, rt: Runtime, init: Optional[str] = None) -> tuple:
    """(classifier loaded from `init` (default init_path), the module trained: compiled and DDP-wrapped as asked, its
    EMA or None). The EMA copy is made after DDP's start-up broadcast of rank 0's weights: equal on every rank."""
    raw = build_model(cfg, num_classes)
    init = init_path(cfg) if init is None else init
    log(rt.rank, load_pretrained(raw, init, cfg.model).describe(init) if init != "scratch"
        else "init: scratch (random weights)")
    raw.to(rt.device)
    model = torch.compile(raw, dynamic=False) if cfg.compile else raw     # compile after .to, before DDP
    if rt.ddp:
        model = wrap_ddp(model, rt.device)
    ema = make_ema(raw, cfg.ema) if cfg.ema > 0 and not cfg.eval_only else None
    return raw, model, ema


# =============================================================================
# Machinery: what running the method needs (not the method itself).


def init_path(cfg: FinetuneConfig) -> str:
    """--init, or the CPU demo's pretraining; 'scratch': random weights. A missing file is an error."""
    init = cfg.init or (CPU_INIT if cfg.preset == "cpu" else "")
    if not init:
        raise ValueError("--init is required with the paper recipe: an encoder checkpoint (train.py's final.pt, the "
                         "released BEVT or Video Swin weights), or --init scratch for random weights")
    if init != "scratch" and not os.path.exists(init):
        raise ValueError(f"--init {init}: no such file" + (" (run the CPU pretraining demo first: python train.py "
                         "--preset cpu --stage image && python train.py --preset cpu --stage joint, or pass "
                         "--init scratch)" if init == CPU_INIT else ""))
    return init


def save_final(out_dir: str, record: dict, task: Task, raw: nn.Module, ema: Optional[AveragedModel], step: int) -> None:
    """final.pt (and final_ema.pt): the weights with the config and class names tools/predict.py reads."""
    final = {"model": raw.state_dict(), "step": step, "config": record,
             "num_classes": task.num_classes, "classes": task.classes}
    save_checkpoint(os.path.join(out_dir, "final.pt"), final)
    if ema is not None:
        save_checkpoint(os.path.join(out_dir, "final_ema.pt"), {**final, "model": ema.module.state_dict()})


# -----------------------------------------------------------------------------
# Loading any pretrained encoder (paper §4.1-4.2; the released checkpoint layout)


def _detect(sd: dict, outer: dict) -> tuple[str, tuple]:
    """(kind, (checkpoint prefix, ours) pairs for bevt.load_renamed) from the key layout."""
    config = outer.get("config") if isinstance(outer.get("config"), dict) else {}
    if any(k.startswith(("video_decoder.", "image_decoder.")) for k in sd) or "stage" in config:
        return "train.py BEVT pretraining", (("encoder.", "encoder."),)    # its `head.` is the 8192-code token head
    if any(k.startswith("backbone.") for k in sd):
        if any(k.startswith("cls_head.fc_cls.") for k in sd):
            return ("released classification (Video Swin / BEVT finetuned)",
                    (("backbone.", "encoder."), ("cls_head.fc_cls.", "head.")))
        return "released BEVT pretraining", (("backbone.", "encoder."),)
    if any(k.startswith("encoder.") for k in sd):
        return "finetune.py classifier", (("encoder.", "encoder."), ("head.", "head."))
    if "patch_embed.proj.weight" in sd:
        return "bare Swin encoder", (("head.", None), ("", "encoder."))   # encoder keys without a prefix
    raise ValueError("checkpoint layout not recognised: no encoder keys (expected backbone.*, encoder.* "
                     "or patch_embed.proj.weight)")


def _check_encoder_shape(enc: dict, config: swin3d.SwinConfig, model_name: str) -> None:
    """One-line error when the checkpoint's encoder is another Swin size than the chosen preset."""
    w = enc.get("patch_embed.proj.weight")
    blocks = (len({k.split(".")[3] for k in enc if k.startswith(f"layers.{i}.blocks.")}) for i in itertools.count())
    depths = tuple(itertools.takewhile(bool, blocks))                  # blocks per stage, up to the first empty one
    heads = tuple(enc[t].shape[1] for i in range(len(depths))
                  if (t := f"layers.{i}.blocks.0.attn.relative_position_bias_table") in enc)
    got = (None if w is None else w.shape[0], depths, heads)
    want = (config.embed_dim, tuple(config.depths), tuple(config.num_heads))
    if got[:2] != want[:2] or (heads and heads != want[2]):
        raise ValueError(f"checkpoint encoder has embed_dim={got[0]}, depths={got[1]}, heads={got[2]} but "
                         f"--model {model_name} has embed_dim={want[0]}, depths={want[1]}, heads={want[2]}")


def _checkpoint_window(enc: dict, cfg: swin3d.SwinConfig) -> Optional[tuple]:
    """(checkpoint window, model window) when the tables are of another temporal window, to be trilinearly
    resized (swin3d.resize_relative_tables, paper §4.1-4.2); None when they fit."""
    table_rows = {v.shape[0] for k, v in enc.items() if k.endswith("relative_position_bias_table")}
    if not table_rows or table_rows == {math.prod(2 * w - 1 for w in cfg.window_size)}:
        return None
    # The checkpoint's temporal window, from the table size and the (unchanged) spatial window.
    rows = table_rows.pop()
    spatial = (2 * cfg.window_size[1] - 1) * (2 * cfg.window_size[2] - 1)
    if table_rows or rows % spatial or ((rows // spatial) + 1) % 2:
        raise ValueError(f"relative_position_bias_table of {rows} rows fits no window (Wt, "
                         f"{cfg.window_size[1]}, {cfg.window_size[2]}); the model's window is {cfg.window_size}")
    return (((rows // spatial) + 1) // 2, *cfg.window_size[1:]), tuple(cfg.window_size)


def load_pretrained(model: VideoClassifier, checkpoint, model_name: str = "?") -> swin3d.LoadReport:
    """Load the encoder (and a classifier head of the right size) from any supported checkpoint, on the model's
    window. An encoder of another size or a tensor of another shape: a one-line ValueError."""
    flat, outer = swin3d.read_state_dict(checkpoint)
    kind, prefixes = _detect(flat, outer)
    old = next(o for o, new in prefixes if new == "encoder.")
    enc = {k[len(old):]: v for k, (_, v) in flat.items() if k.startswith(old) and not k.startswith("head.")}
    _check_encoder_shape(enc, model.encoder.config, model_name)
    window = _checkpoint_window(enc, model.encoder.config)
    return bevt.load_renamed(model, flat, prefixes, kind, window, soft=("head.",))   # e.g. a K400 head for SSv2


if __name__ == "__main__":
    main()
