"""BEVT finetuning and evaluation: a pretrained encoder -> an evaluated video classifier.

Implements the paper's §4.1 finetuning protocol and §4.2 "Deeper dataset
analysis" (the temporal-dependency test of Table 2), with the released
finetuning configs' recipes and checkpoint layouts. Model:
swin3d.py; data: data.py; pretraining: train.py (whose helpers this file imports).

    video (B, 3, T, H, W) -> Video Swin encoder -> final-normed F4 (B, T/2, H/32, W/32, 8C)
        -> average pool over (T', H', W') -> (B, 8C) -> Dropout(0.5) -> Linear(8C -> classes)

    # CPU demo (synthetic data, ~3 min on 2 cores): finetune the demo pretraining
    # (runs/bevt/joint/final.pt from `python train.py --preset cpu --stage image &&
    # python train.py --preset cpu --stage joint`) once for the appearance labels and once
    # for the motion labels, then print a Table-2-style table
    python finetune.py --preset cpu

    # the same on 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node=2 finetune.py --preset cpu

    # one GPU, the released K400 recipe (Swin-B, 32x2 frames, layer-wise lr decay 0.9)
    python finetune.py --recipe k400 --init bevt_pretrain.pth --root K400/videos \\
        --train-list k400_train.txt --val-list k400_val.txt

    # one node, 8 GPUs, SSv2 (window 16x7x7, backbone lr x0.1, label smoothing, EMA)
    torchrun --standalone --nproc_per_node=8 finetune.py --recipe ssv2 --init bevt_pretrain.pth ...

    # Table 2 on a finetuned model: no training, three evaluations
    python finetune.py --recipe ssv2 --init runs/finetune/ssv2/final.pt --eval-only \\
        --eval-mode normal,single-frame,shuffle --root ... --val-list ...

Tools, as subcommands (their code follows the method, at the end of this file):

    python finetune.py extract ...   # frozen features (pooled final-normed F4) of a video list, resumable
    python finetune.py probe ...     # linear probe and k-NN on those features
    python finetune.py predict ...   # top-5 classes of single videos with a finetuned checkpoint
    python finetune.py tables ...    # mini reproductions of the paper's Tables 1, 2 and 8 on the synthetic set

Checkpoints accepted by --init (the kind is detected and printed with exactly
which keys were used and which were not): a train.py checkpoint
(`{'model': BEVT state dict}`), a released BEVT pretraining checkpoint
(`backbone.*`, `cls_head.lm_head.*`, ...), a Video Swin / BEVT classification
checkpoint (`backbone.*` + `cls_head.fc_cls.*`), a 2D Swin image checkpoint
(inflated to 3D), a finetune.py checkpoint, or `scratch`. A pretrained window
(8,7,7) is resized to the recipe's (e.g. (16,7,7)) by interpolating the
relative-position tables.

Outputs in --out/<task>: `ckpt.pt` (latest, atomic, resumable with --resume
auto), `final.pt`, `metrics.jsonl` (train steps and evaluations), `config.json`,
`eval.json` and `confusion_<mode>.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import swin3d
# Same logic as pretraining, imported rather than duplicated (nanoGPT-style helpers in train.py).
from train import (DIST_TIMEOUT_MIN, PRECISIONS, USER_ERRORS, EpochStream, Parser, Runtime, StepLog,
                   add_dataclass_flags, all_gather_rows, all_rng_states, batch_record, check_ranges, claim_run_dir,
                   clip_gradients, data_config_from, load_for_resume, lr_at, param_groups, precision_note,
                   resolve_precision, resume_accumulation, resume_position, resume_rng, save_checkpoint, save_curves,
                   saved_batch, seed_everything, setup_distributed, start_log, unwrap, wrap_ddp, write_atomic)

# -----------------------------------------------------------------------------
# Configuration: the released recipes as defaults, a CPU preset for the demo

EVAL_MODES = ("normal", "single-frame", "shuffle")     # Table 2: Normal / Single-frame / Random-Shuffling


@dataclass
class FinetuneConfig:
    recipe: str = "k400"                  # k400 | ssv2 | diving48 (RECIPES below)
    preset: str = "paper"                 # paper | cpu
    model: str = "base"                   # swin3d preset; Swin-B throughout the paper (§4.1)
    init: str = ""                        # checkpoint (any kind, see the docstring) | scratch; cpu: the demo's
    out: str = "runs/finetune"
    resume: str = "auto"                  # auto: continue <out>/<task>/ckpt.pt if there is one | no | a path
    overwrite: bool = False               # discard a previous run in <out>/<task> and start again
    allow_batch_change: bool = False      # resume on a world size that cannot keep the effective batch: go on with the nearest one, lr rescaled
    eval_only: bool = False               # evaluate --init as it is (a finetuned checkpoint), no training
    # --- data: your lists, or the synthetic set (CPU preset, no --train-list)
    data: str = ""                        # synthetic data folder, generated on first use
    task: str = "both"                    # synthetic labels: appearance | motion | both (Table 2's two columns)
    root: str = ""                        # video folder the lists' paths are relative to
    train_list: str = ""
    val_list: str = ""
    classes: str = ""                     # optional file of class names, one a line (confusion-matrix labels)
    num_classes: int = 0                  # 0 = the recipe's (K400 400, SSv2 174, Diving48 48) or the synthetic list's
    sampling: str = "dense"               # dense (K400: 32 x 2) | uniform (SSv2: one frame per segment)
    frames: int = 32                      # paper §4.1-4.2: 32 frames
    interval: int = 2                     # K400: frame interval 2
    crop: int = 224
    short_side: int = 256                 # train/val resize (released Resize(-1, 256))
    test_short_side: int = 224            # test resize before ThreeCrop (released)
    test_clips: int = 4                   # K400: 4 clips x 3 crops; SSv2: 1 x 3 (paper §4.1-4.2)
    test_crops: int = 3
    rrc_scale: tuple = (0.08, 1.0)        # RandomResizedCrop area range (released default)
    flip: float = 0.5                     # K400 0.5; SSv2 0 (left/right matters)
    randaug_n: int = 0                    # SSv2: RandAugment n=4 ...
    randaug_m: int = 7                    # ... m=7
    erase: float = 0.0                    # SSv2: random erasing 0.25
    batch_size: int = 8                   # clips per process (released videos_per_gpu=8)
    eval_batch_size: int = 1              # released val/test videos_per_gpu=1
    global_batch: int = 256               # K400: 8 GPUs x 8 clips x accumulation 4 (paper §4.1-4.2)
    workers: int = 4
    # --- model
    window: tuple = (8, 7, 7)             # K400 (8,7,7); SSv2 (16,7,7), tables interpolated (paper §4.1-4.2)
    drop_path: float = 0.3                # K400 0.3, SSv2 0.4 (paper §3 "BEVT encoders")
    dropout: float = 0.5                  # before the classifier (paper §4.1-4.2, released I3DHead dropout_ratio)
    # --- optimisation (paper §4.1-4.2)
    epochs: int = 60
    warmup_epochs: float = 2.5
    lr: float = 3e-4                      # at the recipe's global batch; scaled linearly with the effective batch
    min_lr: float = 0.0                   # cosine to 0
    weight_decay: float = 0.001           # K400 0.001, SSv2 0.05; none on relative tables, norms, biases
    betas: tuple = (0.9, 0.999)
    layer_decay: float = 0.9              # K400 layer-wise lr decay; 1 = off
    backbone_lr_mult: float = 1.0         # SSv2: backbone lr x0.1
    label_smoothing: float = 0.0          # SSv2: 0.1
    ema: float = 0.0                      # EMA decay of the weights (SSv2: 0.9998 = 1 - mmcv EMAHook momentum); 0 = off
    clip_grad: float = 40.0               # K400 40; SSv2 none (0)
    accum_steps: int = 0                  # 0 = global_batch / (batch_size * world)
    max_steps: int = 0
    # --- evaluation
    eval_mode: str = "normal"             # comma-separated subset of normal,single-frame,shuffle (Table 2)
    eval_split: str = "test"              # test: clips x crops, softmax averaged; val: one centre clip
    # --- runtime
    compile: bool = False
    precision: str = "auto"               # auto (bf16 where the GPU/CPU computes it natively, else fp32) | bf16 | fp32
    grad_checkpointing: bool = False
    dist_timeout: float = DIST_TIMEOUT_MIN  # minutes a collective waits for a dead or frozen rank
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500                 # optimizer steps


# The released configs (paper §4.1-4.2): swin_base_patch244_window877_bevt_finetune_k400.py and
# swin_base_patch244_window1677_bevt_finetune_ssv2.py.
RECIPES = {
    "k400": dict(sampling="dense", frames=32, interval=2, flip=0.5, randaug_n=0, erase=0.0,
                 test_clips=4, window=(8, 7, 7), drop_path=0.3, lr=3e-4, weight_decay=0.001, layer_decay=0.9,
                 backbone_lr_mult=1.0, label_smoothing=0.0, ema=0.0, clip_grad=40.0,
                 global_batch=8 * 8 * 4),           # 8 GPUs x 8 clips x update_interval 4
    "ssv2": dict(sampling="uniform", frames=32, interval=1, flip=0.0, randaug_n=4, randaug_m=7,
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

# The CPU demo: the cpu Swin preset (C=32) on 8-frame 112-px clips of the
# synthetic set, sized so both label sets and all three evaluations take a few
# minutes on 2 cores. One recipe for both label sets, so that Table 2's columns
# differ only in the labels. Measured on the synthetic motion labels (README,
# "Finetuning"): the cpu model starts from weights near their small init
# (trunc-normal 0.02), where its MLPs are almost linear, and needs a few
# hundred steps at lr 1e-3 before the loss leaves ln(4) (earlier from the demo
# pretraining, later from scratch). The recipe's slowing parts were therefore
# switched off for 500 steps: the K400 recipe's lr 3e-4 with layer decay 0.9,
# label smoothing 0.1, dropout 0.5 and drop path 0.1 had reached 45% top-1 after
# 300 steps; lr 2e-3 stayed at chance; lr 1e-3 without them reached 83%.
# Frames: 8 with interval 4, i.e. the whole 32-frame synthetic video, in which
# the object moves 8-14 px between sampled frames, more than a 4-px patch. With
# interval 2 the step at which the loss leaves ln(4) varied so much that one
# seed in three never got there in 500 steps (README, "Finetuning"). (Those
# measurements were on version 2 of the synthetic set, with 4 directions.)
# Workers: 2 loading processes beside the step ran 1.2x faster than 1 on the
# 2-core CPU (150 steps, one run); a sample does not depend on the worker count.
CPU_PRESET = dict(
    model="cpu", sampling="dense", frames=8, interval=4, crop=112, short_side=128, test_short_side=112,
    test_clips=1, test_crops=3, rrc_scale=(0.5, 1.0), randaug_n=0, erase=0.0, batch_size=8, eval_batch_size=8,
    global_batch=8, workers=2, window=(8, 7, 7), drop_path=0.0, dropout=0.0, epochs=20, warmup_epochs=1.0,
    lr=1e-3, weight_decay=0.05, layer_decay=1.0, backbone_lr_mult=1.0, label_smoothing=0.0, ema=0.99,
    clip_grad=5.0, eval_mode="normal,single-frame,shuffle", log_every=5, ckpt_every=50)
CPU_INIT = "runs/bevt/joint/final.pt"     # train.py's CPU demo output (default --out runs/bevt)
SYNTHETIC_TASKS = ("appearance", "motion")


CHOICES = {"recipe": ("k400", "ssv2", "diving48"), "preset": ("paper", "cpu"), "precision": PRECISIONS,
           "task": SYNTHETIC_TASKS + ("both",), "sampling": ("dense", "uniform"), "eval_split": ("val", "test")}
POSITIVE = ("frames", "interval", "crop", "short_side", "test_short_side", "test_clips", "test_crops", "batch_size",
            "eval_batch_size", "global_batch", "epochs", "lr", "log_every", "ckpt_every", "dist_timeout")
NON_NEGATIVE = ("num_classes", "workers", "warmup_epochs", "min_lr", "weight_decay", "label_smoothing", "clip_grad",
                "accum_steps", "max_steps", "randaug_n", "randaug_m")
FRACTIONS = {"flip": (0.0, 1.0 + 1e-9), "erase": (0.0, 1.0 + 1e-9), "drop_path": (0.0, 1.0), "dropout": (0.0, 1.0),
             "ema": (0.0, 1.0), "layer_decay": (1e-9, 1.0 + 1e-9), "backbone_lr_mult": (1e-9, 1.0 + 1e-9)}


def resolve_config(args: dict) -> FinetuneConfig:
    """Defaults <- recipe <- preset <- explicit flags, then range checks (FlagError names the flag)."""
    defaults = FinetuneConfig()
    cfg = dataclasses.asdict(defaults)
    cfg.update(RECIPES[args.get("recipe") or defaults.recipe])
    if (args.get("preset") or defaults.preset) == "cpu":
        cfg.update(CPU_PRESET)
    cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if v is not None})
    cfg = FinetuneConfig(**cfg)
    check_ranges(cfg, POSITIVE, NON_NEGATIVE, FRACTIONS)
    parse_eval_modes(cfg.eval_mode)                             # raises on an unknown mode
    return cfg


def parse_args(argv=None) -> FinetuneConfig:
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(ap, FinetuneConfig, CHOICES)
    args = vars(ap.parse_args(argv))
    try:
        return resolve_config(args)
    except ValueError as e:                                   # one line naming the bad value, exit 2
        ap.error(str(e))


def comma_items(spec: str) -> list:
    """The items of a comma-separated flag value, stripped, empty ones dropped."""
    return [x.strip() for x in spec.split(",") if x.strip()]


def parse_eval_modes(spec: str) -> tuple:
    modes = tuple(comma_items(spec))
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

    def no_weight_decay(self) -> set:
        return {"encoder." + n for n in self.encoder.no_weight_decay()}


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
    scales = {}
    for name, _ in model.named_parameters():
        if name.startswith("head."):
            scales[name] = 1.0
            continue
        if name.startswith("encoder.norm."):
            e = 1
        else:
            matches = [p for p in order if name.startswith(p)]
            if len(matches) != 1:
                raise ValueError(f"parameter {name} has no layer-wise decay rule")
            e = exponent[matches[0]]
        scales[name] = layer_decay ** e * backbone_mult
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
        key = (scales[name], wd)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": wd, "lr_scale": scales[name]}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return sorted(groups.values(), key=lambda g: (-g["lr_scale"], g["weight_decay"]))


class EMA:
    """Exponential moving average of the weights (the SSv2 recipe's mmcv EMAHook, momentum 2e-4).

    ema = d·ema + (1 − d)·θ after every optimizer step, with d warmed up as
    min(decay, (1 + n)/(10 + n)) (TF ExponentialMovingAverage's num_updates),
    so that short runs (the CPU demo) do not average in the random init.
    Differs from the released code: mmcv's EMAHook updates every iteration
    (micro-batch), with a fixed momentum; here once per optimizer step.
    Buffers (relative indices) are copied.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, st: dict) -> None:
        self.module.load_state_dict(st["module"])
        self.updates = st["updates"]


# -----------------------------------------------------------------------------
# Loading any pretrained encoder (paper §4.1-4.2; the released checkpoint layout)


def _state_dict_of(checkpoint) -> tuple[dict, dict]:
    """(flat state dict, outer dict) of a path / dict; `module.` / `_orig_mod.` stripped."""
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
        checkpoint = swin3d.load_file(checkpoint)
    outer = checkpoint if isinstance(checkpoint, dict) else {}
    sd = checkpoint
    for k in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(k), dict):
            sd = sd[k]
            break
    out = {}
    for key, v in sd.items():
        out[swin3d.unwrap_key(key)] = (key, v)                                   # keep the original name for the report
    return out, outer


def _detect(sd: dict, outer: dict) -> tuple[str, str, Optional[str]]:
    """(kind, encoder prefix, classifier-head prefix or None) from the key layout."""
    keys = list(sd)
    config = outer.get("config") if isinstance(outer.get("config"), dict) else {}
    if any(k.startswith(("video_decoder.", "image_decoder.")) for k in keys) or "stage" in config:
        return "train.py BEVT pretraining", "encoder.", None     # its `head.` is the 8192-code token head
    if any(k.startswith("backbone.") for k in keys):
        if any(k.startswith("cls_head.fc_cls.") for k in keys):
            return "released classification (Video Swin / BEVT finetuned)", "backbone.", "cls_head.fc_cls."
        return "released BEVT pretraining", "backbone.", None
    if any(k.startswith("encoder.") for k in keys):
        return "finetune.py classifier", "encoder.", "head."
    if swin3d.is_torchvision_layout(keys):
        return swin3d.TORCHVISION_KIND, "", "head."              # keys renamed by load_pretrained; head: K400
    if "patch_embed.proj.weight" in sd:
        return "bare Swin encoder", "", None                   # e.g. a 2D Swin image checkpoint (its head: ImageNet)
    raise ValueError("checkpoint layout not recognised: no encoder keys (expected backbone.*, encoder.*, "
                     "torchvision's features.* or patch_embed.proj.weight)")


def _check_encoder_shape(enc: dict, config: swin3d.SwinConfig, model_name: str) -> None:
    """One-line error when the checkpoint's encoder is another Swin size than the chosen preset."""
    w = enc.get("patch_embed.proj.weight")
    depths = []
    for i in range(len(config.depths) + 4):
        n = len({k.split(".")[3] for k in enc if k.startswith(f"layers.{i}.blocks.")})
        if n == 0:
            break
        depths.append(n)
    heads = [enc[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1] for i in range(len(depths))
             if f"layers.{i}.blocks.0.attn.relative_position_bias_table" in enc]
    got = (None if w is None else w.shape[0], tuple(depths), tuple(heads))
    want = (config.embed_dim, tuple(config.depths), tuple(config.num_heads))
    if got[0] != want[0] or got[1] != want[1] or (heads and got[2] != want[2]):
        raise ValueError(f"checkpoint encoder has embed_dim={got[0]}, depths={got[1]}, heads={got[2]} but "
                         f"--model {model_name} has embed_dim={want[0]}, depths={want[1]}, heads={want[2]}")


def load_pretrained(model: VideoClassifier, checkpoint, model_name: str = "?") -> swin3d.LoadReport:
    """Load the encoder (and a classifier head of the right size) from any supported checkpoint.

    Returns a LoadReport; raises a one-line ValueError on an encoder of another
    size or a tensor of the wrong shape. The window is adapted to the model's:
    2D tables are inflated (swin3d.inflate_2d_state_dict), 3D tables of another
    temporal window are trilinearly resized (swin3d.resize_relative_tables).
    """
    sd, outer = _state_dict_of(checkpoint)
    kind, enc_prefix, head_prefix = _detect(sd, outer)
    if kind == swin3d.TORCHVISION_KIND:                     # features.* -> layers.* (original names kept)
        sd = {swin3d.torchvision_key(k): ov for k, ov in sd.items()}
    cfg = model.encoder.config
    unused, rederived, enc, head = [], [], {}, {}
    for k, (orig, v) in sd.items():
        if head_prefix and k.startswith(head_prefix):
            head[k[len(head_prefix):]] = (orig, v)
        elif k.startswith(enc_prefix) and not (enc_prefix == "" and k.startswith("head.")):
            name = k[len(enc_prefix):]
            if name.endswith(("relative_position_index", "attn_mask")):
                rederived.append(orig)                      # relative index: re-derived, never trusted
            elif name.startswith("patch_embed_2d.") or name == "mask_token":
                unused.append(orig)                         # pretraining-only parts (paper §4.1-4.2)
            else:
                enc[name] = (orig, v)
        else:
            unused.append(orig)                             # decoders, token head, tokenizer, 2D head, ...
    tensors = {k: v for k, (_, v) in enc.items()}
    names = {k: orig for k, (orig, _) in enc.items()}
    _check_encoder_shape(tensors, cfg, model_name)
    window = None
    pe = tensors.get("patch_embed.proj.weight")
    if pe is not None and pe.dim() == 4:                    # a 2D image Swin: inflate to 3D (paper §4.1-4.2)
        kind += ", 2D -> 3D inflated"
        inflated = swin3d.inflate_2d_state_dict(tensors, cfg, image_embed=False)
        tensors = {k: v for k, v in inflated.items()}
    else:
        table_rows = {v.shape[0] for k, v in tensors.items() if k.endswith("relative_position_bias_table")}
        want_rows = math.prod(2 * w - 1 for w in cfg.window_size)
        if table_rows and table_rows != {want_rows}:
            # The checkpoint's temporal window, from the table size and the (unchanged) spatial window.
            rows = table_rows.pop()
            spatial = (2 * cfg.window_size[1] - 1) * (2 * cfg.window_size[2] - 1)
            if table_rows or rows % spatial or ((rows // spatial) + 1) % 2:
                raise ValueError(f"relative_position_bias_table of {rows} rows fits no window (Wt, "
                                 f"{cfg.window_size[1]}, {cfg.window_size[2]}); the model's window is {cfg.window_size}")
            old = (((rows // spatial) + 1) // 2, *cfg.window_size[1:])
            tensors = swin3d.resize_relative_tables(tensors, old, cfg.window_size)
            window = (old, tuple(cfg.window_size))
    ours = model.state_dict()
    mapped = {}
    for k, v in tensors.items():
        key = "encoder." + k
        orig = names.get(k, k)
        if key not in ours:
            unused.append(orig)
            continue
        swin3d.check_shape(orig, v, ours[key])
        mapped[key] = v
    for k, (orig, v) in head.items():
        key = "head." + k
        if key in ours and tuple(v.shape) == tuple(ours[key].shape):
            mapped[key] = v
        else:
            unused.append(orig)                             # e.g. a K400 head (400 classes) for SSv2
    result = model.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return swin3d.LoadReport(kind, sorted(mapped), sorted(result.missing_keys), sorted(unused), sorted(rederived),
                             window)


# -----------------------------------------------------------------------------
# Evaluation: multi-view testing, the temporal probes of Table 2, metrics


def temporal_probe(video: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Table 2 on a batch (B, [V,] 3, T, H, W): per sample, 'single-frame' repeats one random frame
    T times, 'shuffle' permutes the frames randomly (data.single_frame / data.shuffle_frames); the
    views of one sample share the draw. 'normal' returns the input."""
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
    k = min(5, num_classes)
    topk = probs.topk(k, dim=-1).indices
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
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc=f"eval {mode}", leave=False, dynamic_ncols=True, file=sys.stdout)
    for batch in it:
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


def save_confusion_png(conf, path: str, classes: Optional[list] = None, title: str = "") -> None:
    """Row-normalised confusion matrix as a PNG (Pillow only): white = 0, dark blue = 1,
    rows = true class, columns = prediction; counts written in the cells when they fit."""
    from PIL import Image, ImageDraw
    conf = np.asarray(conf, dtype=np.float64)
    K = conf.shape[0]
    cell = int(max(3, min(48, 720 // max(K, 1))))
    names = list(classes) if classes and len(classes) == K and K <= 60 else [str(i) for i in range(K)]
    label_w = 8 + 6 * max(len(n) for n in names) if cell >= 10 else 0
    top = 24 + (label_w if cell >= 10 else 0)
    W, H = label_w + K * cell + 10, top + K * cell + 10
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), title, fill="black")
    rows = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    for i in range(K):
        for j in range(K):
            v = rows[i, j]
            colour = (int(255 * (1 - v) + 20 * v), int(255 * (1 - v) + 60 * v), int(255 * (1 - v) + 140 * v))
            x0, y0 = label_w + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline=(200, 200, 200))
            if cell >= 24 and conf[i, j]:
                draw.text((x0 + 3, y0 + cell // 3), str(int(conf[i, j])), fill="white" if v > 0.5 else "black")
    if cell >= 10:
        for i, n in enumerate(names):
            draw.text((4, top + i * cell + cell // 3), n, fill="black")                     # true class
            col = Image.new("RGB", (label_w, 12), "white")
            ImageDraw.Draw(col).text((2, 0), n, fill="black")
            img.paste(col.rotate(90, expand=True), (label_w + i * cell + (cell - 12) // 2, 24))   # predicted
    img.save(path)


def evaluate(model: nn.Module, loader, modes: tuple, seed: int, rt: Runtime, num_classes: int) -> dict:
    """mode -> metrics over the whole (deduplicated) evaluation set, on every rank."""
    out = {}
    for mode in modes:
        loader.set_epoch(0)
        probs, labels, index = predict(model, loader, mode, seed, rt, progress=rt.rank == 0)
        p, y = gather_predictions(probs, labels, index, rt.ddp)
        out[mode] = classification_metrics(p, y, num_classes)
    return out


# -----------------------------------------------------------------------------
# Data: your lists or the synthetic set; class-count checks


def check_classes(ann: str, root: str, num_classes: int, train: bool) -> list:
    """One-line error when the annotation list's labels do not fit the class count."""
    labels = [l for _, l in data.read_annotations(ann, root)]
    lo, hi = min(labels), max(labels)
    if lo < 0 or hi >= num_classes or (train and hi + 1 != num_classes):
        raise ValueError(f"class count mismatch: {ann} has labels {lo}..{hi} ({hi + 1} classes) but the model "
                         f"has {num_classes} classes (--num-classes / the recipe)")
    return labels


def data_config(cfg: FinetuneConfig) -> data.FinetuneDataConfig:
    """The data side of the recipe: FinetuneDataConfig's fields taken from the flags of the same name."""
    return data_config_from(data.FinetuneDataConfig, cfg, num_workers="workers")


class Task(NamedTuple):
    name: str
    root: str
    train_list: str
    val_list: str
    num_classes: int
    classes: Optional[list]
    flip: float


def resolve_tasks(cfg: FinetuneConfig, rank: int) -> list:
    """Your data (one task) or the synthetic set (appearance and/or motion)."""
    if cfg.train_list or cfg.val_list:
        if not cfg.root or not cfg.val_list or (not cfg.train_list and not cfg.eval_only):
            raise ValueError("your data needs --root, --val-list and (unless --eval-only) --train-list")
        classes = None
        if cfg.classes:
            with open(cfg.classes) as f:
                classes = [line.strip() for line in f if line.strip()]
        n = cfg.num_classes or (len(classes) if classes else RECIPE_CLASSES[cfg.recipe])
        if classes and len(classes) != n:
            raise ValueError(f"class count mismatch: {cfg.classes} names {len(classes)} classes, the model has {n}")
        return [Task(cfg.recipe, cfg.root, cfg.train_list, cfg.val_list, n, classes, cfg.flip)]
    root = cfg.data or "data/synthetic"
    if not os.path.exists(os.path.join(root, data.DONE_NAME)):
        data.ensure_synthetic(root, seed=0, verbose=rank == 0)
    tasks = []
    for name in (SYNTHETIC_TASKS if cfg.task == "both" else (cfg.task,)):
        vids = os.path.join(root, "videos")
        with open(os.path.join(vids, f"classes_{name}.txt")) as f:
            classes = [line.strip() for line in f if line.strip()]
        n = cfg.num_classes or len(classes)
        # A left-right flip turns "left" into "right": no flip for motion labels (as SSv2, paper §4.1-4.2).
        flip = 0.0 if name == "motion" else cfg.flip
        tasks.append(Task(name, vids, os.path.join(vids, f"train_{name}.txt"), os.path.join(vids, f"val_{name}.txt"),
                          n, classes, flip))
    return tasks


# -----------------------------------------------------------------------------
# Training


def train_step(model, batches: list, rt: Runtime, clip_grad: float, smoothing: float):
    """Forward/backward over the micro-batches of one optimizer step, then clip.

    As train.train_step: gradients are all-reduced only on the last micro-step
    (the others accumulate locally under no_sync()), and each micro-batch's loss
    is divided by their number, so the step's gradient is that of the mean over
    the effective batch. Returns (mean loss, mean accuracy, gradient norm), all
    tensors on the device (no read-back in the step).
    """
    accum, loss_sum, acc_sum = len(batches), 0.0, 0.0
    for k, batch in enumerate(batches):
        video = batch["video"].to(rt.device, non_blocking=True)       # (B, 3, T, H, W)
        label = batch["label"].to(rt.device, non_blocking=True)       # (B,)
        ctx = model.no_sync() if rt.ddp and k < accum - 1 else contextlib.nullcontext()
        with ctx:
            with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.bf16):
                logits = model(video)
            # Label smoothing (SSv2 recipe, 0.1): the released LabelSmoothing blending is
            # y·(1 − ε) + ε/K, which is exactly F.cross_entropy's label_smoothing.
            loss = F.cross_entropy(logits.float(), label, label_smoothing=smoothing)
            (loss / accum).backward()
        loss_sum = loss_sum + loss.detach() / accum
        acc_sum = acc_sum + (logits.argmax(-1) == label).float().mean() / accum
    gnorm = clip_gradients(list(model.parameters()), clip_grad)      # clip_grad 0: SSv2, norm only logged
    return loss_sum, acc_sum, gnorm


def log(rank: int, *args) -> None:
    if rank == 0:
        print(*args, flush=True)


def build_model(cfg: FinetuneConfig, num_classes: int) -> VideoClassifier:
    swin = swin3d.get_config(cfg.model, window_size=tuple(cfg.window), drop_path_rate=cfg.drop_path,
                             use_checkpoint=cfg.grad_checkpointing)
    return VideoClassifier(swin, num_classes, cfg.dropout)


def run_task(cfg: FinetuneConfig, task: Task, rt: Runtime) -> dict:
    """Finetune (unless --eval-only) and evaluate one label set; returns {'model': metrics, 'ema': metrics}."""
    seed_everything(cfg.seed + rt.rank)                           # seed = base + rank
    out_dir = os.path.join(cfg.out, task.name)
    lock, resume = claim_run_dir(out_dir, cfg, rt)
    try:
        return _run_task(cfg, task, rt, out_dir, resume)
    finally:
        if lock is not None:
            lock.release()


def _run_task(cfg: FinetuneConfig, task: Task, rt: Runtime, out_dir: str, resume: Optional[str]) -> dict:
    ddp, rank, world, device, bf16 = rt
    modes = parse_eval_modes(cfg.eval_mode)
    dcfg = dataclasses.replace(data_config(cfg), flip=task.flip)
    check_classes(task.val_list, task.root, task.num_classes, train=False)
    if not cfg.eval_only:
        check_classes(task.train_list, task.root, task.num_classes, train=True)

    # --- model, then weights
    raw = build_model(cfg, task.num_classes)
    init = cfg.init or (CPU_INIT if cfg.preset == "cpu" else "")
    if init and init != "scratch":
        if not os.path.exists(init):
            raise ValueError(f"--init {init}: no such file" + (" (run the CPU pretraining demo first: python train.py "
                             "--preset cpu --stage image && python train.py --preset cpu --stage joint, or pass "
                             "--init scratch)" if init == CPU_INIT else ""))
        report = load_pretrained(raw, init, cfg.model)
        log(rank, report.describe(init))
    else:
        log(rank, "init: scratch (random weights)")
    raw.to(device)
    ema = EMA(raw, cfg.ema) if cfg.ema > 0 and not cfg.eval_only else None
    model = torch.compile(raw, dynamic=False) if cfg.compile else raw     # compile after .to, before DDP
    if ddp:
        model = wrap_ddp(model, device)
    log(rank, f"task {task.name}: {task.num_classes} classes; model {cfg.model} window {tuple(cfg.window)}: "
              f"{swin3d.param_count(raw) / 1e6:.2f}M parameters; device {device}, "
              f"{precision_note(cfg.precision, bf16, device)}"
              f"{', compiled' if cfg.compile else ''}")

    split = cfg.eval_split
    val_loader = data.build_finetune_loader(split, dcfg, ann=task.val_list, root=task.root, rank=rank,
                                            world_size=world, verbose=False)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    step = 0
    if not cfg.eval_only:
        step = train(cfg, task, model, ema, rt, out_dir, resume)

    # --- evaluation: the model and, alongside, its EMA
    results = {"model": evaluate(model, val_loader, modes, cfg.seed + 1, rt, task.num_classes)}
    if ema is not None:
        results["ema"] = evaluate(ema.module, val_loader, modes, cfg.seed + 1, rt, task.num_classes)
    if rank == 0:
        views = f"{cfg.test_clips} clips x {cfg.test_crops} crops" if split == "test" else "1 centre clip"
        for which, res in results.items():
            for mode, m in res.items():
                print(f"[{task.name}] {which} {mode:12s} ({views}, {m['n']} videos): top-1 {m['top1']:.1f}  "
                      f"top-5 {m['top5']:.1f}  mean class {m['mean_class']:.1f}")
                save_confusion_png(m["confusion"], os.path.join(out_dir, f"confusion_{which}_{mode}.png"),
                                   task.classes, f"{task.name} {which} {mode}: top-1 {m['top1']:.1f}%")
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"step": step, "eval": {w: {k: {x: y for x, y in m.items() if x != "confusion"}
                                                           for k, m in r.items()} for w, r in results.items()}}) + "\n")
        with open(os.path.join(out_dir, "eval.json"), "w") as f:
            json.dump({"step": step, "split": split, "views": views, "results": results}, f)
        note = save_curves(out_dir, title=f"finetune {task.name}, {cfg.model} ({out_dir})")   # + validation top-1
        print(note or f"[{task.name}] curves: {os.path.join(out_dir, 'curves.png')}")
    return results


def train(cfg: FinetuneConfig, task: Task, model: nn.Module, ema: Optional[EMA], rt: Runtime, out_dir: str,
          resume: Optional[str]) -> int:
    """The finetuning loop (train.py's structure: accumulation, schedule, resume, tqdm, JSONL, non-finite stop).
    `model` may be compiled and DDP-wrapped; checkpoints and the EMA read the module under the wrappers."""
    ddp, rank, world, device, bf16 = rt
    raw = unwrap(model)
    dcfg = dataclasses.replace(data_config(cfg), flip=task.flip)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    # Batch: as train.py, a resumed run keeps its checkpoint's effective batch on any number of processes.
    def derived_accum(c: dict, w: int) -> int:       # the accumulation of config c on w processes
        return c.get("accum_steps") or max(1, c["global_batch"] // (c["batch_size"] * w))

    per_process = {"clips": cfg.batch_size}
    ck, saved, batch_note = None, None, ""
    if resume is None:
        accum = derived_accum(dataclasses.asdict(cfg), world)
    else:
        ck = load_for_resume(resume, lambda m: log(rank, m))
        saved = saved_batch(ck, {"clips": "batch_size"}, derived_accum)
        request = cfg.accum_steps if cfg.accum_steps != ck.get("config", {}).get("accum_steps", 0) else 0
        accum, batch_note = resume_accumulation(saved, per_process, world, request, cfg.allow_batch_change,
                                                {"clips": "--batch-size"}, resume, lambda e: cfg.lr * e / cfg.global_batch)
    eff = cfg.batch_size * world * accum
    lr = cfg.lr * eff / cfg.global_batch
    loader = data.build_finetune_loader("train", dcfg, ann=task.train_list, root=task.root, rank=rank,
                                        world_size=world, accum=accum, verbose=rank == 0)
    steps_per_epoch = loader.steps_per_epoch                          # global steps: samples // effective batch
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    log(rank, f"world {world} x {cfg.batch_size} clips x accum {accum} = effective batch {eff}; lr = base_lr "
              f"{cfg.lr:g} x {eff} / recipe batch {cfg.global_batch} = {lr:.3g}; {steps_per_epoch} steps/epoch x "
              f"{cfg.epochs} epochs = {total} steps, warm-up {warmup}")
    groups = finetune_param_groups(raw, cfg.weight_decay, cfg.layer_decay, cfg.backbone_lr_mult)
    lo, hi = min(g["lr_scale"] for g in groups), max(g["lr_scale"] for g in groups)
    log(rank, f"lr multipliers: layer decay {cfg.layer_decay:g}, backbone x{cfg.backbone_lr_mult:g} -> "
              f"{lo:.3g} (patch embedding) .. {hi:.3g} (head); weight decay {cfg.weight_decay:g}; label smoothing "
              f"{cfg.label_smoothing:g}; EMA {cfg.ema:g}; grad clip {cfg.clip_grad:g}")
    for g in groups:
        g.pop("names")
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), fused=device.type == "cuda")

    step, epoch, epoch_step = 0, 0, 0
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if ck is not None:
        raw.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if ema is not None and ck.get("ema"):
            ema.load_state_dict(ck["ema"])
        step, epoch, epoch_step = resume_position(ck, saved, "clips", eff, steps_per_epoch)
        log(rank, f"resumed from {resume}: step {step}, epoch {epoch}, step {epoch_step} of the epoch"
            + (f"; {batch_note}" if batch_note else ""))
    if rank == 0:
        start_log(out_dir, cfg, step if ck is not None else None)

    steplog = StepLog(metrics_path if rank == 0 else None, rt)
    stream = EpochStream(loader, epoch, epoch_step)
    if ck is not None:
        resume_rng(ck, saved, cfg.seed, rank, world, step, lambda m: log(rank, m))
    stop_at = min(total, cfg.max_steps) if cfg.max_steps else total
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=stop_at, initial=step, desc=f"finetune {task.name}", dynamic_ncols=True, file=sys.stdout)
    model.train()
    t0, seen = time.time(), 0
    while step < stop_at:
        cur_lr = lr_at(step, total, warmup, lr, cfg.min_lr * eff / cfg.global_batch)
        for g in opt.param_groups:
            g["lr"] = cur_lr * g["lr_scale"]
        batches = stream.take(accum)
        loss, acc, gnorm = train_step(model, batches, rt, cfg.clip_grad, cfg.label_smoothing)
        seen += sum(len(b["video"]) for b in batches)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(raw)
        step += 1
        # Queued on the device; read (and checked for non-finite values) every log_every steps.
        steplog.add({"step": step, "epoch": stream.epoch, "lr": cur_lr},
                    {"loss": loss, "acc": acc, "grad_norm": gnorm})
        if bar is not None:
            bar.update(1)
        save = step % cfg.ckpt_every == 0 or step == stop_at
        if step % cfg.log_every == 0 or save:
            rate = seen * world / max(time.time() - t0, 1e-9)   # clips per second since this process began
            last = steplog.flush({"clips_per_s": rate})[-1]   # before any save: a non-finite step is never saved
            if rank == 0:
                bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['acc']:.2f}", lr=f"{cur_lr:.2e}",
                                **{"clips/s": f"{rate:.1f}"})
        if save:
            rngs = all_rng_states(ddp, world)
            if rank == 0:
                save_checkpoint(ckpt_path, {"model": raw.state_dict(), "optimizer": opt.state_dict(),
                                            "ema": ema.state_dict() if ema is not None else None, "step": step,
                                            "epoch": stream.epoch, "epoch_step": stream.step, "world": world,
                                            "batch": batch_record(world, accum, per_process), "rng": rngs,
                                            "config": dataclasses.asdict(cfg)}, keep_previous=True)
                note = save_curves(out_dir, title=f"finetune {task.name}, {cfg.model} ({out_dir})")
                if note:
                    bar.write(note)
    if rank == 0:
        bar.close()
        final = {"model": raw.state_dict(), "step": step, "config": dataclasses.asdict(cfg),
                 "num_classes": task.num_classes, "classes": task.classes}   # class names: for `predict`
        save_checkpoint(os.path.join(out_dir, "final.pt"), final)
        if ema is not None:
            save_checkpoint(os.path.join(out_dir, "final_ema.pt"), {**final, "model": ema.module.state_dict()})
    return step


# -----------------------------------------------------------------------------
# Table 2


def table2(results: dict, which: str = "model") -> str:
    """Table-2-style rows: task, normal, single-frame (drop), shuffled (drop), top-1 %."""
    lines = [f"{'labels':12s} {'Normal':>8s} {'Single-frame':>16s} {'Random-Shuffling':>18s}"]
    for task, res in results.items():
        r = res[which]
        n = r.get("normal", {}).get("top1")
        cells = [f"{n:8.1f}" if n is not None else f"{'-':>8s}"]
        for mode, width in (("single-frame", 16), ("shuffle", 18)):
            v = r.get(mode, {}).get("top1")
            s = "-" if v is None else (f"{v:.1f} ({v - n:+.1f})" if n is not None else f"{v:.1f}")
            cells.append(f"{s:>{width}s}")
        lines.append(f"{task:12s} " + " ".join(cells))
    return "\n".join(lines)


def _fail(tool: str, e: Exception) -> None:
    """A user error of finetune.py (or of one of its tools): one line on stderr, exit status 2."""
    if dist.is_initialized():
        dist.destroy_process_group()
    print(f"finetune.py{' ' + tool if tool else ''}: error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:                             # the subcommands at the end of this file
        return TOOLS[argv[0]](argv[1:])
    cfg = parse_args(argv)
    rt = setup_distributed(cfg.dist_timeout, cfg.precision)
    rank = rt.rank
    t0 = time.time()
    try:
        tasks = resolve_tasks(cfg, rank)
        results = {t.name: run_task(cfg, t, rt) for t in tasks}
    except USER_ERRORS as e:
        _fail("", e)                                          # bad input: one line naming the mismatch, exit 2
    if rank == 0:
        for which in ("model", "ema"):
            if all(which in r for r in results.values()):
                print(f"\nTable 2 style: top-1 % on {cfg.eval_split} ({which} weights), {len(results)} label "
                      f"set(s), {time.time() - t0:.0f} s in all (paper: K400 80.6 / 65.3 / 77.8, SSv2 66.3 / 6.3 "
                      f"/ 19.0)")
                print(table2(results, which))
    if rt.ddp:
        dist.destroy_process_group()
    return results


# =============================================================================
# Tools. The method ends above; below are the tools around it, one subcommand each:
#
#   python finetune.py extract --preset cpu --init runs/bevt/joint/final.pt \
#       --root data/synthetic/videos --list data/synthetic/videos/train_motion.txt --out runs/features/train
#   python finetune.py probe --train-features runs/features/train --val-features runs/features/val
#   python finetune.py predict --init runs/finetune/motion/final.pt --video a.mp4 b.mp4 [--json]
#   python finetune.py tables --preset cpu --tables 1,2,8 --seeds 3
#
# `extract` writes the frozen features that `probe` (linear probe and k-NN) reads:
# one feature path for both. `tables` reruns the mini reproductions of the
# paper's Tables 1, 2 and 8 on the synthetic set.

# -----------------------------------------------------------------------------
# Tools: frozen features (`extract`): the final-normed F4, average-pooled, per video or per window


@dataclass
class ExtractConfig:
    list: str = ""                        # annotation list (`relative/path label` a line) under --root
    views: str = "centre"                 # centre: one centre clip, centre crop | test: the recipe's clips x crops, averaged
    clip_len: int = 0                     # > 0: one feature row per window of clip_len frames (every --interval-th)
    stride: int = 0                       # frames between window starts (0: clip_len x interval, side by side)
    chunk: int = 64                       # videos per part file under <out>/parts: the unit a rerun skips


# The FinetuneConfig fields extract reads (its --help lists only these).
EXTRACT_FIELDS = {"recipe", "preset", "model", "init", "out", "root", "sampling", "frames", "interval", "crop",
                  "short_side", "test_short_side", "test_clips", "test_crops", "window", "eval_batch_size",
                  "workers", "precision", "dist_timeout"}
FEATURE_FORMAT = 1


class WindowSampling:
    """Every window of `clip_len` frames (each `interval`-th) starting every `stride` frames:
    num_frames -> frame indices (windows, clip_len). A video shorter than one window gives one
    window whose missing frames repeat its last frame."""

    def __init__(self, clip_len: int, interval: int, stride: int):
        self.clip_len, self.interval, self.stride = clip_len, interval, stride

    def __call__(self, num_frames: int) -> np.ndarray:
        span = (self.clip_len - 1) * self.interval + 1                       # frames one window covers
        starts = np.arange(0, max(num_frames - span, 0) + 1, self.stride)   # (windows,)
        idx = starts[:, None] + np.arange(self.clip_len)[None] * self.interval
        return np.minimum(idx, num_frames - 1)                               # (windows, clip_len)


class _EveryVideo(torch.utils.data.Dataset):
    """Each listed video exactly once (no replacement, unlike training): a file that cannot be
    decoded comes back as {"row", "bad": reason}, to be listed in bad.txt."""

    def __init__(self, rows: list, sampling, transform, threads: int):
        self.rows, self.sampling, self.transform, self.threads = rows, sampling, transform, threads

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, k: int) -> dict:
        row, path = self.rows[k]
        try:
            frames, idx, _ = data.read_video(path, self.sampling, self.threads)   # (clips, T, H, W, 3)
        except data.BadMedia as e:
            return {"row": row, "bad": e.reason}
        video = self.transform(frames)["video"]
        video = video if video.dim() == 5 else video[None]                      # (views, 3, T, c, c)
        return {"row": row, "video": video, "starts": torch.as_tensor(idx.reshape(len(idx), -1)[:, 0])}


def _as_list(batch: list) -> list:
    return batch                                           # samples differ in view count: no stacking


def _file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def feature_settings(cfg: FinetuneConfig, xcfg: ExtractConfig) -> dict:
    """Everything the features depend on; its digest names the run, so a changed checkpoint,
    list or view never reuses old parts."""
    init = cfg.init or "scratch"
    return {"format": FEATURE_FORMAT, "init": os.path.abspath(init) if init != "scratch" else init,
            "init_digest": _file_digest(init) if init != "scratch" else "", "list": os.path.abspath(xcfg.list),
            "list_digest": _file_digest(xcfg.list), "root": os.path.abspath(cfg.root), "model": cfg.model,
            "window": list(cfg.window), "sampling": cfg.sampling, "frames": cfg.frames, "interval": cfg.interval,
            "crop": cfg.crop, "short_side": cfg.short_side, "test_short_side": cfg.test_short_side,
            "test_clips": cfg.test_clips, "test_crops": cfg.test_crops, "views": xcfg.views,
            "clip_len": xcfg.clip_len, "stride": xcfg.stride, "precision": cfg.precision}


def frozen_encoder(cfg: FinetuneConfig, log_fn=print) -> VideoClassifier:
    """The encoder of --init (any kind load_pretrained reads), frozen: eval mode, no gradients."""
    model = build_model(cfg, num_classes=1)                  # the head is never used for features
    if cfg.init and cfg.init != "scratch":
        log_fn(load_pretrained(model, cfg.init, cfg.model).describe(cfg.init))
    else:
        log_fn("init: scratch (random weights)")
    return model.eval().requires_grad_(False)


def extract_features(cfg: FinetuneConfig, xcfg: ExtractConfig, rt: Runtime, progress: bool = True) -> dict:
    """Features of every video of xcfg.list into cfg.out; returns meta.json's contents.

    Writes features.npy (rows, 8C) float32, index.tsv (row, path, label, views,
    start frame), bad.txt (files that could not be decoded, with the reason)
    and, last, meta.json. The list is cut into chunks of xcfg.chunk videos;
    chunk k is computed by rank k % world and written atomically to
    parts/part_<k>.pt, so a killed run redoes only its unfinished chunks and a
    complete output (meta.json with the same settings) is not recomputed.
    Rank 0 merges the parts. The encoder runs on batches of --eval-batch-size
    views gathered across videos.
    """
    if not xcfg.list or not cfg.root or not cfg.out:
        raise ValueError("extract needs --list (the videos), --root (their folder) and --out (the output folder)")
    if xcfg.views not in ("centre", "test"):
        raise ValueError(f"--views must be centre or test, got {xcfg.views!r}")
    if xcfg.clip_len < 0 or xcfg.stride < 0 or xcfg.chunk < 1:
        raise ValueError(f"--clip-len and --stride must be >= 0 and --chunk >= 1, got {xcfg.clip_len}, "
                         f"{xcfg.stride}, {xcfg.chunk}")
    if xcfg.clip_len and xcfg.views != "centre":
        raise ValueError("--clip-len (sliding windows) takes centre-crop views; drop --views test")
    ddp, rank, world, device, bf16 = rt
    log_fn = (lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None)
    settings = feature_settings(cfg, xcfg)
    key = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=8).hexdigest()
    meta_path = os.path.join(cfg.out, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            try:
                meta = json.load(f)
            except json.JSONDecodeError:
                meta = {}
        if meta.get("key") == key and os.path.exists(os.path.join(cfg.out, "features.npy")):
            log_fn(f"extract: {cfg.out} is complete for these settings ({meta['rows']} rows); nothing to do")
            return meta
    t0 = time.time()
    listed = data.read_annotations(xcfg.list, cfg.root)                  # [(path, label)]
    rows = [(i, str(p)) for i, (p, _) in enumerate(listed)]
    labels = [label for _, label in listed]
    parts_dir = os.path.join(cfg.out, "parts", key)
    if rank == 0:
        os.makedirs(parts_dir, exist_ok=True)
        for old in os.listdir(os.path.join(cfg.out, "parts")):        # parts of other settings: stale
            if old != key:
                shutil.rmtree(os.path.join(cfg.out, "parts", old), ignore_errors=True)
    if ddp:
        dist.barrier()

    # --- what one sample is: frames -> views (V, 3, T, c, c)
    interval = cfg.interval if cfg.sampling == "dense" else 1
    if xcfg.clip_len:
        sampling = WindowSampling(xcfg.clip_len, interval, xcfg.stride or xcfg.clip_len * interval)
        transform = data.FinetuneClipTransform("val", cfg.crop, cfg.short_side)
    elif xcfg.views == "centre":
        sampling = data.FrameSampling(cfg.frames, interval, cfg.sampling, num_clips=1, test_mode=True)
        transform = data.FinetuneClipTransform("val", cfg.crop, cfg.short_side)
    else:
        sampling = data.FrameSampling(cfg.frames, interval, cfg.sampling, num_clips=cfg.test_clips, test_mode=True)
        transform = data.FinetuneClipTransform("test", cfg.crop, cfg.short_side, cfg.test_short_side, cfg.test_crops)
    model = frozen_encoder(cfg, log_fn).to(device)
    chunks = [rows[k:k + xcfg.chunk] for k in range(0, len(rows), xcfg.chunk)]
    mine = [k for k in range(len(chunks)) if k % world == rank
            and not os.path.exists(os.path.join(parts_dir, f"part_{k:05d}.pt"))]
    done = len([k for k in range(len(chunks)) if k % world == rank]) - len(mine)
    log_fn(f"extract: {len(rows)} videos in {len(chunks)} chunks over {world} process(es); {done} chunk(s) of "
           f"rank 0 already written; views: " + (f"windows of {xcfg.clip_len} frames every {sampling.stride}"
                                                if xcfg.clip_len else xcfg.views) + f"; {precision_note(cfg.precision, bf16, device)}")
    threads = data.auto_decode_threads(cfg.workers)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(chunks[k]) for k in mine), desc="extract", dynamic_ncols=True, file=sys.stdout)
    with torch.no_grad():
        for k in mine:
            ds = _EveryVideo(chunks[k], sampling, transform, threads)
            loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=cfg.workers, collate_fn=_as_list)
            feats, out_rows, starts, bad, pending = [], [], [], [], []

            def run_pending():
                """The views of the waiting videos, in batches of --eval-batch-size across videos."""
                views = torch.cat([s["video"] for s in pending])                   # (sum V, 3, T, c, c)
                f = torch.cat([_pooled(model, views[i:i + cfg.eval_batch_size], rt)
                               for i in range(0, len(views), cfg.eval_batch_size)])   # (sum V, 8C)
                for s, fv in zip(pending, f.split([len(s["video"]) for s in pending])):
                    if xcfg.clip_len:                                             # one row per window
                        feats.append(fv)
                        out_rows.extend([s["row"]] * len(fv))
                        starts.extend(s["starts"].tolist())
                    else:                                                         # views averaged: one row
                        feats.append(fv.mean(0, keepdim=True))
                        out_rows.append(s["row"])
                        starts.append(-1)
                pending.clear()

            for (sample,) in loader:
                if "bad" in sample:
                    bad.append((sample["row"], sample["bad"]))
                else:
                    pending.append(sample)
                    if sum(len(s["video"]) for s in pending) >= cfg.eval_batch_size:
                        run_pending()
                if bar is not None:
                    bar.update(1)
            if pending:
                run_pending()
            dim = model.encoder.num_features
            part = {"rows": torch.tensor(out_rows, dtype=torch.long),
                    "features": torch.cat(feats) if feats else torch.zeros(0, dim),
                    "starts": torch.tensor(starts, dtype=torch.long), "bad": [[r, reason] for r, reason in bad]}
            tmp = os.path.join(parts_dir, f"part_{k:05d}.pt.tmp-{os.getpid()}")
            torch.save(part, tmp)
            os.replace(tmp, os.path.join(parts_dir, f"part_{k:05d}.pt"))
    if bar is not None:
        bar.close()
    if ddp:
        dist.barrier()                                            # every rank's parts are written
    meta = None
    if rank == 0:
        meta = _merge_parts(cfg, xcfg, settings, key, rows, labels, len(chunks), parts_dir, time.time() - t0)
        log_fn(f"extract: {meta['rows']} feature rows of dim {meta['dim']} from {meta['videos']} videos "
               f"({meta['bad']} unreadable, listed in bad.txt) -> {cfg.out} in {meta['seconds']:.0f} s")
    if ddp:
        dist.barrier()
    if rank == 0:
        return meta
    with open(meta_path) as f:
        return json.load(f)


def _pooled(model: VideoClassifier, video: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """(n, 3, T, c, c) -> (n, 8C) float32 on the CPU: the pooled final-normed F4."""
    with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.bf16):
        return model.features(video.to(rt.device, non_blocking=True)).float().cpu()


def _merge_parts(cfg, xcfg, settings, key, rows, labels, n_chunks, parts_dir, seconds) -> dict:
    parts = [torch.load(os.path.join(parts_dir, f"part_{k:05d}.pt"), weights_only=True) for k in range(n_chunks)]
    feats = torch.cat([p["features"] for p in parts]).numpy().astype(np.float32)     # (rows, 8C)
    rws = torch.cat([p["rows"] for p in parts]).tolist()
    starts = torch.cat([p["starts"] for p in parts]).tolist()
    bad = [b for p in parts for b in p["bad"]]
    views = (cfg.test_clips * cfg.test_crops) if (xcfg.views == "test" and not xcfg.clip_len) else 1
    tmp = os.path.join(cfg.out, f"features.npy.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, feats)
    os.replace(tmp, os.path.join(cfg.out, "features.npy"))
    write_atomic(os.path.join(cfg.out, "index.tsv"), "row\tpath\tlabel\tviews\tstart\n" + "".join(
        f"{r}\t{rows[r][1]}\t{labels[r]}\t{views}\t{s}\n" for r, s in zip(rws, starts)))
    write_atomic(os.path.join(cfg.out, "bad.txt"), "".join(f"{rows[r][1]}\t{why}\n" for r, why in bad))
    meta = {"key": key, "rows": len(rws), "dim": int(feats.shape[1]) if feats.ndim == 2 else 0,
            "videos": len(rows), "bad": len(bad), "seconds": round(seconds, 1), "settings": settings}
    write_atomic(os.path.join(cfg.out, "meta.json"), json.dumps(meta, indent=1))      # last: marks it complete
    return meta


def load_features(folder: str) -> dict:
    """A folder written by extract -> {"features": (N, D) float32, "labels": (N,) int64, "paths", "starts", "meta"}."""
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        raise ValueError(f"{folder} holds no complete features (no meta.json); write them with "
                         f"`python finetune.py extract ... --out {folder}`")
    with open(meta_path) as f:
        meta = json.load(f)
    feats = np.load(os.path.join(folder, "features.npy"))
    paths, labels, starts = [], [], []
    with open(os.path.join(folder, "index.tsv")) as f:
        next(f)
        for line in f:
            _, path, label, _, start = line.rstrip("\n").split("\t")
            paths.append(path)
            labels.append(int(label))
            starts.append(int(start))
    if len(labels) != len(feats) or len(feats) != meta["rows"]:
        raise ValueError(f"{folder}: features.npy has {len(feats)} rows, index.tsv {len(labels)}, meta.json "
                         f"{meta['rows']}; extract it again")
    return {"features": feats, "labels": np.asarray(labels, dtype=np.int64), "paths": paths,
            "starts": np.asarray(starts), "meta": meta}


# -----------------------------------------------------------------------------
# Tools: linear probe and k-NN on frozen features (`probe`)
#
# The two standard measures of what a pretrained encoder has learnt without
# training it: a linear classifier on the features (MAE's protocol: BatchNorm
# without affine parameters, then one Linear layer, no weight decay) and a
# weighted k-nearest-neighbour vote (DINO's protocol: cosine similarity, k = 20,
# each neighbour's vote weighted by exp(similarity / 0.07)). Both read the files
# `extract` writes, and neither touches the encoder.


@dataclass
class ProbeConfig:
    train_features: str = ""              # folder written by `finetune.py extract` for the training list
    val_features: str = ""                # ... for the validation list
    epochs: int = 100                     # linear probe: passes over the training features
    lr: float = 0.1                       # linear probe: SGD (momentum 0.9) peak lr, cosine to 0
    batch_size: int = 256                 # linear probe: features per step
    k: int = 20                           # k-NN: neighbours (DINO: 20)
    temperature: float = 0.07             # k-NN: vote weight exp(cosine / T) (DINO: 0.07)
    seed: int = 0
    json: bool = False                    # print the results as one JSON line


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, epochs: int = 100, lr: float = 0.1, batch_size: int = 256,
                 seed: int = 0) -> dict:
    """Logistic regression on frozen features: BatchNorm1d(affine=False) + Linear, trained with
    SGD (momentum 0.9, cosine lr, no weight decay) on (N, D) features; returns train and val top-1 %."""
    gen = torch.Generator().manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False, eps=1e-6),
                         nn.Linear(train_x.shape[1], num_classes))
    with torch.no_grad():
        nn.init.trunc_normal_(head[1].weight, std=0.01, generator=gen)   # MAE: std 0.01, bias 0
        head[1].bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    n = len(train_x)
    bs = min(batch_size, n)
    steps_per_epoch = max(1, n // bs)
    total = epochs * steps_per_epoch
    step = 0
    head.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * bs:(b + 1) * bs]
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    with torch.no_grad():
        train_acc = (head(train_x).argmax(-1) == train_y).double().mean().item() * 100
        val_acc = (head(val_x).argmax(-1) == val_y).double().mean().item() * 100
    return {"train_top1": train_acc, "top1": val_acc}


def knn_classify(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07) -> dict:
    """Weighted k-NN (DINO): cosine similarities to the training features, the k most similar
    vote for their class with weight exp(sim / T); returns top-1 %."""
    a = F.normalize(train_x.float(), dim=1)                               # (N, D)
    b = F.normalize(val_x.float(), dim=1)                                 # (M, D)
    k = min(k, len(a))
    sim, idx = (b @ a.T).topk(k, dim=1)                                   # (M, k)
    votes = torch.zeros(len(b), num_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
    return {"top1": (votes.argmax(1) == val_y).double().mean().item() * 100, "k": k}


def probe_features(train: dict, val: dict, pcfg: ProbeConfig) -> dict:
    """Linear probe and k-NN from two load_features() results."""
    if train["features"].shape[1:] != val["features"].shape[1:]:
        raise ValueError(f"train features have dim {train['features'].shape[1:]}, val features "
                         f"{val['features'].shape[1:]}: extracted with different encoders")
    tx, vx = torch.from_numpy(train["features"]), torch.from_numpy(val["features"])
    ty, vy = torch.from_numpy(train["labels"]), torch.from_numpy(val["labels"])
    classes = int(max(ty.max(), vy.max())) + 1
    lin = linear_probe(tx, ty, vx, vy, classes, pcfg.epochs, pcfg.lr, pcfg.batch_size, pcfg.seed)
    knn = knn_classify(tx, ty, vx, vy, classes, pcfg.k, pcfg.temperature)
    return {"linear": lin, "knn": knn, "classes": classes, "train": len(tx), "val": len(vx),
            "chance": 100.0 * np.bincount(vy.numpy(), minlength=classes).max() / len(vy)}


# -----------------------------------------------------------------------------
# Tools: prediction on single videos (`predict`)


@dataclass
class PredictConfig:
    classes: str = ""                     # class names, one a line (default: those the checkpoint stores, else indices)
    top: int = 5                          # classes printed per video
    json: bool = False                    # one JSON document on stdout instead of text


# The FinetuneConfig fields predict reads; the view settings default to those the checkpoint was finetuned with.
PREDICT_FIELDS = {"recipe", "preset", "model", "init", "sampling", "frames", "interval", "crop", "test_short_side",
                  "test_clips", "test_crops", "window", "eval_batch_size", "precision"}
VIEW_FIELDS = ("model", "sampling", "frames", "interval", "crop", "test_short_side", "test_clips", "test_crops",
               "window")


def load_classifier(args: dict, log_fn=print) -> tuple[VideoClassifier, FinetuneConfig, Optional[list]]:
    """A finetuned classifier from --init, its view settings (the checkpoint's config where the
    flags do not say otherwise) and the class names it stores."""
    init = args.get("init")
    if not init or init == "scratch":
        raise ValueError("predict needs --init: a finetuned checkpoint (finetune.py's final.pt or a released "
                         "classification checkpoint)")
    if not os.path.exists(init):
        raise ValueError(f"--init {init}: no such file")
    ck = swin3d.load_file(init)
    stored = ck.get("config") if isinstance(ck, dict) and isinstance(ck.get("config"), dict) else {}
    base = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in VIEW_FIELDS}
    if stored.get("preset") == "cpu":
        base["preset"] = "cpu"                              # a --preset flag still overrides it, below
    cfg = resolve_config({**base, **{k: v for k, v in args.items() if v is not None}})
    sd, _ = _state_dict_of(ck)
    heads = [v for k, (_, v) in sd.items() if k.endswith(("head.weight", "fc_cls.weight")) and v.dim() == 2]
    num_classes = (ck.get("num_classes") if isinstance(ck, dict) else None) or (heads[0].shape[0] if heads else 0)
    model = build_model(cfg, num_classes or 1)
    report = load_pretrained(model, ck, cfg.model)
    if not num_classes or "head.weight" not in report.loaded:
        raise ValueError(f"--init {init} holds no classifier head ({report.kind}); predict needs a finetuned "
                         f"checkpoint")
    log_fn(report.describe(init))
    classes = ck.get("classes") if isinstance(ck, dict) else None
    return model.eval().requires_grad_(False), cfg, classes


def predict_video(model: VideoClassifier, cfg: FinetuneConfig, path: str, device, bf16: bool) -> tuple[torch.Tensor, int]:
    """One video file -> (class probabilities (K,), views): softmax averaged over the recipe's
    test views (clips x crops, as finetune.py's test evaluation). Raises data.BadMedia."""
    interval = cfg.interval if cfg.sampling == "dense" else 1
    sampling = data.FrameSampling(cfg.frames, interval, cfg.sampling, num_clips=cfg.test_clips, test_mode=True)
    transform = data.FinetuneClipTransform("test", cfg.crop, cfg.short_side, cfg.test_short_side, cfg.test_crops)
    frames, _, _ = data.read_video(path, sampling)                          # (clips, T, H, W, 3)
    views = transform(frames)["video"]                                      # (crops*clips, 3, T, c, c)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = torch.cat([model(views[i:i + cfg.eval_batch_size].to(device))
                            for i in range(0, len(views), cfg.eval_batch_size)])   # (V, K)
    return average_views(logits, len(views))[0].cpu(), len(views)


# -----------------------------------------------------------------------------
# Tools: the command lines of extract, probe and predict


def _tool_parser(name: str, doc: str, fields: Optional[set], extra: tuple) -> Parser:
    ap = Parser(prog=f"finetune.py {name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if fields:
        add_dataclass_flags(ap, FinetuneConfig, CHOICES, only=fields)
    for cls, choices in extra:
        add_dataclass_flags(ap, cls, choices)
    return ap


def _split(args: dict, cls) -> tuple[dict, object]:
    """Parsed flags -> (the FinetuneConfig ones, an instance of `cls` from its own)."""
    names = {f.name for f in dataclasses.fields(cls)}
    mine = {k: v for k, v in args.items() if k in names and v is not None}
    return {k: v for k, v in args.items() if k not in names}, cls(**mine)


def extract_main(argv) -> dict:
    """python finetune.py extract --init CKPT --root R --list L --out DIR [--views test] [--clip-len N --stride S]"""
    ap = _tool_parser("extract", extract_features.__doc__, EXTRACT_FIELDS, ((ExtractConfig, {"views": ("centre", "test")}),))
    args, xcfg = _split(vars(ap.parse_args(argv)), ExtractConfig)
    if args.get("out") is None:
        ap.error("extract needs --out DIR (where features.npy, index.tsv, bad.txt and meta.json go)")
    try:
        cfg = resolve_config(args)
    except ValueError as e:
        ap.error(str(e))
    rt = setup_distributed(cfg.dist_timeout, cfg.precision)
    try:
        if rt.rank == 0:
            os.makedirs(cfg.out, exist_ok=True)
        meta = extract_features(cfg, xcfg, rt)
    except USER_ERRORS as e:
        _fail("extract", e)
    if rt.ddp:
        dist.destroy_process_group()
    return meta


def probe_main(argv) -> dict:
    """python finetune.py probe --train-features DIR --val-features DIR [--json]"""
    ap = _tool_parser("probe", "Linear probe and k-NN on features written by `finetune.py extract` (MAE's and "
                      "DINO's protocols).", None, ((ProbeConfig, {}),))
    _, pcfg = _split(vars(ap.parse_args(argv)), ProbeConfig)
    if not pcfg.train_features or not pcfg.val_features:
        ap.error("probe needs --train-features DIR and --val-features DIR (folders written by finetune.py extract)")
    try:
        res = probe_features(load_features(pcfg.train_features), load_features(pcfg.val_features), pcfg)
    except USER_ERRORS as e:
        _fail("probe", e)
    if pcfg.json:
        print(json.dumps(res))
    else:
        print(f"{res['train']} train / {res['val']} val features, {res['classes']} classes (majority class "
              f"{res['chance']:.1f}%): linear probe top-1 {res['linear']['top1']:.1f} (train "
              f"{res['linear']['train_top1']:.1f}), k-NN (k={res['knn']['k']}) top-1 {res['knn']['top1']:.1f}")
    return res


def predict_main(argv) -> list:
    """python finetune.py predict --init FINETUNED --video a.mp4 [b.mp4 ...] [--classes names.txt] [--json]"""
    ap = _tool_parser("predict", "Top classes of single videos, softmax averaged over the recipe's test views "
                      "(the views the checkpoint was finetuned for, unless flags say otherwise).",
                      PREDICT_FIELDS, ((PredictConfig, {}),))
    ap.add_argument("--video", nargs="+", required=True, help="video files")
    args = vars(ap.parse_args(argv))
    videos = args.pop("video")
    args, pcfg = _split(args, PredictConfig)
    quiet = pcfg.json
    try:
        model, cfg, classes = load_classifier(args, log_fn=(lambda m: print(m, file=sys.stderr)) if quiet else print)
        if classes and len(classes) != model.num_classes:
            raise ValueError(f"{args.get('init')} names {len(classes)} classes but its head has {model.num_classes}; "
                             f"pass --classes names.txt")
        if pcfg.classes:
            with open(pcfg.classes) as f:
                classes = [line.strip() for line in f if line.strip()]
            if len(classes) != model.num_classes:
                raise ValueError(f"--classes {pcfg.classes} names {len(classes)} classes, the checkpoint has "
                                 f"{model.num_classes}")
    except (*USER_ERRORS, OSError) as e:
        _fail("predict", e)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    bf16 = resolve_precision(cfg.precision, device)
    names = classes or [str(i) for i in range(model.num_classes)]
    out, failed = [], 0
    for path in videos:
        try:
            if not os.path.isfile(path):
                raise data.BadMedia(path, "no such file")
            probs, views = predict_video(model, cfg, path, device, bf16)
        except data.BadMedia as e:
            print(f"finetune.py predict: error: cannot read {path}: {e.reason}", file=sys.stderr, flush=True)
            out.append({"video": path, "error": e.reason})
            failed += 1
            continue
        p, i = probs.topk(min(pcfg.top, len(probs)))
        top = [{"class": names[j], "index": j, "prob": round(float(q), 5)} for q, j in zip(p.tolist(), i.tolist())]
        out.append({"video": path, "views": views, "top": top})
        if not quiet:
            print(f"{path} ({views} views): " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in top), flush=True)
    if quiet:
        print(json.dumps(out))
    if failed:
        raise SystemExit(1)                       # every readable video was still predicted
    return out


# -----------------------------------------------------------------------------
# Tools: mini reproductions of the paper's Tables 1, 2 and 8 (`tables`)
#
# On the synthetic set (data.py): its appearance labels stand in for K400 (one
# frame tells the class) and its motion labels for SSv2 / Diving48 (the class
# needs time). Every pretraining uses the cpu preset of train.py and every
# finetune the cpu preset of this file: one recipe for all rows of a table.
#   Table 1: scratch, BEVT-I (image stage), BEVT-V (video stage from scratch),
#            BEVT (image stage, then joint) and, the question of Table 6, the
#            joint stage from scratch; each by linear probe, k-NN and
#            finetuning on both label sets. BEVT-V and both joint runs see the
#            same videos: the video stage and the joint stage run the same
#            number of steps on the same clip batch.
#   Table 2: the BEVT finetunes evaluated normally, on single frames and on
#            shuffled frames.
#   Table 8: BEVT-V with each mask strategy, by linear probe and finetuning on
#            the motion labels.
# Results go cell by cell into a JSON file (a rerun skips the cells it holds),
# and as mean +- std over seeds into a text table and a chart.


@dataclass
class TablesConfig:
    tables: str = "1,2,8"                 # comma-separated subset of 1, 2, 8
    seeds: int = 3                        # seeds 0 .. seeds-1 (pretraining, finetuning and probe draws)
    out: str = "runs/tables"              # the runs: <out>/s<seed>/<pretraining>/<stage>, <out>/s<seed>/ft/...
    results: str = "assets/tables.json"   # the cells; a rerun skips the cells already there
    chart: str = "assets/tables.png"      # mean +- std over seeds as bars
    data: str = ""                        # synthetic data folder (default data/synthetic, generated on first use)
    only_seeds: str = ""                  # comma-separated subset of the seeds to run now (e.g. "1,3"), so two
                                          # processes can share the work; the tables report every seed on file
    rows: str = ""                        # comma-separated rows to run now (e.g. "bevt-i,tube"; default all)
                                          # by Table 1 slug (scratch, bevt-i, bevt-v, bevt,
                                          # bevt-joint-from-scratch) or Table 8 strategy (tube, ..., random-3d)
    max_steps: int = 0                    # > 0: cap every pretraining and finetune (to try the plumbing)
    pretrain_args: str = ""               # extra train.py flags for every pretraining (part of the recipe)
    finetune_args: str = ""               # extra finetune.py flags for every finetune (part of the recipe)


TABLE1_ROWS = ("scratch", "BEVT-I", "BEVT-V", "BEVT", "BEVT, joint from scratch")
TABLE8_ROWS = ("tube", "tube-fixed", "tube-0.25-0.75", "tube-0.75-1.0", "frame-diff", "random-frame", "random-3d")
# Table 8's row names, as the paper prints them (Swin-T, BEVT-V, mask ratio 50%).
TABLE8_NAMES = {"tube": "Tube 0.5T-T", "tube-fixed": "Tube T", "tube-0.25-0.75": "Tube 0.25T-0.75T",
                "tube-0.75-1.0": "Tube 0.75T-1.0T", "frame-diff": "Frame-Diff", "random-frame": "Random-Frame",
                "random-3d": "Random-3D"}
# The paper's numbers beside ours (top-1 %): Table 1 / 6 (Swin-B; SSv2, Diving48, K400), Table 8
# (Swin-T; SSv2, K400), Table 2 (Swin-B; normal, single-frame, shuffle).
PAPER = {
    "1": {"scratch": None, "BEVT-I": (69.2, 81.2, 80.5), "BEVT-V": (67.1, 83.7, 76.2), "BEVT": (70.6, 86.7, 80.6),
          "BEVT, joint from scratch": (67.9, 85.1, 78.5)},
    "8": {"tube": (63.3, 71.6), "tube-fixed": (62.6, 71.2), "tube-0.25-0.75": (62.8, 69.5),
          "tube-0.75-1.0": (63.1, 71.6), "frame-diff": (62.9, 70.6), "random-frame": (62.6, 70.9),
          "random-3d": (59.1, 67.4)},
    "2": {"K400": (80.6, 65.3, 77.8), "SSv2": (66.3, 6.3, 19.0), "Diving48": (84.0, 13.8, 50.4)},
}


def tables_recipe(pretrain_args: str = "", finetune_args: str = "") -> dict:
    """The recipe every cell depends on: both CPU presets, the pretraining stages' epochs, and the
    extra flags given to every run (recorded only when there are some)."""
    import train
    norm = lambda d: json.loads(json.dumps(d))                   # tuples -> lists, as stored in JSON
    recipe = {"synthetic_version": data.SYNTHETIC_VERSION, "train": norm(train.CPU_PRESET),
              "stage_epochs": norm(train.CPU_STAGE_EPOCHS), "finetune": norm(CPU_PRESET)}
    recipe.update({k: v for k, v in (("pretrain_args", pretrain_args), ("finetune_args", finetune_args)) if v})
    return recipe


def row_names(tables: tuple) -> dict:
    """{name accepted by --rows: row as the runner knows it} for the requested tables."""
    names = {"bevt": "BEVT"} if "2" in tables else {}
    names.update({_slug(r): r for r in TABLE1_ROWS} if "1" in tables else {})
    names.update({s: s for s in TABLE8_ROWS} if "8" in tables else {})
    return names


def _pretrainings(row: str) -> list:
    """The train.py runs a row's encoder needs, in order: [(run folder name, stage, extra flags)]."""
    if row == "scratch":
        return []
    if row == "BEVT-I":
        return [("bevt", "image", [])]
    if row == "BEVT":
        return [("bevt", "image", []), ("bevt", "joint", [])]        # joint starts from <run>/image/final.pt
    if row == "BEVT, joint from scratch":
        return [("joint-scratch", "joint", [])]                    # no image stage in that folder
    strategy = "tube" if row == "BEVT-V" else row
    name = "video" if strategy == "tube" else f"video-{strategy}"
    return [(name, "video", ["--mask-strategy", strategy])]


class Tables:
    """Runs and records the cells of the requested tables; see the section comment above."""

    def __init__(self, tcfg: TablesConfig):
        self.t = tcfg
        self.data = tcfg.data or "data/synthetic"
        self.results = {"cells": {}}
        if os.path.exists(tcfg.results):
            with open(tcfg.results) as f:
                try:
                    self.results = json.load(f)
                except json.JSONDecodeError:
                    raise ValueError(f"{tcfg.results} is not valid JSON (a torn write?); move it away to start again")
        self.cells = self.results.setdefault("cells", {})
        # Cells of one file come from one recipe: a file made with other presets is not mixed in.
        recipe = tables_recipe(tcfg.pretrain_args, tcfg.finetune_args)
        if self.results.setdefault("recipe", recipe) != recipe:
            raise ValueError(f"{tcfg.results} holds cells made with another CPU recipe (train.py / finetune.py "
                             f"presets changed since); pass another --results file")

    def record(self, key: str, value: dict, seconds: float) -> None:
        """Add one cell to the results file: under a lock, re-read it and merge, so processes
        running other seeds into the same file never drop each other's cells."""
        self.cells[key] = {**value, "seconds": round(seconds, 1)}
        os.makedirs(os.path.dirname(os.path.abspath(self.t.results)), exist_ok=True)
        lock = data.FileLock(self.t.results + ".lock")
        while lock.acquire() is not None:
            time.sleep(0.2)                                # another process is writing its cell
        try:
            if os.path.exists(self.t.results):
                with open(self.t.results) as f:
                    on_file = json.load(f).get("cells", {})
                self.cells.update({k: v for k, v in on_file.items() if k not in self.cells})
            write_atomic(self.t.results, json.dumps(self.results, indent=1, sort_keys=True))
        finally:
            lock.release()
        print(f"[tables] {key}: " + ", ".join(f"{k} {v:.1f}" for k, v in value.items()
                                               if isinstance(v, (int, float))), flush=True)

    # --- the runs behind the cells
    def checkpoint(self, row: str, seed: int) -> str:
        """Run (or reuse) the pretrainings of `row` for `seed`; return the encoder's checkpoint or 'scratch'."""
        import train
        path = "scratch"
        for name, stage, extra in _pretrainings(row):
            run = os.path.join(self.t.out, f"s{seed}", name)
            path = os.path.join(run, stage, "final.pt")
            if os.path.exists(path):
                continue
            argv = ["--preset", "cpu", "--stage", stage, "--out", run, "--seed", str(seed), *extra]
            argv += ["--data", self.data] if self.t.data else []
            argv += ["--max-steps", str(self.t.max_steps)] if self.t.max_steps else []
            train.main(argv + shlex.split(self.t.pretrain_args))
        return path

    def finetune(self, row: str, task: str, seed: int) -> None:
        key = f"finetune|{row}|{task}|s{seed}"
        if key in self.cells:
            return
        t0 = time.time()
        init = self.checkpoint(row, seed)
        out = os.path.join(self.t.out, f"s{seed}", "ft", _slug(row))
        argv = ["--preset", "cpu", "--task", task, "--init", init, "--out", out, "--seed", str(seed),
                "--eval-mode", ",".join(EVAL_MODES)]
        argv += ["--data", self.data] if self.t.data else []
        argv += ["--max-steps", str(self.t.max_steps)] if self.t.max_steps else []
        res = main(argv + shlex.split(self.t.finetune_args))[task]
        value = {mode: m["top1"] for mode, m in res["model"].items()}
        value.update({f"ema {mode}": m["top1"] for mode, m in res.get("ema", {}).items()})
        self.record(key, value, time.time() - t0)

    def probe(self, row: str, seed: int) -> None:
        """Linear probe and k-NN on both label sets from one extraction per split (same videos)."""
        keys = {task: f"probe|{row}|{task}|s{seed}" for task in SYNTHETIC_TASKS}
        if all(k in self.cells for k in keys.values()):
            return
        t0 = time.time()
        init = self.checkpoint(row, seed)
        vids = os.path.join(self.data, "videos")
        feats = {}
        for split in ("train", "val"):
            out = os.path.join(self.t.out, f"s{seed}", "features", _slug(row), split)
            argv = ["extract", "--preset", "cpu", "--init", init, "--root", vids, "--out", out,
                    "--list", os.path.join(vids, f"{split}_appearance.txt")]
            main(argv + _only_flags(shlex.split(self.t.finetune_args), EXTRACT_FIELDS))
            feats[split] = load_features(out)
        for task, key in keys.items():
            relabelled = {}
            for split in ("train", "val"):             # the same videos under the task's labels
                labels = {str(p): l for p, l in data.read_annotations(os.path.join(vids, f"{split}_{task}.txt"),
                                                                        vids)}
                relabelled[split] = {**feats[split], "labels": np.asarray([labels[p] for p in feats[split]["paths"]])}
            res = probe_features(relabelled["train"], relabelled["val"], ProbeConfig(seed=seed))
            self.record(key, {"linear": res["linear"]["top1"], "knn": res["knn"]["top1"]}, time.time() - t0)

    def run(self, tables: tuple) -> None:
        seeds = range(self.t.seeds)
        if self.t.only_seeds:
            seeds = [int(x) for x in comma_items(self.t.only_seeds)]
        wanted = set(comma_items(self.t.rows)) or set(row_names(tables))
        for seed in seeds:
            if "2" in tables and "bevt" in wanted:
                for task in SYNTHETIC_TASKS:
                    self.finetune("BEVT", task, seed)
            if "1" in tables:
                for row in (r for r in TABLE1_ROWS if _slug(r) in wanted):
                    self.probe(row, seed)
                    for task in SYNTHETIC_TASKS:
                        self.finetune(row, task, seed)
            if "8" in tables:
                for strategy in (s for s in TABLE8_ROWS if s in wanted):
                    row = "BEVT-V" if strategy == "tube" else strategy
                    self.probe(row, seed)
                    self.finetune(row, "motion", seed)


def _only_flags(tokens: list, fields: set) -> list:
    """The flags of a token list (`--name value...`) whose field is in `fields`."""
    out, keep = [], False
    for tok in tokens:
        if tok.startswith("--"):
            keep = tok[2:].split("=")[0].replace("-", "_") in fields
        if keep:
            out.append(tok)
    return out


def _slug(row: str) -> str:
    return row.replace(", ", "-").replace(" ", "-").lower()


def cell_stats(cells: dict, kind: str, row: str, task: str, measure: str) -> Optional[tuple]:
    """(mean, std, n) over the seeds that have the cell, or None (std 0 for one seed)."""
    vals = [c[measure] for k, c in cells.items() if k.rsplit("|", 1)[0] == f"{kind}|{row}|{task}" and measure in c]
    if not vals:
        return None
    v = np.asarray(vals, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _fmt(s: Optional[tuple]) -> str:
    return "-" if s is None else f"{s[0]:.1f} ± {s[1]:.1f} ({s[2]})"


def tables_text(cells: dict, tables: tuple) -> str:
    """The requested tables in Markdown: top-1 % as mean ± std (seeds), the paper's beside."""
    out = []
    if "1" in tables:
        out += ["Table 1 (mini): top-1 %, mean ± std (seeds); paper: Swin-B, SSv2 / Diving48 / K400 finetuned",
                "", "| init | appearance linear | appearance k-NN | appearance finetune | motion linear | "
                "motion k-NN | motion finetune | paper |", "|---|---|---|---|---|---|---|---|"]
        for row in TABLE1_ROWS:
            cols = [_fmt(cell_stats(cells, "probe", row, t, m)) for t in SYNTHETIC_TASKS for m in ("linear", "knn")]
            cols = [cols[0], cols[1], _fmt(cell_stats(cells, "finetune", row, "appearance", "normal")),
                    cols[2], cols[3], _fmt(cell_stats(cells, "finetune", row, "motion", "normal"))]
            paper = PAPER["1"][row]
            out.append(f"| {row} | " + " | ".join(cols) + f" | {' / '.join(map(str, paper)) if paper else '-'} |")
        out.append("")
    if "2" in tables:
        out += ["Table 2 (mini): BEVT finetuned, top-1 %, mean ± std (seeds)", "",
                "| labels | Normal | Single-frame | Random-Shuffling |", "|---|---|---|---|"]
        for task in SYNTHETIC_TASKS:
            out.append(f"| {task} | " + " | ".join(_fmt(cell_stats(cells, "finetune", "BEVT", task, m))
                                                    for m in EVAL_MODES) + " |")
        for name, nums in PAPER["2"].items():
            out.append(f"| paper, {name} | " + " | ".join(f"{v}" for v in nums) + " |")
        out.append("")
    if "8" in tables:
        out += ["Table 8 (mini): BEVT-V by mask strategy, motion labels, top-1 %, mean ± std (seeds); paper: "
                "Swin-T, SSv2 / K400 finetuned", "", "| strategy | motion linear | motion finetune | paper |",
                "|---|---|---|---|"]
        for strategy in TABLE8_ROWS:
            row = "BEVT-V" if strategy == "tube" else strategy
            out.append(f"| {TABLE8_NAMES[strategy]} | {_fmt(cell_stats(cells, 'probe', row, 'motion', 'linear'))} | "
                       f"{_fmt(cell_stats(cells, 'finetune', row, 'motion', 'normal'))} | "
                       f"{' / '.join(map(str, PAPER['8'][strategy]))} |")
    return "\n".join(out)


def draw_tables_chart(cells: dict, tables: tuple, path: str) -> None:
    """One panel per table: bars of the mean top-1 over seeds with ±std error bars (Pillow only)."""
    from PIL import Image, ImageDraw
    palette = [(66, 103, 172), (221, 132, 82), (85, 168, 104), (196, 78, 82), (129, 114, 179), (147, 120, 96),
               (218, 139, 195)]
    panels = []
    if "1" in tables:
        groups = [(f"{t} {m}", [(row, cell_stats(cells, kind, row, t, meas)) for row in TABLE1_ROWS])
                  for t in SYNTHETIC_TASKS for m, kind, meas in (("linear", "probe", "linear"), ("k-NN", "probe", "knn"),
                                                                  ("finetune", "finetune", "normal"))]
        panels.append(("Table 1 (mini): initialisations", groups))
    if "2" in tables:
        groups = [(t, [(m, cell_stats(cells, "finetune", "BEVT", t, m)) for m in EVAL_MODES]) for t in SYNTHETIC_TASKS]
        panels.append(("Table 2 (mini): BEVT finetuned, temporal probes", groups))
    if "8" in tables:
        groups = [(m, [(TABLE8_NAMES[s], cell_stats(cells, kind, "BEVT-V" if s == "tube" else s, "motion", meas))
                       for s in TABLE8_ROWS]) for m, kind, meas in (("motion linear", "probe", "linear"),
                                                                    ("motion finetune", "finetune", "normal"))]
        panels.append(("Table 8 (mini): BEVT-V mask strategies", groups))
    W, PH, left, top = 900, 260, 50, 40
    img = Image.new("RGB", (W, PH * len(panels) + 10), "white")
    d = ImageDraw.Draw(img)
    for p, (title, groups) in enumerate(panels):
        y0 = p * PH
        plot_h, base = PH - top - 60, y0 + PH - 60                       # bar area height, y of 0%
        d.text((left, y0 + 8), title + "  (top-1 %, mean ± std over seeds)", fill="black")
        for v in (0, 25, 50, 75, 100):
            y = base - plot_h * v / 100
            d.line([(left, y), (W - 10, y)], fill=(225, 225, 225))
            d.text((8, y - 6), f"{v}", fill="grey")
        series = [name for name, _ in groups[0][1]]
        gw = (W - left - 10) / len(groups)
        bw = max(4, (gw - 16) / len(series))
        for g, (gname, bars) in enumerate(groups):
            gx = left + g * gw + 8
            d.text((gx, base + 4), gname, fill="black")
            for b, (_, st) in enumerate(bars):
                if st is None:
                    continue
                x0 = gx + b * bw
                y = base - plot_h * st[0] / 100
                d.rectangle([x0, y, x0 + bw - 2, base], fill=palette[b % len(palette)])
                lo, hi = base - plot_h * (st[0] - st[1]) / 100, base - plot_h * (st[0] + st[1]) / 100
                cx = x0 + (bw - 2) / 2
                d.line([(cx, lo), (cx, hi)], fill="black")
                d.line([(cx - 3, lo), (cx + 3, lo)], fill="black")
                d.line([(cx - 3, hi), (cx + 3, hi)], fill="black")
        x = left
        for b, name in enumerate(series):                                 # legend
            d.rectangle([x, base + 22, x + 10, base + 32], fill=palette[b % len(palette)])
            d.text((x + 14, base + 22), name, fill="black")
            x += 14 + 7 * len(name) + 16
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    img.save(tmp)
    os.replace(tmp, path)


def tables_main(argv) -> dict:
    """python finetune.py tables --tables 1,2,8 --seeds 3 [--results assets/tables.json --chart assets/tables.png]"""
    ap = _tool_parser("tables", "Mini reproductions of the paper's Tables 1, 2 and 8 on the synthetic set (cpu "
                      "presets), mean ± std over seeds; resumable cell by cell.", None, ((TablesConfig, {}),))
    ap.add_argument("--preset", choices=("cpu",), default="cpu", help="the only scale this runs at (default cpu)")
    args = vars(ap.parse_args(argv))
    args.pop("preset")
    _, tcfg = _split(args, TablesConfig)
    tables = tuple(comma_items(tcfg.tables))
    if not tables or any(t not in ("1", "2", "8") for t in tables):
        ap.error(f"--tables must be a comma-separated subset of 1,2,8, got {tcfg.tables!r}")
    if tcfg.seeds < 1 or tcfg.max_steps < 0:
        ap.error(f"--seeds must be >= 1 and --max-steps >= 0, got {tcfg.seeds} and {tcfg.max_steps}")
    try:
        only = [int(x) for x in comma_items(tcfg.only_seeds)]
    except ValueError:
        only = [-1]
    if any(not 0 <= x < tcfg.seeds for x in only):
        ap.error(f"--only-seeds must list seeds in 0..{tcfg.seeds - 1}, got {tcfg.only_seeds!r}")
    names = row_names(tables)
    unknown = [x for x in comma_items(tcfg.rows) if x not in names]
    if unknown:
        ap.error(f"--rows: {', '.join(unknown)} is not a row of table(s) {','.join(tables)}; "
                 f"choose from {', '.join(names)}")
    t0 = time.time()
    try:
        runner = Tables(tcfg)
        runner.run(tables)
    except USER_ERRORS as e:
        _fail("tables", e)
    shown = ("1", "2", "8")                      # every table, from every cell on file (other runs' too)
    text = tables_text(runner.cells, shown)
    draw_tables_chart(runner.cells, shown, tcfg.chart)
    print("\n" + text + f"\n\nresults: {tcfg.results}; chart: {tcfg.chart}; this run took {time.time() - t0:.0f} s")
    return runner.cells


TOOLS = {"extract": extract_main, "probe": probe_main, "predict": predict_main, "tables": tables_main}


if __name__ == "__main__":
    main()
