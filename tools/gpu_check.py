"""The prepared GPU check: run it whenever a GPU is lent (about 3-5 minutes on one GPU).

    torchrun --standalone --nproc_per_node=1 tools/gpu_check.py [--out /tmp/gpu_check] [--skip-train]
    python tools/gpu_check.py --cpu-dry-run       # the same code at toy sizes on a CPU (checks the script)

Not collected by pytest (the project's tests run on CPUs). It exercises the
code path a CUDA + NCCL run takes and prints the figures the README asks for;
it exits non-zero on any error. In order:

1. SDPA kernels: which `scaled_dot_product_attention` backend runs the window
   attention with a learnable bias (the relative position table) and the
   shifted-window mask, and whether the bias gets its gradient through it.
   Each backend is tried alone (torch.nn.attention.sdpa_kernel), and the
   kernel that the unrestricted call picks is read off the profiler.
2. The DALL-E tokenizer (the published architecture with random weights: the
   published ones are not downloadable here; its cost does not depend on the
   values) on the synthetic set's images at 112 px: fp32, bf16 and fp16
   (channels-last), frames per second and the share of codes identical to fp32.
   With random weights the agreement only bounds how near-tie the argmax is;
   rerun with `--tokenizer encoder.pkl` for the real figure.
3. One pretraining step of Swin-T at the paper's per-GPU batch (8 clips
   16x224² + 64 images, 8192 codes), bf16, eager: step time, peak memory.
4. train.py itself under torchrun on NCCL: the CPU preset's data with the
   Swin-T model, 20 steps of the image stage and 20 of the joint stage, bf16
   and --compile; step rate and peak memory.
"""

import argparse
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bevt  # noqa: E402
import swin3d  # noqa: E402
import tokenizer  # noqa: E402
import train  # noqa: E402
from tools import synthetic  # noqa: E402
from tools.bench_train import make_batch  # noqa: E402  (the benchmark's inputs: one definition)


DRY = False          # --cpu-dry-run: toy sizes on the CPU


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synced(fn, repeats=5, warmup=2):
    repeats, warmup = (1, 1) if DRY else (repeats, warmup)
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def check_sdpa(device):
    """Window attention as swin3d runs it: (B·nW, nh, N, hd) with a float bias that needs a gradient."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile
    g = torch.Generator(device="cpu").manual_seed(0)
    B, nh, N, hd = (2, 2, 16, 8) if DRY else (64, 4, 392, 32)    # a stage-1 Swin-B window (8,7,7)
    q, k, v = (torch.randn(B, nh, N, hd, generator=g).to(device, torch.bfloat16) for _ in range(3))
    bias = (0.02 * torch.randn(1, nh, N, N, generator=g)).to(device, torch.bfloat16).requires_grad_(True)

    def run():
        bias.grad = None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out.float().square().mean().backward()
        return out, bias.grad

    ref_out, ref_grad = None, None
    with sdpa_kernel([SDPBackend.MATH]):
        ref_out, ref_grad = (t.detach().float().clone() for t in run())
    print(f"SDPA backends with a learnable float bias (bf16, {(B, nh, N, hd)}):")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                out, grad = run()
                ms = synced(run) * 1e3
            if grad is None:
                note = "runs, but NO gradient reaches the bias"
            else:
                err = (grad.float() - ref_grad).abs().max().item() / max(ref_grad.abs().max().item(), 1e-12)
                note = f"runs, bias gradient flows (max rel diff to math {err:.1e})"
            print(f"  {backend.name:20s} {note}; fwd+bwd {ms:.2f} ms")
        except RuntimeError as e:
            print(f"  {backend.name:20s} refused: {str(e).splitlines()[0][:110]}")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        run()
        sync()
    names = sorted({e.key for e in prof.key_averages() if "attention" in e.key.lower() or "fmha" in e.key.lower()})
    print(f"  unrestricted call ran: {', '.join(names) or '?'}")


def check_tokenizer(device, path, images_dir):
    tok = tokenizer.load_tokenizer(path, device=device) if path else tokenizer.DalleTokenizer().to(device)
    files = tokenizer.list_images(images_dir)[:8 if DRY else 192]
    x = torch.stack([tokenizer.read_square_image(f, 224) for f in files]).to(device)       # (N, 3, 224, 224) in [0, 1]
    half = tokenizer.lanczos_resize(x, (112, 112))                                    # what the dVAE sees
    print(f"tokenizer {tok.kind} ({'given weights' if path else 'random weights'}), {len(half)} frames of 112 px:")
    ref = None
    for precision in tokenizer.TOKENIZER_PRECISIONS:
        tok.set_precision(precision)
        codes = tok.codes_of_copy(half)
        s = synced(lambda: tok.codes_of_copy(half), repeats=3, warmup=1)
        ref = codes if ref is None else ref
        agree = (codes == ref).float().mean().item()
        print(f"  {precision}: {len(half) / s:8.0f} frames/s, codes identical to fp32: {agree:.2%}")
    tok.set_precision("fp32")


def check_step(device):
    torch.manual_seed(0)
    model = bevt.BEVT(bevt.BEVTConfig(swin=swin3d.get_config("tiny", drop_path_rate=0.1))).to(device)
    model.set_stage("joint")
    tok = tokenizer.OfflineTokenizer(torch.rand(8192, 192)).to(device)
    opt = torch.optim.AdamW(train.param_groups(model, 0.05), lr=1e-4, fused=device.type == "cuda")
    clips, images, T, S = (1, 2, 4, 96) if DRY else (8, 64, 16, 224)
    batch = make_batch(dict(clips=clips, images=images, frames=T, size=S), device)

    def step():
        train.train_step(model, [batch], tok, train.Runtime(False, 0, 1, device, True), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak()
    s = synced(step, repeats=5, warmup=2)
    print(f"Swin-T joint step, {clips} clips {T}x{S}² + {images} images, bf16 eager: {s:.3f} s/step, "
          f"{clips / s:.1f} clips/s, peak memory {peak_gib():.2f} GiB")


def check_train(out, root):
    steps = 2 if DRY else 20
    common = ["--preset", "cpu", "--model", "cpu" if DRY else "tiny", "--data", root, "--out", out,
              "--precision", "bf16", "--max-steps", str(steps), "--log-every", "1" if DRY else "5",
              "--workers", "1" if DRY else "4", "--overwrite"] + ([] if DRY else ["--compile"])   # a rerun measures again
    for stage in ("image", "joint"):
        reset_peak()
        t = time.perf_counter()
        last = train.main([*common, "--stage", stage])
        unit = "images_per_s" if stage == "image" else "clips_per_s"
        print(f"train.py --stage {stage}: {steps} steps in {time.perf_counter() - t:.0f} s (compile included), "
              f"{last.get(unit, float('nan')):.1f} {unit.replace('_per_s', '/s')} over the run, final loss "
              f"{last['loss']:.3f}, peak memory {peak_gib():.2f} GiB", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/gpu_check")
    ap.add_argument("--tokenizer", default="", help="a real tokenizer file (encoder.pkl or converted .pt)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--cpu-dry-run", action="store_true", help="toy sizes on the CPU: checks this script")
    args = ap.parse_args()
    global DRY
    DRY = args.cpu_dry_run
    if DRY:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --cpu-dry-run to check the script on a CPU)")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU dry run"
    print(f"torch {torch.__version__}, {name}, bf16 native: {train.resolve_precision('auto', device)}", flush=True)
    root = os.path.join(args.out, "data")
    small = dict(n_train=8, n_val=2, images_train=4, images_val=1) if DRY else {}
    synthetic.prepare(root, seed=0, verbose=False, **small)        # the set and its offline tokenizer
    failures = 0
    checks = [("sdpa", lambda: check_sdpa(device)),
              ("tokenizer", lambda: check_tokenizer(device, args.tokenizer, os.path.join(root, "images", "train"))),
              ("step", lambda: check_step(device))]
    if not args.skip_train:
        checks.append(("train.py", lambda: check_train(os.path.join(args.out, "runs"), root)))
    for name, fn in checks:
        t = time.perf_counter()
        try:
            fn()
        except BaseException:                                   # SystemExit from train.py included
            failures += 1
            print(f"[{name}] FAILED:\n{traceback.format_exc()}", flush=True)
        print(f"[{name}] {time.perf_counter() - t:.0f} s", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
