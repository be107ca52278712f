"""Unit tests of train.py's pieces that need no data: flags, schedule, weight-decay groups, RNG state."""

import math
import random

import numpy as np
import pytest
import torch

import finetune
import swin3d
import train
from bevt import BEVT, BEVTConfig


def test_flags_have_paper_defaults_and_presets_override():
    cfg = train.parse_args([])
    assert (cfg.stage, cfg.model, cfg.lr, cfg.weight_decay, cfg.clip_grad, cfg.lam) == ("joint", "base", 5e-4, 0.05, 3.0, 1.0)
    assert (cfg.frames, cfg.frame_interval, cfg.video_batch, cfg.image_batch) == (16, 8, 8, 64)
    assert train.parse_args(["--stage", "image"]).epochs == 800          # §4.1: 800 ImageNet epochs
    cpu = train.parse_args(["--preset", "cpu", "--lr", "1e-3", "--short-side", "120", "140"])
    assert cpu.model == "cpu" and cpu.lr == 1e-3 and cpu.short_side == (120, 140)
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


# -----------------------------------------------------------------------------
# Precision: --precision auto, and bf16 steps against fp32 steps


def test_precision_auto_follows_the_cpus_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(train, "cpu_flags", lambda: {"fpu", "avx2", "avx512f", "avx512bw"})   # AVX512, no BF16
    assert train.resolve_precision("auto", cpu) is False                # emulated bf16 is slower: fp32
    monkeypatch.setattr(train, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert train.resolve_precision("auto", cpu) is True
    monkeypatch.setattr(train, "cpu_flags", lambda: {"amx_bf16"})
    assert train.resolve_precision("auto", cpu) is True
    monkeypatch.setattr(train, "cpu_flags", set)                        # not Linux: no flags known
    assert train.resolve_precision("auto", cpu) is False
    assert train.resolve_precision("fp32", cpu) is False and train.resolve_precision("bf16", cpu) is True
    assert "lacks native bf16" in train.precision_note("auto", False, cpu)


def _fixed_batch(seed=0):
    """A CPU-demo-shaped micro-batch (uint8 pixels, 50% masks) of 2 clips 4x64² and 4 images."""
    g = torch.Generator().manual_seed(seed)
    px = lambda *s: torch.randint(0, 256, s, generator=g, dtype=torch.uint8)     # noqa: E731
    return {"video": px(2, 3, 4, 64, 64), "video_half": px(2, 3, 4, 32, 32),
            "video_mask": torch.rand(2, 2, 4, 4, generator=g) < 0.5,
            "image": px(4, 3, 64, 64), "image_half": px(4, 3, 32, 32),
            "image_mask": torch.rand(4, 4, 4, generator=g) < 0.5}


def _loss_curve(bf16: bool, steps: int = 30) -> list:
    import tokenizer
    torch.manual_seed(0)
    model = BEVT(BEVTConfig(swin=swin3d.get_config("cpu", drop_path_rate=0.0), vocab_size=16))
    model.set_stage("joint")
    tok = tokenizer.OfflineTokenizer(torch.rand(16, 192, generator=torch.Generator().manual_seed(1)))
    opt = torch.optim.AdamW(train.param_groups(model, 0.05), lr=2e-3)
    batch, losses = _fixed_batch(), []
    for _ in range(steps):
        sums, gnorm = train.train_step(model, [batch], tok, train.Runtime(False, 0, 1, torch.device("cpu"), bf16), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(sums["loss"].item())
    return losses


def test_bf16_steps_follow_the_fp32_loss_curve():
    """30 AdamW steps on one fixed batch from the same init. bf16 autocast keeps the loss and the
    weights in fp32 and rounds matmul inputs to 8 mantissa bits (relative error ~4e-3 per product),
    so the curves may drift apart slowly but must tell the same story: every step within 5% of
    the fp32 loss, and the same total decrease within 10% of it."""
    fp32, bf16 = _loss_curve(False), _loss_curve(True)
    assert fp32[-1] < 0.5 * fp32[0]                                    # the fixed batch is being fitted
    rel = [abs(b - f) / f for f, b in zip(fp32, bf16)]
    assert max(rel) < 0.05, rel
    assert abs((bf16[0] - bf16[-1]) - (fp32[0] - fp32[-1])) < 0.1 * (fp32[0] - fp32[-1])
    assert bf16 != fp32                                                # bf16 really ran (it rounds)


# -----------------------------------------------------------------------------
# Resuming on another number of processes: which accumulation keeps the effective batch


def _accum(world, per_process, flag=0):
    saved = train.batch_record(2, 1, {"clips": 2, "images": 4})           # 2 processes x (2 clips + 4 images)
    return train.resume_accumulation(saved, per_process, world, flag, train.BATCH_FLAGS, "ck.pt",
                                     lambda e: 2e-3 * e / 4)


def test_resume_keeps_the_effective_batch_by_changing_the_accumulation():
    both = {"clips": 2, "images": 4}
    assert _accum(2, both) == (1, "")                                     # nothing changed, nothing said
    assert _accum(1, both) == (2, "world 2 -> 1, accumulation 1 -> 2: effective batch 4 clips + 8 images kept")
    accum, note = _accum(4, {"clips": 1, "images": 2})                    # 4 processes with half the batch
    assert accum == 1 and "--video-batch 2 -> 1, --image-batch 4 -> 2: effective batch 4 clips + 8 images kept" in note


@pytest.mark.parametrize("world, per_process, flag, expect", [
    # 3 x 2 clips divides no 4: the nearest batch and the flags that could keep it.
    (3, {"clips": 2, "images": 4}, 0, "ck.pt was trained with an effective batch of 4 clips + 8 images per step; "
                                      "3 process(es) x 2 clips + 4 images make 6 clips + 12 images at best "
                                      "(accumulation 1): keep it with other --video-batch, --image-batch or "
                                      "process counts (learning rate 0.002 at that batch)"),
    # The clips fit, the images do not.
    (1, {"clips": 2, "images": 8}, 0, "1 process(es) x 2 clips + 8 images make 4 clips + 16 images at best "
                                      "(accumulation 2)"),
    # A new --accum-steps that would change the batch is refused.
    (2, {"clips": 2, "images": 4}, 2, "4 clips + 8 images per step; --accum-steps 2 would make it 8 clips + 16 "
                                      "images: keep it"),
])
def test_resume_that_cannot_keep_the_effective_batch_is_one_line(world, per_process, flag, expect):
    with pytest.raises(ValueError) as e:
        _accum(world, per_process, flag)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_throughput_leaves_out_the_warm_up_and_measures_a_recent_window():
    """A slow first step (compilation: 10 s) and 4 samples a second afterwards: the rate is 4, not 16/13."""
    times = iter([0.0, 10.0, 11.0, 12.0, 13.0, 14.0, 14.5])
    speed = train.Throughput(window=2, warmup=2, clock=lambda: next(times))
    speed.add(4)
    assert speed.rate() == pytest.approx(0.4)                              # only the warm-up so far: since the start
    for _ in range(3):
        speed.add(4)
    assert speed.rate() == pytest.approx(4.0)                              # steps 3-4, after the warm-up
    speed.add(4)
    speed.add(4)                                                           # the last 2 steps: 1 s, then 0.5 s
    assert speed.rate() == pytest.approx(8 / 1.5)


def test_every_flag_has_help_and_its_defaults_under_both_presets():
    for parser in (train.build_parser(), finetune.build_parser()):
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and not action.help.startswith(" ("), action.option_strings
        parser.format_help()                                               # no stray % in a help text
    helps = {a.dest: a.help for a in train.build_parser()._actions}
    assert "paper 800 (image), 150 (video, joint), cpu 20 (image), 8 (video, joint)" in helps["epochs"]
    assert "default: paper 8192, cpu 256" in helps["vocab_size"]
    assert "required unless scratch (random init is Table 6's ablation)" in helps["init"]    # a continuation line
    drop_path = next(a.help for a in finetune.build_parser()._actions if a.dest == "drop_path")
    assert drop_path.endswith("(default: k400 0.3, ssv2 0.4, diving48 0.4, cpu 0.0)")


@pytest.mark.parametrize("argv, says", [
    (["--preset", "cpu", "--mask-ratio", "0.3"], "--mask-ratio 0.3 at --crop 112"),
    (["--preset", "cpu", "--stage", "video", "--mask-ratio", "0.3"], "--mask-ratio 0.3"),
])
def test_masks_the_flags_cannot_draw_are_refused_at_parse_time(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_the_checkpoint_checksum_is_the_one_every_earlier_checkpoint_carries():
    """The digest's order is part of every checkpoint on disk: this value is what the function of commit
    b1dfb92 (the first that wrote checksums this way) gives for this state; a changed walk would make every
    earlier checkpoint read as damaged, and a killed run could not resume after an update."""
    import torch
    state = {"model": {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.tensor([1, 2])},
             "step": 7, "rng": [(1, 2.5, "x")], "config": {"lr": 0.002, "stage": "joint"}}
    assert train.state_digest(state) == "f4e3debf341dfe321dce3fd28da2fb3b"
