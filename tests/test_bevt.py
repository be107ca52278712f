"""Tests of bevt.py: decoder shapes, the joint loss (eqs. 3-5), gradient flow,
stages for DDP, and loading the released checkpoint layout (paper §3 "Decoders"; the released checkpoint layout; the public interface)."""

import pytest
import torch
import torch.nn.functional as F

import swin3d
from bevt import BEVT, BEVTConfig
from tools import convert_checkpoint, kmeans_fit


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
    torch.manual_seed(0)
    tok = kmeans_fit.fit(torch.rand(8, 3, 64, 64), 64, seed=0, iters=3)
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


def test_load_torchvision_swin3d_for_pretraining(tmp_path):
    """train.py --init with torchvision's swin3d layout: refused, naming the converter; once converted
    (tools/convert_checkpoint.py torchvision), the encoder is loaded under our names and its 400-class
    head, now the released classifier `cls_head.fc_cls`, is reported unused, not loaded."""
    from test_swin3d import torchvision_state_dict
    sd = torchvision_state_dict(classes=400)
    m = tiny_bevt(vocab=400)                                  # even a token head of the same shape stays untouched
    with pytest.raises(ValueError, match="python tools/convert_checkpoint.py torchvision IN OUT"):
        m.load_released({"module." + k: v for k, v in sd.items()})
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "swin3d_t.pth")
    convert_checkpoint.main(["torchvision", str(tmp_path / "swin3d_t.pth"), str(tmp_path / "converted.pt")])
    head_before = m.head.weight.detach().clone()
    report = m.load_released(str(tmp_path / "converted.pt"))
    assert report.unused == ["cls_head.fc_cls.bias", "cls_head.fc_cls.weight"]
    assert report.rederived == sorted("backbone." + convert_checkpoint.torchvision_key(k) for k in sd
                                      if k.endswith("relative_position_index"))
    assert report.missing == sorted([k for k in m.state_dict() if k.startswith(
        ("encoder.patch_embed_2d.", "video_decoder.", "image_decoder.", "head."))] + ["encoder.mask_token"])
    assert torch.equal(m.head.weight, head_before)
    ours = m.state_dict()
    assert torch.equal(ours["encoder.layers.2.blocks.1.mlp.fc2.bias"], sd["features.4.1.mlp.3.bias"])
    assert torch.equal(ours["encoder.layers.0.downsample.norm.weight"], sd["features.1.norm.weight"])


def test_load_inflated_2d_swin_for_pretraining(tmp_path):
    """A 2D Swin image checkpoint: refused, naming `convert_checkpoint.py inflate`; inflated, it
    initialises the encoder and the image stream's own patch embedding (the 2D kernel as it is)."""
    from test_swin3d import fake_2d_swin
    sd = fake_2d_swin()
    m = tiny_bevt()
    with pytest.raises(ValueError, match="python tools/convert_checkpoint.py inflate IN OUT"):
        m.load_released({"model": sd})
    torch.save({"model": sd}, tmp_path / "swin2d.pth")
    convert_checkpoint.main(["inflate", "--model", "cpu", str(tmp_path / "swin2d.pth"), str(tmp_path / "3d.pt")])
    report = m.load_released(str(tmp_path / "3d.pt"))
    assert report.unused == []
    assert report.missing == sorted([k for k in m.state_dict() if k.startswith(
        ("video_decoder.", "image_decoder.", "head."))] + ["encoder.mask_token"])
    assert torch.equal(m.state_dict()["encoder.patch_embed_2d.proj.weight"], sd["patch_embed.proj.weight"])


def test_load_rejects_wrong_shapes_and_bad_codes():
    m = tiny_bevt()
    with pytest.raises(ValueError, match="backbone.norm.weight"):
        m.load_released({"backbone.norm.weight": torch.zeros(7)})
    b = batch()
    with pytest.raises(ValueError, match="int64"):
        m(images=b["images"], image_masks=b["image_masks"], image_codes=b["image_codes"].int())
    with pytest.raises(ValueError, match="do not match"):
        m(images=b["images"], image_masks=b["image_masks"], image_codes=b["image_codes"][:, :2])


def test_a_weight_held_twice_under_names_that_map_to_one_key_is_refused(tmp_path):
    """`encoder.X` and `module.encoder.X` (or the released `backbone.X`) are one weight: a file that holds
    both is refused in one line naming both keys, not loaded with whichever came last (issue 33)."""
    m = tiny_bevt()
    sd = m.state_dict()
    w = sd["encoder.norm.weight"]
    for shadow in ("module.encoder.norm.weight", "backbone.norm.weight", "module.backbone.norm.weight"):
        with pytest.raises(ValueError, match="twice") as e:
            m.load_released({"encoder.norm.weight": w, shadow: torch.zeros_like(w)})
        assert "'encoder.norm.weight'" in str(e.value) and repr(shadow) in str(e.value)
        assert "\n" not in str(e.value)
    torch.save({"model": {**sd, "module.encoder.norm.weight": w + 1}}, tmp_path / "twice.pt")
    with pytest.raises(ValueError, match="twice"):
        m.load_released(str(tmp_path / "twice.pt"))
    assert torch.equal(m.state_dict()["encoder.norm.weight"], w)            # nothing was loaded


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


# ----------------------------------------------------------------------------- tools/show.py (pictures)

import os          # noqa: E402
import subprocess  # noqa: E402
import sys         # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tools import decoders, show, tokenizer_tool  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 16


def _save_bevt_checkpoint(path, vocab, constant_code, config):
    """A freshly initialised cpu-preset BEVT whose head always predicts `constant_code`, saved as train.py saves
    final.pt. A constant prediction makes "right" exactly "target == constant_code", known without the model."""
    import train
    m = tiny_bevt(vocab=vocab)
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.fill_(-10.0)
        m.head.bias[constant_code] = 10.0
    train.save_checkpoint(str(path), {"model": m.state_dict(), "step": 0, "config": config})


def _codes_of(tok, crop_uint8):
    """Target codes as train.py computes them: the 8-bit Lanczos half-size copy, then the tokenizer."""
    import data
    import tokenizer
    return tok.codes_of_copy(data.to_uint8(tokenizer.half_copy(data.to_float(crop_uint8), tok.resample)))


def _upscale(a, k):
    return a.repeat(k, 0).repeat(k, 1)


def _tile(png, record, row, col):
    x0, y0, x1, y1 = record["tiles"][row, col]
    return png[y0:y1, x0:x1]


def _codebook_image(tok, codes):
    """codes (h, w) -> (8h, 8w, 3) uint8 from the codebook rows, each an 8x8 RGB patch in (c, y, x) order."""
    h, w = codes.shape
    out = np.zeros((8 * h, 8 * w, 3), np.float32)
    for i in range(h):
        for j in range(w):
            out[8 * i:8 * i + 8, 8 * j:8 * j + 8] = tok.codebook[codes[i, j]].view(3, 8, 8).permute(1, 2, 0).numpy()
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def _cell_interiors(a, cell, pad):
    """(h·cell, w·cell, 3) -> the cells without a `pad`-px border (where the right/wrong frames are drawn)."""
    h, w = a.shape[0] // cell, a.shape[1] // cell
    return a.reshape(h, cell, w, cell, 3)[:, pad:cell - pad, :, pad:cell - pad]


@pytest.fixture(scope="module")
def show_setup(syn, tmp_path_factory):
    """The synthetic set, an offline tokenizer fitted on its images, and the inputs of one clip computed
    here without tools/show.py: frames 4, 6, 8, 10 (4 frames every 2, centred in the 16) cropped to 96 px."""
    import data
    import masking
    d = tmp_path_factory.mktemp("show")
    tok = tokenizer_tool.fit_from_dir(os.path.join(syn, "images", "train"), VOCAB, size=96, iters=5, max_patches=4000,
                         verbose=False)
    tok.save(d / "tok.pt")
    video = os.path.join(syn, "videos", "train", "000000.mp4")
    frames, idx, _ = data.read_video(video, lambda n: np.arange(4, 12, 2))
    crop = torch.from_numpy(frames).permute(0, 3, 1, 2)[..., :, 8:104].contiguous()   # 96x112: short side is 96
    codes = _codes_of(tok, crop)                                                     # (4, 6, 6)
    inp, tgt = masking.MaskGenerator("tube", (4, 96, 96), mask_ratio=0.5, seed=0)()
    masked = torch.from_numpy(tgt)
    values, counts = codes[masked].unique(return_counts=True)
    c = int(values[counts.argmax()])                      # the commonest masked target: some right, some wrong
    config = {"model": "cpu", "crop": 96, "frames": 4, "frame_interval": 2, "mask_strategy": "tube",
              "mask_ratio": 0.5, "tokenizer": str(d / "tok.pt"), "stage": "joint", "preset": "cpu"}
    _save_bevt_checkpoint(d / "final.pt", VOCAB, c, config)
    return dict(dir=d, tok=tok, video=video, crop=crop, codes=codes, masked=masked, input_mask=torch.from_numpy(inp),
                code=c, ckpt=str(d / "final.pt"), syn=syn)


def test_show_video_draws_inputs_codes_marks_and_decodings(show_setup, tmp_path):
    s = show_setup
    out = tmp_path / "pred.png"
    r = show.main(["--init", s["ckpt"], "--video", s["video"], "--out-file", str(out)])
    assert os.listdir(tmp_path) == ["pred.png"]                     # no temporary file left beside it
    # What was computed: the crop, the codes, the tube mask and the constant predictions.
    assert r["frame_index"] == [4, 6, 8, 10] and r["shown"] == [0, 1, 2, 3]
    assert torch.equal(r["pixels"], s["crop"])
    assert torch.equal(r["codes"], s["codes"])
    assert torch.equal(r["input_mask"], s["input_mask"]) and torch.equal(r["masked"], s["masked"])
    assert (r["pred"] == s["code"]).all()
    right = (s["codes"] == s["code"]) & s["masked"]
    assert r["masked_count"] == int(s["masked"].sum()) and r["correct"] == int(right.sum())
    assert 0 < r["correct"] < r["masked_count"]                     # both marks appear below
    # What was drawn: every tile, pixel for pixel where the picture is exact.
    png = np.asarray(Image.open(out).convert("RGB"))
    k, cell = r["scale"], r["cell_px"]
    assert cell == 16 * k and png.shape[1] >= 210 + 4 * 96 * k
    pad = max(2, cell // 10) + 1
    for col, t in enumerate(r["shown"]):
        frame = _upscale(s["crop"][t].permute(1, 2, 0).numpy(), k)
        mask_px = _upscale(s["masked"][t].numpy(), cell)
        assert np.array_equal(_tile(png, r, "input", col), frame)
        grey = _tile(png, r, "masked", col)
        assert (grey[mask_px] == show.MASK_GREY).all() and np.array_equal(grey[~mask_px], frame[~mask_px])
        # Predicted codes: a green frame on masked cells whose target is the constant code, red on the others,
        # none on visible cells (sampled in the middle of each cell's top edge).
        pred_tile = _tile(png, r, "predicted", col)
        for i in range(6):
            for j in range(6):
                edge = tuple(pred_tile[i * cell + 1, j * cell + cell // 2])
                if s["masked"][t, i, j]:
                    assert edge == (show.RIGHT if s["codes"][t, i, j] == s["code"] else show.WRONG), (t, i, j)
                else:
                    assert edge not in (show.RIGHT, show.WRONG), (t, i, j)
        # Decoded rows: codebook patches of the targets; of the constant code where masked.
        target_img = _upscale(_codebook_image(s["tok"], s["codes"][t]), 2 * k)
        mixed = torch.where(s["masked"][t], torch.full_like(s["codes"][t], s["code"]), s["codes"][t])
        mixed_img = _upscale(_codebook_image(s["tok"], mixed), 2 * k)
        assert np.abs(_tile(png, r, "decoded_target", col).astype(int) - target_img).max() <= 1
        got = _cell_interiors(_tile(png, r, "decoded_predicted", col), cell, pad).astype(int)
        assert np.abs(got - _cell_interiors(mixed_img, cell, pad)).max() <= 1


def test_show_image_stream(show_setup, tmp_path):
    s = show_setup
    image = os.path.join(s["syn"], "images", "val", "red", "00000.png")
    out = tmp_path / "img.png"
    r = show.main(["--init", s["ckpt"], "--image", image, "--out-file", str(out), "--seed", "3"])
    assert r["stream"] == "image" and r["shown"] == [0]
    pixels = np.asarray(Image.open(image).convert("RGB"))                # 96x112 -> centre crop 96x96
    crop = torch.from_numpy(pixels[:, 8:104].copy()).permute(2, 0, 1)[None]
    assert torch.equal(r["pixels"], crop)
    assert torch.equal(r["codes"], _codes_of(s["tok"], crop))
    import masking
    block = torch.from_numpy(masking.MaskGenerator("block", (96, 96), mask_ratio=0.5, seed=3)()[0])
    assert torch.equal(r["masked"][0], block)
    assert r["correct"] == int(((r["codes"] == s["code"]) & r["masked"]).sum())
    png = np.asarray(Image.open(out).convert("RGB"))
    assert np.array_equal(_tile(png, r, "input", 0), _upscale(crop[0].permute(1, 2, 0).numpy(), r["scale"]))


def test_show_dalle_decodes_through_the_decoder(show_setup, tmp_path):
    """A DALL-E tokenizer needs --decoder; with it, the decoded row is the decoder's own forward on one-hot codes."""
    import tokenizer as T
    s = show_setup
    torch.manual_seed(0)
    enc, dec = T.DalleEncoder(n_hid=64, vocab_size=512), decoders.DalleDecoder(n_init=8, n_hid=64, vocab_size=512)
    for m in (enc, dec):
        for conv in m.modules():
            if isinstance(conv, T.DalleConv2d):
                conv.b.data.normal_(0, 0.1)
    torch.save(enc.state_dict(), tmp_path / "dalle_encoder.pt")
    torch.save(dec.state_dict(), tmp_path / "dalle_decoder.pt")
    _save_bevt_checkpoint(tmp_path / "dalle.pt", 512, 7, {"model": "cpu", "crop": 96, "stage": "image",
                                                          "tokenizer": str(tmp_path / "dalle_encoder.pt")})
    image = os.path.join(s["syn"], "images", "val", "blue", "00000.png")
    out = tmp_path / "d.png"
    with pytest.raises(SystemExit) as e:
        show.main(["--init", str(tmp_path / "dalle.pt"), "--image", image, "--out-file", str(out)])
    assert e.value.code == 2 and not out.exists()
    r = show.main(["--init", str(tmp_path / "dalle.pt"), "--image", image, "--out-file", str(out),
                   "--decoder", str(tmp_path / "dalle_decoder.pt")])
    with torch.no_grad():
        stats = dec(F.one_hot(r["codes"], 512).permute(0, 3, 1, 2).float())       # (1, 6, 48, 48)
    ref = ((torch.sigmoid(stats[:, :3]) - 0.1) / 0.8).clamp(0, 1)                  # dall_e.utils.unmap_pixels
    assert torch.allclose(r["decoded_target"], ref, atol=1e-5)
    png = np.asarray(Image.open(out).convert("RGB"))
    expect = _upscale((ref[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), 2 * r["scale"])
    assert np.abs(_tile(png, r, "decoded_target", 0).astype(int) - expect).max() <= 1


@pytest.mark.parametrize("case", ["no-init", "not-bevt", "not-video", "size", "frames", "out-dir", "out-ext",
                                  "vocab", "ratio", "both-inputs"])
def test_show_bad_input_is_one_line_and_leaves_the_old_picture(show_setup, tmp_path, capsys, case):
    s = show_setup
    out = tmp_path / "pred.png"
    out.write_bytes(b"an older picture")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    import tokenizer as T
    other_vocab = tmp_path / "tok8.pt"
    if case == "vocab":
        T.OfflineTokenizer(s["tok"].codebook[:8]).save(other_vocab)
    base = ["--init", s["ckpt"], "--video", s["video"], "--out-file", str(out)]
    argv, expect = {
        "no-init": (["--init", str(tmp_path / "none.pt"), "--video", s["video"], "--out-file", str(out)],
                    "no such file"),
        "not-bevt": (["--init", str(s["dir"] / "tok.pt"), "--video", s["video"], "--out-file", str(out)],
                     "prediction head"),
        "not-video": (["--init", s["ckpt"], "--video", str(text), "--out-file", str(out)], "notes.mp4"),
        "size": (base + ["--crop", "100"], "multiple of 16"),
        "frames": (base + ["--frames", "3"], "multiple of the temporal patch"),
        "out-dir": (["--init", s["ckpt"], "--video", s["video"], "--out-file", str(tmp_path / "no" / "p.png")],
                    "does not exist"),
        "out-ext": (["--init", s["ckpt"], "--video", s["video"], "--out-file", str(tmp_path / "p.jpg")], ".png"),
        "vocab": (base + ["--tokenizer", str(other_vocab)], "8 codes"),
        "ratio": (base + ["--mask-ratio", "1.5"], "--mask-ratio"),
        "both-inputs": (base + ["--image", s["video"]], "not allowed with"),
    }[case]
    with pytest.raises(SystemExit) as e:
        show.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("show:")]   # minus the progress bar
    # One line from run_cli; argparse's own errors (a bad flag) come after its usage lines.
    assert lines[-1].startswith("show.py: error:") and expect in lines[-1], err
    assert out.read_bytes() == b"an older picture"                 # untouched
    assert sorted(os.listdir(tmp_path)) == sorted(["pred.png", "notes.mp4"] + (["tok8.pt"] if case == "vocab" else []))


def test_show_command_line(show_setup, tmp_path):
    """As a program: --help, and a user error is one line on stderr with exit status 2, no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    h = subprocess.run([sys.executable, "tools/show.py", "--help"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert h.returncode == 0 and "--video" in h.stdout and "--decoder" in h.stdout
    p = subprocess.run([sys.executable, "tools/show.py", "--init", str(tmp_path / "none.pt"), "--video",
                        show_setup["video"], "--out-file", str(tmp_path / "p.png")], cwd=ROOT, capture_output=True,
                       text=True, env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("show.py: error:") and "none.pt" in p.stderr
