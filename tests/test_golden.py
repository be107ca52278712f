"""Golden tests of the weight-layout conventions that loading released weights depends on.

At random initialisation every channel order, neighbour order or token order
is as good as any other: a model trained from scratch learns around it, so the
other tests cannot tell. A released checkpoint was trained with one particular
convention, and loading it into code that uses another silently computes
something else. Each test here builds its weights by hand, in the released
layout, so that the convention alone decides the answer; the expected values
are written from the convention (paper §3, the authors' released code), never
read from this project's output:

* decoders (§3 "Decoders", Fig. 3): Linear(12C -> 8C) over concat(F3, F̂4),
  F3 first (`lm_down_st.0`, `lm_down`); F̂4 = ConvTranspose(F4), kernel (1, 2, 2)
  or 2x2, the extra row/column of an odd F3 cropped at the end; the video
  decoder's `fpn_t.0` ConvTranspose3d (2, 1, 1) gives token step t the frames
  2t (kernel slot 0) and 2t+1 (slot 1);
* patch merging: concat of the 2x2 neighbours (h0,w0), (h1,w0), (h0,w1), (h1,w1),
  LayerNorm(4C), Linear(4C -> 2C); odd sizes zero-padded at the end;
* window attention: tokens of a window flattened time-major (t, h, w); the
  relative index (dt+Wt-1)(2Wh-1)(2Ww-1) + (dh+Wh-1)(2Ww-1) + (dw+Ww-1) of the
  offset query - key; qkv output laid out (3, heads, head_dim); heads merged
  head-major; logits scaled by head_dim^-0.5;
* patch embeddings: Conv3d kernel (t, h, w) = (2, 4, 4), Conv2d (4, 4), zero
  padding at the end;
* inflation of a 2D Swin: kernel copied into both temporal slices and divided
  by 2, the 2D table tiled over every Δt;
* window resize (SSv2, (8,7,7) -> (16,7,7)): the table viewed as
  (Δt, Δh, Δw) = (15, 13, 13), trilinearly interpolated (align_corners=False,
  torch's default, as the released loader calls it) to (31, 13, 13);
* tokenizer: the crop halved, mapped x' = (1-2ε)x + ε with ε = 0.1, one code
  per 8x8 pixels of the half-size copy, codes (N, H/16, W/16) with row i,
  column j the pixels [16i, 16i+16) x [16j, 16j+16); clips frame by frame;
* targets: the video target mask is the input mask repeated x2 in time,
  interleaved (t0, t0, t1, t1, ...), and target code t is frame t's; an
  image's targets are the codes of its masked cells;
* encoder input: ImageNet mean/std in RGB order; the classifier pools the
  final-normed F4.

All tensors are tiny; the whole file runs in seconds.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import bevt
import masking
import data
import finetune
import swin3d
import tokenizer as T
import train
from tools import convert_checkpoint

EPS_LN = 1e-5                  # nn.LayerNorm's default eps
NEG = -1e4                     # a logit that softmax turns into an exact 0 in fp32


def eye_cols(rows, cols, start):
    """(rows, cols) zeros with an identity block at columns [start, start + rows)."""
    w = torch.zeros(rows, cols)
    w[:, start:start + rows] = torch.eye(rows)
    return w


# -----------------------------------------------------------------------------
# Decoders: concat order [F3, F̂4], upsampling kernels, crop, temporal slots


def tiny_bevt():
    """A BEVT with C = 2, so 4C = 8 (F3) and 8C = 16 (F4, decoder width)."""
    torch.manual_seed(0)
    cfg = swin3d.get_config("cpu", embed_dim=2, num_heads=(1, 1, 1, 1), drop_path_rate=0.0)
    return bevt.BEVT(bevt.BEVTConfig(swin=cfg, vocab_size=8))


def up_gain(a, b):
    """The hand-set value of the upsampling kernel at spatial slot (a, b) = (row, column) parity."""
    return 1.0 + a + 2.0 * b


def released_decoder_weights(select):
    """Both decoders in the released key layout, 8C = 16, 4C = 8.

    fpn_s.0 / fpn.0: channel i -> i only, kernel value up_gain(a, b) at (h, w) slot (a, b);
    lm_down(_st): `select` = "F3" keeps input channels [0, 8) (the first 4C = F3 in the
    released order) as outputs [0, 8); "F4" keeps input channels [8, 24) (F̂4) as outputs [0, 16);
    fpn_t.0: channel i -> i, slot k (frame 2t + k) gain k + 1."""
    D = 16
    k2 = torch.tensor([[up_gain(0, 0), up_gain(0, 1)], [up_gain(1, 0), up_gain(1, 1)]])   # [a][b]
    fpn_s = torch.zeros(D, D, 1, 2, 2)
    fpn2d = torch.zeros(D, D, 2, 2)
    fpn_t = torch.zeros(D, D, 2, 1, 1)
    for i in range(D):
        fpn_s[i, i, 0] = k2
        fpn2d[i, i] = k2
        fpn_t[i, i, 0, 0, 0], fpn_t[i, i, 1, 0, 0] = 1.0, 2.0
    lm = eye_cols(8, 24, 0) if select == "F3" else eye_cols(16, 24, 8)
    if select == "F3":
        lm = torch.cat([lm, torch.zeros(8, 24)])                   # (16, 24)
    z = torch.zeros(D)
    return {"backbone.fpn_s.0.weight": fpn_s, "backbone.fpn_s.0.bias": z,
            "backbone.lm_down_st.0.weight": lm, "backbone.lm_down_st.0.bias": z,
            "backbone.fpn_t.0.weight": fpn_t, "backbone.fpn_t.0.bias": z,
            "backbone.fpn.0.weight": fpn2d, "backbone.fpn.0.bias": z,
            "backbone.lm_down.weight": lm.clone(), "backbone.lm_down.bias": z}


def load_decoders(select):
    m = tiny_bevt()
    report = m.load_released({"state_dict": released_decoder_weights(select)})
    assert report.unused == []                                     # every released decoder key found its module
    assert not any(k.startswith(("video_decoder.", "image_decoder.")) for k in report.missing)
    return m


@pytest.mark.parametrize("select", ["F3", "F4"])
@pytest.mark.parametrize("hw", [(4, 6), (3, 5)])                   # (3, 5): odd F3, F̂4 cropped at the end
def test_video_decoder_concat_order_upsampling_and_frame_slots(select, hw):
    m = load_decoders(select)
    h, w = hw
    torch.manual_seed(1)
    B, t = 2, 2
    f3 = torch.randn(B, t, h, w, 8)
    f4 = torch.randn(B, t, (h + 1) // 2, (w + 1) // 2, 16)
    with torch.no_grad():
        out = m.video_decoder(f3, f4)
    assert out.shape == (B, 2 * t, h, w, 16)
    expected = torch.zeros_like(out)
    for tt in range(t):
        for k in range(2):                                         # frame 2t + k comes from kernel slot k
            for i in range(h):
                for j in range(w):
                    if select == "F3":
                        expected[:, 2 * tt + k, i, j, :8] = (k + 1) * f3[:, tt, i, j]
                    else:
                        expected[:, 2 * tt + k, i, j] = (k + 1) * up_gain(i % 2, j % 2) * f4[:, tt, i // 2, j // 2]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("select", ["F3", "F4"])
@pytest.mark.parametrize("hw", [(4, 6), (3, 5)])
def test_image_decoder_concat_order_and_upsampling(select, hw):
    m = load_decoders(select)
    h, w = hw
    torch.manual_seed(2)
    f3 = torch.randn(3, h, w, 8)
    f4 = torch.randn(3, (h + 1) // 2, (w + 1) // 2, 16)
    with torch.no_grad():
        out = m.image_decoder(f3, f4)
    assert out.shape == (3, h, w, 16)
    expected = torch.zeros_like(out)
    for i in range(h):
        for j in range(w):
            if select == "F3":
                expected[:, i, j, :8] = f3[:, i, j]
            else:
                expected[:, i, j] = up_gain(i % 2, j % 2) * f4[:, i // 2, j // 2]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# Patch merging: neighbour order (h0,w0), (h1,w0), (h0,w1), (h1,w1)

MERGE_SLOTS = [(0, 0), (1, 0), (0, 1), (1, 1)]                      # slot k -> (dh, dw)


def distinct_tokens(shape, C=8):
    """Tokens e_i - e_j, all different: each has mean 0 and squared norm 2, so a
    LayerNorm over any concatenation of them is a pure rescaling."""
    pairs = [(i, j) for i in range(C) for j in range(C) if i != j]
    n = math.prod(shape)
    assert n <= len(pairs)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(pairs), generator=g)[:n].tolist()
    x = torch.zeros(n, C)
    for r, p in enumerate(order):
        i, j = pairs[p]
        x[r, i], x[r, j] = 1.0, -1.0
    return x.view(*shape, C)


@pytest.mark.parametrize("slot", range(4))
@pytest.mark.parametrize("hw", [(4, 6), (3, 5)])                   # odd: zero-padded at the end
def test_patch_merging_neighbour_order(slot, hw):
    C = 8
    h, w = hw
    x = distinct_tokens((1, 2, h, w), C)                           # (B, t, h, w, C)
    pm = swin3d.PatchMerging(C)
    # Released layout: reduction (2C, 4C) on the concat of 4 neighbours; select one slot.
    with torch.no_grad():
        pm.reduction.weight.copy_(torch.cat([eye_cols(C, 4 * C, slot * C), torch.zeros(C, 4 * C)]))
        out = pm(x)
    ho, wo = (h + 1) // 2, (w + 1) // 2
    assert out.shape == (1, 2, ho, wo, 2 * C)
    dh, dw = MERGE_SLOTS[slot]
    for tt in range(2):
        for i in range(ho):
            for j in range(wo):
                group = [(2 * i + a, 2 * j + b) for a, b in MERGE_SLOTS]
                real = sum(1 for r, c in group if r < h and c < w)  # the others are zero padding
                scale = 1.0 / math.sqrt(2.0 * real / (4 * C) + EPS_LN)   # LayerNorm(4C) of mean-0 tokens
                r, c = 2 * i + dh, 2 * j + dw
                want = x[0, tt, r, c] * scale if (r < h and c < w) else torch.zeros(C)
                torch.testing.assert_close(out[0, tt, i, j, :C], want, atol=1e-5, rtol=1e-5)
                assert out[0, tt, i, j, C:].abs().max() == 0


# -----------------------------------------------------------------------------
# Window attention: token order in a window, the relative index per axis,
# qkv layout, head order, scale


def table_row(d, table_window):
    """Row of the relative position table for the offset d = query - key (released formula)."""
    Wt, Wh, Ww = table_window
    dt, dh, dw = d
    return (dt + Wt - 1) * (2 * Wh - 1) * (2 * Ww - 1) + (dh + Wh - 1) * (2 * Ww - 1) + (dw + Ww - 1)


def copy_stage(window, offsets, C=4, attention="explicit"):
    """One unshifted Swin block whose head h copies, into its channel slice, the token at
    query - offsets[h]: q = k = 0 so the logits are the bias alone, the bias is 0 at that
    offset's table row and NEG elsewhere, v = identity, proj = identity, MLP output 0."""
    nh = len(offsets)
    stage = swin3d.SwinStage(C, 1, nh, window, 4.0, True, 0.0, 0.0, [0.0], False, False, attention).eval()
    blk = stage.blocks[0]
    with torch.no_grad():
        qkv = torch.zeros(3 * C, C)
        qkv[2 * C:] = torch.eye(C)                                 # released layout: rows (q | k | v)
        blk.attn.qkv.weight.copy_(qkv)
        blk.attn.qkv.bias.zero_()
        blk.attn.proj.weight.copy_(torch.eye(C))
        blk.attn.proj.bias.zero_()
        table = torch.full_like(blk.attn.relative_position_bias_table, NEG)
        for head, d in enumerate(offsets):
            table[table_row(d, window), head] = 0.0
        blk.attn.relative_position_bias_table.copy_(table)
        blk.mlp.fc2.weight.zero_()
        blk.mlp.fc2.bias.zero_()
    return stage


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
@pytest.mark.parametrize("grid,offsets", [
    ((2, 6, 8), [(1, 0, 0), (0, 0, 1)]),          # time, then width
    ((2, 6, 8), [(0, 1, 0), (0, -1, 0)]),         # height, both signs
    ((2, 6, 8), [(-1, 1, -2), (0, 2, 3)]),        # mixed
    ((1, 6, 8), [(0, 1, 0), (0, -1, 3)]),         # image stream: window (1, 3, 4), the Δt = 0 rows
])
def test_attention_copies_the_token_at_the_table_offset(grid, offsets, attention):
    """Window (2, 3, 4) (distinct sizes per axis) on a (t, 6, 8) grid: 4 windows per
    time block. Head h of query p must return LN(x)[p - offsets[h]] when that token
    is in p's window: this fixes the time-major token order inside a window, the
    index formula per axis, its sign (query - key), the qkv layout and the head order."""
    window, C, hd = (2, 3, 4), 4, 2
    stage = copy_stage(window, offsets, C, attention)
    torch.manual_seed(3)
    x = torch.randn(1, *grid, C)
    with torch.no_grad():
        out, _ = stage(x)
    ln = F.layer_norm(x, (C,))
    used = (min(window[0], grid[0]), window[1], window[2])
    checked = [0] * len(offsets)
    for p in [(a, b, c) for a in range(grid[0]) for b in range(grid[1]) for c in range(grid[2])]:
        for head, d in enumerate(offsets):
            q = tuple(pi - di for pi, di in zip(p, d))
            inside = all(0 <= qi < n for qi, n in zip(q, grid))
            same_window = inside and all(qi // u == pi // u for qi, pi, u in zip(q, p, used))
            if not same_window:
                continue
            sl = slice(head * hd, (head + 1) * hd)
            torch.testing.assert_close(out[0, p[0], p[1], p[2], sl] - x[0, p[0], p[1], p[2], sl],
                                       ln[0, q[0], q[1], q[2], sl], atol=1e-5, rtol=1e-5)
            checked[head] += 1
    assert min(checked) >= 8                                       # each head was checked on many queries


def test_attention_scale_is_head_dim():
    """Two tokens, q = k = v = x, no bias: the weight of key j for query i is
    softmax_j(x_i·x_j / sqrt(head_dim)) per head (head_dim = 2 here, C = 4)."""
    C, nh = 4, 2
    attn = swin3d.WindowAttention3D(C, (1, 1, 2), nh, attention="explicit").eval()
    with torch.no_grad():
        attn.qkv.weight.copy_(torch.eye(C).repeat(3, 1))
        attn.qkv.bias.zero_()
        attn.proj.weight.copy_(torch.eye(C))
        attn.proj.bias.zero_()
        attn.relative_position_bias_table.zero_()
        x = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.5, -1.0, 2.0, 1.0]]).view(1, 1, 2, C)
        out = attn(x, swin3d.relative_position_index((1, 1, 2), (1, 1, 2)), None)
    for head in range(nh):
        sl = slice(2 * head, 2 * head + 2)
        xs = x[0, 0, :, sl]
        for i in range(2):
            logits = [float(xs[i] @ xs[j]) / math.sqrt(2) for j in range(2)]
            e = [math.exp(v) for v in logits]
            want = sum(e[j] / sum(e) * xs[j] for j in range(2))
            torch.testing.assert_close(out[0, 0, i, sl], want, atol=1e-5, rtol=1e-5)


def test_relative_index_formula_per_axis():
    """Every pair of a (2, 3, 4) window, against a (3, 4, 5) table (all strides differ)."""
    window, table = (2, 3, 4), (3, 4, 5)
    idx = swin3d.relative_position_index(window, table)
    coords = [(a, b, c) for a in range(2) for b in range(3) for c in range(4)]      # time-major
    for i, p in enumerate(coords):
        for j, q in enumerate(coords):
            assert idx[i, j].item() == table_row(tuple(pi - qi for pi, qi in zip(p, q)), table)


# -----------------------------------------------------------------------------
# Patch embeddings: kernel (t, h, w) / (h, w), zero padding at the end

# Output channel j reads one input value: (in channel, [kt,] kh, kw).
PICKS_3D = [(0, 0, 0, 0), (1, 1, 0, 3), (2, 0, 3, 1), (0, 1, 2, 2)]
PICKS_2D = [(0, 0, 0), (1, 0, 3), (2, 3, 1), (0, 2, 2)]


def tiny_encoder(**kw):
    torch.manual_seed(0)
    return swin3d.SwinTransformer3D(swin3d.get_config("cpu", embed_dim=4, num_heads=(1, 1, 1, 1),
                                                      drop_path_rate=0.0, **kw)).eval()


def one_hot_kernel(picks, shape):
    w = torch.zeros(len(picks), *shape)
    for j, p in enumerate(picks):
        w[(j,) + p] = 1.0
    return w


def padded(x, sizes):
    """x zero-padded at the end of its last len(sizes) dims to `sizes`."""
    out = torch.zeros(*x.shape[: x.dim() - len(sizes)], *sizes)
    out[(...,) + tuple(slice(0, n) for n in x.shape[-len(sizes):])] = x
    return out


def embed_2d_by_hand(img, picks):
    """(B, 3, H, W) -> pre-norm tokens (B, ceil(H/4), ceil(W/4), C) from one-hot (h, w) kernels."""
    B, _, H, W = img.shape
    h, w = -(-H // 4), -(-W // 4)
    xp = padded(img, (4 * h, 4 * w))
    out = torch.zeros(B, h, w, len(picks))
    for j, (ci, kh, kw) in enumerate(picks):
        for i in range(h):
            for k in range(w):
                out[:, i, k, j] = xp[:, ci, 4 * i + kh, 4 * k + kw]
    return out


def test_video_patch_embedding_kernel_layout_t_h_w():
    m = tiny_encoder()
    with torch.no_grad():
        m.load_state_dict({"patch_embed.proj.weight": one_hot_kernel(PICKS_3D, (3, 2, 4, 4)),
                           "patch_embed.proj.bias": torch.zeros(4)}, strict=False)
        torch.manual_seed(4)
        x = torch.rand(2, 3, 3, 10, 7)                              # T, H, W not multiples of (2, 4, 4)
        tokens = m.embed(x)
    xp = padded(x, (4, 12, 8))
    pre = torch.zeros(2, 2, 3, 2, 4)
    for j, (ci, kt, kh, kw) in enumerate(PICKS_3D):
        for t in range(2):
            for i in range(3):
                for k in range(2):
                    pre[:, t, i, k, j] = xp[:, ci, 2 * t + kt, 4 * i + kh, 4 * k + kw]
    torch.testing.assert_close(tokens, F.layer_norm(pre, (4,)), atol=1e-5, rtol=1e-5)


def test_image_patch_embedding_kernel_layout_h_w():
    m = tiny_encoder()
    with torch.no_grad():
        m.load_state_dict({"patch_embed_2d.proj.weight": one_hot_kernel(PICKS_2D, (3, 4, 4)),
                           "patch_embed_2d.proj.bias": torch.zeros(4)}, strict=False)
        torch.manual_seed(5)
        img = torch.rand(2, 3, 10, 7)
        tokens = m.embed(img)
    assert tokens.shape == (2, 1, 3, 2, 4)
    torch.testing.assert_close(tokens[:, 0], F.layer_norm(embed_2d_by_hand(img, PICKS_2D), (4,)),
                               atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# Inflating a 2D Swin image checkpoint


def test_inflation_of_2d_kernel_and_table():
    cfg = swin3d.get_config("cpu", embed_dim=4, num_heads=(1, 1, 1, 1), drop_path_rate=0.0, window_size=(2, 3, 3))
    table2d = torch.arange(25.0).view(25, 1) * 0.1 - 1.0          # window 3x3: (2*3-1)^2 rows, one head
    sd2 = {"patch_embed.proj.weight": one_hot_kernel(PICKS_2D, (3, 4, 4)), "patch_embed.proj.bias": torch.zeros(4),
           "layers.0.blocks.0.attn.relative_position_bias_table": table2d}
    sd3 = convert_checkpoint.inflate_2d_state_dict(sd2, cfg)
    # Table: every Δt row equals the 2D table at (Δh, Δw).
    t3 = sd3["layers.0.blocks.0.attn.relative_position_bias_table"]
    assert t3.shape == (3 * 5 * 5, 1)
    for dt in (-1, 0, 1):
        for dh in range(-2, 3):
            for dw in range(-2, 3):
                assert t3[table_row((dt, dh, dw), (2, 3, 3)), 0] == table2d[(dh + 2) * 5 + (dw + 2), 0]
    # Kernel: a 2-frame clip embeds to the mean of its frames' 2D embeddings (before the norm).
    m = swin3d.SwinTransformer3D(cfg).eval()
    m.load_state_dict(sd3, strict=False)
    torch.manual_seed(6)
    f0, f1 = torch.rand(2, 3, 8, 12), torch.rand(2, 3, 8, 12)
    with torch.no_grad():
        video = m.embed(torch.stack([f0, f1], dim=2))                # (B, 1, 2, 3, C)
        image = m.embed(f0)
    mean2d = (embed_2d_by_hand(f0, PICKS_2D) + embed_2d_by_hand(f1, PICKS_2D)) / 2
    torch.testing.assert_close(video[:, 0], F.layer_norm(mean2d, (4,)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image[:, 0], F.layer_norm(embed_2d_by_hand(f0, PICKS_2D), (4,)), atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# Window resize of the relative tables, (8, 7, 7) -> (16, 7, 7)

HEAD_COEFFS = [(1.0, 10.0, 100.0, 0.0), (-2.0, 7.0, -3.0, 5.0)]    # value = a·it + b·ih + c·iw + d per head


def separable_table(Wt, Wh=7, Ww=7):
    """A table whose value is affine in each offset coordinate, rows in the released order."""
    nt, nh_, nw = 2 * Wt - 1, 2 * Wh - 1, 2 * Ww - 1
    tab = torch.zeros(nt * nh_ * nw, len(HEAD_COEFFS))
    for it in range(nt):
        for ih in range(nh_):
            for iw in range(nw):
                row = table_row((it - Wt + 1, ih - Wh + 1, iw - Ww + 1), (Wt, Wh, Ww))
                for head, (a, b, c, d) in enumerate(HEAD_COEFFS):
                    tab[row, head] = a * it + b * ih + c * iw + d
    return tab


def expected_resized(new_Wt, old_Wt, Wh=7, Ww=7):
    """Trilinear with align_corners=False only moves along Δt (13 -> 13 is the identity): new
    grid point i samples the old grid at clamp((i + 0.5)·n_old/n_new − 0.5, 0, n_old − 1), and
    interpolating an affine function gives the affine function there."""
    n_old, n_new = 2 * old_Wt - 1, 2 * new_Wt - 1
    tab = torch.zeros(n_new * (2 * Wh - 1) * (2 * Ww - 1), len(HEAD_COEFFS))
    for it in range(n_new):
        src = min(max((it + 0.5) * n_old / n_new - 0.5, 0.0), n_old - 1.0)
        for ih in range(2 * Wh - 1):
            for iw in range(2 * Ww - 1):
                row = table_row((it - new_Wt + 1, ih - Wh + 1, iw - Ww + 1), (new_Wt, Wh, Ww))
                for head, (a, b, c, d) in enumerate(HEAD_COEFFS):
                    tab[row, head] = a * src + b * ih + c * iw + d
    return tab


def test_window_resize_of_relative_tables():
    key = "layers.1.blocks.0.attn.relative_position_bias_table"
    out = swin3d.resize_relative_tables({key: separable_table(8)}, (8, 7, 7), (16, 7, 7))[key]
    assert out.shape == (31 * 13 * 13, 2)
    torch.testing.assert_close(out, expected_resized(16, 8), atol=1e-3, rtol=1e-5)
    # The same window leaves the table as it is; a table of another window is a one-line error.
    assert torch.equal(swin3d.resize_relative_tables({key: separable_table(8)}, (8, 7, 7), (8, 7, 7))[key],
                       separable_table(8))
    with pytest.raises(ValueError, match="needs"):
        swin3d.resize_relative_tables({key: separable_table(8)}, (4, 7, 7), (16, 7, 7))


def test_finetune_loader_resizes_a_k400_window_for_ssv2():
    key = "encoder.layers.1.blocks.0.attn.relative_position_bias_table"        # the cpu preset: 2 heads
    torch.manual_seed(0)
    sd = finetune.VideoClassifier(swin3d.get_config("cpu"), 4).state_dict()
    sd[key] = separable_table(8)
    model = finetune.VideoClassifier(swin3d.get_config("cpu", window_size=(16, 7, 7)), 4)
    report = finetune.load_pretrained(model, {"model": sd})
    assert report.window == ((8, 7, 7), (16, 7, 7))
    torch.testing.assert_close(model.state_dict()[key], expected_resized(16, 8), atol=1e-3, rtol=1e-5)


# -----------------------------------------------------------------------------
# Tokenizer: pixel map, code grid orientation, clips frame by frame

EPS = 0.1                                                    # DALL-E's logit-Laplace ε
BRIGHT = 0.8                                                 # hand-built DALL-E: code 1 iff max mapped R > 0.8


def threshold_dalle(chunk_size=64):
    """A DALL-E encoder (n_hid 4, 2 codes) built by hand: channel 0 carries the mapped red
    value (7x7 conv, centre tap), every block is the identity (residual paths zero, 1x1
    id_paths copy channel 0), the 3 max-pools give the max over each 8x8 patch of the
    half-size image, and the output conv gives logits (0, v − 0.8): code 1 iff red is high."""
    enc = T.DalleEncoder(n_hid=4, n_blk_per_group=2, vocab_size=2)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            p.zero_()
            if name == "blocks.input.w":
                p[0, 0, 3, 3] = 1.0
            elif name.endswith("id_path.w"):
                p[0, 0, 0, 0] = 1.0
        enc.blocks.output.conv.w[1, 0, 0, 0] = 1.0
        enc.blocks.output.conv.b[1] = -BRIGHT
    return T.DalleTokenizer(enc, chunk_size=chunk_size)


def two_level_tokenizer():
    """Offline tokenizer with two codes: an all-0 and an all-1 8x8x3 patch."""
    return T.OfflineTokenizer(torch.stack([torch.zeros(192), torch.ones(192)]), {"vocab_size": 2})


def cells_image(code_map, cell=16, other=None):
    """(3, H, W) image whose red (and, for the offline tokenizer, every) channel is 1 on the
    cells where code_map is 1, 0 elsewhere; `other` fills green/blue if given."""
    m = torch.as_tensor(code_map, dtype=torch.float32)
    up = m.repeat_interleave(cell, 0).repeat_interleave(cell, 1)        # (H, W)
    img = up.expand(3, *up.shape).clone()
    if other is not None:
        img[1:] = other
    return img


MAPS = [[[0, 0, 1], [1, 0, 0]], [[1, 0, 0], [0, 0, 1]], [[0, 1, 0], [0, 0, 0]],
        [[0, 0, 0], [1, 0, 1]], [[1, 0, 1], [0, 0, 0]], [[0, 0, 0], [0, 1, 0]]]   # 2 x 3 codes, no two 1s adjacent


def test_dalle_input_is_the_half_size_crop_pixel_mapped():
    """A uniform crop is uniform at every scale, so the dVAE must see exactly (1-2ε)x + ε
    per channel (RGB order kept) at half the size."""
    tok = threshold_dalle()
    seen = []
    hook = tok.encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(2, 3, 32, 48).contiguous()
    tok.tokenize(x)
    hook.remove()
    assert len(seen) == 1 and seen[0].shape == (2, 3, 16, 24)
    want = torch.tensor([EPS, 0.5, 1 - EPS]).view(1, 3, 1, 1).expand(2, 3, 16, 24)
    torch.testing.assert_close(seen[0], want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["dalle", "offline"])
def test_code_grid_orientation_and_clip_frame_order(kind):
    tok = threshold_dalle(chunk_size=4) if kind == "dalle" else two_level_tokenizer()
    g = torch.Generator().manual_seed(7)
    other = (lambda: torch.rand(2, 32, 48, generator=g) * 0.5) if kind == "dalle" else (lambda: None)
    # Images: code (i, j) is the 16x16 block at rows 16i.., columns 16j.. (a 2 x 3 grid).
    imgs = torch.stack([cells_image(MAPS[n], other=other()) for n in range(2)])
    assert torch.equal(tok.tokenize(imgs), torch.tensor(MAPS[:2]))
    # Clips (B=2, 3, T=3, H, W): codes (B, T, 2, 3), frame t of sample b is MAPS[3b + t].
    clips = torch.stack([torch.stack([cells_image(MAPS[3 * b + t], other=other()) for t in range(3)], dim=1)
                         for b in range(2)])
    assert clips.shape == (2, 3, 3, 32, 48)
    assert torch.equal(tok.tokenize_clip(clips), torch.tensor(MAPS).view(2, 3, 2, 3))


def test_training_targets_are_the_codes_of_each_frame_of_the_tokenizer_copy():
    """train.model_inputs: the codes of the half-size copies the data pipeline made, clip
    frame t -> codes[:, t], images -> (B, h, w); never the normalised encoder input."""
    tok = threshold_dalle(chunk_size=4)
    half = [cells_image(mp, cell=8) for mp in MAPS]                      # half-size copies: 8 px per code
    video_tok = torch.stack([torch.stack(half[3 * b: 3 * b + 3], dim=1) for b in range(2)])   # (2, 3, 3, 16, 24)
    image_tok = torch.stack(half[:3])                                                            # (3, 3, 16, 24)
    g = torch.Generator().manual_seed(0)
    batch = {"video": torch.randint(0, 256, (2, 3, 3, 32, 48), generator=g, dtype=torch.uint8),
             "video_mask": torch.zeros(2, 2, 2, 3, dtype=torch.bool), "video_half": video_tok,
             "image": torch.randint(0, 256, (3, 3, 32, 48), generator=g, dtype=torch.uint8),
             "image_mask": torch.zeros(3, 2, 3, dtype=torch.bool), "image_half": image_tok}
    inputs = train.model_inputs(batch, tok, torch.device("cpu"))
    assert torch.equal(inputs["video_codes"], torch.tensor(MAPS).view(2, 3, 2, 3))
    assert torch.equal(inputs["image_codes"], torch.tensor(MAPS[:3]))
    # The encoder input is the uint8 crop, normalised; the codes come from the tokenizer copy only.
    assert torch.equal(inputs["videos"], data.normalize_batch(batch["video"]))
    assert torch.equal(inputs["images"], data.normalize_batch(batch["image"]))
    # The same copies as uint8 (how the loaders ship them) give the same codes.
    as_u8 = {**batch, "video_half": data.to_uint8(video_tok), "image_half": data.to_uint8(image_tok)}
    assert torch.equal(train.model_inputs(as_u8, tok, torch.device("cpu"))["video_codes"], inputs["video_codes"])


# -----------------------------------------------------------------------------
# Targets: the input mask repeated x2 in time, interleaved; codes in frame order


def test_target_mask_is_interleaved_in_time():
    torch.manual_seed(8)
    mask = torch.rand(3, 4, 2, 3) < 0.5                               # (B, T/2, h, w)
    tgt = masking.target_mask(mask, 8)
    assert tgt.shape == (3, 8, 2, 3)
    for t in range(4):
        assert torch.equal(tgt[:, 2 * t], mask[:, t]) and torch.equal(tgt[:, 2 * t + 1], mask[:, t])
    assert torch.equal(masking.target_mask(mask, 7), tgt[:, :7])            # odd T: the padded frame dropped


@pytest.mark.parametrize("step", [0, 1])
def test_mvm_loss_reads_the_codes_of_the_masked_frames(step):
    """The head ignores the features (weight 0) and has bias b_c = c, so the loss at a
    position with code c is logsumexp(b) - c. With codes[:, t] = t (T = 4) and only token
    step `step` masked, the predicted frames must be 2·step and 2·step + 1."""
    torch.manual_seed(0)
    cfg = swin3d.get_config("cpu", drop_path_rate=0.0)
    m = bevt.BEVT(bevt.BEVTConfig(swin=cfg, vocab_size=4))
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.copy_(torch.arange(4.0))
    videos = torch.randn(1, 3, 4, 32, 32)
    masks = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    masks[:, step] = True
    codes = torch.arange(4).view(1, 4, 1, 1).expand(1, 4, 2, 2).contiguous()
    out = m(videos=videos, video_masks=masks, video_codes=codes)
    lse = torch.logsumexp(torch.arange(4.0), 0).item()
    frames = (2 * step, 2 * step + 1)
    assert out["loss_mvm"].item() == pytest.approx(lse - sum(frames) / 2, abs=1e-5)


def test_mim_loss_reads_the_codes_of_the_masked_cells():
    """Image stream, same construction: codes[i, j] = 3i + j on a 2 x 3 grid (2 x 3 codes),
    cells (0, 2) and (1, 0) masked: the loss is logsumexp(b) - (2 + 3) / 2."""
    torch.manual_seed(0)
    m = bevt.BEVT(bevt.BEVTConfig(swin=swin3d.get_config("cpu", drop_path_rate=0.0), vocab_size=6))
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.copy_(torch.arange(6.0))
    masks = torch.tensor([[[False, False, True], [True, False, False]]])
    codes = torch.arange(6).view(1, 2, 3)
    out = m(images=torch.randn(1, 3, 32, 48), image_masks=masks, image_codes=codes)
    lse = torch.logsumexp(torch.arange(6.0), 0).item()
    assert out["loss_mim"].item() == pytest.approx(lse - 2.5, abs=1e-5)


# -----------------------------------------------------------------------------
# Encoder input normalisation and the classifier's pooled feature


def test_encoder_input_normalisation_is_imagenet_rgb():
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)       # R, G, B on 0..255
    torch.manual_seed(9)
    x = torch.rand(2, 3, 4, 5)                                           # (N, 3, H, W) in [0, 1]
    want = torch.stack([(x[:, c] * 255 - mean[c]) / std[c] for c in range(3)], dim=1)
    torch.testing.assert_close(data.normalize(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(data.normalize(x, channels_first=True), want.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_classifier_pools_the_final_normed_f4():
    torch.manual_seed(0)
    model = finetune.VideoClassifier(swin3d.get_config("cpu", drop_path_rate=0.0), 3).eval()
    video = torch.randn(2, 3, 4, 64, 64)
    with torch.no_grad():
        f4 = model.encoder(video).f4                                     # (B, 2, 2, 2, 256), before the norm
        want = F.layer_norm(f4, (256,), model.encoder.norm.weight, model.encoder.norm.bias).mean(dim=(1, 2, 3))
        torch.testing.assert_close(model.features(video), want, atol=1e-5, rtol=1e-5)
        # A norm with weight 0 outputs its bias everywhere: the pooled feature is that bias.
        model.encoder.norm.weight.zero_()
        model.encoder.norm.bias.copy_(torch.linspace(-1, 1, 256))
        torch.testing.assert_close(model.features(video), torch.linspace(-1, 1, 256).expand(2, 256),
                                   atol=1e-6, rtol=0)
