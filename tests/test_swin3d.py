"""Tests of swin3d.py (paper §3 "BEVT encoders"; the released checkpoint layout; the public
interface): shapes, SDPA == explicit attention, weight sharing between the streams, gradient
checkpointing, parameter counts, checkpoint layouts, and the specification of drop path, shifted-window regions and padding."""

import math

import pytest
import torch
import torch.nn.functional as F

import swin3d
from tools import convert_checkpoint
from swin3d import (clamp_window, get_config, relative_position_index,
                    shift_mask, window_partition, window_reverse)


def small_model(**kw):
    """The CPU preset without stochastic depth: deterministic and fast."""
    kw.setdefault("drop_path_rate", 0.0)
    torch.manual_seed(0)
    return swin3d.SwinTransformer3D(get_config("cpu", **kw))


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("preset", ["tiny", "small", "base", "large", "cpu"])
def test_stage_shapes_every_preset(preset):
    # Meta tensors carry shapes only: every preset, both streams, in milliseconds.
    with torch.device("meta"):
        m = swin3d.SwinTransformer3D(get_config(preset))
        C = m.embed_dim
        video = m(torch.empty(2, 3, 16, 224, 224))
        image = m(torch.empty(3, 3, 224, 224))
    for i, (v, im) in enumerate(zip(video.stages, image.stages)):
        side = 56 // 2 ** i
        assert tuple(v.shape) == (2, 8, side, side, C * 2 ** i)        # time never downsampled
        assert tuple(im.shape) == (3, side, side, C * 2 ** i)
    assert tuple(video.f4_norm.shape) == (2, 8, 7, 7, 8 * C)
    assert tuple(image.f4_norm.shape) == (3, 7, 7, 8 * C)


@pytest.mark.parametrize("shape", [(1, 3, 5, 70, 90), (2, 3, 3, 33, 47), (1, 3, 70, 90)])
def test_odd_sizes_are_padded(shape):
    m = small_model()
    out = m(torch.randn(shape))
    t = math.ceil(shape[2] / 2) if len(shape) == 5 else None
    h, w = math.ceil(shape[-2] / 4), math.ceil(shape[-1] / 4)
    for i, f in enumerate(out.stages):
        expected = (shape[0],) + ((t,) if t else ()) + (h, w, m.embed_dim * 2 ** i)
        assert tuple(f.shape) == expected
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        assert torch.isfinite(f).all()


def test_real_shapes_tiny_both_streams():
    torch.manual_seed(0)
    m = swin3d.SwinTransformer3D(get_config("tiny")).eval()
    with torch.no_grad():
        v = m(torch.randn(1, 3, 4, 64, 64))
        i = m(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in v.stages] == [(1, 2, 16, 16, 96), (1, 2, 8, 8, 192),
                                                  (1, 2, 4, 4, 384), (1, 2, 2, 2, 768)]
    assert [tuple(f.shape) for f in i.stages] == [(2, 16, 16, 96), (2, 8, 8, 192),
                                                  (2, 4, 4, 384), (2, 2, 2, 768)]
    # f4_norm is the final LayerNorm of F4.
    assert close(i.f4_norm, m.norm(i.f4))


# ----------------------------------------------------------------------------- geometry helpers

def test_clamp_window():
    assert clamp_window((8, 56, 56), (8, 7, 7), (4, 3, 3)) == ((8, 7, 7), (0, 3, 3))
    assert clamp_window((1, 56, 56), (8, 7, 7), (4, 3, 3)) == ((1, 7, 7), (0, 3, 3))
    assert clamp_window((16, 4, 9), (8, 7, 7), (4, 3, 3)) == ((8, 4, 7), (4, 0, 3))


def test_partition_reverse_roundtrip():
    x = torch.randn(2, 4, 14, 21, 5)
    w = window_partition(x, (2, 7, 7))
    assert w.shape == (2, 2 * 2 * 3, 2 * 7 * 7, 5)
    # The first window holds x[:, :2, :7, :7] in time-major order.
    assert torch.equal(w[:, 0], x[:, :2, :7, :7].reshape(2, -1, 5))
    assert torch.equal(window_reverse(w, (2, 7, 7), (4, 14, 21)), x)


def decode_offsets(index, table_window):
    """Invert paper §3 "BEVT encoders"'s index formula into (dt, dh, dw)."""
    Wt, Wh, Ww = table_window
    dw = index % (2 * Ww - 1) - (Ww - 1)
    dh = (index // (2 * Ww - 1)) % (2 * Wh - 1) - (Wh - 1)
    dt = index // ((2 * Wh - 1) * (2 * Ww - 1)) - (Wt - 1)
    return dt, dh, dw


def test_image_index_is_the_dt0_submatrix_of_the_video_index():
    full = relative_position_index((8, 7, 7), (8, 7, 7))
    img = relative_position_index((1, 7, 7), (8, 7, 7))
    assert torch.equal(img, full[:49, :49])
    assert (decode_offsets(img, (8, 7, 7))[0] == 0).all()
    # Where only time shrinks we agree with the released index[:N, :N] slicing ...
    assert torch.equal(relative_position_index((4, 7, 7), (8, 7, 7)), full[:196, :196])
    # ... where a spatial extent shrinks, the slice picks wrong offsets and we do not.
    assert not torch.equal(relative_position_index((8, 4, 4), (8, 7, 7)), full[:128, :128])


def test_geometry_is_cached_per_shape():
    m = small_model()
    x = torch.randn(1, 3, 4, 64, 64)
    m(x)
    n = len(swin3d._GEOMETRY_CACHE)
    first = dict(swin3d._GEOMETRY_CACHE)
    m(x)
    m(x)
    assert len(swin3d._GEOMETRY_CACHE) == n
    assert all(swin3d._GEOMETRY_CACHE[k] is v for k, v in first.items())


# ----------------------------------------------------------------------------- SDPA == explicit

def test_window_attention_sdpa_equals_reference():
    torch.manual_seed(0)
    B, nW, nh, N, hd = 2, 3, 4, 18, 8
    q, k, v = (torch.randn(B, nW, nh, N, hd) for _ in range(3))
    bias = torch.randn(nh, N, N)
    mask = torch.zeros(nW, N, N)
    mask[1:, :5, 5:] = -100.0
    for m in (None, mask):
        ref = swin3d.attention_reference(q, k, v, bias, m)
        assert close(swin3d._sdpa_windows(q, k, v, bias, m, 0.0), ref)
    # The mask really changes the result (it is not silently dropped).
    assert not close(swin3d.attention_reference(q, k, v, bias, mask), swin3d.attention_reference(q, k, v, bias, None))


@pytest.mark.parametrize("with_mask", [False, True])
def test_explicit_attention_function_equals_autograd_of_the_formula(with_mask):
    # The in-place forward and hand-written backward of _ExplicitAttention against
    # autograd through attention_reference, in float64 (they differ only by rounding),
    # and against finite differences (gradcheck), independently of the reference.
    torch.manual_seed(0)
    B, nW, nh, N, hd = 2, 3, 2, 10, 4
    qkv = torch.randn(B, nW, N, 3 * nh * hd, dtype=torch.float64, requires_grad=True)
    table = torch.randn(nh, N, N, dtype=torch.float64, requires_grad=True)
    mask = None
    if with_mask:
        mask = torch.zeros(nW, N, N, dtype=torch.float64)
        mask[1:, :4, 4:] = -100.0
    scale = hd ** -0.5

    def reference(qkv, bias):
        q, k, v = swin3d._split_heads(qkv, nh)
        return swin3d._merge_heads(swin3d.attention_reference(q, k, v, bias, mask, 0.0, scale))

    def ours(qkv, bias):
        return swin3d._ExplicitAttention.apply(qkv, bias, mask, nh, scale)

    out_r, out_o = reference(qkv, table * 1.0), ours(qkv, table * 1.0)     # a non-leaf bias, as in the model
    assert out_o.shape == (B, nW, N, nh * hd)
    assert torch.allclose(out_o, out_r, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(out_r)
    grads_r = torch.autograd.grad(out_r, (qkv, table), g)
    grads_o = torch.autograd.grad(out_o, (qkv, table), g)
    for a, b in zip(grads_o, grads_r):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)
    small = qkv[:1, :2, :5, :].detach().clone().requires_grad_()     # 5 tokens per window
    small_bias = table[:, :5, :5].detach().clone().requires_grad_()
    mask_small = None if mask is None else mask[:2, :5, :5]
    assert torch.autograd.gradcheck(
        lambda t, b: swin3d._ExplicitAttention.apply(t, b, mask_small, nh, scale), (small, small_bias))
    # A frozen bias gets no gradient and needs no reduction.
    frozen = ours(qkv, table.detach())
    assert torch.autograd.grad(frozen, qkv, g)[0].shape == qkv.shape


def test_shifted_window_weights_are_flushed_not_denormal():
    # With the -100 shift mask, the plain fp32 softmax gives masked pairs weights
    # of ~4e-44: denormals, on which CPU arithmetic is many times slower. The
    # explicit path's saved P has exact zeros there instead, and the same output.
    torch.manual_seed(0)
    B, nW, nh, N, hd = 2, 2, 2, 16, 8
    qkv = torch.randn(B, nW, N, 3 * nh * hd, requires_grad=True)
    bias = 0.1 * torch.randn(nh, N, N)
    mask = torch.zeros(nW, N, N)
    mask[1, :8, 8:] = mask[1, 8:, :8] = -100.0                          # window 1: two regions
    scale = hd ** -0.5
    out = swin3d._ExplicitAttention.apply(qkv, bias, mask, nh, scale)
    p = out.grad_fn.saved_tensors[1]                                    # P, (B, nW, nh, N, N)
    tiny = torch.finfo(torch.float32).tiny
    assert not ((p > 0) & (p < tiny)).any()
    assert (p[:, 1, :, :8, 8:] == 0).all() and (p[:, 1, :, :8, :8] > 0).all()
    q, k, v = swin3d._split_heads(qkv.detach(), nh)
    plain = ((q * scale) @ k.transpose(-2, -1) + bias + mask[:, None]).softmax(-1)
    assert ((plain > 0) & (plain < tiny)).any()                        # what is being avoided
    ref = swin3d._merge_heads(swin3d.attention_reference(q, k, v, bias, mask, 0.0, scale))
    assert close(out, ref, 1e-6)


@pytest.mark.parametrize("stream", ["video", "image"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_encoder_sdpa_equals_explicit(stream, with_mask):
    # Window (2,4,4) on a 4x18x18 token grid: time and space are shifted and
    # padded (18 is not a multiple of 4); later stages clamp the window.
    m = small_model(window_size=(2, 4, 4))
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 72, 72) if stream == "video" else torch.randn(2, 3, 72, 72)
    mask = None
    if with_mask:
        # 72 px is no multiple of 16, so use 80 px for masked inputs.
        x = F.pad(x, (0, 8, 0, 8))
        grid = (2, 4, 5, 5) if stream == "video" else (2, 5, 5)
        mask = torch.rand(grid) < 0.5
    m.set_attention("sdpa")
    out_f = m(x, mask)
    m.set_attention("explicit")
    out_e = m(x, mask)
    for a, b in zip(out_f.stages, out_e.stages):
        assert close(a, b)
    # Gradients agree too; compared in float64, where the two paths differ only by
    # rounding (in fp32 the LayerNorm-heavy loss amplifies rounding to ~1e-3).
    m, x = m.double(), x.double()
    grads = []
    for impl in ("sdpa", "explicit"):
        m.set_attention(impl)
        grads.append(torch.autograd.grad(m(x, mask).f4_norm.square().sum(), list(m.parameters()),
                                         allow_unused=True))
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-9, rtol=1e-7)


# ----------------------------------------------------------------------------- weight sharing

def reference_2d_block(blk, x, window, shift):
    """An independent 2D Swin block (Liu et al. 2021) on tokens (B, h, w, C) using
    blk's weights and the Δt = 0 rows of its 3D bias table."""
    B, h, w, C = x.shape
    attn = blk.attn
    Wt, Wh, Ww = attn.window_size
    nh = attn.num_heads
    y = blk.norm1(x)
    if any(shift):
        y = torch.roll(y, (-shift[0], -shift[1]), (1, 2))
    y = y.view(B, h // window[0], window[0], w // window[1], window[1], C).permute(0, 1, 3, 2, 4, 5)
    y = y.reshape(-1, window[0] * window[1], C)                       # (B*nW, N, C)
    N = y.shape[1]
    qkv = attn.qkv(y).view(-1, N, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    # 2D relative index built from 2D offsets, shifted to the Δt = 0 block of the table.
    ch, cw = torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")
    ch, cw = ch.flatten(), cw.flatten()
    dh, dw = ch[:, None] - ch[None], cw[:, None] - cw[None]
    idx = (Wt - 1) * (2 * Wh - 1) * (2 * Ww - 1) + (dh + Wh - 1) * (2 * Ww - 1) + (dw + Ww - 1)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + attn.relative_position_bias_table[idx].permute(2, 0, 1)
    if any(shift):
        # Swin 2D mask: region labels from slicing each axis into 3 parts.
        lab = torch.zeros(h, w)
        n = 0
        for sh in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
            for sw in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
                lab[sh, sw] = n
                n += 1
        lab = lab.view(h // window[0], window[0], w // window[1], window[1]).permute(0, 2, 1, 3).reshape(-1, N)
        m2 = (lab[:, None, :] != lab[:, :, None]).float() * -100.0     # (nW, N, N)
        logits = logits.view(B, -1, nh, N, N) + m2[None, :, None]
        logits = logits.view(-1, nh, N, N)
    y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, N, C)
    y = attn.proj(y)
    y = y.view(B, h // window[0], w // window[1], window[0], window[1], C).permute(0, 1, 3, 2, 4, 5)
    y = y.reshape(B, h, w, C)
    if any(shift):
        y = torch.roll(y, shift, (1, 2))
    x = x + y
    return x + blk.mlp(blk.norm2(x))


def test_image_stream_is_2d_swin_with_dt0_bias():
    m = small_model().eval()
    stage = m.layers[2]                                                 # the cpu preset's 2-block stage
    assert len(stage.blocks) == 2
    x = torch.randn(2, 14, 14, 4 * m.embed_dim)                        # image tokens, 2x2 windows of 7x7
    with torch.no_grad():
        ref = reference_2d_block(stage.blocks[1], reference_2d_block(stage.blocks[0], x, (7, 7), (0, 0)),
                                 (7, 7), (3, 3))
        ours, _ = stage(x.unsqueeze(1))                                  # one time step
    assert close(ours.squeeze(1), ref)


def test_image_path_equals_one_step_video_path():
    # Give the 3D embedding the inflated 2D weights: a 2-frame static clip then embeds
    # to the same tokens as the image, and must give the same features at every stage.
    m = small_model().eval()
    with torch.no_grad():
        w2 = m.patch_embed_2d.proj.weight
        m.patch_embed.proj.weight.copy_(w2.unsqueeze(2).repeat(1, 1, 2, 1, 1) / 2)
        m.patch_embed.proj.bias.copy_(m.patch_embed_2d.proj.bias)
        m.patch_embed.norm.load_state_dict(m.patch_embed_2d.norm.state_dict())
        img = torch.randn(2, 3, 64, 64)
        mask = torch.rand(2, 4, 4) < 0.5
        out_i = m(img, mask)
        out_v = m(img.unsqueeze(2).repeat(1, 1, 2, 1, 1), mask.unsqueeze(1))
    for a, b in zip(out_i.stages, out_v.stages):
        assert b.shape[1] == 1 and close(a, b.squeeze(1))
    # Both streams share every block weight: there is one set of blocks only.
    names = [n for n, _ in m.named_parameters()]
    assert not any("2d" in n for n in names if n.startswith("layers."))


# ----------------------------------------------------------------------------- mask token

def test_mask_token_replaces_masked_tokens():
    m = small_model()
    x = torch.randn(1, 3, 4, 64, 64)
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2, 3] = True
    tok = m.embed(x, mask)
    plain = m.patch_embed(x)
    # Tokenizer cell (t=1, 2, 3) covers tokens h 8..11, w 12..15.
    sel = torch.zeros(1, 2, 16, 16, dtype=torch.bool)
    sel[0, 1, 8:12, 12:16] = True
    assert torch.equal(tok[sel], m.mask_token[0].expand(16, -1))
    assert torch.equal(tok[~sel], plain[~sel])


def test_fully_masked_input_ignores_pixels():
    m = small_model().eval()
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    a = m(torch.randn(1, 3, 64, 64), mask).f4_norm
    b = m(torch.randn(1, 3, 64, 64), mask).f4_norm
    assert close(a, b)


# ----------------------------------------------------------------------------- checkpointing

@pytest.mark.parametrize("stream", ["video", "image"])
def test_gradient_checkpointing_same_outputs_and_grads(stream):
    m = small_model(drop_path_rate=0.2).train()          # stochastic depth: RNG must be replayed
    x = torch.randn(2, 3, 4, 64, 64) if stream == "video" else torch.randn(2, 3, 64, 64)
    mask = torch.rand((2, 2, 4, 4) if stream == "video" else (2, 4, 4)) < 0.5
    results = []
    for ckpt in (False, True):
        for layer in m.layers:
            layer.use_checkpoint = ckpt
        m.zero_grad()
        torch.manual_seed(7)
        out = m(x, mask)
        (out.f4_norm.square().mean() + out.f3.mean()).backward()
        results.append((out.f4_norm.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                                if p.grad is not None}))
    (o0, g0), (o1, g1) = results
    assert close(o0, o1)
    assert g0.keys() == g1.keys() and "mask_token" in g0
    for n in g0:
        assert close(g0[n], g1[n], 1e-5), n


# ----------------------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("preset,millions", [("tiny", 28.16), ("small", 49.82), ("base", 88.05), ("large", 196.95)])
def test_parameter_counts_match_released_encoder(preset, millions):
    # paper §3 "BEVT encoders": the released classification encoder (video patch embed with norm,
    # 4 stages, final norm) plus Linear(8C -> 400); no image embedding or mask token.
    with torch.device("meta"):
        m = swin3d.SwinTransformer3D(get_config(preset))
    n = swin3d.param_count(m, exclude=("patch_embed_2d.", "mask_token"))
    n += m.num_features * 400 + 400
    assert abs(n / 1e6 - millions) <= 0.05


# ----------------------------------------------------------------------------- checkpoint layout

def released_layout(cfg):
    """Key -> shape of the released encoder (the released checkpoint layout), written out independently."""
    C, (Wt, Wh, Ww) = cfg.embed_dim, cfg.window_size
    keys = {"patch_embed.proj.weight": (C, 3, 2, 4, 4), "patch_embed.proj.bias": (C,),
            "patch_embed.norm.weight": (C,), "patch_embed.norm.bias": (C,),
            "patch_embed_2d.proj.weight": (C, 3, 4, 4), "patch_embed_2d.proj.bias": (C,),
            "patch_embed_2d.norm.weight": (C,), "patch_embed_2d.norm.bias": (C,),
            "mask_token": (1, 1, C), "norm.weight": (8 * C,), "norm.bias": (8 * C,)}
    N = Wt * Wh * Ww
    for i, (d, nh) in enumerate(zip(cfg.depths, cfg.num_heads)):
        c = C * 2 ** i
        for j in range(d):
            p = f"layers.{i}.blocks.{j}."
            for n in ("norm1", "norm2"):
                keys[p + n + ".weight"] = keys[p + n + ".bias"] = (c,)
            keys[p + "attn.relative_position_bias_table"] = ((2 * Wt - 1) * (2 * Wh - 1) * (2 * Ww - 1), nh)
            keys[p + "attn.relative_position_index"] = (N, N)
            keys[p + "attn.qkv.weight"], keys[p + "attn.qkv.bias"] = (3 * c, c), (3 * c,)
            keys[p + "attn.proj.weight"], keys[p + "attn.proj.bias"] = (c, c), (c,)
            keys[p + "mlp.fc1.weight"], keys[p + "mlp.fc1.bias"] = (4 * c, c), (4 * c,)
            keys[p + "mlp.fc2.weight"], keys[p + "mlp.fc2.bias"] = (c, 4 * c), (c,)
        if i < 3:
            keys[f"layers.{i}.downsample.norm.weight"] = keys[f"layers.{i}.downsample.norm.bias"] = (4 * c,)
            keys[f"layers.{i}.downsample.reduction.weight"] = (2 * c, 4 * c)
    return keys


def test_state_dict_keys_equal_released_layout():
    m = small_model()
    expected = released_layout(m.config)
    sd = m.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_released_checkpoint_loads_and_index_is_rederived():
    m = small_model()
    torch.manual_seed(3)
    ckpt = {"state_dict": {}}
    for k, shape in released_layout(m.config).items():
        ckpt["state_dict"]["backbone." + k] = (torch.randint(0, 5, shape) if k.endswith("index")
                                               else torch.randn(shape))
    ckpt["state_dict"]["cls_head.lm_head.weight"] = torch.randn(8192, 8 * m.embed_dim)
    sd = convert_checkpoint.strip_prefix(ckpt["state_dict"], "backbone.")
    result = m.load_state_dict(sd, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    table = "layers.2.blocks.1.attn.relative_position_bias_table"
    assert torch.equal(m.state_dict()[table], sd[table])
    # The garbage index of the checkpoint was not taken.
    idx = m.layers[0].blocks[0].attn.relative_position_index
    assert torch.equal(idx, relative_position_index((8, 7, 7), (8, 7, 7)))


def test_read_state_dict_unwraps_and_refuses_two_keys_for_one_name(tmp_path):
    """read_state_dict: a path or dict; `state_dict`, `model` or the bare dict; keys without
    `module.`/`_orig_mod.`, each with its original key; two keys for one name refused."""
    w = torch.randn(3)
    torch.save({"model": {"module._orig_mod.norm.weight": w}, "step": 7}, tmp_path / "ck.pt")
    flat, outer = swin3d.read_state_dict(tmp_path / "ck.pt")
    assert list(flat) == ["norm.weight"] and flat["norm.weight"][0] == "module._orig_mod.norm.weight"
    assert torch.equal(flat["norm.weight"][1], w) and outer["step"] == 7
    assert list(swin3d.read_state_dict({"state_dict": {"a": w}})[0]) == ["a"]
    assert list(swin3d.read_state_dict({"module.a": w})[0]) == ["a"]
    with pytest.raises(ValueError, match="twice, as 'a' and 'module.a'"):
        swin3d.read_state_dict({"a": w, "module.a": w})


# ----------------------------------------------------------------------------- inflation, resizing

def fake_2d_swin(C=32, depths=(1, 1, 2, 1), heads=(1, 2, 4, 8), window=7):
    """A 2D Swin (Liu et al. 2021) state dict: its key layout, random values of a
    trained network's scale (std 0.05) so activations stay O(1)."""
    sd = {"patch_embed.proj.weight": torch.randn(C, 3, 4, 4), "patch_embed.proj.bias": torch.randn(C),
          "patch_embed.norm.weight": torch.randn(C), "patch_embed.norm.bias": torch.randn(C),
          "norm.weight": torch.randn(8 * C), "norm.bias": torch.randn(8 * C),
          "head.weight": torch.randn(1000, 8 * C), "head.bias": torch.randn(1000)}
    for i, (d, nh) in enumerate(zip(depths, heads)):
        c = C * 2 ** i
        for j in range(d):
            p = f"layers.{i}.blocks.{j}."
            sd[p + "attn.relative_position_bias_table"] = torch.randn((2 * window - 1) ** 2, nh)
            sd[p + "attn.relative_position_index"] = torch.zeros(window ** 2, window ** 2, dtype=torch.long)
            if j % 2:
                sd[p + "attn_mask"] = torch.zeros(4, window ** 2, window ** 2)
            for n, shape in (("norm1.weight", (c,)), ("norm1.bias", (c,)), ("norm2.weight", (c,)),
                             ("norm2.bias", (c,)), ("attn.qkv.weight", (3 * c, c)), ("attn.qkv.bias", (3 * c,)),
                             ("attn.proj.weight", (c, c)), ("attn.proj.bias", (c,)),
                             ("mlp.fc1.weight", (4 * c, c)), ("mlp.fc1.bias", (4 * c,)),
                             ("mlp.fc2.weight", (c, 4 * c)), ("mlp.fc2.bias", (c,))):
                sd[p + n] = torch.randn(shape) * 0.05
        if i < 3:
            sd[f"layers.{i}.downsample.norm.weight"] = torch.randn(4 * c)
            sd[f"layers.{i}.downsample.norm.bias"] = torch.randn(4 * c)
            sd[f"layers.{i}.downsample.reduction.weight"] = torch.randn(2 * c, 4 * c)
    return sd


# ----------------------------------------------------------------------------- torchvision's Video Swin

# torchvision.models.video.swin3d_t / _s / _b: (embed_dim, depths, heads), patch (2,4,4), window (8,7,7).
TORCHVISION_ARCHS = {"swin3d_t": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
                     "swin3d_s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
                     "swin3d_b": (128, (2, 2, 18, 2), (4, 8, 16, 32))}


def torchvision_layout(C, depths, heads, window=(8, 7, 7), classes=400):
    """Key -> shape of torchvision's SwinTransformer3d state dict, written out from its source
    (torchvision/models/video/swin_transformer.py and the 2D swin_transformer.py it imports):
    `features` is a Sequential of [stage 0, merging 0, stage 1, merging 1, ...], a stage a
    Sequential of SwinTransformerBlocks, whose MLP is torchvision.ops.MLP (0 Linear, 1 GELU,
    2 Dropout, 3 Linear, 4 Dropout)."""
    Wt, Wh, Ww = window
    N = Wt * Wh * Ww
    keys = {"patch_embed.proj.weight": (C, 3, 2, 4, 4), "patch_embed.proj.bias": (C,),
            "patch_embed.norm.weight": (C,), "patch_embed.norm.bias": (C,)}
    for i, (d, nh) in enumerate(zip(depths, heads)):
        c = C * 2 ** i
        for j in range(d):
            p = f"features.{2 * i}.{j}."
            keys[p + "norm1.weight"] = keys[p + "norm1.bias"] = (c,)
            keys[p + "attn.relative_position_bias_table"] = ((2 * Wt - 1) * (2 * Wh - 1) * (2 * Ww - 1), nh)
            keys[p + "attn.relative_position_index"] = (N, N)
            keys[p + "attn.qkv.weight"], keys[p + "attn.qkv.bias"] = (3 * c, c), (3 * c,)
            keys[p + "attn.proj.weight"], keys[p + "attn.proj.bias"] = (c, c), (c,)
            keys[p + "norm2.weight"] = keys[p + "norm2.bias"] = (c,)
            keys[p + "mlp.0.weight"], keys[p + "mlp.0.bias"] = (4 * c, c), (4 * c,)
            keys[p + "mlp.3.weight"], keys[p + "mlp.3.bias"] = (c, 4 * c), (c,)
        if i < len(depths) - 1:
            p = f"features.{2 * i + 1}."
            keys[p + "reduction.weight"] = (2 * c, 4 * c)
            keys[p + "norm.weight"] = keys[p + "norm.bias"] = (4 * c,)
    C8 = C * 2 ** (len(depths) - 1)
    keys["norm.weight"], keys["norm.bias"] = (C8,), (C8,)
    keys["head.weight"], keys["head.bias"] = (classes, C8), (classes,)
    return keys


def torchvision_state_dict(C=32, depths=(1, 1, 2, 1), heads=(1, 2, 4, 8), classes=400, seed=0):
    """A state dict in torchvision's layout (cpu-preset size by default) with random values of
    a trained network's scale; the index buffers hold garbage (they must be re-derived)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in torchvision_layout(C, depths, heads, classes=classes).items():
        if k.endswith("relative_position_index"):
            sd[k] = torch.randint(0, 5, shape, generator=g)
        elif k.endswith("norm.weight") or k.endswith(("norm1.weight", "norm2.weight")):
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[k] = 0.05 * torch.randn(shape, generator=g)
    return sd


@pytest.mark.parametrize("name", sorted(TORCHVISION_ARCHS))
def test_torchvision_layout_maps_onto_every_encoder_key(name):
    C, depths, heads = TORCHVISION_ARCHS[name]
    layout = torchvision_layout(C, depths, heads)
    mapped = convert_checkpoint.map_torchvision_state_dict(layout)           # values (shapes here) untouched
    head = {k for k in mapped if k.startswith("head.")}
    assert head == {"head.weight", "head.bias"}                  # the classifier stays out of the encoder
    with torch.device("meta"):
        ours = swin3d.SwinTransformer3D(swin3d.SwinConfig(embed_dim=C, depths=depths, num_heads=heads))
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()
                if not k.startswith("patch_embed_2d.") and k != "mask_token"}   # BEVT's pretraining-only parts
    assert {k: v for k, v in mapped.items() if k not in head} == expected
    preset = {"swin3d_t": "tiny", "swin3d_s": "small", "swin3d_b": "base"}[name]
    assert (C, depths, heads) == (swin3d.PRESETS[preset].embed_dim, swin3d.PRESETS[preset].depths,
                                  swin3d.PRESETS[preset].num_heads)


def test_torchvision_state_dict_loads_and_every_tensor_counts():
    """A mapped load leaves no encoder key missing (but the image stream's embedding and the mask
    token, which torchvision has not got), and perturbing any one tensor changes the output;
    perturbing a relative index buffer does not (it is re-derived, never read)."""
    sd = torchvision_state_dict()
    mapped = convert_checkpoint.map_torchvision_state_dict(sd)
    head = {k: mapped.pop(k) for k in ("head.weight", "head.bias")}
    assert torch.equal(head["head.weight"], sd["head.weight"])
    m = small_model()
    result = m.load_state_dict(mapped, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["mask_token", "patch_embed_2d.norm.bias", "patch_embed_2d.norm.weight",
                                           "patch_embed_2d.proj.bias", "patch_embed_2d.proj.weight"]
    mine = m.state_dict()
    for k, v in mapped.items():
        if not k.endswith("relative_position_index"):
            assert torch.equal(mine[k], v), k
    m.eval()
    x = torch.randn(1, 3, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(x).f4_norm
    changed = []
    g = torch.Generator().manual_seed(2)
    for key in sd:
        if key.startswith("head."):
            continue
        ours_key = convert_checkpoint.torchvision_key(key)
        original = mapped[ours_key]
        # Random, not constant: a constant shift of a bias, or of a bias table, is removed exactly by
        # the next LayerNorm or softmax, and would prove nothing either way.
        bumped = (original + 0.5 * torch.randn(original.shape, generator=g) if original.is_floating_point()
                  else original + 1)
        m.load_state_dict({ours_key: bumped}, strict=False)
        with torch.no_grad():
            out = m(x).f4_norm
        m.load_state_dict({ours_key: original}, strict=False)
        if key.endswith("relative_position_index"):
            assert torch.equal(out, ref), f"{key}: an index buffer was read"
        elif torch.allclose(out, ref, atol=1e-6, rtol=0):
            changed.append(key)
    assert changed == [], f"perturbing these tensors did not change the output: {changed}"
    with torch.no_grad():
        assert torch.equal(m(x).f4_norm, ref)                        # every tensor was put back


def test_torchvision_patch_merging_order_is_ours():
    """torchvision's PatchMerging (the 2D class the video model imports) on a 5-D input: pad H, W
    to even, then cat(x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :],
    x[..., 1::2, 1::2, :]), norm, reduction. With the mapped weights ours gives the same."""
    sd = torchvision_state_dict()
    m = small_model()
    first_merge = {k: v for k, v in sd.items() if k.startswith("features.1.")}
    m.load_state_dict(convert_checkpoint.map_torchvision_state_dict(first_merge), strict=False)
    x = torch.randn(2, 3, 7, 9, 32)                                  # odd H, W: padded at the end
    xp = F.pad(x, (0, 0, 0, x.shape[-2] % 2, 0, x.shape[-3] % 2))
    cat = torch.cat([xp[..., 0::2, 0::2, :], xp[..., 1::2, 0::2, :], xp[..., 0::2, 1::2, :],
                     xp[..., 1::2, 1::2, :]], -1)
    ref = F.linear(F.layer_norm(cat, (128,), sd["features.1.norm.weight"], sd["features.1.norm.bias"]),
                   sd["features.1.reduction.weight"])
    with torch.no_grad():
        assert close(m.layers[0].downsample(x), ref)


def test_inflate_2d_checkpoint():
    m = small_model()
    sd2 = fake_2d_swin()
    sd3 = convert_checkpoint.inflate_2d_state_dict(sd2, m.config)
    # (The kernel and table values: test_golden.test_inflation_of_2d_kernel_and_table.)
    result = m.load_state_dict(sd3, strict=False)
    assert set(result.missing_keys) == {"mask_token"}
    assert result.unexpected_keys == []
    # The inflated model's image stream equals a 2D Swin block on the same tokens.
    x = torch.randn(1, 14, 14, 32)
    m.eval()
    with torch.no_grad():
        ours, _ = m.layers[0](x.unsqueeze(1))
        ref = reference_2d_block(m.layers[0].blocks[0], x, (7, 7), (0, 0))
    assert close(ours.squeeze(1), ref)


def test_convert_checkpoint_tool_writes_loadable_files(tmp_path, capsys):
    """tools/convert_checkpoint.py: each command writes {"state_dict": ...} in the released layout
    (`backbone.` + encoder key; torchvision's head as `cls_head.fc_cls.`) that the encoder loads;
    the unconverted files are refused by the loaders with the command that converts them."""
    torch.save({"model": fake_2d_swin()}, tmp_path / "swin2d.pth")
    torch.save(torchvision_state_dict(), tmp_path / "tv.pth")
    convert_checkpoint.main(["inflate", "--model", "cpu", str(tmp_path / "swin2d.pth"), str(tmp_path / "3d.pt")])
    convert_checkpoint.main(["resize", "--old-window", "8", "7", "7", "--new-window", "16", "7", "7",
                             str(tmp_path / "3d.pt"), str(tmp_path / "16.pt")])
    convert_checkpoint.main(["torchvision", str(tmp_path / "tv.pth"), str(tmp_path / "tv.pt")])
    for name, window, head in (("3d", (8, 7, 7), set()), ("16", (16, 7, 7), set()),
                               ("tv", (8, 7, 7), {"cls_head.fc_cls.weight", "cls_head.fc_cls.bias"})):
        sd = swin3d.load_file(str(tmp_path / f"{name}.pt"))["state_dict"]
        assert {k for k in sd if not k.startswith("backbone.")} == head, name
        swin3d.check_converted(sd)                                   # what the loaders accept
        r = small_model(window_size=window).load_state_dict(convert_checkpoint.strip_prefix(sd, "backbone."),
                                                            strict=False)
        assert r.unexpected_keys == [], name
        assert set(r.missing_keys) <= {"mask_token", "patch_embed_2d.proj.weight", "patch_embed_2d.proj.bias",
                                       "patch_embed_2d.norm.weight", "patch_embed_2d.norm.bias"}, name
    for src, command in (("swin2d.pth", "inflate"), ("tv.pth", "torchvision")):
        ck = swin3d.load_file(str(tmp_path / src))
        with pytest.raises(ValueError, match=f"python tools/convert_checkpoint.py {command} IN OUT"):
            swin3d.check_converted(ck.get("model", ck))
    with pytest.raises(SystemExit) as e:                              # a user error: one line, exit 2
        convert_checkpoint.main(["torchvision", str(tmp_path / "none.pth"), str(tmp_path / "x.pt")])
    assert e.value.code == 2 and "convert_checkpoint.py: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):                                   # not torchvision's layout
        convert_checkpoint.main(["torchvision", str(tmp_path / "swin2d.pth"), str(tmp_path / "x.pt")])
    assert "not a torchvision swin3d checkpoint" in capsys.readouterr().err


def test_inflate_resizes_a_different_2d_window():
    cfg = get_config("cpu")
    sd3 = convert_checkpoint.inflate_2d_state_dict(fake_2d_swin(window=12), cfg)
    assert sd3["layers.0.blocks.0.attn.relative_position_bias_table"].shape == (15 * 13 * 13, 1)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("x,mask,match", [
    (torch.randn(3, 64, 64), None, "expected a clip"),
    (torch.randn(1, 1, 3, 4, 64, 64), None, "expected a clip"),
    (torch.randn(1, 4, 64, 64), None, "input channels"),
    (torch.randn(1, 3, 64, 64), torch.zeros(1, 4, 4), "bool"),
    (torch.randn(1, 3, 64, 64), torch.zeros(1, 8, 8, dtype=torch.bool), "expected \\(1, 4, 4\\)"),
    (torch.randn(1, 3, 4, 64, 64), torch.zeros(1, 4, 4, dtype=torch.bool), "expected \\(1, 2, 4, 4\\)"),
    (torch.randn(1, 3, 60, 64), torch.zeros(1, 4, 4, dtype=torch.bool), "divisible by 16"),
])
def test_bad_input_is_a_clear_error(x, mask, match):
    m = small_model()
    with pytest.raises(ValueError, match=match):
        m(x, mask)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="expected one of"):
        get_config("huge")
    with pytest.raises(TypeError, match="windw"):
        get_config("tiny", windw=(8, 7, 7))


def test_auto_attention_picks_a_kernel_and_agrees():
    m = small_model(window_size=(2, 4, 4))
    x = torch.randn(1, 3, 8, 64, 64)
    outs = {}
    for impl in ("auto", "sdpa", "explicit"):
        m.set_attention(impl)
        with torch.no_grad():
            outs[impl, "infer"] = m(x).f4_norm
        outs[impl, "train"] = m(x).f4_norm.detach()
    # Inference: auto runs SDPA; CPU training (the bias needs a gradient): the explicit formula.
    assert torch.equal(outs["auto", "infer"], outs["sdpa", "infer"])
    assert torch.equal(outs["auto", "train"], outs["explicit", "train"])
    assert close(outs["sdpa", "train"], outs["explicit", "train"])
    with pytest.raises(ValueError, match="expected one of"):
        m.set_attention("flash")


# ----------------------------------------------------------------------------- specification: drop path,
# shifted-window regions, padding, and the faster equivalents held equal to the visible path

def test_stochastic_depth_keeps_the_expectation_and_is_identity_in_eval():
    """DropPath: each sample's branch is kept with probability 1-p and then scaled by 1/(1-p), so
    E[x + DropPath(b)] = x + b; in eval mode it is x + b exactly."""
    torch.manual_seed(0)
    n, p = 20000, 0.3
    x, b = torch.zeros(n, 2, 3), torch.ones(n, 2, 3)
    y = swin3d.add_drop_path(x, b, p, training=True)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / (1 - p)).all(1)).all()   # whole samples, scaled
    kept = (per_sample[:, 0] > 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.02                                   # kept with probability 1 - p
    assert abs(y.mean().item() - 1.0) < 0.03                            # expectation = the branch
    assert torch.equal(swin3d.add_drop_path(x, b, p, training=False), x + b)


def wrapped_labels(size, shift):
    """Independent of Swin's slicing: after roll(-shift), the token at position p of an axis of
    length L came from position (p + s) mod L; it wrapped around iff p >= L - s. Label each token
    of the rolled grid by which axes it wrapped along."""
    t, h, w = (torch.arange(n) >= n - s if s else torch.zeros(n, dtype=torch.bool) for n, s in zip(size, shift))
    return t[:, None, None] * 4 + h[None, :, None] * 2 + w[None, None, :] * 1          # (t, h, w)


@pytest.mark.parametrize("size,window,shift", [((4, 14, 14), (2, 7, 7), (1, 3, 3)),
                                               ((2, 12, 8), (2, 4, 4), (0, 2, 2)),
                                               ((6, 9, 6), (3, 3, 3), (1, 1, 1))])
def test_shift_mask_regions_where_the_window_is_smaller_than_the_map(size, window, shift):
    """After roll(-shift), two tokens of one window may attend to each other iff they were
    neighbours before the roll, i.e. iff they wrapped around along the same axes: mask 0 there,
    -100 elsewhere. Checked window by window, windows in window_partition's order."""
    mask = shift_mask(size, window, shift)
    labels = wrapped_labels(size, shift)
    wt, wh, ww = window
    k = 0
    for t0 in range(0, size[0], wt):
        for h0 in range(0, size[1], wh):
            for w0 in range(0, size[2], ww):
                lab = labels[t0:t0 + wt, h0:h0 + wh, w0:w0 + ww].flatten()          # time-major, as the windows
                want = torch.where(lab[:, None] == lab[None, :], 0.0, -100.0)
                assert torch.equal(mask[k], want), (t0, h0, w0)
                k += 1
    assert k == mask.shape[0] and (mask != 0).any() and (mask[0] == 0).all()   # only the far windows straddle


def test_padding_is_at_the_end_and_cropped_from_the_end():
    """A time axis of 3 with window 2 is padded to 4 at the END, and the block's output keeps the
    first 3 steps. Moving step 0 to the end (or cropping the start) changes which tokens share a
    window, so an independent block on the explicitly end-padded input must agree exactly."""
    torch.manual_seed(0)
    blk = swin3d.SwinBlock3D(8, 2, (2, 2, 2), 2.0, True, 0.0, 0.0, 0.0, "sdpa").eval()
    x = torch.randn(1, 3, 2, 2, 8)                                      # t = 3: padded to 4 at the end
    geom = swin3d.WindowGeometry((2, 2, 2), (0, 0, 0), relative_position_index((2, 2, 2), (2, 2, 2)), None)
    with torch.no_grad():
        out = blk._attention(x, geom)
        # By hand: normalise, pad a zero step at the end, windows {0,1} and {2,pad}, keep the first 3.
        y = F.pad(blk.norm1(x), (0, 0, 0, 0, 0, 0, 0, 1))
        windows = window_partition(y, (2, 2, 2))
        ref = window_reverse(blk.attn(windows, geom.index, None), (2, 2, 2), (4, 2, 2))[:, :3]
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    # Step 0 attends only to step 1 (its window), never to step 2: the padding did not go first.
    x2 = x.clone()
    x2[:, 2] += 1.0
    with torch.no_grad():
        assert torch.equal(blk._attention(x2, geom)[:, :2], out[:, :2])
