"""The embedded synthetic data set and its offline tokenizer (prepared before the CPU demo).

A small real data set (H.264 mp4 videos, PNG/JPEG images) whose labels need
appearance only or need time: the CPU stand-in for Kinetics vs
Something-Something in the paper's Table 2. It is read by data.py's loaders
exactly as a real data set is.

    python tools/synthetic.py                  # data/synthetic, with tokenizer_256.pt
    python tools/synthetic.py --out DIR --seed 0 [--train 200 --val 60 ...]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files

import av                 # noqa: E402
import numpy as np        # noqa: E402
from PIL import Image     # noqa: E402
from tqdm import tqdm     # noqa: E402

import data               # noqa: E402
import train              # noqa: E402

from tools.tokenizer_tool import fit_from_dir   # noqa: E402

# -----------------------------------------------------------------------------
# The scenes: appearance labels vs labels that need time
#
# Each video is a smooth, weakly tinted grey texture with one saturated object
# (3 shapes x 6 colours). The whole scene drifts right or left: the
# background pans at 1-2 px per frame and the object moves, faster (2-3.5 px
# per frame), the same way. Both live on a torus (the texture is periodic and
# the object wraps around the edges). Every video carries two labels,
# independent of each other:
#   appearance (6 classes, the object's colour, drawn at random; its shape is
#     a nuisance): one frame tells it (a K400 stand-in);
#   motion (2 classes, right or left; even-numbered videos move right and odd
#     ones left, so every split is balanced and the majority class is chance):
#     only the order of the frames tells it (an SSv2 stand-in: SSv2 has such
#     pairs, e.g. "pushing something from left to right" and "... from right
#     to left"). One frame cannot, because the start position of the object
#     and the texture phase are uniform, so at every time step a frame has the
#     same law whatever the direction; and a shuffled clip moving right has
#     the same law as a shuffled clip moving left, so shuffling destroys the
#     label completely (paper Table 2). Flipping a clip left-right swaps the
#     two classes: use flip=0 for motion labels, as SSv2 does.
# Images are single frames of the same kind of scene, in a folder tree by
# appearance class, for the image stream and for fitting the offline tokenizer.
#
# Why these sizes (version 2): with a 10-15 px object, 3 shapes x 2 colours
# as the appearance classes and a static background (version 1), the CPU
# Swin from scratch had learnt only the colour after 500 finetuning steps and
# nothing of the direction after 600 (its one moving object covered ~2% of
# the tokens). Colour on a 18-26 px object, and a drift every token sees, are
# learnt in a few hundred steps (README, "Finetuning"), which the 10-minute
# CPU demo can afford.
# Why two directions (version 3): version 2 had four (right, left, down, up).
# A shuffled clip still shows its axis (the frames' positions spread along x
# or along y), so shuffled frames told "right or left" from "down or up" and a
# model could score 50% on them with no temporal order at all (seeds of the
# demo gave 33-45% against a 25% chance). Any set of straight motions has that
# leak unless all of them share one axis; with one axis, the only classes that
# shuffling cannot separate are a motion and its reverse.
#
# Version 4 (issue "make the paper's motion claims testable"; docs/motion.md): the
# background stands still and three objects of the class colour move, each at
# its own speed, all in the direction of the motion label. In version 3 the
# whole picture pans, so copying a masked token from the neighbouring frame
# (the shortcut Random-3D masking allows and tube masking forbids) needs the
# direction of motion, i.e. the label. In version 4, as in real video, that copy
# works without any motion almost everywhere (the still background), and only
# the moving objects' tokens need it. Single frames and shuffled frames stay at
# chance by the same argument as above (uniform start positions on the torus;
# the frames of a clip moving right, as a set, have the law of a clip moving left).
SYNTHETIC_VERSION = 3                 # the default set (the CPU demo's); --version 4 writes the other
VERSIONS = (3, 4)
V4_OBJECTS = 3                        # moving objects per video in version 4
V4_RADIUS_FRAC = (0.10, 0.14)         # their radius as a fraction of the frame height (13-18 px at 128)
SYN_FRAMES = 32                       # frames per video (2 s at 16 fps)
SYN_HEIGHT, SYN_WIDTH = 128, 160      # short side 128: the CPU demo rescales to [128, 160] and crops 112
SYN_FPS = 16
SYN_GOP = 16                          # a keyframe every 16 frames, so seeking has something to do
SYN_CRF = 26                          # x264 quality: ~10 KB per video
# One thread and no assembly: with either, this x264 build (PyAV's) wrote different bytes for the
# same frames in about 1 run in 20 (measured); without both, 0 in 400. Encoding costs ~50% more
# (48 vs 31 ms per 32-frame video), and the data set is byte-reproducible from its seed.
SYN_X264 = {"crf": str(SYN_CRF), "preset": "veryfast", "threads": "1", "x264-params": "asm=0"}
SYN_TRAIN, SYN_VAL = 200, 60          # videos per split (each video is listed in both label sets)
SYN_IMAGES_TRAIN, SYN_IMAGES_VAL = 80, 10     # images per appearance class
SYN_PNG_EVERY = 8                     # every 8th image is PNG, the rest JPEG (quality 90)
SHAPES = ("circle", "square", "triangle")
COLOURS = {"blue": (40, 80, 225), "cyan": (40, 205, 220), "green": (40, 185, 60),
           "magenta": (215, 50, 200), "red": (220, 45, 40), "yellow": (235, 210, 40)}   # saturation >= 145
APPEARANCE_CLASSES = tuple(sorted(COLOURS))                                          # sorted = label order
MOTION_CLASSES = ("right", "left")
MOTION_VECTORS = {"right": (1, 0), "left": (-1, 0)}                 # (dx, dy) per unit of speed
RADIUS_FRAC = (0.14, 0.20)            # object radius as a fraction of the frame height (18-26 px at 128)
SPEED_FRAC = (0.0125, 0.022)          # object: pixels per frame as a fraction of the width (2-3.5 px at 160)
PAN_FRAC = (0.006, 0.0125)            # background: pixels per frame as a fraction of the width (1-2 px at 160)
DONE_NAME = "DONE"


def _syn_params(seed: int, split: str, k: int, height: int, width: int, version: int = SYNTHETIC_VERSION) -> dict:
    """The random draws of one video: its own stream, so sizes never change other videos.
    Version 4 draws its still background's and extra objects' parameters after version 3's."""
    rng = np.random.default_rng([seed, {"train": 0, "val": 1, "img-train": 2, "img-val": 3}[split], k])
    p = {
        "shape": int(rng.integers(len(SHAPES))), "colour": int(rng.integers(len(COLOURS))),
        "direction": k % len(MOTION_CLASSES),                           # balanced splits
        "radius": rng.uniform(*RADIUS_FRAC) * height, "speed": rng.uniform(*SPEED_FRAC) * width,
        "pan": rng.uniform(*PAN_FRAC) * width,
        "x0": rng.uniform(0, width), "y0": rng.uniform(0, height),
        "colour_jitter": rng.normal(0, 12, 3), "bg_seed": int(rng.integers(2 ** 31)),
    }
    if version == 4:                      # a still background; V4_OBJECTS objects, each its own shape, size, speed
        p["pan"] = 0.0
        p["objects"] = [{"shape": int(rng.integers(len(SHAPES))), "radius": rng.uniform(*V4_RADIUS_FRAC) * height,
                         "speed": rng.uniform(*SPEED_FRAC) * width, "x0": rng.uniform(0, width),
                         "y0": rng.uniform(0, height), "colour_jitter": rng.normal(0, 12, 3)}
                        for _ in range(V4_OBJECTS)]
    return p


def _periodic_noise(rng: np.random.Generator, height: int, width: int, sigma: float) -> np.ndarray:
    """(H, W) smooth noise that tiles the torus: white noise low-passed with a Gaussian of
    `sigma` px in the Fourier domain, scaled to unit standard deviation."""
    fy = np.fft.fftfreq(height)[:, None]                         # cycles per pixel, (H, 1)
    fx = np.fft.rfftfreq(width)[None, :]                         # (1, W//2+1)
    spectrum = np.fft.rfft2(rng.standard_normal((height, width)))
    z = np.fft.irfft2(spectrum * np.exp(-2 * (np.pi * sigma) ** 2 * (fx ** 2 + fy ** 2)), s=(height, width))
    return z / max(z.std(), 1e-8)


def _syn_background(seed: int, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float64: a smooth grey texture with a weak tint (low saturation, so the object
    stands out), periodic in both axes so that it can pan forever. Not yet clipped to [0, 255].

    Numpy only: torch's OpenMP threads would spin between calls and steal the
    two cores from the x264 encoder threads.
    """
    rng = np.random.default_rng(seed)
    base = rng.uniform(70, 180)                                  # mean grey level
    lum = base + 28 * _periodic_noise(rng, height, width, 8.0) + 8 * _periodic_noise(rng, height, width, 2.0)
    tint = 10 * rng.standard_normal(3) + 6 * np.stack([_periodic_noise(rng, height, width, 16.0) for _ in range(3)], -1)
    return lum[..., None] + tint


def _pan(background: np.ndarray, shifts) -> np.ndarray:
    """background (H, W, 3) periodic -> (n, H, W, 3): copies translated by (dx, dy) px each
    (sub-pixel, exact on the torus: a phase ramp in the Fourier domain), clipped to [0, 255]."""
    H, W = background.shape[:2]
    fy = np.fft.fftfreq(H)[:, None, None]                        # (H, 1, 1)
    fx = np.fft.rfftfreq(W)[None, :, None]                       # (1, W//2+1, 1)
    spectrum = np.fft.rfft2(background, axes=(0, 1))             # (H, W//2+1, 3)
    d = np.asarray(shifts, np.float64).reshape(-1, 2)[:, :, None, None, None]   # (n, 2, 1, 1, 1)
    ramp = np.exp(-2j * np.pi * (fx * d[:, 0] + fy * d[:, 1]))   # (n, H, W//2+1, 1)
    return np.clip(np.fft.irfft2(spectrum * ramp, s=(H, W), axes=(1, 2)), 0, 255)


def render_synthetic(p: dict, times, height: int, width: int) -> np.ndarray:
    """Frames at `times` of the video with parameters p -> (len(times), H, W, 3) uint8.

    Frame t: the background translated by pan·t and each object centred at
    (x0, y0) + speed·t, all along the video's direction (version 3: one object,
    p's own; version 4: p["objects"] on a still background); rendering any
    subset of times gives the same frames as rendering them all.
    """
    dx, dy = MOTION_VECTORS[MOTION_CLASSES[p["direction"]]]
    img = _pan(_syn_background(p["bg_seed"], height, width),
               [(dx * p["pan"] * t, dy * p["pan"] * t) for t in times]).astype(np.float32)   # (n, H, W, 3)
    t = np.asarray(times, np.float32)[:, None, None]             # (n, 1, 1)
    colour = np.array(COLOURS[APPEARANCE_CLASSES[p["colour"]]])
    for o in p.get("objects", [p]):                              # painted in order, later ones on top
        alpha = _object_alpha(o, t, (dx, dy), height, width)     # (n, H, W, 1)
        img = img + alpha * ((colour + o["colour_jitter"]).astype(np.float32) - img)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _object_alpha(o: dict, t: np.ndarray, direction, height: int, width: int) -> np.ndarray:
    """Coverage (n, H, W, 1) in [0, 1] of object `o` (shape, radius, speed, x0, y0) at times t (n, 1, 1)."""
    cx = o["x0"] + direction[0] * o["speed"] * t                 # object centre at each time
    cy = o["y0"] + direction[1] * o["speed"] * t
    xs = np.arange(width, dtype=np.float32)[None, None, :] + 0.5     # pixel centres, (1, 1, W)
    ys = np.arange(height, dtype=np.float32)[None, :, None] + 0.5    # (1, H, 1)
    # Offsets to the centre on the torus (the object wraps around the edges);
    # separable, (n, 1, W) and (n, H, 1), broadcast to (n, H, W) only below.
    ox = (xs - cx + width / 2) % width - width / 2
    oy = (ys - cy + height / 2) % height - height / 2
    r = o["radius"]
    shape = SHAPES[o["shape"]]
    if shape == "circle":                                        # signed distance to the outline, px
        sd = np.sqrt(ox ** 2 + oy ** 2) - r
    elif shape == "square":                                      # same area as the circle: side r*sqrt(pi)
        half = r * math.sqrt(math.pi) / 2
        sd = np.maximum(np.abs(ox), np.abs(oy)) - half
    else:                                                        # equilateral, apex up, circumradius 1.3 r
        R = 1.3 * r
        c30 = math.cos(math.pi / 6)
        sd = np.maximum(np.maximum(oy, -c30 * ox - 0.5 * oy), c30 * ox - 0.5 * oy) - R / 2
    return np.clip(0.5 - sd, 0.0, 1.0)[..., None]                # 1-px antialiased edge


def write_video(path: data.PathLike, frames: np.ndarray, fps: int = SYN_FPS, codec: str = "libx264",
                gop: int = SYN_GOP, options: Optional[dict] = None) -> None:
    """(T, H, W, 3) uint8 RGB -> a yuv420p video file with PyAV (H.264 mp4, VP9 webm, ...).

    Every frame gets its pts (frame number, time base 1/fps), so the encoder
    never sees undefined timestamps.
    """
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=dict(options or {}))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.time_base = Fraction(1, fps)
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():                              # flush the encoder
            container.mux(packet)


def make_synthetic(out: data.PathLike, seed: int = 0, n_train: int = SYN_TRAIN, n_val: int = SYN_VAL,
                   images_train: int = SYN_IMAGES_TRAIN, images_val: int = SYN_IMAGES_VAL,
                   frames: int = SYN_FRAMES, height: int = SYN_HEIGHT, width: int = SYN_WIDTH,
                   verbose: bool = False, version: int = SYNTHETIC_VERSION) -> Path:
    """Write the synthetic data set into `out` (which must not hold one yet); DONE last.

    Layout (paths in the lists are relative to videos/ and images/):
        videos/{train,val}/NNNNNN.mp4
        videos/{train,val}_{appearance,motion}.txt, videos/classes_{appearance,motion}.txt
        images/{train,val}/<appearance class>/NNNNN.{png,jpg}, images/{train,val}_list.txt
        info.json, DONE
    Deterministic: the same arguments give byte-identical files.
    """
    out = Path(out)
    if (out / DONE_NAME).exists():
        raise FileExistsError(f"{out} already holds a synthetic data set")
    (out / "videos").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bar = tqdm(total=n_train + n_val, desc="synthetic videos", unit="video", disable=not verbose, file=sys.stderr,
               leave=False)
    for split, n in (("train", n_train), ("val", n_val)):
        (out / "videos" / split).mkdir(exist_ok=True)
        rows = {"appearance": [], "motion": []}
        for k in range(n):
            p = _syn_params(seed, split, k, height, width, version)
            rel = f"{split}/{k:06d}.mp4"
            write_video(out / "videos" / rel, render_synthetic(p, range(frames), height, width),
                        options=SYN_X264)
            rows["appearance"].append(f"{rel} {p['colour']}")
            rows["motion"].append(f"{rel} {p['direction']}")
            bar.update(1)
        for task, lines in rows.items():
            (out / "videos" / f"{split}_{task}.txt").write_text("\n".join(lines) + "\n")
    bar.close()
    (out / "videos" / "classes_appearance.txt").write_text("\n".join(APPEARANCE_CLASSES) + "\n")
    (out / "videos" / "classes_motion.txt").write_text("\n".join(MOTION_CLASSES) + "\n")
    for split, per_class in (("train", images_train), ("val", images_val)):
        lines = []
        for label, name in enumerate(APPEARANCE_CLASSES):
            (out / "images" / split / name).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                p = _syn_params(seed, f"img-{split}", label * 100_000 + k, height, width, version)
                p["colour"] = label                                     # the class fixes the colour
                t = int(np.random.default_rng([seed, 7, label, k]).integers(frames))
                img = Image.fromarray(render_synthetic(p, [t], height, width)[0])
                ext = "png" if k % SYN_PNG_EVERY == 0 else "jpg"
                rel = f"{split}/{name}/{k:05d}.{ext}"
                if ext == "png":
                    img.save(out / "images" / rel, "PNG")
                else:
                    img.save(out / "images" / rel, "JPEG", quality=90)
                lines.append(f"{rel} {label}")
        (out / "images" / f"{split}_list.txt").write_text("\n".join(lines) + "\n")
    info = {"version": version, "seed": seed, "frames": frames, "height": height, "width": width,
            "fps": SYN_FPS, "videos": {"train": n_train, "val": n_val},
            "images_per_class": {"train": images_train, "val": images_val},
            "classes": {"appearance": list(APPEARANCE_CLASSES), "motion": list(MOTION_CLASSES)},
            "notes": {"appearance": "one frame suffices (K400-like); any recipe",
                      "motion": "needs time (SSv2-like); finetune with flip=0: a flip swaps left/right"}}
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    (out / DONE_NAME).write_text(json.dumps(_syn_key(seed, n_train, n_val, images_train, images_val,
                                                     frames, height, width, version)) + "\n")
    if verbose:
        mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
        print(f"synthetic data set: {n_train}+{n_val} videos, {len(APPEARANCE_CLASSES)}x"
              f"({images_train}+{images_val}) images, {mb:.1f} MB in {time.time() - t0:.1f} s")
    return out


def _syn_key(seed, n_train, n_val, images_train, images_val, frames, height, width,
             version=SYNTHETIC_VERSION) -> dict:
    return {"version": version, "seed": seed, "n_train": n_train, "n_val": n_val,
            "images_train": images_train, "images_val": images_val, "frames": frames,
            "height": height, "width": width}


def make_synthetic_set(root: data.PathLike, seed: int = 0, timeout: float = 900.0, verbose: bool = True,
                     **sizes) -> Path:
    """The synthetic data set at `root`, generated first if it is not there. Safe for concurrent ranks.

    Whoever creates the lock file `.<root>.lock` beside root generates into a
    temporary folder and renames it to root (so a half-written set is never
    seen); everyone else waits for root/DONE. An existing complete set made
    with other arguments is an error (delete it to regenerate); so is a
    non-empty root without DONE (not ours). `sizes`: make_synthetic's size
    arguments (n_train, n_val, images_train, images_val, frames, height, width, version).
    """
    root = Path(root)
    key = _syn_key(seed, *(sizes.get(k, d) for k, d in (
        ("n_train", SYN_TRAIN), ("n_val", SYN_VAL), ("images_train", SYN_IMAGES_TRAIN),
        ("images_val", SYN_IMAGES_VAL), ("frames", SYN_FRAMES), ("height", SYN_HEIGHT), ("width", SYN_WIDTH),
        ("version", SYNTHETIC_VERSION))))
    done = root / DONE_NAME
    lock = data.FileLock(root.parent / f".{root.name}.lock")
    deadline, told = time.time() + timeout, False
    while True:
        if done.exists():
            found = json.loads(done.read_text())
            if found != key:
                raise ValueError(f"{root} holds a synthetic data set made with {found}, not {key}; "
                                 f"delete it to regenerate, or pass another path")
            return root
        if root.exists() and any(root.iterdir()):
            raise FileExistsError(f"{root} exists and is not a complete synthetic data set (no {DONE_NAME}); "
                                  f"delete it or choose another path")
        root.parent.mkdir(parents=True, exist_ok=True)
        busy = lock.acquire()
        if busy is not None:                                     # someone else is generating: wait
            if verbose and not told:
                print(f"waiting for {busy}, which is generating {root} ...", flush=True)
                told = True
            if time.time() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {done} from {busy}")
            time.sleep(0.2)
            continue
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        # We hold the lock, so no generator is alive: any temporary folder is a dead one's.
        for old in root.parent.glob(f".{root.name}.tmp-*"):
            shutil.rmtree(old, ignore_errors=True)
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            if verbose:
                print(f"generating the synthetic data set (seed {seed}) in {root} ...", flush=True)
            make_synthetic(tmp, seed=seed, verbose=verbose, **sizes)
            if root.exists():
                root.rmdir()                                     # empty (checked above)
            os.rename(tmp, root)                                 # atomic: complete or absent
            if verbose:
                print(f"-> {root}", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            lock.release()


# -----------------------------------------------------------------------------
# The set and its offline tokenizer, prepared once

# The offline tokenizer the CPU demo reads: 256 codes fitted on 112-px crops of the training
# images (the cpu preset's crop), 10 k-means iterations over at most 50,000 patches, seed = the set's.
TOKENIZER_VOCAB, TOKENIZER_SIZE = 256, 112


def tokenizer_path(root, vocab: int = TOKENIZER_VOCAB) -> str:
    return os.path.join(str(root), f"tokenizer_{vocab}.pt")


def prepare(root, seed: int = 0, verbose: bool = True, vocab: int = TOKENIZER_VOCAB,
            size: int = TOKENIZER_SIZE, **sizes) -> str:
    """Write the synthetic set at `root` (if not there) and fit its offline tokenizer (if not there)."""
    make_synthetic_set(root, seed=seed, verbose=verbose, **sizes)
    path = tokenizer_path(root, vocab)
    if not os.path.exists(path):
        if verbose:
            print(f"fitting the offline tokenizer ({vocab} codes) on {root}/images/train ...")
        tok = fit_from_dir(os.path.join(str(root), "images", "train"), vocab, size=size, seed=seed,
                           iters=10, max_patches=50_000, verbose=False)
        tok.save(path)
    return str(root)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="synthetic.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/synthetic", help="folder of the set (default data/synthetic)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the set and of the tokenizer's fit (default 0)")
    ap.add_argument("--version", type=int, choices=VERSIONS, default=SYNTHETIC_VERSION,
                    help="3: the whole scene pans (the CPU demo's set); 4: a still background with three "
                         f"moving objects (docs/motion.md) (default {SYNTHETIC_VERSION})")
    ap.add_argument("--train", type=int, default=SYN_TRAIN, help=f"training videos (default {SYN_TRAIN})")
    ap.add_argument("--val", type=int, default=SYN_VAL, help=f"validation videos (default {SYN_VAL})")
    ap.add_argument("--images-train", type=int, default=SYN_IMAGES_TRAIN,
                    help=f"training images per appearance class (default {SYN_IMAGES_TRAIN})")
    ap.add_argument("--images-val", type=int, default=SYN_IMAGES_VAL,
                    help=f"validation images per appearance class (default {SYN_IMAGES_VAL})")
    ap.add_argument("--frames", type=int, default=SYN_FRAMES, help=f"frames per video (default {SYN_FRAMES})")
    ap.add_argument("--height", type=int, default=SYN_HEIGHT, help=f"frame height, px (default {SYN_HEIGHT})")
    ap.add_argument("--width", type=int, default=SYN_WIDTH, help=f"frame width, px (default {SYN_WIDTH})")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    sizes = dict(n_train=args.train, n_val=args.val, images_train=args.images_train, images_val=args.images_val,
                 frames=args.frames, height=args.height, width=args.width, version=args.version)
    train.run_cli("synthetic.py", lambda: prepare(args.out, args.seed, **sizes))


if __name__ == "__main__":
    main()
