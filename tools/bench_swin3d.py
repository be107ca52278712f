"""Benchmark of the Video Swin encoder (swin3d.py): speed, memory and FLOPs.

    python tools/bench_swin3d.py                 # CPU preset + Swin-T on this CPU, FLOPs of Swin-B
    python tools/bench_swin3d.py --quick         # fewer repeats, CPU preset only
    python tools/bench_swin3d.py --device cuda   # the same on a GPU, in bf16 autocast

1. Time of each stream for forward+backward (training) and forward only
   under no_grad (inference), for the attention implementations of
   swin3d.WindowAttention3D: "sdpa" (F.scaled_dot_product_attention) and
   "explicit" (the softmax formula). The default "auto" is "sdpa" except
   for CPU training, where it is "explicit": PyTorch's CPU flash kernel
   cannot give the bias table its gradient, so SDPA falls back to its math
   kernel, which is slower than the explicit path's in-place forward and
   hand-written backward (swin3d._ExplicitAttention).
   All variants run in one process, interleaved, median of --repeats, so the
   ratios are fair on a shared, noisy machine.
2. Peak memory of one forward+backward: on CUDA `max_memory_allocated`; on the
   CPU the growth of the peak resident set size of a fresh subprocess (it
   includes allocator slack, so compare rows, not absolute bytes).
3. Multiply-accumulates of Swin-B for one 32x224x224 view with window (8,7,7)
   and (16,7,7), counted on the meta device with torch.utils.flop_counter
   (which counts 2 FLOPs per MAC), against the published 282 and 321 GFLOPs
   (fvcore MACs) and the released code's 281.3 and 320.4 GMACs (paper §3 "BEVT encoders").
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import swin3d  # noqa: E402

# (preset, stream, input shape): the stated inputs of the README table.
CASES = [
    ("cpu", "video", (2, 3, 16, 112, 112)),
    ("cpu", "image", (16, 3, 112, 112)),
    ("tiny", "video", (1, 3, 16, 224, 224)),
    ("tiny", "image", (8, 3, 224, 224)),
]


def step(model, x, train=True):
    if not train:
        with torch.no_grad():
            return model(x)
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out.f4_norm.float().mean() + out.f3.float().mean()).backward()


def timed(model, x, device, amp, train=True):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
        step(model, x, train)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


# (attention implementation, training?) variants timed for each case.
VARIANTS = [("sdpa", True), ("explicit", True), ("sdpa", False), ("explicit", False)]


def bench_time(preset, shape, device, repeats, amp):
    torch.manual_seed(0)
    model = swin3d.SwinTransformer3D(swin3d.get_config(preset)).to(device).train()
    x = torch.randn(shape, device=device)
    times = {v: [] for v in VARIANTS}
    for r in range(repeats + 1):                                   # round 0 is warm-up
        for impl, train in VARIANTS:                               # interleaved
            model.set_attention(impl)
            t = timed(model, x, device, amp, train)
            if r:
                times[(impl, train)].append(t)
    return {v: statistics.median(ts) for v, ts in times.items()}


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(preset, shape, attention, device, amp):
    """Peak extra memory of one forward+backward (see the module docstring)."""
    if device == "cuda":
        torch.manual_seed(0)
        model = swin3d.SwinTransformer3D(swin3d.get_config(preset, attention=attention)).to(device).train()
        x = torch.randn(shape, device=device)
        timed(model, x, device, amp)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        timed(model, x, device, amp)
        return torch.cuda.max_memory_allocated() - base
    # CPU: a fresh interpreter per measurement, so earlier runs leave no high-water mark.
    code = (f"import sys; sys.argv=['x']; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r});"
            f"import bench_swin3d as b; print(b._cpu_peak({preset!r}, {tuple(shape)!r}, {attention!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _cpu_peak(preset, shape, attention):
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = swin3d.SwinTransformer3D(swin3d.get_config(preset, attention=attention)).train()
    x = torch.randn(shape)
    base = rss_bytes()
    step(model, x)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def flops_table():
    from torch.utils.flop_counter import FlopCounterMode
    rows = []
    for window, published, released in (((8, 7, 7), 282, 281.3), ((16, 7, 7), 321, 320.4)):
        with torch.device("meta"):
            model = swin3d.SwinTransformer3D(swin3d.get_config("base", window_size=window))
            x = torch.empty(1, 3, 32, 224, 224)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
        gmac = counter.get_total_flops() / 2 / 1e9
        rows.append(f"| Swin-B 32x224x224, window {window} | {gmac:.1f} | {released} | {published} |")
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to time (default cpu)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per case, the median reported (default 5)")
    ap.add_argument("--quick", action="store_true", help="CPU preset only, 3 repeats")
    ap.add_argument("--models", default=None, help="comma-separated subset of the swin3d presets, e.g. cpu,tiny,base")
    return ap


def main():
    args = build_parser().parse_args()
    amp = args.device == "cuda"                                     # bf16 autocast on GPU, fp32 on CPU
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    cases = list(CASES)
    if args.device == "cuda":
        cases += [("base", "video", (8, 3, 16, 224, 224)), ("base", "image", (64, 3, 224, 224))]
    presets = {"cpu"} if args.quick else (set(args.models.split(",")) if args.models else None)
    repeats = 3 if args.quick else args.repeats
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"{'bf16 autocast' if amp else 'fp32'}, median of {repeats}")
    print("\n| preset | stream | input | train sdpa (ms) | train explicit (ms) | explicit/sdpa "
          "| infer sdpa (ms) | infer explicit (ms) | explicit/sdpa "
          "| peak train mem sdpa (MB) | explicit (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for preset, stream, shape in cases:
        if presets and preset not in presets:
            continue
        t = {k: v * 1e3 for k, v in bench_time(preset, shape, args.device, repeats, amp).items()}
        m_s = peak_memory(preset, shape, "sdpa", args.device, amp) / 2 ** 20
        m_e = peak_memory(preset, shape, "explicit", args.device, amp) / 2 ** 20
        ts, te = t[("sdpa", True)], t[("explicit", True)]
        fs, fe = t[("sdpa", False)], t[("explicit", False)]
        print(f"| {preset} | {stream} | {'x'.join(map(str, shape))} | {ts:.0f} | {te:.0f} | {te / ts:.2f} "
              f"| {fs:.0f} | {fe:.0f} | {fe / fs:.2f} | {m_s:.0f} | {m_e:.0f} |", flush=True)
    print("\n| model | GMACs (ours, flop_counter / 2) | released code | published GFLOPs |")
    print("|---|---|---|---|")
    for row in flops_table():
        print(row)


if __name__ == "__main__":
    main()
