"""Tests of bevt.py: decoder shapes, the joint loss (eqs. 3-5), gradient flow,
stages for DDP, and loading the released checkpoint layout (paper §3 "Decoders"; the released checkpoint layout; the public interface)."""

import pytest
import torch
import torch.nn.functional as F

import swin3d
from bevt import BEVT, BEVTConfig


def tiny_bevt(vocab=64, lam=1.0):
    torch.manual_seed(0)
    cfg = BEVTConfig(swin=swin3d.get_config("cpu", drop_path_rate=0.0), vocab_size=vocab, lam=lam)
    return BEVT(cfg)


def batch(B=2, T=4, S=64, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = S // 16
    return dict(
        videos=torch.randn(B, 3, T, S, S, generator=g),
        video_masks=torch.rand(B, T // 2, h, h, generator=g) < 0.5,
        video_codes=torch.randint(0, vocab, (B, T, h, h), generator=g),
        images=torch.randn(B + 1, 3, S, S, generator=g),
        image_masks=torch.rand(B + 1, h, h, generator=g) < 0.5,
        image_codes=torch.randint(0, vocab, (B + 1, h, h), generator=g),
    )


@pytest.mark.parametrize("S", [64, 112])          # 112 px: odd F3 (7x7), F4 upsampled 8x8 is cropped
def test_decoder_output_shapes(S):
    m = tiny_bevt()
    C8 = m.encoder.num_features
    assert m.features(torch.randn(2, 3, 8, S, S)).shape == (2, 8, S // 16, S // 16, C8)
    assert m.features(torch.randn(3, 3, S, S)).shape == (3, S // 16, S // 16, C8)


def test_loss_equals_hand_written_cross_entropy():
    m = tiny_bevt(lam=0.7)
    b = batch()
    out = m(**b)
    # Head on every position, then select the masked ones (the released code's order).
    fi = m.features(b["images"], b["image_masks"])
    li = m.head(fi)[b["image_masks"]]
    loss_mim = F.cross_entropy(li, b["image_codes"][b["image_masks"]])
    fv = m.features(b["videos"], b["video_masks"])
    target = b["video_masks"].repeat_interleave(2, dim=1)                 # (B, T, h, w)
    assert target.shape == b["video_codes"].shape
    lv = m.head(fv)[target]
    loss_mvm = F.cross_entropy(lv, b["video_codes"][target])
    assert torch.allclose(out["loss_mim"], loss_mim, atol=1e-5)
    assert torch.allclose(out["loss_mvm"], loss_mvm, atol=1e-5)
    assert torch.allclose(out["loss"], loss_mim + 0.7 * loss_mvm, atol=1e-5)
    acc = (lv.argmax(-1) == b["video_codes"][target]).float().mean()
    assert torch.allclose(out["acc_mvm"], acc)
    # Chance-level at init: loss near log(vocab).
    assert abs(out["loss_mim"].item() - torch.log(torch.tensor(64.0)).item()) < 1.0


def test_single_stream_forward():
    m = tiny_bevt()
    b = batch()
    img = m(images=b["images"], image_masks=b["image_masks"], image_codes=b["image_codes"])
    assert set(img) == {"loss", "loss_mim", "acc_mim"} and torch.equal(img["loss"], img["loss_mim"])
    vid = m(videos=b["videos"], video_masks=b["video_masks"], video_codes=b["video_codes"])
    assert set(vid) == {"loss", "loss_mvm", "acc_mvm"}


def test_gradients_reach_every_part_in_the_joint_stage():
    m = tiny_bevt()
    m.set_stage("joint")
    m(**batch())["loss"].backward()
    for name in ("encoder.mask_token", "encoder.patch_embed.proj.weight", "encoder.patch_embed_2d.proj.weight",
                 "video_decoder.fpn_s.0.weight", "video_decoder.lm_down_st.0.weight", "video_decoder.fpn_t.0.weight",
                 "image_decoder.fpn.0.weight", "image_decoder.lm_down.weight", "head.weight", "encoder.norm.weight"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    # No trainable parameter is left without a gradient (DDP: find_unused_parameters=False).
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("stage", ["image", "video"])
def test_single_stream_stages_have_no_unused_trainable_parameters(stage):
    m = tiny_bevt()
    m.set_stage(stage)
    b = batch()
    keys = ("images", "image_masks", "image_codes") if stage == "image" else ("videos", "video_masks", "video_codes")
    m(**{k: b[k] for k in keys})["loss"].backward()
    unused = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    other = "patch_embed." if stage == "image" else "patch_embed_2d."
    assert not dict(m.named_parameters())["encoder." + other + "proj.weight"].requires_grad
    with pytest.raises(ValueError, match="expected one of"):
        m.set_stage("both")


def test_tokenizer_gets_no_gradient_inside_a_training_step():
    import tokenizer
    torch.manual_seed(0)
    tok = tokenizer.OfflineTokenizer.fit(torch.rand(8, 3, 64, 64), 64, seed=0, iters=3)
    m = tiny_bevt()
    pixels = torch.rand(2, 3, 4, 64, 64)
    codes = tok.tokenize_clip(pixels)
    assert codes.dtype == torch.long and not codes.requires_grad
    masks = torch.rand(2, 2, 4, 4) < 0.5
    m(videos=pixels, video_masks=masks, video_codes=codes)["loss"].backward()
    assert all(p.grad is None for p in tok.parameters()) and not tok.training
    assert not any(n.startswith("tok") for n, _ in m.named_parameters())


def released_state_dict(m):
    """Our weights under the released names (the released checkpoint layout), renamed by hand."""
    rename = {"video_decoder.": "backbone.", "image_decoder.": "backbone.", "encoder.": "backbone.",
              "head.": "cls_head.lm_head."}
    sd = {}
    for k, v in m.state_dict().items():
        for ours, theirs in rename.items():
            if k.startswith(ours):
                sd[theirs + k[len(ours):]] = v.clone()
                break
    assert "backbone.fpn_s.0.weight" in sd and "backbone.lm_down.weight" in sd and "backbone.fpn_t.0.bias" in sd
    return sd


def test_load_released_layout_reports_exactly():
    src, dst = tiny_bevt(), tiny_bevt()
    torch.manual_seed(5)
    for p in src.parameters():
        p.data.normal_()
    sd = released_state_dict(src)
    sd["cls_head.vae_encoder.blocks.input.w"] = torch.zeros(256, 3, 7, 7)
    sd["cls_head.fc_cls.weight"] = torch.zeros(400, src.encoder.num_features)
    ckpt = {"state_dict": {"module." + k: v for k, v in sd.items()}, "meta": {}}
    report = dst.load_released(ckpt)
    assert report.missing == []
    assert report.unused == ["module.cls_head.fc_cls.weight", "module.cls_head.vae_encoder.blocks.input.w"]
    for (n, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), n


def test_load_video_swin_classifier_reports_missing_pretraining_parts(tmp_path):
    src, dst = tiny_bevt(), tiny_bevt()
    enc = {"backbone." + k: v for k, v in src.encoder.state_dict().items()
           if not k.startswith(("patch_embed_2d.", "mask_token"))}
    enc["cls_head.fc_cls.weight"] = torch.zeros(400, src.encoder.num_features)
    enc["cls_head.fc_cls.bias"] = torch.zeros(400)
    path = tmp_path / "swin_k400.pth"
    torch.save({"state_dict": enc}, path)
    report = dst.load_released(str(path))
    expected_missing = sorted([k for k in dst.state_dict() if k.startswith(
        ("encoder.patch_embed_2d.", "video_decoder.", "image_decoder.", "head."))] + ["encoder.mask_token"])
    assert report.missing == expected_missing
    assert report.unused == ["cls_head.fc_cls.bias", "cls_head.fc_cls.weight"]


def test_load_rejects_wrong_shapes_and_bad_codes():
    m = tiny_bevt()
    with pytest.raises(ValueError, match="backbone.norm.weight"):
        m.load_released({"backbone.norm.weight": torch.zeros(7)})
    b = batch()
    with pytest.raises(ValueError, match="int64"):
        m(images=b["images"], image_masks=b["image_masks"], image_codes=b["image_codes"].int())
    with pytest.raises(ValueError, match="do not match"):
        m(images=b["images"], image_masks=b["image_masks"], image_codes=b["image_codes"][:, :2])


def test_compiled_encoder_and_decoders_have_no_graph_breaks():
    """What train.py --compile compiles (encoder, both decoders) traces to one graph per stream:
    a graph break would fall back to Python between pieces and, on GPUs, stall the step."""
    torch.manual_seed(0)
    m = BEVT(BEVTConfig(swin=swin3d.get_config("cpu"), vocab_size=64))
    video, vmask = torch.randn(2, 3, 8, 112, 112), torch.rand(2, 4, 7, 7) < 0.5
    image, imask = torch.randn(3, 3, 112, 112), torch.rand(3, 7, 7) < 0.5
    for x, mask, decoder in ((video, vmask, m.video_decoder), (image, imask, m.image_decoder)):
        e = torch._dynamo.explain(m.encoder)(x, mask)
        assert (e.graph_count, e.graph_break_count) == (1, 0), e.break_reasons
        out = m.encoder(x, mask)
        e = torch._dynamo.explain(decoder)(out.f3, out.f4)
        assert (e.graph_count, e.graph_break_count) == (1, 0), e.break_reasons
