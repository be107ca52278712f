"""Pictures of what a pretrained BEVT predicts under a mask (bevt.py, paper §3 eqs. 2-4).

    python tools/show.py --init runs/bevt/joint/final.pt --video clip.mp4 --out-file pred.png
    python tools/show.py --init runs/bevt/image/final.pt --image photo.png --out-file pred.png

One PNG; one column per shown frame (a few frames spread over the clip, or the
image), six rows:

  input                the crop the model sees: short side resized to the crop size, centre crop
  masked input         grey cells = the tokenizer-grid cells replaced by the mask token (16x16 px each)
  target codes         the frozen tokenizer's code of every cell: one colour per code, its number
                       where it fits; visible cells faded (only masked cells are predicted, eqs. 3-4)
  predicted codes      argmax of the shared head (eq. 2) at every cell; each masked cell framed
                       green where it equals the target, red and struck through where it does not
  decoded targets      the target codes back to pixels: the offline tokenizer's codebook patches,
                       or DALL-E's dVAE decoder (--decoder decoder.pkl)
  decoded predictions  the predicted codes at the masked cells (framed as above) and the target
                       codes elsewhere, decoded the same way: what the model "sees" under the mask

The title gives the masked-token accuracy over every masked cell of the clip
(all T frames, not only the shown ones), the number the training log reports
as acc_mvm / acc_mim. Shown frames of a clip come in pairs per mask time step:
frames 2k and 2k+1 share one input mask (the tube's target mask repeats it, §3).
Pillow only; written atomically (a temporary file renamed over --out-file).
"""
import argparse
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files

import numpy as np                  # noqa: E402
import torch                        # noqa: E402

import bevt                         # noqa: E402
import data                         # noqa: E402
import masking                      # noqa: E402
import swin3d                       # noqa: E402
import tokenizer as tokenizer_mod   # noqa: E402
import train                        # noqa: E402
from tools import decoders          # noqa: E402

PROG = "show.py"

SHOW_ROWS = (
    ("input", "input", "centre crop"),
    ("masked", "masked input", "grey = mask token"),
    ("target", "target codes", "faded = not masked"),
    ("predicted", "predicted codes", "green right, red wrong"),
    ("decoded_target", "decoded targets", "codes -> pixels"),
    ("decoded_predicted", "decoded predictions", "at the masked cells"),
)
RIGHT, WRONG = (0, 160, 60), (215, 25, 30)            # frame colours of correctly / wrongly predicted cells
MASK_GREY = (128, 128, 128)                            # masked cells in the masked-input row
_SHOW_FONTS: dict = {}


def _show_font(size: int, bold: bool = False):
    """DejaVu Sans where installed, else Pillow's own scalable font (Pillow >= 10.1), else its bitmap font."""
    if (size, bold) not in _SHOW_FONTS:
        from PIL import ImageFont
        font = None
        try:
            font = ImageFont.truetype("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf", size)
        except OSError:
            try:
                font = ImageFont.load_default(size=size)
            except TypeError:
                font = ImageFont.load_default()
        _SHOW_FONTS[size, bold] = font
    return _SHOW_FONTS[size, bold]


def code_colours(vocab: int):
    """(vocab, 3) uint8: a fixed colour per code. Hues step by the golden ratio (neighbouring codes far
    apart on the colour wheel), with 4 saturation and 3 brightness levels, so that equal codes look
    equal and different ones rarely alike. The colours mean nothing beyond identity."""
    import colorsys
    out = np.empty((vocab, 3), np.uint8)
    for c in range(vocab):
        h = (c * 0.618033988749895) % 1.0
        s = 0.45 + 0.45 * ((c * 7) % 4) / 3
        v = 0.98 - 0.3 * ((c * 5) % 3) / 2
        out[c] = [round(255 * u) for u in colorsys.hsv_to_rgb(h, s, v)]
    return out


def _checkpoint_parts(init: str):
    """(checkpoint dict, its train.py config or {}, vocab from the head's shape) of --init."""
    ck = swin3d.load_file(init)                       # weights_only=True; one line if it is not a checkpoint
    if not isinstance(ck, dict):
        raise ValueError(f"--init {init}: expected a checkpoint dict, got a {type(ck).__name__}")
    config = ck.get("config") if isinstance(ck.get("config"), dict) else {}
    sd = ck
    for k in ("state_dict", "model"):
        if isinstance(sd.get(k), dict):
            sd = sd[k]
            break
    heads = [v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)
             and swin3d.unwrap_key(k) in ("head.weight", "cls_head.lm_head.weight")]
    if not heads or heads[0].dim() != 2:
        raise ValueError(f"--init {init}: expected a BEVT pretraining checkpoint with its prediction head "
                         f"(head.weight or cls_head.lm_head.weight: train.py's final.pt / ckpt.pt, or the released "
                         f"one), got keys {sorted(map(str, sd))[:3]}...")
    return ck, config, int(heads[0].shape[0])


def _read_crop(video: Optional[str], image: Optional[str], size: int, frames: int, interval: int):
    """The media as the model's input: (T, 3, size, size) uint8 (T = 1 for an image) and the frame indices.

    Video: T frames every `interval` frames, centred in the file (looped when it
    is shorter, as data.py loops short videos); short side resized to `size`
    (bicubic, antialiased), centre crop: the validation transform without the
    multi-view test crops.
    """
    if video:
        def sample(n):
            start = max(0, (n - (frames - 1) * interval - 1) // 2)
            return (start + np.arange(frames) * interval) % n
        pixels, idx, _ = data.read_video(video, sample)                   # (T, H, W, 3) uint8
    else:
        pixels, idx = data.read_image(image)[None], np.zeros(1, np.int64)  # (1, H, W, 3)
    x = data.frames_to_tensor(pixels)                                      # (T, 3, H, W) uint8
    hw = data.short_side_size(*x.shape[-2:], size)
    x = data.resize(x, hw, "bicubic")
    top, left = data.center_crop_box(*hw, size)
    return x[..., top:top + size, left:left + size].contiguous(), [int(i) for i in idx]


def show(init: str, out: str, *, video: Optional[str] = None, image: Optional[str] = None,
         tokenizer: str = "", decoder: str = "", model: str = "", size: int = 0, frames: int = 0,
         frame_interval: int = 0, mask_strategy: str = "", mask_ratio: float = 0.0, seed: int = 0,
         columns: int = 4, scale: int = 0, device: str = "cpu", progress: bool = True) -> dict:
    """Run a pretrained BEVT on one video (or image) with a fresh mask and draw the picture described above.

    Settings left at 0 / "" come from the checkpoint's train.py config (crop,
    frames, frame_interval, mask strategy and ratio, tokenizer, model), else the
    paper's defaults. Returns a record of what was drawn (for tests and
    scripts): the shown frame indices, each tile's box in the picture, the
    codes, predictions and masks, and the accuracy.
    """
    from tqdm import tqdm

    if bool(video) == bool(image):
        raise ValueError(f"expected exactly one of a video or an image, got video={video!r}, image={image!r}")
    out_path = os.path.abspath(out)
    if not out_path.lower().endswith(".png"):
        raise ValueError(f"--out-file: expected a .png path, got {out!r}")
    if not os.path.isdir(os.path.dirname(out_path)):
        raise ValueError(f"--out-file {out}: its folder {os.path.dirname(out_path)} does not exist")
    bar = tqdm(total=6, desc="show", unit="step", disable=not progress, file=sys.stderr)
    try:
        return _show(bar, init, out_path, video, image, tokenizer, decoder, model, size, frames, frame_interval,
                     mask_strategy, mask_ratio, seed, columns, scale, device)
    except BaseException:
        bar.leave = False                  # a failed run clears its bar: the error is the one line left
        raise
    finally:
        bar.close()


def _show(bar, init, out_path, video, image, tokenizer, decoder, model, size, frames, frame_interval,
          mask_strategy, mask_ratio, seed, columns, scale, device) -> dict:
    """The body of `show`, one progress step per stage."""

    stream = "video" if video else "image"
    # --- the model, from a pretraining checkpoint (train.py's or the released one)
    bar.set_postfix_str("model")
    ck, cfg, vocab = _checkpoint_parts(init)
    preset = model or cfg.get("model") or "base"
    net = bevt.BEVT(bevt.BEVTConfig(swin=swin3d.get_config(preset, drop_path_rate=0.0), vocab_size=vocab))
    report = net.load_released(ck)
    # The other stream's patch embedding and decoder may be missing; everything else is needed
    # (a Video Swin classifier, say, has no decoders, mask token or token head).
    other = ("encoder.patch_embed_2d.", "image_decoder.") if video else ("encoder.patch_embed.", "video_decoder.")
    needed = [k for k in report.missing if not k.startswith(other)]
    if needed:
        raise ValueError(f"--init {init} does not hold the {stream} stream of a BEVT pretraining model: "
                         f"{len(needed)} keys missing, e.g. {needed[:3]}")
    net.eval().to(device)
    notes = []
    untrained = {("video", "image"): "an image-stage (BEVT-I)", ("image", "video"): "a video-stage (BEVT-V)"}
    if (stream, cfg.get("stage")) in untrained:           # that stage froze this stream's own parts at their init
        notes.append(f"{untrained[stream, cfg.get('stage')]} checkpoint: its {stream} patch embedding and decoder "
                     f"were never trained")
    bar.update()

    # --- settings: flags, else the checkpoint's config, else the paper's
    size = size or int(cfg.get("crop") or 224)
    T = (frames or int(cfg.get("frames") or 16)) if video else 1
    interval = frame_interval or int(cfg.get("frame_interval") or 8)
    strategy = mask_strategy or ((cfg.get("mask_strategy") or "tube") if video else "block")
    ratio = mask_ratio or float(cfg.get("mask_ratio") or 0.5)
    pt = net.config.swin.patch_size[0]
    if size % tokenizer_mod.PATCH:
        raise ValueError(f"--crop: expected a multiple of {tokenizer_mod.PATCH} (one code per 16x16 px), got {size}")
    if video and (T < pt or T % pt):
        raise ValueError(f"--frames: expected a positive multiple of the temporal patch {pt}, got {T}")
    tok_path = tokenizer or cfg.get("tokenizer") or ""
    if not tok_path and cfg.get("preset") == "cpu":               # train.py's CPU preset fits one on first use
        tok_path = os.path.join(cfg.get("data") or "data/synthetic", f"tokenizer_{cfg.get('vocab_size')}.pt")
    if not tok_path:
        raise ValueError(f"--tokenizer: expected the tokenizer the model was trained with (encoder.pkl, its "
                         f"converted .pt or an offline tokenizer file); {init} names none")
    tok = tokenizer_mod.load_tokenizer(tok_path, device=device)
    tokenizer_mod.check_vocab(tok, vocab)
    if isinstance(tok, tokenizer_mod.OfflineTokenizer):
        decode, decoded_by = (lambda codes: decoders.decode_offline(tok, codes)), "the offline tokenizer's codebook"
    else:
        if not decoder:
            raise ValueError(f"--decoder: a {tok.kind} tokenizer decodes codes through its dVAE decoder; expected "
                             f"--decoder decoder.pkl (or its converted .pt), got none")
        dec = decoders.load_dalle_decoder(decoder, device=device)
        if dec.vocab_size != tok.vocab_size:
            raise ValueError(f"--decoder {decoder} has {dec.vocab_size} codes, the tokenizer {tok.vocab_size}")
        decode, decoded_by = dec.decode_half, "the DALL-E decoder"

    # --- the input, its target codes and a mask
    bar.set_postfix_str("read")
    x, frame_idx = _read_crop(video, image, size, T, interval)              # (T, 3, S, S) uint8
    bar.update()
    bar.set_postfix_str("tokenize")
    half = data.to_uint8(tokenizer_mod.half_copy(data.to_float(x), tok.resample))   # (T, 3, S/2, S/2), as data.py ships it
    codes = tok.codes_of_copy(half.to(device)).cpu()                      # (T, h, w) int64
    gen = masking.MaskGenerator(strategy, (T, size, size) if video else (size, size), mask_ratio=ratio,
                                temporal_patch=pt, seed=seed)
    inp = torch.from_numpy(gen()[0])                                      # (T/2, h, w) | (h, w) bool
    bar.update()

    # --- predictions: the head at every cell (the loss only reads the masked ones)
    bar.set_postfix_str("predict")
    with torch.no_grad():
        if video:
            pixels = data.normalize_batch(x.transpose(0, 1)[None].to(device))     # (1, 3, T, S, S)
            feats = net.features(pixels, inp[None].to(device))[:, :T]             # (1, T, h, w, 8C)
            masked = masking.target_mask(inp[None], T, pt)[0]                             # (T, h, w)
        else:
            pixels = data.normalize_batch(x.to(device))                           # (1, 3, S, S)
            feats = net.features(pixels, inp[None].to(device))                    # (1, h, w, 8C)
            masked = inp[None]                                                    # (1, h, w)
        pred = net.head(feats).argmax(-1).reshape(codes.shape).cpu()              # (T, h, w) int64
    right = (pred == codes) & masked
    n_masked, n_right = int(masked.sum()), int(right.sum())
    bar.update()

    # --- codes back to pixels: targets, and predictions at the masked cells
    bar.set_postfix_str("decode")
    mixed = torch.where(masked, pred, codes)                                     # (T, h, w)
    with torch.no_grad():
        dec_target = torch.cat([decode(codes[i:i + 4].to(device)).cpu() for i in range(0, T, 4)])   # (T, 3, S/2, S/2)
        dec_pred = torch.cat([decode(mixed[i:i + 4].to(device)).cpu() for i in range(0, T, 4)])
    bar.update()

    # --- the picture
    bar.set_postfix_str("draw")
    shown = sorted(set(np.linspace(0, T - 1, min(columns, T)).round().astype(int).tolist()))
    scale = scale or max(1, round(200 / size))
    def short(path):                                                   # parent/name
        return os.path.join(*os.path.normpath(path).split(os.sep)[-2:])
    title = f"BEVT predictions: {short(init)} on {short(video or image)}"
    acc = n_right / max(n_masked, 1)
    sub = (f"{tok.kind} tokenizer ({tok.vocab_size} codes), decoded by {decoded_by}; {strategy} mask, ratio "
           f"{ratio:g}, seed {seed}: masked-token accuracy {n_right}/{n_masked} = {100 * acc:.1f}% over "
           + (f"all {T} frames" if video else "the image"))
    img, tiles = _draw_show(title, [sub] + notes, x, masked, codes, pred, dec_target, dec_pred, shown,
                            [f"frame {frame_idx[t]}" + ("" if masked[t].any() else " (no mask)") for t in shown]
                            if video else ["image"], scale,
                            code_colours(tok.vocab_size))
    tmp = os.path.join(os.path.dirname(out_path), f".{os.path.basename(out_path)}.tmp-{os.getpid()}")
    try:
        img.save(tmp, format="PNG", optimize=True)
        os.replace(tmp, out_path)                       # never a half-written picture under --out-file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    bar.update()
    return {"out": out_path, "stream": stream, "rows": [r[0] for r in SHOW_ROWS], "shown": shown,
            "frame_index": frame_idx, "tiles": tiles, "scale": scale, "size": size, "cell_px": 16 * scale,
            "codes": codes, "pred": pred, "masked": masked, "input_mask": inp, "pixels": x,
            "decoded_target": dec_target, "decoded_predicted": dec_pred, "masked_count": n_masked,
            "correct": n_right, "accuracy": acc, "notes": notes, "load_report": report, "tokenizer": tok_path}


def _draw_show(title, lines, x, masked, codes, pred, dec_target, dec_pred, shown, col_names, scale, palette):
    """The PIL picture: header, column names, one row per SHOW_ROWS entry; returns (image, tile boxes).

    x (T, 3, S, S) uint8; masked, codes, pred (T, h, w); dec_* (T, 3, S/2, S/2) in [0, 1].
    Tiles are S·scale px square, every tokenizer cell 16·scale px: all upscaling
    is nearest-neighbour by whole factors, so every drawn pixel is a pixel of
    the input (or of a decoded image) repeated.
    """
    from PIL import Image, ImageDraw
    S = x.shape[-1]
    F_, cell = S * scale, 16 * scale
    h, w = codes.shape[-2:]
    M, G, LW = 14, 8, 210                                      # margin, gap between tiles, label column
    f_title, f_text, f_small = _show_font(18, True), _show_font(13), _show_font(12)
    f_code = _show_font(max(8, int(cell * 0.34)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(s, font):
        x0, _, x1, _ = probe.textbbox((0, 0), s, font=font)
        return x1 - x0

    legend = ("masked cell, predicted code = target", "masked cell, predicted code != target (colours: one per code)")
    legend_w = 24 + text_w(legend[0], f_small) + 24 + 24 + text_w(legend[1], f_small)
    width = max(M + LW + len(shown) * (F_ + G) - G + M, 2 * M + legend_w, 2 * M + text_w(title, f_title))
    # Wrap the header lines to the picture width, word by word.
    wrapped = []
    for line in lines:
        cur = ""
        for word in line.split(" "):
            cand = f"{cur} {word}".strip()
            if cur and text_w(cand, f_text) > width - 2 * M:
                wrapped.append(cur)
                cur = word
            else:
                cur = cand
        wrapped.append(cur)
    header = M + 26 + 18 * len(wrapped) + 8
    top = header + 22                                          # below the column names
    height = top + len(SHOW_ROWS) * (F_ + G) - G + 34 + M      # + the legend line
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((M, M), title, font=f_title, fill=(20, 20, 20))
    for i, line in enumerate(wrapped):
        draw.text((M, M + 28 + 18 * i), line, font=f_text, fill=(60, 60, 60))

    def up(a: np.ndarray, k: int) -> np.ndarray:               # (H, W, 3) -> nearest upscale by k
        return a.repeat(k, 0).repeat(k, 1)

    def frame_rgb(t):                                          # (S·scale, S·scale, 3) uint8
        return up(x[t].permute(1, 2, 0).numpy(), scale)

    def decoded_rgb(d, t):                                     # half-size [0, 1] -> (S·scale, S·scale, 3)
        a = (d[t].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return up(a, 2 * scale)

    def code_map(c, t, mark):
        """One colour per code; cells outside the mask faded towards white; numbers where they fit."""
        rgb = palette[c[t].numpy()]                                        # (h, w, 3)
        faded = (0.3 * rgb + 0.7 * 255).round().astype(np.uint8)
        rgb = np.where(masked[t].numpy()[..., None], rgb, faded)
        tile = Image.fromarray(up(rgb, cell))
        d = ImageDraw.Draw(tile)
        for i in range(h):
            for j in range(w):
                s = str(int(c[t, i, j]))
                if text_w(s, f_code) <= cell - 4:
                    r, g, b = (int(v) for v in rgb[i, j])
                    ink = (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)
                    bx = d.textbbox((0, 0), s, font=f_code)
                    d.text((j * cell + (cell - (bx[2] - bx[0])) / 2 - bx[0],
                            i * cell + (cell - (bx[3] - bx[1])) / 2 - bx[1]), s, font=f_code, fill=ink)
        if mark:
            frame_cells(d, t, strike=True)
        else:                                                  # targets: outline the masked cells
            for i, j in masked[t].nonzero().tolist():
                d.rectangle([j * cell, i * cell, j * cell + cell - 1, i * cell + cell - 1], outline=(70, 70, 70))
        return tile

    def frame_cells(d, t, strike=False):
        """Green frame on masked cells predicted right, red frame (and a stroke) on the wrong ones."""
        bw = max(2, cell // 10)
        for i, j in masked[t].nonzero().tolist():
            ok = bool(pred[t, i, j] == codes[t, i, j])
            x0, y0 = j * cell, i * cell
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline=RIGHT if ok else WRONG, width=bw)
            if strike and not ok:
                d.line([x0 + bw, y0 + bw, x0 + cell - 1 - bw, y0 + cell - 1 - bw], fill=WRONG, width=max(1, bw // 2))

    tiles = {}
    for c, (t, name) in enumerate(zip(shown, col_names)):
        x0 = M + LW + c * (F_ + G)
        draw.text((x0 + (F_ - text_w(name, f_text)) / 2, header), name, font=f_text, fill=(40, 40, 40))
        inp = frame_rgb(t)
        grey = np.where(up(masked[t].numpy(), cell)[..., None], np.array(MASK_GREY, np.uint8), inp)
        for r, (key, _, _) in enumerate(SHOW_ROWS):
            y0 = top + r * (F_ + G)
            if key == "input":
                tile = Image.fromarray(inp)
            elif key == "masked":
                tile = Image.fromarray(grey)
            elif key in ("target", "predicted"):
                tile = code_map(codes if key == "target" else pred, t, mark=key == "predicted")
            else:
                tile = Image.fromarray(decoded_rgb(dec_target if key == "decoded_target" else dec_pred, t))
                if key == "decoded_predicted":
                    frame_cells(ImageDraw.Draw(tile), t)
            img.paste(tile, (x0, y0))
            tiles[key, c] = (x0, y0, x0 + F_, y0 + F_)
    for r, (_, label, note) in enumerate(SHOW_ROWS):
        y_mid = top + r * (F_ + G) + F_ / 2
        draw.text((M, y_mid - 17), label, font=_show_font(14, True), fill=(20, 20, 20))
        draw.text((M, y_mid + 3), note, font=f_small, fill=(90, 90, 90))
    # Legend: what the frames mean.
    y = height - M - 20
    draw.rectangle([M, y, M + 16, y + 16], outline=RIGHT, width=3)
    draw.text((M + 24, y + 1), legend[0], font=f_small, fill=(40, 40, 40))
    x1 = M + 24 + text_w(legend[0], f_small) + 24
    draw.rectangle([x1, y, x1 + 16, y + 16], outline=WRONG, width=3)
    draw.line([x1 + 3, y + 3, x1 + 13, y + 13], fill=WRONG, width=2)
    draw.text((x1 + 24, y + 1), legend[1], font=f_small, fill=(40, 40, 40))
    return img, tiles


def build_parser() -> argparse.ArgumentParser:
    s = argparse.ArgumentParser(prog=PROG, description="Mask a video clip (tube mask) or an image (blockwise mask), "
                                "run a pretrained BEVT and draw, for a few frames: the input, the masked input, the "
                                "target and predicted code maps (each masked cell marked right or wrong), and both "
                                "decoded back to pixels.")
    s.add_argument("--init", required=True, metavar="CKPT", help="a BEVT pretraining checkpoint: train.py's "
                   "final.pt / ckpt.pt (its config supplies the defaults below) or the released one")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", metavar="FILE", help="a video file (any container FFmpeg reads)")
    src.add_argument("--image", metavar="FILE", help="an image file (png, jpg, ...): the image stream")
    s.add_argument("--out-file", required=True, metavar="PNG", help="the picture to write (atomically)")
    s.add_argument("--tokenizer", default="", metavar="FILE", help="the tokenizer the model was trained with "
                   "(default: the checkpoint's; for the CPU preset <data>/tokenizer_<vocab>.pt)")
    s.add_argument("--decoder", default="", metavar="FILE", help="DALL-E only: decoder.pkl or its converted .pt "
                   "(python tools/tokenizer_tool.py convert ...), to draw codes as pixels")
    s.add_argument("--model", default="", choices=("",) + tuple(swin3d.PRESETS),
                   help="Swin preset (default: the checkpoint's, else base)")
    s.add_argument("--crop", type=int, default=0, help="crop size in px, a multiple of 16 (default: the checkpoint's "
                   "crop, else 224)")
    s.add_argument("--frames", type=int, default=0, help="clip length T (default: the checkpoint's, else 16)")
    s.add_argument("--frame-interval", type=int, default=0, help="frame step (default: the checkpoint's, else 8)")
    s.add_argument("--mask-strategy", default="", help="masking.py strategy (default: the checkpoint's, else tube; "
                   "images: block)")
    s.add_argument("--mask-ratio", type=float, default=0.0, help="mask ratio in (0, 1) (default: the "
                   "checkpoint's, else 0.5)")
    s.add_argument("--seed", type=int, default=0, help="seed of the mask")
    s.add_argument("--columns", type=int, default=4, help="frames shown, spread over the clip (default 4)")
    s.add_argument("--scale", type=int, default=0, help="display px per input px (default: about 200 px per frame)")
    s.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    return s


def main(argv=None) -> dict:
    """`python tools/show.py ...`; user errors end in one line naming what was expected and what came, exit 2."""
    ap = build_parser()
    a = ap.parse_args(argv)
    for name in ("crop", "frames", "frame_interval", "scale"):
        if getattr(a, name) < 0:
            ap.error(f"--{name.replace('_', '-')}: expected a positive integer (0 = default), got {getattr(a, name)}")
    if a.columns < 1:
        ap.error(f"--columns: expected an integer >= 1, got {a.columns}")
    if not 0.0 <= a.mask_ratio < 1.0:
        ap.error(f"--mask-ratio: expected a number in (0, 1) (0 = default), got {a.mask_ratio}")
    record = train.run_cli(PROG, _show_cli, a)
    print(f"wrote {a.out_file}: {len(record['shown'])} {'frames' if record['stream'] == 'video' else 'image'} x "
          f"{len(record['rows'])} rows; masked-token accuracy {record['correct']}/{record['masked_count']} = "
          f"{100 * record['accuracy']:.1f}%" + "".join(f"\nnote: {n}" for n in record["notes"]))
    return record


def _show_cli(a) -> dict:
    try:
        return show(a.init, a.out_file, video=a.video, image=a.image, tokenizer=a.tokenizer, decoder=a.decoder,
                    model=a.model, size=a.crop, frames=a.frames, frame_interval=a.frame_interval,
                    mask_strategy=a.mask_strategy, mask_ratio=a.mask_ratio, seed=a.seed, columns=a.columns,
                    scale=a.scale, device=a.device)
    except data.BadMedia as e:                        # an unreadable video or image: a user error too
        raise ValueError(str(e)) from None


if __name__ == "__main__":
    main()
