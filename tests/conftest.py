"""Shared pytest set-up: keep CPU tests deterministic and light on this 2-core
machine. (The flat top-level modules are importable through pytest.ini's
`pythonpath = .`.)"""
import os

import torch

# Two cores: more intra-op threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


import pytest


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """A tiny synthetic data set written with PyAV by tools/synthetic.py (8 videos, 24 images,
    96x112 px) with its 32-code offline tokenizer fitted on 96-px crops: the smallest on which
    train.py runs (96-px crops of 4 frames; tests/test_train.py's `args`)."""
    from tools import synthetic
    root = tmp_path_factory.mktemp("bevt") / "syn"
    synthetic.prepare(root, seed=0, verbose=False, vocab=32, size=96, n_train=8, n_val=2, images_train=4,
                      images_val=1, frames=16, height=96, width=112)
    return str(root)
