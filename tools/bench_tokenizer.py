"""Benchmark of the tokenizers (tokenizer.py): codes per second on this machine.

    python tools/bench_tokenizer.py                    # batch of 8 224-px crops, CPU
    python tools/bench_tokenizer.py --batch-size 32 --repeats 5
    python tools/bench_tokenizer.py --crop 112         # the CPU demo's crops
    python tools/bench_tokenizer.py --agreement data/synthetic/images/val   # + bf16/fp16 code agreement

What is timed, for a batch of `--batch-size` crops of `--crop` px (default 224, the
paper's crop), each halved with Lanczos to the 112-px image the dVAE sees and
turned into (size/16)² = 196 codes:

1. the Lanczos 1/2 resize alone (both tokenizers pay it);
2. DALL-E: the full published architecture (n_hid 256, 8192 codes, 54M
   parameters) with random weights (the published ones cannot be downloaded
   here; the compute does not depend on the values), fp32, as `tokenize` runs
   it, and once more with the encoder in channels_last memory format;
3. the offline k-means tokenizer with 8192, 1024 and 256 codes (random
   codebooks; nearest-code search cost depends only on the sizes).

`tokenize` includes the resize. Times are the median of --repeats after one
warm-up call (first calls pay oneDNN's primitive creation), in one process
using torch's intra-op threads (--threads, default all cores). On a CUDA
machine the same cases also run on the GPU (synchronised timing).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files
import torch  # noqa: E402

import tokenizer as T  # noqa: E402
from tools import tokenizer_tool  # noqa: E402


def timed(fn, repeats, device):
    fn()                                                        # warm-up
    ts = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=8, help="crops per tokenize call (default 8)")
    ap.add_argument("--crop", type=int, default=224, help="crop size in px (the dVAE sees crop/2; default 224)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per case, the median reported (default 3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    ap.add_argument("--skip-dalle", action="store_true", help="only the resize and the offline tokenizer")
    ap.add_argument("--agreement", default="", metavar="DIR",
                    help="also: share of codes bf16/fp16 leave equal to fp32, on the images under DIR")
    ap.add_argument("--tokenizer", default="", help="weights for --agreement (default: random)")
    return ap


def main():
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    n, s = args.batch_size, args.crop
    codes_per_call = n * (s // T.PATCH) ** 2
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; batch {n} crops of {s} px "
          f"-> dVAE input {s // 2} px -> {s // T.PATCH}x{s // T.PATCH} codes each ({codes_per_call} per call); "
          f"median of {args.repeats}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")

    rows = []
    for dev in devices:
        x = torch.rand(n, 3, s, s, device=dev)

        def report(name, sec):
            rows.append((dev.type, name, sec))
            print(f"{dev.type:5s} {name:36s} {sec * 1e3:9.1f} ms/call  {codes_per_call / sec:10.0f} codes/s  "
                  f"{n / sec:8.1f} frames/s", flush=True)

        report("Lanczos 1/2 resize only", timed(lambda: T.lanczos_resize(x, (s // 2, s // 2)), args.repeats, dev))
        if not args.skip_dalle:
            tok = T.DalleTokenizer().to(dev)                    # random weights, published shapes
            report("DALL-E dVAE encoder (8192)", timed(lambda: tok.tokenize(x), args.repeats, dev))
            tok.encoder.to(memory_format=torch.channels_last)
            report("DALL-E, channels_last", timed(lambda: tok.tokenize(x), args.repeats, dev))
            tok.encoder.to(memory_format=torch.contiguous_format)
            for precision in ("bf16", "fp16"):                  # Tokenizer.set_precision (channels-last)
                tok.set_precision(precision)
                report(f"DALL-E, {precision} autocast", timed(lambda: tok.tokenize(x), args.repeats, dev))
            tok.set_precision("fp32")
            del tok
        for vocab in (8192, 1024, 256):
            codebook = torch.rand(vocab, 3 * T.DVAE_PATCH ** 2)
            tok = T.OfflineTokenizer(codebook).to(dev)
            report(f"offline k-means ({vocab})", timed(lambda: tok.tokenize(x), args.repeats, dev))

    if args.agreement and not args.skip_dalle:
        agreement(args.agreement, devices[-1], args.tokenizer)


def agreement(images_dir, device, weights="", count=64, size=224):
    """Share of DALL-E codes that bf16 / fp16 autocast leave identical to fp32, on real image files.

    With random weights (all we have here) the logits' margins are not the
    trained model's, so this bounds how often near-ties flip rather than giving
    the published tokenizer's figure; pass a real encoder with --tokenizer."""
    files = tokenizer_tool.list_images(images_dir)[:count]
    x = torch.stack([tokenizer_tool.read_square_image(f, size) for f in files]).to(device)
    tok = T.load_tokenizer(weights, device=device) if weights else T.DalleTokenizer().to(device)
    ref = tok.tokenize(x)
    for precision in ("bf16", "fp16"):
        same = (tok.set_precision(precision).tokenize(x) == ref).float().mean().item()
        print(f"{device.type:5s} codes identical to fp32 with {precision}: {same:.2%} of {ref.numel()} codes "
              f"({len(files)} images from {images_dir}, {'given' if weights else 'random'} weights)")


if __name__ == "__main__":
    main()
