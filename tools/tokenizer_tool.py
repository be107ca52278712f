"""The tokenizer's commands: convert the published DALL-E pickles, fit the offline tokenizer, inspect a file.

    python tools/tokenizer_tool.py convert --pkl encoder.pkl --out-file dalle_encoder.pt
        # once: the published pickle -> a plain state dict (weights_only=True loadable);
        # the same for decoder.pkl -> dalle_decoder.pt (prediction pictures, tools/decoders.py)
    python tools/tokenizer_tool.py fit --image-root DIR --vocab-size 8192 --out-file tok.pt [--crop 224
                            --seed 0 --iters 20 --max-patches 200000 --kmeans-init kmeans++ --device cpu]
        # the offline tokenizer (tokenizer.OfflineTokenizer), from the images under DIR (recursively)
    python tools/tokenizer_tool.py info PATH
        # what a tokenizer file is and its vocabulary
"""
import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files

import numpy as np               # noqa: E402
import torch                     # noqa: E402
from PIL import Image            # noqa: E402

import data                      # noqa: E402
import tokenizer                 # noqa: E402
import train                     # noqa: E402
from tools import decoders        # noqa: E402
from tools import kmeans_fit      # noqa: E402

PROG = "tokenizer_tool.py"


def list_images(root) -> list:
    """Every image under `root` (the extensions the image stream reads, data.IMAGE_EXTS), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image directory not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in data.IMAGE_EXTS)
    if not files:
        raise ValueError(f"no images ({', '.join(data.IMAGE_EXTS)}) under {root}")
    return files


def read_square_image(path: Path, size: int) -> torch.Tensor:
    """An image file -> (3, size, size) in [0, 1]: short side to `size` (bicubic), centre crop."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def fit_from_dir(data, vocab_size: int, *, size: int = 224, seed: int = 0, iters: int = 20,
                 max_patches: int = 200_000, init: str = "kmeans++", resample: str = "pil",
                 device: str = "cpu", batch: int = 32, verbose: bool = True) -> tokenizer.OfflineTokenizer:
    """Fit the offline tokenizer on the images under `data`: each image gives an
    equal, seeded random share of the `max_patches` patches."""
    if size % tokenizer.PATCH:
        raise ValueError(f"--crop {size} is not a multiple of {tokenizer.PATCH}")
    files = list_images(data)
    per_image = max(1, math.ceil(max_patches / len(files)))
    g = torch.Generator().manual_seed(seed)
    feats = []
    it = range(0, len(files), batch)
    if verbose:
        from tqdm import tqdm
        it = tqdm(it, desc="patches", unit="batch")
    for i in it:
        x = torch.stack([read_square_image(p, size) for p in files[i:i + batch]])   # (b, 3, size, size)
        f = kmeans_fit.extract_patches(x, resample).view(x.shape[0], -1, 3 * tokenizer.DVAE_PATCH ** 2)  # (b, P, 192)
        for fi in f:
            keep = torch.randperm(fi.shape[0], generator=g)[:per_image]
            feats.append(fi[keep])
    feats = torch.cat(feats)
    if feats.shape[0] > max_patches:
        feats = feats[torch.randperm(feats.shape[0], generator=g)[:max_patches]]
    if verbose:
        print(f"{len(files)} images -> {feats.shape[0]} patches of {feats.shape[1]} values; "
              f"k-means with {vocab_size} codes, {iters} iterations, init {init}, seed {seed}")
    return kmeans_fit.fit_patches(feats, vocab_size, seed=seed, iters=iters, init=init,
                                  resample=resample, device=device, verbose=verbose, size=size,
                                  source=str(data), n_images=len(files))


def read_dalle_pickle(path) -> tuple:
    """("encoder" | "decoder", tensors) of a published DALL-E pickle, whichever it is.

    Read as an encoder first; only a refusal that names a dall_e.decoder class
    (raised by find_class before anything of the file ran) makes it try the
    decoder's allow-list. Any other global is refused by both.
    """
    try:
        obj = tokenizer.restricted_torch_load(path, what="encoder.pkl or decoder.pkl")
    except tokenizer.UnsafePickleError as e:
        if "'dall_e.decoder." not in str(e):
            raise
        obj = tokenizer.restricted_torch_load(path, decoders.DecoderUnpickler, what="decoder.pkl")
    for kind, root in (("encoder", tokenizer.PickledEncoder), ("decoder", decoders.PickledDecoder)):
        if isinstance(obj, root):
            return kind, tokenizer.module_tensors(obj)
    raise ValueError(f"{path}: expected a pickled dall_e Encoder or Decoder, got a {type(obj).__name__}")


def convert(pkl, out) -> None:
    kind, state = read_dalle_pickle(pkl)
    # Check names and shapes before writing anything.
    (tokenizer.DalleTokenizer if kind == "encoder" else decoders.DalleDecoder).from_state_dict(state)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({k: v.detach().contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, out)
    n = sum(v.numel() for v in state.values())
    print(f"wrote {out}: DALL-E {kind}, {len(state)} tensors, {n / 1e6:.1f}M values (load with weights_only=True)")


def fit(args) -> None:
    tok = fit_from_dir(args.image_root, args.vocab_size, size=args.crop, seed=args.seed, iters=args.iters,
                       max_patches=args.max_patches, init=args.kmeans_init, resample=args.resample,
                       device=args.device, verbose=not args.quiet)
    tok.save(args.out_file)
    print(f"wrote {args.out_file}: offline tokenizer, {tok.vocab_size} codes, fit mse {tok.config['fit_mse']:.5f} "
          f"per value")


def info(path) -> None:
    tok = tokenizer.load_tokenizer(path)
    print(f"{path}: {tok.kind} tokenizer, vocabulary {tok.vocab_size}, resample {tok.resample}")
    if isinstance(tok, tokenizer.OfflineTokenizer):
        print(f"config: {tok.config}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="encoder.pkl or decoder.pkl -> plain state dict (loads with weights_only=True)")
    c.add_argument("--pkl", required=True, help="the published DALL-E encoder.pkl (or decoder.pkl, for pictures)")
    c.add_argument("--out-file", required=True, metavar="PT", help="output .pt file")
    f = sub.add_parser("fit", help="fit the offline k-means tokenizer on a directory of images")
    f.add_argument("--image-root", required=True, metavar="DIR", help="directory searched recursively for "
                   "png/jpg images")
    f.add_argument("--vocab-size", type=int, required=True, help="number of codes (8192 = DALL-E's)")
    f.add_argument("--out-file", required=True, metavar="PT", help="output .pt file")
    f.add_argument("--crop", type=int, default=224, help="crop size in pixels, a multiple of 16 (default 224)")
    f.add_argument("--seed", type=int, default=0, help="seed of the crops, patches and k-means (default 0)")
    f.add_argument("--iters", type=int, default=20, help="Lloyd iterations")
    f.add_argument("--max-patches", type=int, default=200_000, help="patches sampled for the fit")
    f.add_argument("--kmeans-init", choices=("kmeans++", "random"), default="kmeans++",
                   help="how k-means picks its first centres (default kmeans++)")
    f.add_argument("--resample", choices=tokenizer.RESAMPLE_KINDS, default="pil",
                   help="Lanczos flavour for the 1/2 resize")
    f.add_argument("--device", default="cpu", help="where k-means runs (cuda for large vocabularies)")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="what a tokenizer file holds")
    i.add_argument("path", metavar="PATH", help="a tokenizer file: encoder.pkl, its converted .pt, an offline "
                   "tokenizer or a folder holding encoder.pkl")
    return ap


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.cmd == "convert":
        train.run_cli(PROG, convert, args.pkl, args.out_file)
    elif args.cmd == "fit":
        train.run_cli(PROG, fit, args)
    else:
        train.run_cli(PROG, info, args.path)


if __name__ == "__main__":
    main()
