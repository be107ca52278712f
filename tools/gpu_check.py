"""The prepared GPU check: what a CPU cannot show about the headline command, in one short run.

    python tools/gpu_check.py                     # on a CUDA machine: about 5-7 minutes on one H100
    python tools/gpu_check.py --cpu-dry-run       # the same code at toy sizes on a CPU (about a minute)

Start it as plain `python`: the checks that need several processes start
`torchrun` themselves (NCCL on CUDA, gloo in the dry run). Not collected by
pytest. Each check below passes or fails on what it measures; the figures go
to <out>/gpu_check.json and a table at the end; the exit status is 1 if any
check failed. The output of every train.py / finetune.py run is in <out>/logs.

1. sdpa: a Swin-B stage-1 window attention (C 128, 4 heads, window 8x7x7,
   shifted) through F.scaled_dot_product_attention with its learnable relative
   position bias, under the kernel torch picks in bf16. FAILS if the bias
   table gets no gradient, or one more than 10% off the math kernel's in fp32.
   Also listed: each backend alone, and the kernel the profiler saw.
2. tokenizer: the DALL-E encoder (the published architecture, random weights:
   its cost does not depend on the values) on the 192 frames of a per-GPU
   batch at 112 px: frames/s in fp32 (train.py's default) and bf16.
3. step: one joint pretraining step of Swin-B at the paper's per-GPU batch
   (8 clips 16x224² + 64 images, 8192 codes), bf16, with that tokenizer
   making the targets: step time (median of steps after the warm-up, so
   compilation is excluded), clips/s, peak memory, FLOPs of the step counted
   with torch.utils.flop_counter (forward, backward and the tokenizer) and the
   MFU against the GPU's dense bf16 peak. Out of memory: retried with gradient
   checkpointing (the row says so). Eager here; compiled as the last check.
4. resume: train.py's image stage (Swin-T, drop path 0.1 so that the CUDA RNG
   matters, fused AdamW on CUDA): 4 steps in one run against 2 steps + a
   resume to 4. FAILS if steps 3-4 (loss, gradient norm) differ by more than
   the noise between two fresh runs allows.
5. ddp-accum: train.py under torchrun (NCCL), accumulation 2 (no_sync on the
   first micro-batch) against one process with the same global batch in one
   micro-batch: the same samples, so the first steps' loss and gradient
   norm must agree.
6. finetune: finetune.py under torchrun from the resume check's final.pt, a few
   steps and its evaluation on the validation videos: eval.json written, every
   video evaluated once, top-1 finite.
7. compiled: check 3 after train.py --compile's model.compile_streams; the
   warm-up (compilation) is reported apart from the timed steps. --no-compile
   skips it.
"""

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files
import torch  # noqa: E402

import bevt  # noqa: E402
import swin3d  # noqa: E402
import tokenizer  # noqa: E402
import train  # noqa: E402
from tools import synthetic  # noqa: E402
from tools.bench_train import make_batch  # noqa: E402  (the benchmark's inputs: one definition)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Dense bf16 tensor-core peaks (TFLOP/s) by device name, first match wins; --peak-tflops overrides.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("A100", 312.0), ("L40S", 362.0))
PAPER_STEP = dict(model="base", clips=8, frames=16, images=64, size=224, vocab=8192)     # per GPU, §4.1
DRY_STEP = dict(model="cpu", clips=1, frames=4, images=2, size=96, vocab=8192)     # a 6x6 grid: room for a block


class CheckFailed(Exception):
    """A check ran and measured something wrong: one line."""


class Ctx:
    """What every check needs: device, toy sizes or not, output folder, the synthetic set."""

    def __init__(self, args):
        self.dry = args.cpu_dry_run
        self.device = torch.device("cpu") if self.dry else torch.device("cuda", 0)
        self.out = os.path.abspath(args.out)                              # torchrun's runs start in the repository
        self.root = os.path.join(self.out, "data")
        self.peak_tflops = args.peak_tflops
        self.compile = not (self.dry or args.no_compile)
        self.nproc = 1 if self.dry else min(2, torch.cuda.device_count())    # processes of the torchrun checks
        self.precision = "fp32" if self.dry else "bf16"
        self.ckpt = False                                     # gradient checkpointing: set when the step ran out of memory

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated() / 2 ** 30 if self.device.type == "cuda" else float("nan")


def timed_steps(ctx: Ctx, fn, warmup: int, repeats: int) -> dict:
    """Run fn `warmup` times (compilation, cudnn autotuning: not timed), then `repeats` times, each synced:
    the median and the window's mean step time and the peak memory of the timed window."""
    t = time.perf_counter()
    for _ in range(warmup):
        fn()
    ctx.sync()
    warm = time.perf_counter() - t
    ctx.reset_peak()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ctx.sync()
        times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times), "window_mean_s": statistics.fmean(times), "warmup_s": warm,
            "peak_gib": ctx.peak_gib()}


# -----------------------------------------------------------------------------
# 1. SDPA with a learnable bias


def window_attention_grads(ctx: Ctx, attn, x, index, mask, bf16: bool):
    """(output, bias-table gradient) of one forward/backward of a WindowAttention3D."""
    attn.zero_grad(set_to_none=True)
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = attn(x, index, mask)
    out.float().square().mean().backward()
    return out.detach().float(), attn.relative_position_bias_table.grad


def check_sdpa(ctx: Ctx) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile
    dim, heads, window, size, B = (32, 2, (2, 7, 7), (2, 14, 14), 1) if ctx.dry else (128, 4, (8, 7, 7), (8, 56, 56), 8)
    torch.manual_seed(0)
    attn = swin3d.WindowAttention3D(dim, window, heads, attention="sdpa").to(ctx.device)
    torch.nn.init.trunc_normal_(attn.relative_position_bias_table, std=0.02)
    N, nW = math.prod(window), math.prod(s // w for s, w in zip(size, window))
    x = torch.randn(B, nW, N, dim, device=ctx.device)                      # windows (B, nW, N, C)
    index = swin3d.relative_position_index(window, window, device=ctx.device)
    mask = swin3d.shift_mask(size, window, tuple(w // 2 for w in window), device=ctx.device)   # (nW, N, N)
    bf16 = ctx.device.type == "cuda"
    res = {"shape": [B * nW, heads, N, dim // heads], "dtype": "bf16" if bf16 else "fp32", "backends": {}}
    for name, m in (("shifted", mask), ("unshifted", None)):
        with sdpa_kernel([SDPBackend.MATH]):
            _, ref = window_attention_grads(ctx, attn, x, index, m, bf16=False)
        ref = ref.clone()
        _, grad = window_attention_grads(ctx, attn, x, index, m, bf16)      # the kernel torch picks
        if grad is None or not grad.abs().max() > 0:
            raise CheckFailed(f"{name} window attention: the kernel torch picks gives the relative position bias "
                              f"{'no' if grad is None else 'a zero'} gradient")
        err = ((grad.float() - ref).abs().max() / ref.abs().max()).item()
        res[f"{name}_bias_grad_rel_err"] = err
        if err > (0.1 if bf16 else 1e-4):
            raise CheckFailed(f"{name} window attention: the bias gradient differs from the math kernel's by "
                              f"{err:.1e} (relative)")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                _, grad = window_attention_grads(ctx, attn, x, index, mask, bf16)
            flows = grad is not None and bool(grad.abs().max() > 0)
            res["backends"][backend.name] = "bias gradient" if flows else "NO bias gradient"
        except RuntimeError as e:
            res["backends"][backend.name] = "refused: " + str(e).splitlines()[0][:80]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        window_attention_grads(ctx, attn, x, index, mask, bf16)
        ctx.sync()
    res["kernels"] = sorted({e.key for e in prof.key_averages()
                             if any(s in e.key.lower() for s in ("attention", "fmha", "flash"))})[:6]
    return res


# -----------------------------------------------------------------------------
# 2-3. The DALL-E tokenizer and the headline step


def check_tokenizer(ctx: Ctx) -> dict:
    c = DRY_STEP if ctx.dry else PAPER_STEP
    tok = tokenizer.DalleTokenizer().to(ctx.device)                         # the published architecture, random
    n, half = c["clips"] * c["frames"] + c["images"], c["size"] // 2
    x = torch.randint(0, 256, (n, 3, half, half), dtype=torch.uint8, device=ctx.device)
    res, ref = {"frames": n, "px": half}, None
    for precision in ("fp32", "bf16"):
        tok.set_precision(precision)
        codes = tok.codes_of_copy(x)
        ref = codes if ref is None else ref
        t = timed_steps(ctx, lambda: tok.codes_of_copy(x), warmup=1, repeats=1 if ctx.dry else 3)
        res[f"{precision}_frames_per_s"] = n / t["step_s"]
        res[f"{precision}_codes_equal_to_fp32"] = (codes == ref).float().mean().item()
    return res


def peak_tflops(ctx: Ctx) -> float:
    if ctx.peak_tflops:
        return ctx.peak_tflops
    name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else ""
    return next((p for key, p in PEAK_BF16_TFLOPS if key in name), float("nan"))


def headline_step(ctx: Ctx, c: dict, ckpt: bool, compiled: bool) -> dict:
    """Build Swin-B BEVT (joint stage), fused AdamW and the random DALL-E tokenizer; time train.step."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    swin = swin3d.get_config(c["model"], drop_path_rate=0.3, use_checkpoint=ckpt)
    model = bevt.BEVT(bevt.BEVTConfig(swin=swin, vocab_size=c["vocab"])).to(ctx.device)
    model.set_stage("joint")
    tok = tokenizer.DalleTokenizer().to(ctx.device)                         # fp32, as train.py's default
    opt = torch.optim.AdamW(train.param_groups(model, 0.05), lr=1e-4, fused=ctx.device.type == "cuda")
    batch = make_batch(c, ctx.device)
    rt = train.Runtime(False, 0, 1, ctx.device, ctx.device.type == "cuda")

    def step():
        sums, _ = train.train_step(model, [batch], tok, rt, 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return sums

    res = {"grad_checkpointing": ckpt}
    counter = FlopCounterMode(display=False)
    with counter:
        loss = step()["loss"].item()
    if not math.isfinite(loss):
        raise CheckFailed(f"the Swin-B step's loss is {loss}")
    res["tflop_per_step"] = counter.get_total_flops() / 1e12            # forward + backward + tokenizer
    res["flops_note"] = "fwd + bwd + tokenizer" + (" + recomputation (checkpointing)" if ckpt else "")
    if compiled:
        model.compile_streams(dynamic=False)                              # what train.py --compile does
    res.update(timed_steps(ctx, step, warmup=(3 if compiled else 2) if not ctx.dry else 1, repeats=2 if ctx.dry else 5))
    res["clips_per_s"], res["images_per_s"] = c["clips"] / res["step_s"], c["images"] / res["step_s"]
    res["mfu"] = res["tflop_per_step"] / res["step_s"] / peak_tflops(ctx)
    return res


def check_step(ctx: Ctx, compiled: bool = False) -> dict:
    """The headline step, eager (or compiled: the last check, its compilation the longest wait)."""
    c = DRY_STEP if ctx.dry else PAPER_STEP
    res = {"batch": f"{c['clips']} clips {c['frames']}x{c['size']}² + {c['images']} images, {c['model']}"}
    try:
        res.update(headline_step(ctx, c, ctx.ckpt, compiled))
    except torch.cuda.OutOfMemoryError:
        if ctx.ckpt:
            raise
        gc.collect()
        torch.cuda.empty_cache()
        ctx.ckpt = True                                                   # the row says it was needed
        res.update(headline_step(ctx, c, True, compiled))
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return res


# -----------------------------------------------------------------------------
# 4-6. train.py and finetune.py as a user runs them


def run_logged(ctx: Ctx, name: str, fn):
    """fn() with stdout and stderr in <out>/logs/<name>.log; on an exception the log's tail is printed."""
    os.makedirs(os.path.join(ctx.out, "logs"), exist_ok=True)
    path = os.path.join(ctx.out, "logs", f"{name}.log")
    with open(path, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            return fn()
        except SystemExit as e:                                       # train.run_cli's one-line errors
            if e.code:
                raise CheckFailed(f"{name} exited with {e.code}; see {path}") from None
    return None


def torchrun(ctx: Ctx, name: str, script: str, argv: list) -> None:
    """`python -m torch.distributed.run --standalone --nproc_per_node=N script argv`, output to a log."""
    path = os.path.join(ctx.out, "logs", f"{name}.log")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ctx.nproc}",
           os.path.join(REPO, script), *map(str, argv)]
    with open(path, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code:
        with open(path) as f:
            tail = "".join(f.readlines()[-15:])
        raise CheckFailed(f"{name}: torchrun {script} exited with {code}; {path} ends:\n{tail}")


def steps_of(run_dir: str) -> dict:
    """{step: metrics row} of a run folder's metrics.jsonl."""
    return {r["step"]: r for r in train.read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r}


def rel_diff(a: dict, b: dict, steps, keys=("loss", "grad_norm")) -> float:
    return max(abs(a[s][k] - b[s][k]) / max(abs(b[s][k]), 1e-12) for s in steps for k in keys)


def image_stage(ctx: Ctx, out: str, steps: int, *extra) -> list:
    return ["--preset", "cpu", "--model", "cpu" if ctx.dry else "tiny", "--data", ctx.root, "--stage", "image",
            "--out", out, "--max-steps", str(steps), "--precision", ctx.precision, "--log-every", "1",
            "--workers", "1" if ctx.dry else "4", *extra]


def check_resume(ctx: Ctx) -> dict:
    drop = ["--drop-path", "0.1"]                                         # draws from the device RNG every step
    runs = {name: os.path.join(ctx.out, "runs", name) for name in ("whole", "twin", "resumed")}
    plan = (("whole", 4), ("resumed", 2), ("resumed", 4)) + ((("twin", 2),) if not ctx.dry else ())
    for name, steps in plan:                                              # twin: two fresh runs give the noise
        run_logged(ctx, f"resume-{name}-{steps}", lambda: train.main(image_stage(ctx, runs[name], steps, *drop)))
    whole, resumed = (steps_of(os.path.join(runs[n], "image")) for n in ("whole", "resumed"))
    noise = 0.0 if ctx.dry else rel_diff(steps_of(os.path.join(runs["twin"], "image")), whole, (1, 2))
    diff = rel_diff(resumed, whole, (3, 4))
    tol = 1e-6 if ctx.dry else max(1e-3, 10 * noise)
    res = {"fresh_runs_rel_diff": noise, "resumed_rel_diff": diff, "tolerance": tol,
           "images_per_s_logged": whole[4].get("images_per_s")}
    if diff > tol:
        raise CheckFailed(f"steps 3-4 after a resume differ from the uninterrupted run by {diff:.1e} (relative; "
                          f"two fresh runs differ by {noise:.1e}): optimizer state or RNG not restored")
    return res


def check_ddp_accum(ctx: Ctx) -> dict:
    per_process = 16 // (2 * ctx.nproc)                                   # the cpu preset's global batch: 16 images
    one, ddp = (os.path.join(ctx.out, "runs", n) for n in ("accum1", "ddp-accum2"))
    run_logged(ctx, "accum1", lambda: train.main(image_stage(ctx, one, 2, "--image-batch", "16")))
    torchrun(ctx, "ddp-accum2", "train.py", image_stage(ctx, ddp, 2, "--image-batch", per_process, "--accum-steps", 2))
    a, b = steps_of(os.path.join(one, "image")), steps_of(os.path.join(ddp, "image"))
    diff = rel_diff(b, a, (1, 2))
    # Not equal to rounding: the loss is a mean over each micro-batch's masked tokens, and blockwise masks
    # differ in size, so a mean of two means is not the mean over both. A lost or doubled micro-batch
    # gradient moves the gradient norm by far more.
    tol = 2e-2
    res = {"processes": ctx.nproc, "per_process": per_process, "accum": 2, "rel_diff": diff, "tolerance": tol,
           "backend": "gloo" if ctx.dry else "nccl"}
    if diff > tol:
        raise CheckFailed(f"accumulation 2 under DDP differs from one micro-batch of the same samples by {diff:.1e}")
    return res


def check_finetune(ctx: Ctx) -> dict:
    init = os.path.join(ctx.out, "runs", "whole", "image", "final.pt")
    out = os.path.join(ctx.out, "runs", "finetune")
    argv = ["--preset", "cpu", "--model", "cpu" if ctx.dry else "tiny", "--data", ctx.root, "--init", init,
            "--out", out, "--task", "appearance", "--max-steps", 2 if ctx.dry else 10, "--eval-mode", "normal",
            "--precision", ctx.precision, "--workers", 1 if ctx.dry else 4, "--log-every", 1]
    torchrun(ctx, "finetune", "finetune.py", argv)
    with open(os.path.join(out, "appearance", "eval.json")) as f:
        ev = json.load(f)
    which, res = next(iter(ev["results"].items()))                       # the model (an EMA copy may follow)
    m = res["normal"]
    with open(os.path.join(ctx.root, "videos", "val_appearance.txt")) as f:
        n_val = sum(1 for line in f if line.strip())
    if m["n"] != n_val or not math.isfinite(m["top1"]):
        raise CheckFailed(f"the evaluation counted {m['n']} of {n_val} videos, top-1 {m['top1']}")
    return {"evaluated": f"{which} normal", "videos": m["n"], "top1": m["top1"], "processes": ctx.nproc}


# -----------------------------------------------------------------------------
# The run: checks in order, figures to JSON, a table


CHECKS = (("sdpa", check_sdpa), ("tokenizer", check_tokenizer), ("step", check_step), ("resume", check_resume),
          ("ddp-accum", check_ddp_accum), ("finetune", check_finetune),
          ("compiled", lambda ctx: check_step(ctx, compiled=True)))


def summary(name: str, r: dict) -> str:
    """The table's one-line figures of a check."""
    if not r.get("ok"):
        return r.get("error", "").splitlines()[0][:100]
    if name == "sdpa":
        return f"bias grad rel err {r['shifted_bias_grad_rel_err']:.1e}; kernels: {', '.join(r['kernels'])[:60]}"
    if name == "tokenizer":
        return f"{r['fp32_frames_per_s']:.0f} frames/s fp32, {r['bf16_frames_per_s']:.0f} bf16"
    if name in ("step", "compiled"):
        return (f"{r['step_s']:.3f} s/step, {r['clips_per_s']:.1f} clips/s + {r['images_per_s']:.0f} images/s, "
                f"{r['peak_gib']:.1f} GiB, {r['tflop_per_step']:.1f} TFLOP, MFU {r['mfu']:.1%}"
                + (" (checkpointing)" if r["grad_checkpointing"] else ""))
    if name in ("resume", "ddp-accum"):
        return f"rel diff {r.get('resumed_rel_diff', r.get('rel_diff')):.1e} (tolerance {r['tolerance']:.0e})"
    return f"{r['videos']} videos, top-1 {r['top1']:.1f} ({r['processes']} process(es))"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/gpu_check", help="folder for the data, runs, logs and gpu_check.json "
                    "(default /tmp/gpu_check; the synthetic set there is reused by a rerun)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="toy sizes on the CPU: checks this script")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled step (saves its compile time)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(n for n, _ in CHECKS)} "
                    "(default all; finetune needs resume's checkpoint)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the GPU's dense bf16 peak for the MFU "
                    "(default: from the device name, e.g. 989 for an H100 SXM)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if "RANK" in os.environ:
        sys.exit("gpu_check: start it as plain `python tools/gpu_check.py`; it runs torchrun itself where needed")
    if not args.cpu_dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (python tools/gpu_check.py --cpu-dry-run checks the script on a CPU)")
    ctx, t_all = Ctx(args), time.perf_counter()
    only = [n for n in args.only.split(",") if n] or [n for n, _ in CHECKS if n != "compiled" or ctx.compile]
    unknown = sorted(set(only) - {n for n, _ in CHECKS})
    if unknown:
        sys.exit(f"gpu_check: unknown --only {','.join(unknown)}; expected a subset of "
                 f"{','.join(n for n, _ in CHECKS)}")
    name = torch.cuda.get_device_name(0) if not ctx.dry else "CPU dry run"
    print(f"gpu_check: torch {torch.__version__}, {name}, out {ctx.out}", flush=True)
    # Enough for the checks: the dry run's toy set; on the GPU 32 + 16 videos and 8 images per class.
    small = (dict(n_train=8, n_val=2, images_train=4, images_val=1) if ctx.dry else
             dict(n_train=32, n_val=16, images_train=8, images_val=2))
    t = time.perf_counter()
    synthetic.prepare(ctx.root, seed=0, verbose=False, **small)           # the set and its offline tokenizer
    print(f"synthetic set at {ctx.root}: {time.perf_counter() - t:.0f} s", flush=True)
    for own in ("runs", "logs"):                                          # a rerun measures again (the data stays)
        shutil.rmtree(os.path.join(ctx.out, own), ignore_errors=True)
    results, path = {}, os.path.join(ctx.out, "gpu_check.json")
    for check, fn in CHECKS:
        if check not in only:
            continue
        t = time.perf_counter()
        try:
            results[check] = {"ok": True, **fn(ctx)}
        except Exception as e:                                             # noqa: BLE001  a failed check, reported
            results[check] = {"ok": False, "error": str(e) if isinstance(e, CheckFailed) else traceback.format_exc()}
        results[check]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"[{check}] {'ok' if results[check]['ok'] else 'FAILED'} in {results[check]['seconds']:.0f} s: "
              f"{summary(check, results[check])}", flush=True)
        doc = {"device": name, "torch": torch.__version__, "total_s": round(time.perf_counter() - t_all, 1),
               "checks": results}
        with open(path, "w") as f:                                         # after each check: a cut run keeps its figures
            json.dump(doc, f, indent=1, default=str)
    print(f"\n{'check':10s} {'result':7s} {'s':>5s}  figures")
    for check, r in results.items():
        print(f"{check:10s} {'ok' if r['ok'] else 'FAILED':7s} {r['seconds']:5.0f}  {summary(check, r)}")
        if not r["ok"] and r["error"].strip() != summary(check, r):
            print("    " + r["error"].rstrip().replace("\n", "\n    "))
    print(f"total {time.perf_counter() - t_all:.0f} s; figures in {path}")
    return 1 if any(not r["ok"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
