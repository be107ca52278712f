"""Shared pytest set-up: make the flat top-level modules importable and keep
CPU tests deterministic and light on this 2-core machine."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# Two cores: more intra-op threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))
