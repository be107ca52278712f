"""The embedded synthetic data set and its offline tokenizer (prepared before the CPU demo).

    python tools/synthetic.py                  # data/synthetic, with tokenizer_256.pt
    python tools/synthetic.py --out DIR --seed 0

(Stage 1 of the restructuring: delegates to the old code; the renderer moves here.)
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files

import data        # noqa: E402
import train       # noqa: E402
from tools import tokenizer_tool   # noqa: E402

# The offline tokenizer the CPU demo reads: 256 codes fitted on 112-px crops of the training
# images (the cpu preset's crop), 10 k-means iterations over at most 50,000 patches, seed = the set's.
TOKENIZER_VOCAB, TOKENIZER_SIZE = 256, 112


def tokenizer_path(root, vocab: int = TOKENIZER_VOCAB) -> str:
    return os.path.join(str(root), f"tokenizer_{vocab}.pt")


def prepare(root, seed: int = 0, verbose: bool = True, vocab: int = TOKENIZER_VOCAB,
            size: int = TOKENIZER_SIZE, **sizes) -> str:
    """Write the synthetic set at `root` (if not there) and fit its offline tokenizer (if not there)."""
    data.ensure_synthetic(root, seed=seed, verbose=verbose, **sizes)
    path = tokenizer_path(root, vocab)
    if not os.path.exists(path):
        if verbose:
            print(f"fitting the offline tokenizer ({vocab} codes) on {root}/images/train ...")
        tok = tokenizer_tool.fit_from_dir(os.path.join(str(root), "images", "train"), vocab, size=size, seed=seed,
                                          iters=10, max_patches=50_000, verbose=False)
        tok.save(path)
    return str(root)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/synthetic", help="folder of the set (default data/synthetic)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the set and of the tokenizer's fit (default 0)")
    args = ap.parse_args(argv)
    train.run_cli("synthetic.py", prepare, args.out, args.seed)


if __name__ == "__main__":
    main()
