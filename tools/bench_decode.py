"""Benchmark of video decoding (data.read_video): this tree against a git revision, per clip.

    python tools/bench_decode.py                     # against HEAD (uncommitted changes vs last commit)
    python tools/bench_decode.py --ref 2f5b12b       # against the decoder that still seeked (issue 28)

Four sources, the same frame indices for both versions, decoder threads 1
(as in a DataLoader worker):

1. the synthetic set (`python tools/synthetic.py`, generated into --data if
   missing): 128x160 H.264 mp4, 32 frames at 16 fps, a keyframe every 16;
   the CPU-demo recipe, 16 frames x interval 2 at a random offset;
2. a long file written here (cached in --data): 3000 frames (100 s at
   30 fps), 256x340 H.264 mp4 with x264's defaults (a keyframe every 250
   frames, B-frames), a panning texture; the paper recipe, 16 frames x
   interval 8 at a random offset (dense sampling, as in pretraining);
3. the same packets remuxed into Matroska, which stores no frame count, so
   every read demuxes the file once to count its frames;
4. the same picture as MPEG-4 Part 2 with B-frames in AVI (how UCF101 and
   HMDB51 are stored), a keyframe every 250 frames.

data.py decodes every clip from the first frame up to the last one it needs.
Against a reference that seeked to the keyframe before the clip (up to
2f5b12b), the long files show what that costs: the clips of a 100-s file
start anywhere, while a Kinetics clip (10 s, x264's keyframe interval 250) mostly
started at frame 0 in both versions.

The reference data.py is read with `git show REF:data.py` and imported under
another name, so both versions run in this one process, interleaved clip by
clip (the order alternating), which keeps the ratio honest on a busy machine.
Printed: median ms per clip of each, the median of the per-clip time ratios
(this tree / reference), and whether both returned identical frames (they
must, for every source). The machine's load average is printed first.
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import av  # noqa: E402
import numpy as np  # noqa: E402

import data  # noqa: E402
from tools import synthetic  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LONG_FRAMES, LONG_FPS, LONG_SIZE = 3000, 30, (256, 340)


def load_reference(ref: str, tmp: Path, name: str = "data"):
    """<name>.py at git revision `ref`, imported as module `<name>_ref` (the benchmarks' before/after)."""
    src = subprocess.run(["git", "show", f"{ref}:{name}.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = tmp / f"{name}_ref.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"{name}_ref", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"{name}_ref"] = module                         # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def long_video(path: Path, codec: str = "libx264", options: Optional[dict] = None) -> Path:
    """A 3000-frame 256x340 video, a texture panning 1.5 px/frame (cached: written once)."""
    if path.exists():
        return path
    h, w = LONG_SIZE
    bg = np.clip(synthetic._syn_background(0, h, w), 0, 255).astype(np.uint8)         # (H, W, 3), periodic
    tmp = path.with_name("part_" + path.name)
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream(codec, rate=LONG_FPS, options=options or {})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = Fraction(1, LONG_FPS)
        for i in range(LONG_FRAMES):
            img = np.roll(bg, ((i // 2) % h, (3 * i // 2) % w), axis=(0, 1))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, LONG_FPS)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)
    return path


def remux(src: Path, dst: Path) -> Path:
    """The same packets in another container (Matroska here: no stored frame count, so read_video counts packets)."""
    if not dst.exists():
        with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
            ins = inp.streams.video[0]
            outs = out.add_stream_from_template(ins)
            for packet in inp.demux(ins):
                if packet.dts is None:                          # the demuxer's empty flush packet
                    continue
                packet.stream = outs
                out.mux(packet)
    return dst


def clips(paths, n_frames, clip_len, interval, count, seed=0):
    """[(path, idx)]: `count` dense clips at random offsets (seeded, the same for both versions)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        path = paths[k % len(paths)]
        span = (clip_len - 1) * interval + 1
        start = int(rng.integers(0, max(1, n_frames - span + 1)))
        out.append((path, (start + interval * np.arange(clip_len)) % n_frames))
    return out


def compare(name, cases, modules):
    """Time each clip with both modules (order alternating); print medians and the ratio."""
    times = {m.__name__: [] for m in modules}
    failed = {m.__name__: 0 for m in modules}
    same = True
    for k, (path, idx) in enumerate(cases):
        order = modules if k % 2 == 0 else modules[::-1]
        out = {}
        for m in order:
            t = time.perf_counter()
            try:
                out[m.__name__], _, _ = m.read_video(path, lambda n, idx=idx: idx, threads=1)
            except m.BadMedia:
                failed[m.__name__] += 1
            times[m.__name__].append(time.perf_counter() - t)
        same &= len(out) == 2 and bool(np.array_equal(*out.values()))
    new, ref = (times[m.__name__] for m in modules)
    ratio = statistics.median(x / y for x, y in zip(new, ref))
    fails = "".join(f"; {m.__name__} raised BadMedia {failed[m.__name__]} times" for m in modules
                    if failed[m.__name__])
    print(f"{name}: {len(cases)} clips; ms per clip (median) this tree {1e3 * statistics.median(new):.1f}, "
          f"reference {1e3 * statistics.median(ref):.1f}; per-clip ratio (median) {ratio:.3f}; "
          f"identical frames: {same}{fails}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", default="HEAD", help="git revision of data.py to compare against")
    ap.add_argument("--data", default="data", help="folder for the synthetic set and the long file")
    ap.add_argument("--clips", type=int, default=60, help="clips per source")
    return ap


def main():
    args = build_parser().parse_args()
    print(f"CPU: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; PyAV {av.__version__}; "
          f"this tree vs data.py at {args.ref}")
    root = synthetic.make_synthetic_set(Path(args.data) / "synthetic", verbose=False)
    syn = [p for p, _ in data.read_annotations(root / "videos/train_appearance.txt", root / "videos")]
    t = time.perf_counter()
    long = long_video(Path(args.data) / f"bench_long{LONG_FRAMES}.mp4")
    print(f"long file: {long} ({long.stat().st_size / 1e6:.1f} MB, ready in {time.perf_counter() - t:.0f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        modules = [data, load_reference(args.ref, Path(tmp))]
        for m in modules:                                       # warm-up: imports, file cache
            m.read_video(syn[0], lambda n: np.arange(4), threads=1)
            m.read_video(long, lambda n: np.arange(4), threads=1)
        compare("synthetic 128x160 mp4, 16 x 2", clips(syn, synthetic.SYN_FRAMES, 16, 2, args.clips), modules)
        compare(f"long {LONG_FRAMES}-frame 256x340 mp4, 16 x 8", clips([long], LONG_FRAMES, 16, 8, args.clips),
                modules)
        mkv = remux(long, long.with_suffix(".mkv"))
        compare("the same as mkv (counted by demuxing), 16 x 8", clips([mkv], LONG_FRAMES, 16, 8, args.clips), modules)
        avi = long_video(Path(args.data) / f"bench_long{LONG_FRAMES}_mpeg4.avi", "mpeg4",
                         {"bf": "2", "g": "250"})
        compare("the same picture as MPEG-4 Part 2 avi, B-frames (Xvid-like), 16 x 8",
                clips([avi], LONG_FRAMES, 16, 8, args.clips), modules)


if __name__ == "__main__":
    main()
