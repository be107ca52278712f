"""Memory and load time of the sample lists at the paper's scale (issue 21): this tree against a git revision.

    python tools/bench_lists.py                                  # 1,281,167 images + 240,000 videos, vs 8f648c6
    python tools/bench_lists.py --images 100000 --videos 20000   # a quicker look

The paper pretrains on ImageNet-1K (1,281,167 images) and Kinetics-400 (~240k
videos). This writes two list files of those sizes, shaped like the real ones,
and needs no media:

    images   imagenet/train, `nXXXXXXXX/nXXXXXXXX_K.JPEG label`, 1000 synset folders
    videos   kinetics/train, `<class name>/<11-char id>_<start>_<end>.mp4 label`, 400 classes

For each list and each version of data.py (the reference, read with
`git show REF:data.py` and imported as `data_ref`, and this tree), one fresh
process builds the real data set (ImageDataset(root, list) or VideoDataset(list,
root, ...)) with the file reads (read_image / read_video) replaced by stubs, so
that only the list is measured, and runs one epoch over every row through the
version's own EpochLoader with 2 forked workers. Printed per row:

    list MB      the main process's USS (private memory, /proc/self/smaps_rollup)
                 after building the data set, minus before (both after gc)
    load s       time to build the data set (read and parse the list)
    worker +MB   each worker's USS growth over the epoch, measured inside the
                 worker at its first sample and at the end of each of its batches
                 (largest of the workers); pages a worker writes stop being shared

Reference default: 8f648c6, the last commit with the list of (Path, int) tuples.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCH, WORKERS = 512, 2


def uss_kb() -> int:
    """This process's unique set size (private clean + private dirty pages), kB."""
    kb = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                kb += int(line.split()[1])
    return kb


def write_lists(folder: Path, images: int, videos: int) -> dict:
    """The two list files and their (empty) roots -> {kind: (list, root)}."""
    import numpy as np
    rng = np.random.default_rng(0)
    img_root, vid_root = folder / "imagenet" / "train", folder / "kinetics" / "train"
    img_root.mkdir(parents=True, exist_ok=True)
    vid_root.mkdir(parents=True, exist_ok=True)
    synsets = sorted(rng.choice(10**8, 1000, replace=False))
    with open(folder / "imagenet_train.txt", "w") as f:
        for i in range(images):                      # ~1281 per class, in class order, as an ImageNet list is
            c = i * 1000 // images
            f.write(f"n{synsets[c]:08d}/n{synsets[c]:08d}_{rng.integers(1, 50000)}.JPEG {c}\n")
    words = ["playing", "riding", "making", "dancing", "throwing", "washing", "golf", "ice", "skating",
             "juggling", "bowling", "surfing", "water", "tai", "chi", "bench", "pressing", "sword"]
    classes = [" ".join(rng.choice(words, 2)) + f" {k}" for k in range(400)]          # spaces, as K400's
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"))
    with open(folder / "kinetics_train.txt", "w") as f:
        for i in range(videos):
            c = int(rng.integers(400))
            start = int(rng.integers(0, 300))
            f.write(f"{classes[c]}/{''.join(rng.choice(alphabet, 11))}_{start:06d}_{start + 10:06d}.mp4 {c}\n")
    return {"images": (folder / "imagenet_train.txt", img_root), "videos": (folder / "kinetics_train.txt", vid_root)}


def load_module(version: str, ref: str, tmp: Path):
    """This tree's data.py, or data.py at git revision `ref` imported as `data_ref`."""
    if version == "new":
        import data
        return data
    from tools.bench_decode import load_reference                    # the same import of data.py at `ref`
    return load_reference(ref, tmp)


class Probe:
    """The data set's transform: returns which worker ran it, and that worker's USS at its first
    sample ("base") and at the last sample of each of its batches ("uss"; -1 elsewhere)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, _pixels) -> dict:
        import torch
        self.calls += 1
        first, end = self.calls == 1, self.calls % BATCH == 0
        info = torch.utils.data.get_worker_info()
        return {"worker": info.id if info else -1, "base": uss_kb() if first else -1,
                "uss": uss_kb() if end else -1}


def child(kind: str, version: str, ann: str, root: str, ref: str) -> dict:
    """One measurement, in a fresh process (run by main)."""
    import numpy as np
    import torch
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        mod = load_module(version, ref, Path(tmp))
    # No media: the file reads return a dummy at once (the list is what is measured).
    mod.read_image = lambda path, min_short=None: np.zeros((1, 1, 3), np.uint8)
    mod.read_video = lambda path, sample=None, threads=1, num_frames=None: (np.zeros((1, 1, 1, 1, 3), np.uint8),
                                                                             None, 300)
    gc.collect()
    before = uss_kb()
    t = time.perf_counter()
    if kind == "images":
        ds = mod.ImageDataset(root, ann, transform=Probe())
    else:
        ds = mod.VideoDataset(ann, root, mod.FrameSampling(16, 8), Probe())
    load_s = time.perf_counter() - t
    gc.collect()
    list_mb = (uss_kb() - before) / 1024
    loader = mod.EpochLoader(ds, BATCH, shuffle=True, drop_last=True, num_workers=WORKERS, verbose=False)
    base, last, rows = {}, {}, 0
    t = time.perf_counter()
    for batch in loader:
        rows += len(batch["label"])
        for w, b, u in zip(batch["worker"].tolist(), batch["base"].tolist(), batch["uss"].tolist()):
            if b >= 0:
                base.setdefault(w, b)
            if u >= 0:
                last[w] = u
    growth = {w: (last[w] - base[w]) / 1024 for w in base}
    return {"kind": kind, "version": version, "rows": len(ds), "epoch_rows": rows, "list_mb": list_mb,
            "load_s": load_s, "worker_mb": max(growth.values()), "workers": growth,
            "epoch_s": time.perf_counter() - t}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1_281_167, help="rows of the ImageNet-shaped list")
    ap.add_argument("--videos", type=int, default=240_000, help="rows of the Kinetics-shaped list")
    ap.add_argument("--ref", default="8f648c6", help="git revision of the reference data.py (the old lists)")
    ap.add_argument("--child", nargs=4, metavar=("KIND", "VERSION", "LIST", "ROOT"), help=argparse.SUPPRESS)
    return ap


def main():
    args = build_parser().parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.ref)))
        return
    print(f"CPU: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; {WORKERS} forked workers, "
          f"batches of {BATCH}; old = data.py at {args.ref}, new = this tree")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        lists = write_lists(Path(tmp), args.images, args.videos)
        print(f"lists written in {time.perf_counter() - t:.0f} s: " + ", ".join(
            f"{k} {p.stat().st_size / 2**20:.0f} MiB" for k, (p, _) in lists.items()))
        print(f"{'list':<8} {'rows':>9} {'version':<7} {'list MB':>8} {'load s':>7} {'worker +MB':>11} {'epoch s':>8}")
        for kind, (ann, root) in lists.items():
            for version in ("old", "new"):
                r = subprocess.run([sys.executable, __file__, "--ref", args.ref, "--child", kind, version,
                                    str(ann), str(root)], capture_output=True, text=True, cwd=ROOT)
                if r.returncode != 0:
                    sys.exit(f"{kind}/{version} failed:\n{r.stderr[-3000:]}")
                m = json.loads(r.stdout.strip().splitlines()[-1])
                assert m["epoch_rows"] == m["rows"] // BATCH * BATCH, m          # every full batch went through
                print(f"{kind:<8} {m['rows']:>9} {version:<7} {m['list_mb']:>8.0f} {m['load_s']:>7.1f} "
                      f"{m['worker_mb']:>11.0f} {m['epoch_s']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
