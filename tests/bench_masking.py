"""Benchmark of the mask generators (masking.py): time to draw masks on this CPU.

    python tests/bench_masking.py                  # 500 repeats per case
    python tests/bench_masking.py --repeats 100    # quicker

1. The per-GPU batch of the paper recipe (paper §4.1, released config
   `omni_videos_per_gpu=[8, 64]`): 8 clips of 16 frames with tube masks plus
   64 images with blockwise masks, 224 px. Budget (issue #3): < 5 ms in total,
   i.e. masks must never be what a data-loading worker waits for.
2. Every strategy on its own: a batch of 8 clips of 16 x 224 x 224 (64 images
   for "block"), time per batch and per mask (a mask = one clip or one image).

Times are the median over --repeats after a warm-up, one process, one thread
(the generators are pure Python + numpy, single-threaded); p90 shows the noise.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from masking import STRATEGIES, MaskGenerator  # noqa: E402

BUDGET_MS = 5.0          # issue #3: one per-GPU batch of masks in under 5 ms
CLIPS, IMAGES = 8, 64    # per GPU (paper §4.1 table: 8 clips + 64 images)
FRAMES, SIZE = 16, 224   # §4: 16-frame clips, 224 px crops


def timed(fn, repeats, warmup=20):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return statistics.median(ts) * 1e3, ts[int(0.9 * (len(ts) - 1))] * 1e3     # ms


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=500)
    args = ap.parse_args()
    print(f"CPU: {os.cpu_count()} cores; median (p90) over {args.repeats} repeats")

    video = MaskGenerator("tube", (FRAMES, SIZE, SIZE), seed=0)
    image = MaskGenerator("block", (SIZE, SIZE), seed=1)

    def recipe():
        video.batch(CLIPS)
        image.batch(IMAGES)

    med, p90 = timed(recipe, args.repeats)
    verdict = "OK" if med < BUDGET_MS else "OVER BUDGET"
    print(f"\nper-GPU batch ({CLIPS} tube clips {FRAMES}x{SIZE}x{SIZE} + {IMAGES} block images {SIZE}px): "
          f"{med:.2f} ms ({p90:.2f})  [budget {BUDGET_MS:g} ms: {verdict}]\n")

    print(f"{'strategy':<16}{'batch':>8}{'ms/batch':>12}{'(p90)':>9}{'us/mask':>10}")
    for s in STRATEGIES:
        n = IMAGES if s == "block" else CLIPS
        gen = MaskGenerator(s, (SIZE, SIZE) if s == "block" else (FRAMES, SIZE, SIZE), seed=0)
        med, p90 = timed(lambda: gen.batch(n), args.repeats)
        print(f"{s:<16}{n:>8}{med:>12.3f}{p90:>9.3f}{med * 1e3 / n:>10.1f}")


if __name__ == "__main__":
    main()
