"""Unit tests of train.py's pieces that need no data: flags, schedule, weight-decay groups, RNG state."""

import math
import random

import numpy as np
import pytest
import torch

import swin3d
import train
from bevt import BEVT, BEVTConfig


def test_flags_have_paper_defaults_and_presets_override():
    cfg = train.parse_args([])
    assert (cfg.stage, cfg.model, cfg.lr, cfg.weight_decay, cfg.clip_grad, cfg.lam) == ("joint", "base", 5e-4, 0.05, 3.0, 1.0)
    assert (cfg.frames, cfg.frame_interval, cfg.video_batch, cfg.image_batch) == (16, 8, 8, 64)
    assert train.parse_args(["--stage", "image"]).epochs == 800          # §4.1: 800 ImageNet epochs
    cpu = train.parse_args(["--preset", "cpu", "--lr", "1e-3", "--short-side", "100", "120"])
    assert cpu.model == "cpu" and cpu.lr == 1e-3 and cpu.short_side == (100, 120)
    with pytest.raises(SystemExit):
        train.parse_args(["--no-such-flag", "1"])
    with pytest.raises(SystemExit):
        train.parse_args(["--stage", "audio"])


def test_lr_schedule_warmup_then_cosine():
    lrs = [train.lr_at(s, 100, 10, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)      # linear warm-up to the peak
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))                   # then non-increasing
    assert lrs[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))   # cosine midpoint
    assert train.lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)          # ends at min_lr


def test_weight_decay_exclusions():
    m = BEVT(BEVTConfig(swin=swin3d.get_config("cpu"), vocab_size=16))
    m.set_stage("image")
    decay, no_decay = train.param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "encoder.mask_token" in nd and "encoder.layers.0.blocks.0.attn.relative_position_bias_table" in nd
    assert "encoder.norm.weight" in nd and "head.bias" in nd
    assert "encoder.layers.0.blocks.0.attn.qkv.weight" in d and "head.weight" in d
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    # Frozen parameters (the video stream in the image stage) are not optimised at all.
    assert not any(n.startswith(("video_decoder.", "encoder.patch_embed.")) for n in d | nd)


def test_rng_state_roundtrips_through_a_weights_only_checkpoint(tmp_path):
    st = train.rng_state()
    train.save_checkpoint(str(tmp_path / "c.pt"), {"rng": st})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    train.set_rng_state(train.load_checkpoint(str(tmp_path / "c.pt"))["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert not (tmp_path / "c.pt.tmp").exists()
