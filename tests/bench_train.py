"""Benchmark of one joint pretraining step (train.train_step + AdamW), eager vs torch.compile.

    python tests/bench_train.py                       # CPU preset and Swin-T on this CPU
    python tests/bench_train.py --cases cpu           # the CPU preset only
    python tests/bench_train.py --device cuda --cases base   # a GPU: Swin-B, bf16, with MFU

Inputs (random tensors; data loading is benchmarked in bench_data.py):
    cpu  preset: 4 clips 3x8x112x112 + 16 images 112x112 (the CPU demo's batch), 256 codes
    tiny (Swin-T): 1 clip 3x16x224x224 + 8 images 224x224, 8192 codes
    base (Swin-B, GPU): 8 clips 3x16x224x224 + 64 images (the paper's per-GPU batch), 8192 codes
The tokenizer is the offline one with a random codebook (its cost is in bench_tokenizer.py).

Time: median of --repeats steps after --warmup steps (compilation happens in
the warm-up). Memory: the peak during the timed steps, model and optimiser
state included: on CUDA max_memory_allocated, on the CPU the process's peak
RSS (VmHWM, reset after the warm-up so compilation's peak is not counted),
each case in a fresh subprocess.
MFU (CUDA): model FLOPs of one step (forward + backward = 3x the forward,
counted with torch.utils.flop_counter) per second over the GPU's dense bf16
peak (--peak-tflops, default 989 for an H100 SXM).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bevt  # noqa: E402
import swin3d  # noqa: E402
import tokenizer  # noqa: E402
import train  # noqa: E402

CASES = {
    "cpu": dict(model="cpu", clips=4, frames=8, images=16, size=112, vocab=256),   # = train.py --preset cpu
    "tiny": dict(model="tiny", clips=1, frames=16, images=8, size=224, vocab=8192),
    "base": dict(model="base", clips=8, frames=16, images=64, size=224, vocab=8192),
}


def make_batch(c, device):
    g = torch.Generator().manual_seed(0)
    S, T, h = c["size"], c["frames"], c["size"] // 16
    def pixels(*shape):                                             # uint8, as data.py ships them
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return {"video": pixels(c["clips"], 3, T, S, S), "video_tok": pixels(c["clips"], 3, T, S // 2, S // 2),
            "video_mask": torch.rand(c["clips"], T // 2, h, h, generator=g) < 0.5,
            "image": pixels(c["images"], 3, S, S), "image_tok": pixels(c["images"], 3, S // 2, S // 2),
            "image_mask": torch.rand(c["images"], h, h, generator=g) < 0.5}


def reset_peak_rss():
    """Linux: reset the peak RSS (VmHWM) to the current RSS, so compilation's peak is not counted."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_case(name, compile_, device, warmup, repeats):
    c = CASES[name]
    torch.manual_seed(0)
    model = bevt.BEVT(bevt.BEVTConfig(swin=swin3d.get_config(c["model"], drop_path_rate=0.1),
                                      vocab_size=c["vocab"])).to(device)
    model.set_stage("joint")
    tok = tokenizer.OfflineTokenizer(torch.rand(c["vocab"], 192)).to(device)
    if compile_:
        model.compile_streams(dynamic=False)                         # what train.py --compile does
    run_model = model
    opt = torch.optim.AdamW(train.param_groups(model, 0.05), lr=1e-4, fused=device.type == "cuda")
    batch = make_batch(c, device)
    bf16 = device.type == "cuda"

    def step():
        train.train_step(run_model, model, [batch], tok, device, False, bf16, 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    t = time.perf_counter()
    for _ in range(warmup):
        step()
    warm_s = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss()
    res = {"case": name, "compile": compile_, "step_s": statistics.median(times), "warmup_s": warm_s,
           "peak_mb": peak / 2 ** 20}
    if device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode
        inputs = train.model_inputs(batch, tok, device)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(**inputs)
        res["tflop_per_step"] = 3 * counter.get_total_flops() / 1e12
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cases", default="cpu,tiny")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)      # internal: one case in this process
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.one:
        name, comp = args.one.split(":")
        print(json.dumps(run_case(name, comp == "1", device, args.warmup, args.repeats)))
        return
    print(f"torch {torch.__version__}, {device}, threads {torch.get_num_threads()}, "
          f"{'bf16' if device.type == 'cuda' else 'fp32'}; median of {args.repeats} steps after {args.warmup}")
    print("\n| case | input | eager step (s) | compiled step (s) | eager/compiled | compile warm-up (s) "
          "| peak mem eager (MB) | compiled (MB) |" + (" MFU eager | MFU compiled |" if device.type == "cuda" else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if device.type == "cuda" else ""))
    for name in args.cases.split(","):
        rows = {}
        for comp in ("0", "1"):                          # a fresh process each: compile caches and RSS
            out = subprocess.run([sys.executable, __file__, "--device", args.device, "--warmup", str(args.warmup),
                                  "--repeats", str(args.repeats), "--one", f"{name}:{comp}"],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            rows[comp] = json.loads(out.stdout.strip().splitlines()[-1])
        e, k = rows["0"], rows["1"]
        c = CASES[name]
        inp = f"{c['clips']}x3x{c['frames']}x{c['size']}² + {c['images']} images"
        line = (f"| {name} | {inp} | {e['step_s']:.3f} | {k['step_s']:.3f} | {e['step_s'] / k['step_s']:.2f} "
                f"| {k['warmup_s']:.0f} | {e['peak_mb']:.0f} | {k['peak_mb']:.0f} |")
        if device.type == "cuda":
            mfu = [r["tflop_per_step"] / r["step_s"] / args.peak_tflops for r in (e, k)]
            line += f" {mfu[0]:.1%} | {mfu[1]:.1%} |"
        print(line, flush=True)


if __name__ == "__main__":
    main()
