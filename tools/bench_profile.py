"""Per-op profile and step time of one joint BEVT pretraining step on the CPU, fp32.

    python tools/bench_profile.py                    # top ops + step time of this tree's swin3d.py
    python tools/bench_profile.py --compare HEAD~1   # ... against the encoder of another git revision
    python tools/bench_profile.py --compare old.py   # ... or of another swin3d.py file

The step is the Swin-T case of tools/bench_train.py without the optimiser:
bevt.BEVT with swin3d.get_config("tiny") and an 8192-code head, 1 clip
3x16x224x224 with a tube mask + 8 images 224x224 with block masks (real masks
from masking.py, 50% of the tokenizer grid), random codes; zero_grad, the
forward (L = L_MIM + L_MVM, paper eq. 5) and the backward. torch.set_num_threads(--threads).

What is printed:
1. torch.profiler's per-op table (key_averages, sorted by self CPU time):
   each op's median self time over --profile-steps profiled steps per variant
   (interleaved) and its share of the median profiled step's wall time, and
   how much of the step the matrix multiplies take
   (aten::mm/bmm/addmm/baddbmm) with their FLOP rate. Self time excludes the
   ops called inside, so the rows add up to the step, less the Python
   between ops. With --compare, one table with both variants side by side.
2. The median step time of each variant over --repeats steps after
   --warmup, timed without the profiler (which adds overhead per op), the
   variants interleaved A, B, A, B... so that load from other processes hits
   both alike, and the median of the per-round ratios. Both wall time and
   process CPU time are given: on a machine shared with other jobs the wall
   time includes time the process waited for a core, the CPU time does not
   (with several threads it includes their spinning at barriers, though).

--compare loads swin3d.py from that revision (or file) as a separate module
and puts its encoder, with the same weights, into a copy of the model: only
the encoder differs; the decoders, head and loss are this tree's.
"""

import argparse
import copy
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bevt  # noqa: E402
import masking  # noqa: E402
import swin3d  # noqa: E402

MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")


def make_inputs(clips=1, frames=16, images=8, size=224, vocab=8192, seed=0):
    """Random pixels and codes, real masks (tube for the clip, block for the images)."""
    g = torch.Generator().manual_seed(seed)
    tube = masking.MaskGenerator("tube", (frames, size, size), seed=seed)
    block = masking.MaskGenerator("block", (size, size), seed=seed)
    v_in, _ = tube.batch(clips)                                    # (clips, T/2, h, w)
    i_in, _ = block.batch(images)                                  # (images, h, w)
    h = size // 16
    return dict(videos=torch.randn(clips, 3, frames, size, size, generator=g),
                video_masks=torch.from_numpy(v_in),
                video_codes=torch.randint(vocab, (clips, frames, h, h), generator=g),
                images=torch.randn(images, 3, size, size, generator=g),
                image_masks=torch.from_numpy(i_in),
                image_codes=torch.randint(vocab, (images, h, h), generator=g))


def step(model, inputs):
    model.zero_grad(set_to_none=True)
    model(**inputs)["loss"].backward()


def load_swin3d_at(rev):
    """swin3d.py as of git revision `rev` (or the file `rev`), imported as its own module."""
    if os.path.isfile(rev):
        with open(rev) as f:
            src = f.read()
    else:
        src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:swin3d.py"], capture_output=True,
                             text=True, check=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "swin3d_baseline.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("swin3d_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                                   # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def with_encoder_from(model, mod):
    """A deep copy of `model` whose encoder is module `mod`'s class, with the same weights."""
    other = copy.deepcopy(model)
    enc = mod.SwinTransformer3D(model.config.swin)
    enc.load_state_dict(model.encoder.state_dict())
    other.encoder = enc
    return other.train()


def profile_step(model, inputs):
    """({op: (calls, self CPU seconds)}, wall seconds, matmul GFLOP) of one profiled step."""
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        t = time.perf_counter()
        step(model, inputs)
        wall = time.perf_counter() - t
    ops = {e.key: (e.count, e.self_cpu_time_total / 1e6) for e in prof.key_averages()}
    gflop = sum(e.flops for e in prof.key_averages() if e.key in MATMUL_OPS) / 1e9
    return ops, wall, gflop


def profile_variants(variants, inputs, steps):
    """Per variant: the per-op median over `steps` profiled steps (variants interleaved)."""
    for m in variants.values():
        step(m, inputs)                                            # warm-up outside the profiler
    runs = {name: [] for name in variants}
    for _ in range(steps):
        for name, m in variants.items():
            runs[name].append(profile_step(m, inputs))
    out = {}
    for name, rs in runs.items():
        keys = set().union(*(ops for ops, _, _ in rs))
        ops = {k: (max(o.get(k, (0, 0.0))[0] for o, _, _ in rs),
                   statistics.median(o.get(k, (0, 0.0))[1] for o, _, _ in rs)) for k in keys}
        out[name] = (ops, statistics.median(w for _, w, _ in rs), rs[0][2])
    return out


def print_profiles(profiles, rows):
    names = list(profiles)
    for name, (ops, wall, gflop) in profiles.items():
        mm = sum(ops.get(k, (0, 0.0))[1] for k in MATMUL_OPS)
        print(f"- {name}: profiled step {wall:.2f} s; matrix multiplies {mm:.2f} s ({100 * mm / wall:.0f}%, "
              f"{gflop:.0f} GFLOP at {gflop / mm:.0f} GFLOP/s), everything else {wall - mm:.2f} s")
    # Rows: the top ops of every variant, ordered by the first variant's self time.
    first = profiles[names[0]][0]
    top = []
    for ops, _, _ in profiles.values():
        top += [k for k, _ in sorted(ops.items(), key=lambda kv: -kv[1][1])[:rows] if k not in top]
    top.sort(key=lambda k: -first.get(k, (0, 0.0))[1])
    head = "| op |" + "".join(f" {n}: calls | self CPU (s) | % of step |" for n in names)
    print("\n" + head + "\n|---|" + "---|---|---|" * len(names))
    for k in top:
        cells = []
        for ops, wall, _ in profiles.values():
            calls, s = ops.get(k, (0, 0.0))
            cells.append(f" {calls} | {s:.3f} | {100 * s / wall:.1f} |")
        print(f"| {k} |" + "".join(cells))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", default=None, metavar="REV",
                    help="git revision whose swin3d.py is the baseline (or the path of a swin3d.py file)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per variant (default 7)")
    ap.add_argument("--rows", type=int, default=15, help="top ops per variant in the table")
    ap.add_argument("--profile-steps", type=int, default=3, help="profiled steps per variant (per-op median)")
    ap.add_argument("--no-profile", action="store_true", help="timing only")
    return ap


def main():
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = bevt.BEVT(bevt.BEVTConfig(swin=swin3d.get_config("tiny"), vocab_size=8192)).train()
    model.set_stage("joint")
    inputs = make_inputs()
    variants = {"this tree": model}
    if args.compare:
        variants = {f"swin3d.py at {args.compare}": with_encoder_from(model, load_swin3d_at(args.compare)),
                    "this tree": model}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; Swin-T joint step "
          f"(1 clip 16x224x224 + 8 images 224x224, 8192 codes), forward + backward\n")
    if not args.no_profile:
        print_profiles(profile_variants(variants, inputs, args.profile_steps), args.rows)

    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for r in range(args.warmup + args.repeats):
        for name, m in variants.items():                           # interleaved A, B, A, B...
            t, c = time.perf_counter(), time.process_time()
            step(m, inputs)
            if r >= args.warmup:
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    print(f"\nmedian of {args.repeats} steps after {args.warmup}, variants interleaved\n")
    print("| variant | step wall (s) | min | max | process CPU time (s) |\n|---|---|---|---|---|")
    for n in variants:
        print(f"| {n} | {statistics.median(wall[n]):.3f} | {min(wall[n]):.3f} | {max(wall[n]):.3f} "
              f"| {statistics.median(cpu[n]):.3f} |")
    if args.compare:
        # Ratio per round (each round ran both variants back to back), then the median.
        a, b = list(variants)
        print()
        for what, ts in (("wall", wall), ("CPU", cpu)):
            ratios = [x / y for x, y in zip(ts[a], ts[b])]
            print(f"speed-up ({what} time, baseline / this tree): median of per-round ratios "
                  f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
