"""Benchmark of the data pipeline (data.py): pretraining clips per second, decoded and augmented.

    python tools/bench_data.py                     # both sources, 0 / 1 / 2 workers
    python tools/bench_data.py --clips 24 --data data/synthetic

Two sources of 16-frame pretraining clips (PretrainClipTransform: rescale,
crop, flip, Lanczos half-size tokenizer copy, normalise, tube mask):

1. the synthetic set (`python tools/synthetic.py`, generated into --data if
   missing): 128x160 H.264, 32 frames, keyframe every 16; CPU-demo recipe
   16 frames x interval 2, short side [128, 160], 112-px crops;
2. a Kinetics-like file written here: 256x340 (256-px short side, as the
   released K400 re-encodes), 300 frames at 30 fps, x264 defaults (keyframe
   every 250 frames, B-frames); the paper recipe 16 frames x interval 8,
   short side [256, 320], 224-px crops.

For each, clips/s through the training loader (`build_pretrain_loader`:
EpochLoader with its global batch sampler, batches of 4, collate) with 0, 1
and 2 DataLoader workers, within one epoch; the first batch (worker start-up,
which persistent workers pay once per loader, not once per epoch) is not
timed; 0 workers runs in the main process with torch's default intra-op
threads (all cores), and once more with one thread. Then where one clip's time goes, in this process: decode (seek +
decode + RGB conversion of the needed frames), rescale + crop (uint8), float
conversion + flip, the tokenizer copy (tokenizer.lanczos_resize), normalise,
tube mask; medians over the clips, torch threads as DataLoader workers use (1).
The machine's load average is printed first: other processes on these 2 cores
change the numbers.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import data  # noqa: E402
from tools import synthetic  # noqa: E402
import tokenizer  # noqa: E402
from masking import MaskGenerator  # noqa: E402

BATCH = 4
KINETICS_SIZE = (256, 340)       # H, W of a 256-px-short-side Kinetics re-encode
KINETICS_FRAMES, KINETICS_FPS = 300, 30   # a 10-s clip


def kinetics_like(path: Path) -> None:
    """A 256x340, 300-frame H.264 mp4 with x264's default GOP: the synthetic scene at that size."""
    p = synthetic._syn_params(0, "train", 0, *KINETICS_SIZE)
    frames = synthetic.render_synthetic(p, range(KINETICS_FRAMES), *KINETICS_SIZE)
    synthetic.write_video(path, frames, fps=KINETICS_FPS, gop=250, options={"crf": "23", "preset": "medium"})


def sources(root: Path, tmp: Path) -> list:
    kin = tmp / "kinetics_like.mp4"
    kinetics_like(kin)
    (tmp / "kinetics.txt").write_text("".join(f"kinetics_like.mp4 {i}\n" for i in range(64)))
    return [
        ("synthetic 128x160, 16x2, crop 112", root / "videos/train_appearance.txt", root / "videos",
         dict(frames=16, interval=2, crop=112, short_side=(128, 160))),
        ("256-px mp4, 16x8, crop 224 (paper)", tmp / "kinetics.txt", tmp,
         dict(frames=16, interval=8, crop=224, short_side=(256, 320))),
    ]


def clips_per_second(ann, root, recipe, workers, clips, threads=None) -> float:
    torch.set_num_threads(threads or os.cpu_count())
    cfg = data.PretrainDataConfig(**recipe, video_batch=BATCH, num_workers=workers)
    loader = data.build_pretrain_loader("video", cfg, video_ann=ann, video_root=root, verbose=False)
    loader.set_epoch(0)
    it = iter(loader)
    next(it)                                                    # worker start-up, not timed
    n, t = 0, time.perf_counter()
    for batch in it:
        n += batch["video"].shape[0]
        if n >= clips:
            break
    return n / (time.perf_counter() - t)


def breakdown(ann, root, recipe, clips) -> dict:
    """Median ms per clip of each stage, run by hand in this process."""
    torch.set_num_threads(1)                                    # as in a DataLoader worker
    samples = data.read_annotations(ann, root)
    sampling = data.FrameSampling(recipe["frames"], recipe["interval"])
    gen = MaskGenerator("tube", (recipe["frames"], recipe["crop"], recipe["crop"]), seed=0)
    crop, lo, hi = recipe["crop"], *recipe["short_side"]
    times = {k: [] for k in ("decode", "rescale+crop", "flip+float", "tokenizer copy", "normalise", "mask")}
    for i in range(clips):
        t0 = time.perf_counter()
        frames, _, _ = data.read_video(samples[i % len(samples)][0], sampling, threads=1)
        t1 = time.perf_counter()
        x = data.frames_to_tensor(frames[0])
        size = data.short_side_size(*x.shape[-2:], data._randint(lo, hi))
        x = data.resize(x, size, "bicubic")
        top, left = data.random_crop_box(*size, crop)
        x = x[..., top:top + crop, left:left + crop]
        t2 = time.perf_counter()
        x = data.to_float(x.flip(-1))
        t3 = time.perf_counter()
        tokenizer.half_copy(x)
        t4 = time.perf_counter()
        data.normalize(x, channels_first=True)
        t5 = time.perf_counter()
        gen()
        t6 = time.perf_counter()
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            times[k].append(dt * 1e3)
    torch.set_num_threads(os.cpu_count())
    return {k: statistics.median(v) for k, v in times.items()}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/synthetic", help="synthetic set (generated here if missing)")
    ap.add_argument("--clips", type=int, default=32, help="clips timed per case")
    return ap


def main():
    args = build_parser().parse_args()
    print(f"CPU: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}; "
          f"batches of {BATCH}; decoder threads per process = cores // workers")
    root = synthetic.make_synthetic_set(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        for name, ann, vroot, recipe in sources(root, Path(tmp)):
            rates = [clips_per_second(ann, vroot, recipe, w, args.clips) for w in (0, 1, 2)]
            single = clips_per_second(ann, vroot, recipe, 0, args.clips, threads=1)
            print(f"\n{name}: clips/s with 0 / 1 / 2 workers: " + " / ".join(f"{r:.1f}" for r in rates)
                  + f"  (0 workers, torch.set_num_threads(1): {single:.1f})")
            ms = breakdown(ann, vroot, recipe, max(8, args.clips // 2))
            total = sum(ms.values())
            print("  per clip, 1 thread: " + ", ".join(f"{k} {v:.1f} ms ({100 * v / total:.0f}%)"
                                                        for k, v in ms.items()) + f"; total {total:.1f} ms")


if __name__ == "__main__":
    main()
