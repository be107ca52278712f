"""Tests of finetune.py (paper §4.1-4.2): layer-wise lr decay, multi-view averaging,
the Table 2 temporal probes, the EMA, loading every checkpoint kind with the
exact missing / unused keys, and one-line errors on bad input. (What finetuning
learns is measured over seeds by `python tools/tables.py`, README "Finetuning",
not by a test: no single seed is a test that cannot flake.) The key formulas
the loader relies on (2D -> 3D inflation, window resizing, the relative index)
are specified once, in test_swin3d.py and test_golden.py.

The expected values are written from the spec (the released K400 config's
table, softmax by hand, key layouts of the released checkpoint layout), never read from the code.
"""

import hashlib
import json
import math
import os

import pytest
import torch

import bevt
import finetune
import swin3d
import train
from tools import synthetic

CPU = swin3d.get_config("cpu")


def classifier(config=CPU, classes=4, **kw):
    torch.manual_seed(0)
    return finetune.VideoClassifier(swin3d.get_config("cpu", **kw) if kw else config, classes)


# -----------------------------------------------------------------------------
# Layer-wise lr decay (K400 recipe) and the backbone multiplier (SSv2 recipe)


def test_layer_decay_multipliers_for_swin_t():
    model = finetune.VideoClassifier(swin3d.get_config("tiny"), 400)
    d = 0.9
    # Swin-T depths (2, 2, 6, 2), written out top-down by hand as in the released K400 table:
    # final norm and last block d^1, each block / merging layer below one more power, patch embedding d^16.
    expected_exponent = {
        "encoder.norm.": 1,
        "encoder.layers.3.blocks.1.": 1, "encoder.layers.3.blocks.0.": 2,
        "encoder.layers.2.downsample.": 3,
        "encoder.layers.2.blocks.5.": 4, "encoder.layers.2.blocks.4.": 5, "encoder.layers.2.blocks.3.": 6,
        "encoder.layers.2.blocks.2.": 7, "encoder.layers.2.blocks.1.": 8, "encoder.layers.2.blocks.0.": 9,
        "encoder.layers.1.downsample.": 10,
        "encoder.layers.1.blocks.1.": 11, "encoder.layers.1.blocks.0.": 12,
        "encoder.layers.0.downsample.": 13,
        "encoder.layers.0.blocks.1.": 14, "encoder.layers.0.blocks.0.": 15,
        "encoder.patch_embed.": 16,
        "head.": 0,
    }
    scales = finetune.layer_lr_scales(model, d)
    names = [n for n, _ in model.named_parameters()]
    assert set(scales) == set(names)
    for name in names:
        prefix = [p for p in expected_exponent if name.startswith(p)]
        assert len(prefix) == 1, name
        assert scales[name] == pytest.approx(d ** expected_exponent[prefix[0]]), name
    # Norms and relative tables inside a layer get the layer's multiplier too.
    assert scales["encoder.layers.2.blocks.0.norm1.weight"] == pytest.approx(d ** 9)
    assert scales["encoder.layers.2.blocks.0.attn.relative_position_bias_table"] == pytest.approx(d ** 9)


def test_layer_decay_matches_the_released_swin_b_table():
    # Swin-B's depths at CPU width: the released config's exponents (lw_lr_decay ** k).
    model = classifier(depths=(2, 2, 18, 2))
    s = finetune.layer_lr_scales(model, 0.9)
    released = {"encoder.norm.weight": 1, "encoder.layers.3.blocks.1.mlp.fc1.weight": 1,
                "encoder.layers.3.blocks.0.mlp.fc1.weight": 2, "encoder.layers.2.downsample.reduction.weight": 3,
                "encoder.layers.2.blocks.17.attn.qkv.weight": 4, "encoder.layers.2.blocks.10.attn.qkv.weight": 11,
                "encoder.layers.2.blocks.1.attn.qkv.weight": 20, "encoder.layers.2.blocks.0.attn.qkv.weight": 21,
                "encoder.layers.1.downsample.reduction.weight": 22, "encoder.layers.0.blocks.0.mlp.fc2.weight": 27,
                "encoder.patch_embed.proj.weight": 28}
    for name, k in released.items():
        assert s[name] == pytest.approx(0.9 ** k), name
    assert s["head.weight"] == 1.0


def test_backbone_multiplier_and_weight_decay_groups():
    model = classifier()
    groups = finetune.finetune_param_groups(model, 0.05, layer_decay=1.0, backbone_mult=0.1)
    name_of, seen = {id(p): n for n, p in model.named_parameters()}, {}
    for g in groups:
        for p in g["params"]:
            assert name_of[id(p)] not in seen
            seen[name_of[id(p)]] = (g["lr_scale"], g["weight_decay"])
    assert set(seen) == {n for n, _ in model.named_parameters()}
    for n, (lr, wd) in seen.items():
        assert lr == pytest.approx(1.0 if n.startswith("head.") else 0.1), n
        no_decay = n.endswith(".bias") or "norm" in n or n.endswith("relative_position_bias_table")
        assert wd == (0.0 if no_decay else 0.05), n


def test_ema_starts_at_the_weights_and_warms_up_its_decay():
    """ema_n = d_n·ema_{n-1} + (1 − d_n)·θ_n with d_n = min(decay, (1 + n)/(10 + n)), ema_0 = θ_0."""
    lin = torch.nn.Linear(3, 2)
    start = lin.weight.detach().clone()
    ema = finetune.make_ema(lin, decay=0.5)
    assert torch.equal(ema.module.weight, start) and not ema.module.training
    want = start.double()
    for n in range(1, 6):
        with torch.no_grad():
            lin.weight.add_(1.0)
        ema.update_parameters(lin)
        d = min(0.5, (1 + n) / (10 + n))                       # 2/11, 3/12, 4/13, 0.5, 0.5
        want = d * want + (1 - d) * lin.weight.detach().double()
    torch.testing.assert_close(ema.module.weight.double(), want, atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# Multi-view testing and the temporal probes


def test_view_averaging_matches_a_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0],          # sample 0, views 0 and 1
                           [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])         # sample 1
    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]
    rows = [softmax(r) for r in logits.tolist()]
    expected = torch.tensor([[(a + b) / 2 for a, b in zip(rows[0], rows[1])],
                             [(a + b) / 2 for a, b in zip(rows[2], rows[3])]])
    assert torch.allclose(finetune.average_views(logits, 2), expected, atol=1e-6)
    # Averaging probabilities is not averaging logits: here they pick different classes.
    lg = torch.tensor([[10.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert finetune.average_views(lg, 3).argmax().item() == 0 and lg.mean(0).argmax().item() == 0
    lg = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert finetune.average_views(lg, 3).argmax().item() == 1 and lg.mean(0).argmax().item() == 0


class _ViewModel(torch.nn.Module):
    """Logits = (mean of the clip, 0): lets the test know every view's logit."""
    def forward(self, x):
        return torch.stack([x.mean(dim=(1, 2, 3, 4)), torch.zeros(len(x))], -1)


def test_predict_averages_the_views_of_each_sample():
    B, V = 3, 4
    video = torch.zeros(B, V, 3, 2, 4, 4)
    vals = torch.tensor([[0.0, 1.0, -2.0, 3.0], [1.0, 1.0, 1.0, 1.0], [-1.0, 0.5, 2.0, 0.0]])
    video += vals[:, :, None, None, None, None]
    batch = {"video": video, "label": torch.tensor([0, 1, 0]), "index": torch.tensor([5, 6, 7])}
    probs, labels, index = finetune.predict(_ViewModel(), [batch], "normal", 0, train.Runtime(False, 0, 1, torch.device("cpu"), False))
    for b in range(B):
        p0 = sum(1 / (1 + math.exp(-v)) for v in vals[b].tolist()) / V      # softmax([v, 0])[0] = sigmoid(v)
        assert probs[b][0].item() == pytest.approx(p0, abs=1e-6)
    assert labels.tolist() == [0, 1, 0] and index.tolist() == [5, 6, 7]


def test_gathered_predictions_drop_the_padded_repeats_by_index():
    # DistributedSampler pads the last shard with repeats of the first samples: index 0 appears twice.
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.9, 0.1]])
    p, y = finetune.gather_predictions(probs, torch.tensor([0, 1, 0, 0]), torch.tensor([2, 0, 1, 2]), False)
    assert y.tolist() == [1, 0, 0] and torch.equal(p, probs[[1, 2, 0]])      # sample order, each once


def _frames_video(B=16, V=2, T=8):
    """(B, V, 3, T, 4, 4) where every pixel of frame t of sample b holds 100·b + t."""
    v = torch.arange(T, dtype=torch.float32)[None, None, None, :, None, None] + \
        100 * torch.arange(B, dtype=torch.float32)[:, None, None, None, None, None]
    return v.expand(B, V, 3, T, 4, 4).clone()


def test_single_frame_repeats_one_frame_of_the_clip():
    x = _frames_video()
    y = finetune.temporal_probe(x, "single-frame", torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    chosen = []
    for b in range(x.shape[0]):
        vals = y[b].unique()
        assert len(vals) == 1                                  # one frame everywhere, in every view
        t = vals.item() - 100 * b
        assert t in range(x.shape[3])                          # a real frame of this sample
        chosen.append(t)
    assert len(set(chosen)) > 1                                # a random frame per sample, not a fixed one


def test_shuffle_is_a_real_permutation_of_the_frames():
    x = _frames_video()
    y = finetune.temporal_probe(x, "shuffle", torch.Generator().manual_seed(0))
    T = x.shape[3]
    perms = []
    for b in range(x.shape[0]):
        order = (y[b, 0, 0, :, 0, 0] - 100 * b).long().tolist()
        assert sorted(order) == list(range(T))                 # every frame exactly once
        for v in range(x.shape[1]):                            # whole frames moved, views share the order
            assert torch.equal(y[b, v], x[b, v][:, order])
        perms.append(tuple(order))
    assert sum(p != tuple(range(T)) for p in perms) == len(perms)   # no identity
    assert len(set(perms)) > 1
    assert torch.equal(finetune.temporal_probe(x, "normal", None), x)


def test_metrics_top5_and_mean_class_accuracy():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.3, 0.4, 0.3]])
    labels = torch.tensor([0, 2, 1, 1])
    m = finetune.classification_metrics(probs, labels, 3)
    assert m["top1"] == pytest.approx(75.0)                    # samples 0, 1 and 3
    assert m["top5"] == pytest.approx(100.0)                   # k = min(5, 3)
    assert m["mean_class"] == pytest.approx((1 + 0.5 + 1) / 3 * 100)   # class 1: 1 of 2 right
    assert m["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


# -----------------------------------------------------------------------------
# Loading every checkpoint kind


def _bevt_sd():
    torch.manual_seed(1)
    return bevt.BEVT(bevt.BEVTConfig(swin=CPU, vocab_size=16)).state_dict()


PRETRAIN_ONLY = ("encoder.patch_embed_2d.", "encoder.mask_token")
INDEX = "relative_position_index"


def test_load_train_py_checkpoint():
    sd = _bevt_sd()
    model = classifier()
    r = finetune.load_pretrained(model, {"model": sd, "step": 3, "config": {"stage": "joint"}})
    assert r.missing == ["head.bias", "head.weight"]
    assert set(r.unused) == {k for k in sd if k.startswith(("video_decoder.", "image_decoder.", "head."))
                             or k.startswith(PRETRAIN_ONLY)}
    assert set(r.rederived) == {k for k in sd if k.endswith(INDEX)}
    ours = model.state_dict()
    for k, v in sd.items():
        if k.startswith("encoder.") and not k.startswith(PRETRAIN_ONLY) and not k.endswith(INDEX):
            assert torch.equal(ours[k], v), k


def _released(sd):
    """Our BEVT keys -> the released layout (the released checkpoint layout), with DDP's module. prefix."""
    names = {"video_decoder.": "backbone.", "image_decoder.": "backbone.", "head.": "cls_head.lm_head.",
             "encoder.": "backbone."}
    out = {}
    for k, v in sd.items():
        for old, new in names.items():
            if k.startswith(old):
                out["module." + new + k[len(old):]] = v
                break
    out["module.cls_head.vae_encoder.blocks.input.w"] = torch.zeros(8, 3, 7, 7)
    return out


def test_a_weight_held_twice_is_refused_not_shadowed():
    """`encoder.X` and `module.encoder.X` are one weight after unwrapping: a file holding both is
    refused in one line naming both keys, before anything is loaded (issue 33)."""
    sd = _bevt_sd()
    model = classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = sd["encoder.norm.weight"]
    with pytest.raises(ValueError, match="twice") as e:
        finetune.load_pretrained(model, {"model": {**sd, "module.encoder.norm.weight": w + 1}})
    assert "'encoder.norm.weight'" in str(e.value) and "'module.encoder.norm.weight'" in str(e.value)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_load_released_bevt_pretraining_checkpoint():
    rel = _released(_bevt_sd())
    model = classifier()
    r = finetune.load_pretrained(model, {"state_dict": rel, "meta": {}})
    assert r.kind == "released BEVT pretraining"
    assert r.missing == ["head.bias", "head.weight"]
    expected_unused = {k for k in rel if k.startswith(("module.cls_head.", "module.backbone.fpn",
                                                       "module.backbone.lm_down", "module.backbone.patch_embed_2d.",
                                                       "module.backbone.mask_token"))}
    assert set(r.unused) == expected_unused
    assert len(expected_unused) == 2 + 1 + 2 + 2 + 2 + 2 + 2 + 4 + 1    # lm_head, vae, 5 decoder layers, 2d embed, mask


def test_load_video_swin_classification_checkpoint(tmp_path):
    src = classifier(classes=7)
    sd = {("backbone." + k[len("encoder."):] if k.startswith("encoder.") else "cls_head.fc_cls." + k[len("head."):]): v
          for k, v in src.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "swin_cls.pth")
    model = classifier(classes=7)
    r = finetune.load_pretrained(model, str(tmp_path / "swin_cls.pth"))
    assert r.missing == [] and r.unused == []
    x = torch.randn(1, 3, 4, 64, 64)
    src.eval(), model.eval()
    assert torch.allclose(src(x), model(x), atol=1e-5)
    # Another class count: the encoder is used, the head is not (and is reported).
    other = classifier(classes=5)
    r = finetune.load_pretrained(other, {"state_dict": sd})
    assert r.missing == ["head.bias", "head.weight"]
    assert r.unused == ["cls_head.fc_cls.bias", "cls_head.fc_cls.weight"]


def test_load_torchvision_swin3d_state_dict(tmp_path):
    """torchvision's swin3d_t/s/b layout (features.*, norm.*, head.*), written by the test from its
    key and shape list (test_swin3d.torchvision_layout): refused, naming the converter; converted by
    tools/convert_checkpoint.py (the released layout, its head as cls_head.fc_cls), loaded exactly."""
    from test_swin3d import torchvision_state_dict
    from tools import convert_checkpoint
    sd = torchvision_state_dict(classes=4)                          # a head of this classifier's size
    with pytest.raises(ValueError, match="python tools/convert_checkpoint.py torchvision IN OUT"):
        finetune.load_pretrained(classifier(classes=4), sd, "cpu")
    torch.save(sd, tmp_path / "swin3d_t.pth")
    convert_checkpoint.main(["torchvision", str(tmp_path / "swin3d_t.pth"), str(tmp_path / "tv.pt")])
    model = classifier(classes=4)
    r = finetune.load_pretrained(model, str(tmp_path / "tv.pt"), "cpu")
    assert r.missing == [] and r.unused == []                       # no encoder key left out
    assert len(r.rederived) == sum(k.endswith(INDEX) for k in sd)   # index buffers: re-derived
    ours = model.state_dict()
    assert torch.equal(ours["encoder.layers.1.blocks.0.mlp.fc1.weight"], sd["features.2.0.mlp.0.weight"])
    assert torch.equal(ours["encoder.layers.2.downsample.reduction.weight"], sd["features.5.reduction.weight"])
    assert torch.equal(ours["head.weight"], sd["head.weight"])
    # The published heads have 400 classes: encoder loaded, head reported unused.
    torch.save(torchvision_state_dict(classes=400), tmp_path / "k400.pth")
    convert_checkpoint.main(["torchvision", str(tmp_path / "k400.pth"), str(tmp_path / "k400.pt")])
    r = finetune.load_pretrained(classifier(classes=4), str(tmp_path / "k400.pt"), "cpu")
    assert r.missing == ["head.bias", "head.weight"]
    assert r.unused == ["cls_head.fc_cls.bias", "cls_head.fc_cls.weight"]


def _swin2d_sd():
    """A 2D Swin image checkpoint (Liu et al. 2021 layout) at the cpu preset's size."""
    enc = swin3d.SwinTransformer3D(CPU).state_dict()
    sd = {}
    for k, v in enc.items():
        if k.startswith("patch_embed_2d.") or k == "mask_token":
            continue
        if k == "patch_embed.proj.weight":
            v = torch.randn(v.shape[0], 3, 4, 4)
        elif k.endswith("relative_position_bias_table"):
            v = torch.randn(13 * 13, v.shape[1])
        elif k.endswith(INDEX):
            v = torch.zeros(49, 49, dtype=torch.long)
        sd[k] = v
    sd["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 49, 49)
    sd["head.weight"], sd["head.bias"] = torch.zeros(1000, 256), torch.zeros(1000)
    return sd


def test_load_2d_swin_is_detected_and_reported(tmp_path):
    """A 2D checkpoint is refused, naming the converter; inflated by tools/convert_checkpoint.py, it
    gives the classifier its encoder (the inflation itself: test_swin3d, test_golden)."""
    from tools import convert_checkpoint
    sd = _swin2d_sd()
    with pytest.raises(ValueError, match="python tools/convert_checkpoint.py inflate IN OUT"):
        finetune.load_pretrained(classifier(), {"model": sd})
    torch.save({"model": sd}, tmp_path / "swin2d.pth")
    convert_checkpoint.main(["inflate", "--model", "cpu", str(tmp_path / "swin2d.pth"), str(tmp_path / "3d.pt")])
    model = classifier()
    r = finetune.load_pretrained(model, str(tmp_path / "3d.pt"))
    assert r.missing == ["head.bias", "head.weight"]                # the ImageNet head was dropped by inflate
    assert r.unused == ["backbone.patch_embed_2d." + k for k in ("norm.bias", "norm.weight", "proj.bias",
                                                                  "proj.weight")]   # the image stream's own
    assert r.rederived == []                                         # inflate drops the index / mask buffers
    assert model.state_dict()["encoder.patch_embed.proj.weight"].shape[2] == 2   # 3D now: (C, 3, 2, 4, 4)


def test_finetune_checkpoint_round_trip_and_scratch():
    src = classifier()
    model = classifier()
    r = finetune.load_pretrained(model, {"model": src.state_dict(), "step": 5})
    assert r.kind == "finetune.py classifier" and r.missing == [] and r.unused == []


def test_encoder_of_another_size_is_a_one_line_error():
    other = bevt.BEVT(bevt.BEVTConfig(swin=swin3d.get_config("cpu", embed_dim=48), vocab_size=16)).state_dict()
    with pytest.raises(ValueError) as e:
        finetune.load_pretrained(classifier(), {"model": other}, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and "embed_dim=48" in msg and "embed_dim=32" in msg
    deeper = bevt.BEVT(bevt.BEVTConfig(swin=swin3d.get_config("cpu", depths=(1, 1, 3, 1)), vocab_size=16)).state_dict()
    with pytest.raises(ValueError, match=r"depths=\(1, 1, 3, 1\)"):
        finetune.load_pretrained(classifier(), {"model": deeper}, "cpu")


def test_classifier_parameter_count_is_the_papers():
    # paper §3 "BEVT encoders": Swin-T with a 400-class head, released classification encoder: 28.16M.
    model = finetune.VideoClassifier(swin3d.get_config("tiny"), 400)
    assert swin3d.param_count(model) / 1e6 == pytest.approx(28.16, abs=0.01)


# -----------------------------------------------------------------------------
# Command line: bad input, and a short finetune on the synthetic motion labels


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft") / "syn"
    synthetic.make_synthetic_set(root, seed=0, verbose=False, n_train=96, n_val=32, images_train=1, images_val=1,
                          frames=16, height=96, width=112)
    return str(root)


SMALL = ["--preset", "cpu", "--crop", "96", "--short-side", "96", "--test-short-side", "96", "--frames", "8",
         "--frame-interval", "2", "--workers", "0", "--log-every", "1"]


def one_line_error(capsys, e) -> str:
    """A user error: exit status 2 and exactly one line on stderr."""
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "error:" in err, err
    return err


def test_unknown_recipe_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        finetune.main(["--recipe", "k600"])
    msg = one_line_error(capsys, e)
    assert "k600" in msg and "k400" in msg


def test_class_count_mismatch_is_a_one_line_error(syn, tmp_path, capsys):
    vids = os.path.join(syn, "videos")
    argv = [*SMALL, "--recipe", "k400", "--init", "scratch", "--out", str(tmp_path), "--video-root", vids,
            "--train-list", os.path.join(vids, "train_motion.txt"), "--val-list", os.path.join(vids, "val_motion.txt")]
    with pytest.raises(SystemExit) as e:
        finetune.main(argv)                                    # K400's 400 classes vs 2 labels
    msg = one_line_error(capsys, e)
    assert "400" in msg and "train_motion.txt" in msg and "2 classes" in msg


def test_encoder_mismatch_from_the_command_line(syn, tmp_path, capsys):
    ck = tmp_path / "small.pt"
    torch.save({"model": bevt.BEVT(bevt.BEVTConfig(swin=swin3d.get_config("cpu", embed_dim=16, num_heads=(1, 1, 2, 4)),
                                                    vocab_size=16)).state_dict(), "config": {"stage": "joint"}}, ck)
    with pytest.raises(SystemExit) as e:
        finetune.main([*SMALL, "--data", syn, "--task", "motion", "--init", str(ck), "--out", str(tmp_path)])
    msg = one_line_error(capsys, e)
    assert "embed_dim=16" in msg and "--model cpu" in msg


def test_missing_synthetic_set_says_how_to_make_it_before_writing(tmp_path, capsys):
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        finetune.main(["--preset", "cpu", "--init", "scratch", "--data", str(tmp_path / "none"), "--out", str(out)])
    msg = one_line_error(capsys, e)
    assert "python tools/synthetic.py --out " + str(tmp_path / "none") in msg
    assert not out.exists()


def test_finished_rerun_writes_nothing_and_config_records_what_ran(syn, tmp_path, capsys):
    """Issues 29.5 and 29.7 in finetune.py: a finished run rerun with other flags trains, evaluates and writes
    nothing (its results come from eval.json); config.json holds the flags as given and what they resolved to."""
    init = tmp_path / "pre.pt"
    torch.save({"model": bevt.BEVT(bevt.BEVTConfig(swin=CPU, vocab_size=16)).state_dict(),
                "config": {"stage": "joint"}}, init)
    out = tmp_path / "ft"
    argv = [*SMALL, "--data", syn, "--task", "motion", "--init", str(init), "--out", str(out), "--frames", "4",
            "--batch-size", "4", "--eval-mode", "normal", "--test-crops", "1", "--max-steps", "2"]
    first = finetune.main(argv)
    names = ("final.pt", "final_ema.pt", "config.json", "metrics.jsonl", "eval.json", "ckpt.pt")
    before = {n: ((out / "motion" / n).read_bytes(), os.stat(out / "motion" / n).st_mtime_ns) for n in names}
    capsys.readouterr()
    again = finetune.main(argv[:-1] + ["1", "--lr", "1e-4"])                       # --max-steps 1, another lr
    out_text = capsys.readouterr().out
    assert {n: ((out / "motion" / n).read_bytes(), os.stat(out / "motion" / n).st_mtime_ns) for n in names} == before
    said = [line for line in out_text.splitlines() if "nothing to do" in line]
    assert len(said) == 1 and "--lr 0.001 -> 0.0001" in said[0] and "--max-steps 2 -> 1" in said[0], out_text
    assert again["motion"]["model"]["normal"]["top1"] == first["motion"]["model"]["normal"]["top1"]
    assert "Table 2 style" in out_text                                             # the table, from eval.json
    cfg = json.loads((out / "motion" / "config.json").read_text())
    res = cfg["resolved"]
    with open(init, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert cfg["precision"] == "auto" and cfg["init"] == str(init)                      # as given
    assert res["precision"] == ("bf16" if train.resolve_precision("auto", torch.device("cpu")) else "fp32")
    assert res["init"] == os.path.abspath(init) and res["init_sha256"] == digest
    assert (res["device"], res["world"], res["accum_steps"], res["torch"]) == ("cpu", 1, 2, torch.__version__)
    for name in ("final.pt", "final_ema.pt", "ckpt.pt"):
        assert json.loads(json.dumps(train.load_checkpoint(str(out / "motion" / name))["config"])) == cfg
