"""Benchmark of one joint pretraining step (train.train_step + AdamW): precision, compile, checkpointing.

    python tools/bench_train.py                                  # this CPU: cpu preset and Swin-T, fp32 vs bf16
    python tools/bench_train.py --cases tiny --variants fp32,bf16,fp32+compile
    python tools/bench_train.py --device cuda                    # a GPU: Swin-T/S/B/L at the paper's per-GPU batch,
                                                                 # bf16, eager/compiled x checkpointing off/on, MFU

Inputs (random uint8 pixels as data.py ships them, tube / blockwise masks at 50%; data
loading is benchmarked in bench_data.py):
    cpu   preset: 4 clips 3x8x112x112 + 16 images 112x112 (the CPU demo's batch), 256 codes
    cpu-finetune: one finetune.py --preset cpu step, 8 clips 3x8x112x112, 4 classes
    tiny  (Swin-T): 1 clip 3x16x224x224 + 8 images 224x224, 8192 codes (--device cpu)
    tiny/small/base/large on --device cuda: 8 clips 3x16x224x224 + 64 images (the paper's per-GPU
    batch), 8192 codes; where that runs out of memory, the batch is halved (clips and images
    together) until it fits, and the row says so.
The tokenizer is the offline one with a random codebook (DALL-E's cost: bench_tokenizer.py).

A variant is `fp32` or `bf16` (autocast; loss and weights stay fp32), plus
`+compile` (train.py --compile: encoder and decoders) and `+ckpt` (gradient
checkpointing per block). Time: median of --repeats steps after --warmup steps
(compilation happens in the warm-up). Memory: the peak during the timed steps,
model and optimiser state included: on CUDA max_memory_allocated, on the CPU
the process's peak RSS (VmHWM, reset after the warm-up so compilation's peak is
not counted). Each (case, variant) runs in a fresh subprocess; the ratio column
compares each variant with the first one of its case.
MFU (CUDA): model FLOPs of one step (forward + backward = 3x the forward,
counted with torch.utils.flop_counter) per second over the GPU's dense bf16
peak (--peak-tflops, default 989 for an H100 SXM; 989 for an H200 too).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files
import bevt  # noqa: E402
import swin3d  # noqa: E402
import tokenizer  # noqa: E402
import train  # noqa: E402

CASES = {
    "cpu": dict(model="cpu", clips=4, frames=8, images=16, size=112, vocab=256),   # = train.py --preset cpu
    "tiny": dict(model="tiny", clips=1, frames=16, images=8, size=224, vocab=8192),
    # finetune.py --preset cpu: one finetuning step (classifier, cross-entropy), 8 clips, no images
    "cpu-finetune": dict(model="cpu", clips=8, frames=8, images=0, size=112, vocab=0, finetune=True),
}
PAPER_BATCH = dict(clips=8, frames=16, images=64, size=224, vocab=8192)       # per GPU, §4.1
GPU_CASES = {m: dict(model=m, **PAPER_BATCH) for m in ("tiny", "small", "base", "large")}


def make_batch(c, device):
    """One joint step's inputs as the loaders ship them: uint8 pixels and the paper's masks
    (tube for clips, blockwise for images, 50%), drawn with fixed seeds."""
    import masking
    g = torch.Generator().manual_seed(0)
    S, T = c["size"], c["frames"]

    def pixels(*shape):                                             # uint8, as data.py ships them
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)

    def masks(gen, n):
        return torch.from_numpy(gen.batch(n)[0])                    # input masks (n, ...) bool
    return {"video": pixels(c["clips"], 3, T, S, S), "video_half": pixels(c["clips"], 3, T, S // 2, S // 2),
            "video_mask": masks(masking.MaskGenerator("tube", (T, S, S), seed=0), c["clips"]),
            "image": pixels(c["images"], 3, S, S), "image_half": pixels(c["images"], 3, S // 2, S // 2),
            "image_mask": masks(masking.MaskGenerator("block", (S, S), seed=1), c["images"])}


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


def run_case(c, variant, device, warmup, repeats):
    parts = variant.split("+")
    bf16, compile_, ckpt = parts[0] == "bf16", "compile" in parts, "ckpt" in parts
    torch.manual_seed(0)
    if c.get("finetune"):
        return run_finetune_case(c, bf16, compile_, ckpt, device, warmup, repeats)
    model = bevt.BEVT(bevt.BEVTConfig(swin=swin3d.get_config(c["model"], drop_path_rate=0.1, use_checkpoint=ckpt),
                                      vocab_size=c["vocab"])).to(device)
    model.set_stage("joint")
    tok = tokenizer.OfflineTokenizer(torch.rand(c["vocab"], 192)).to(device)
    if compile_:
        model.compile_streams(dynamic=False)                         # what train.py --compile does
    opt = torch.optim.AdamW(train.param_groups(model, 0.05), lr=1e-4, fused=device.type == "cuda")
    batch = make_batch(c, device)

    def step():
        train.train_step(model, [batch], tok, train.Runtime(False, 0, 1, device, bf16), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    res = timed(step, device, warmup, repeats)
    if device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode
        inputs = train.model_inputs(batch, tok, device)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(**inputs)
        res["tflop_per_step"] = 3 * counter.get_total_flops() / 1e12
    return res


def timed(step, device, warmup, repeats) -> dict:
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
    return {"step_s": statistics.median(times), "warmup_s": warm_s, "peak_mb": peak / 2 ** 20}


def run_finetune_case(c, bf16, compile_, ckpt, device, warmup, repeats):
    """finetune.train_step on normalised float clips (as the finetuning loader ships them) + AdamW."""
    import finetune
    raw = finetune.VideoClassifier(swin3d.get_config(c["model"], use_checkpoint=ckpt), 4, dropout=0.0).to(device)
    model = torch.compile(raw, dynamic=False) if compile_ else raw
    opt = torch.optim.AdamW(raw.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    batch = {"video": torch.randn(c["clips"], 3, c["frames"], c["size"], c["size"], generator=g),
             "label": torch.randint(0, 4, (c["clips"],), generator=g)}

    def step():
        finetune.train_step(model, [batch], train.Runtime(False, 0, 1, device, bf16), 5.0, 0.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return timed(step, device, warmup, repeats)


def run_subprocess(args, c, variant):
    out = subprocess.run([sys.executable, __file__, "--device", args.device, "--warmup", str(args.warmup),
                          "--repeats", str(args.repeats), "--one", json.dumps([c, variant])],
                         capture_output=True, text=True)
    if out.returncode:
        if "out of memory" in out.stderr.lower():
            return None
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to time (default cpu)")
    ap.add_argument("--cases", default=None, help="comma-separated cases (default cpu: cpu,cpu-finetune,tiny; "
                    "cuda: tiny,small,base,large)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated variants (default cpu: fp32,bf16; cuda: bf16,bf16+compile,bf16+ckpt,"
                         "bf16+compile+ckpt)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first: compilation, autotuning (default 2)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps, the median reported (default 5)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak for the MFU "
                    "(default 989: an H100 SXM)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)      # internal: one case in this process
    return ap


def main():
    args = build_parser().parse_args()
    device = torch.device(args.device)
    if args.one:
        c, variant = json.loads(args.one)
        print(json.dumps(run_case(c, variant, device, args.warmup, args.repeats)))
        return
    cuda = device.type == "cuda"
    table = GPU_CASES if cuda else CASES
    cases = (args.cases or ("tiny,small,base,large" if cuda else "cpu,cpu-finetune,tiny")).split(",")
    variants = (args.variants or ("bf16,bf16+compile,bf16+ckpt,bf16+compile+ckpt" if cuda else "fp32,bf16")).split(",")
    print(f"torch {torch.__version__}, {device}, threads {torch.get_num_threads()}, CPU bf16 native "
          f"{train.resolve_precision('auto', torch.device('cpu'))}; median of {args.repeats} steps after {args.warmup}")
    print("\n| case | input | variant | step (s) | vs first | clips/s | warm-up (s) | peak mem (MB) |"
          + (" MFU |" if cuda else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    for name in cases:
        first = None
        for variant in variants:
            c, note = dict(table[name]), ""
            res = run_subprocess(args, c, variant)
            while res is None and c["clips"] > 1:                      # out of memory: halve the batch
                c["clips"], c["images"] = c["clips"] // 2, c["images"] // 2
                note = " (largest that fits)"
                res = run_subprocess(args, c, variant)
            if res is None:
                print(f"| {name} | - | {variant} | out of memory at 1 clip |", flush=True)
                continue
            first = first or res
            inp = f"{c['clips']}x3x{c['frames']}x{c['size']}²" + (f" + {c['images']} images" if c["images"] else "") + note
            line = (f"| {name} | {inp} | {variant} | {res['step_s']:.3f} | {first['step_s'] / res['step_s']:.2f}x "
                    f"| {c['clips'] / res['step_s']:.1f} | {res['warmup_s']:.0f} | {res['peak_mb']:.0f} |")
            if cuda:
                line += f" {res['tflop_per_step'] / res['step_s'] / args.peak_tflops:.1%} |"
            print(line, flush=True)


if __name__ == "__main__":
    main()
