"""What the attention benchmarks share: issue 3's patterns and a forward+backward closure."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

# label -> (example file, parameter overrides)
PATTERNS = {
    "strided(l=128)": ("strided.attn", {"l": 128}),
    "fixed(l=128,c=16)": ("fixed.attn", {"l": 128, "c": 16}),
    "local(256)": ("local.attn", {"w": 256}),
}


def forward_backward(attn, q, k, v, grad=None):
    """A closure running attn forward and backward from fresh leaves (grad: the output gradient, default ones)."""

    def run():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        out = attn(qq, kk, vv)
        out.backward(grad if grad is not None else torch.ones_like(out))

    return run


def chosen_configs(launcher) -> dict[str, list[int]]:
    """The tile configs (BLOCK_M, BLOCK_N, num_warps, num_stages) a launcher picked on CUDA, by kernel and shape:
    `launcher` is a generated module or patterncc.families.shared.launch (their _SPILL_FREE and _CHOSEN tables)."""
    configs = {}
    for kind, name in (("spill-free", "_SPILL_FREE"), ("chosen", "_CHOSEN")):
        for key, config in getattr(launcher, name, {}).items():
            configs[f"{kind} " + " ".join(str(part).removeprefix("torch.") for part in key)] = list(config)
    return configs


def write_results(path, args, rows):
    """A benchmark's rows as JSON at `path` (when given), with its arguments and torch's version."""
    import json

    if path:
        with open(path, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=1)
