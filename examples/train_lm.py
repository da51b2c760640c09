"""Train a small character-level language model with patterncc attention, and the same model with dense causal
attention, on the CPU; plot both loss curves.

    python examples/train_lm.py                       # strided pattern, 300 steps, out/train_lm.png
    python examples/train_lm.py --pattern examples/fixed.attn -D l=16 -D c=4 --steps 500
    python examples/train_lm.py --compile             # torch.compile both models (fullgraph)

The text is this repository's own documentation (README.md and docs/*.md), read character by character. Both
models share everything but the attention: the same initial weights, batches and optimizer; the dense one calls
F.scaled_dot_product_attention(is_causal=True). Patterns must be causal (a language model cannot see ahead).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import patterncc.nn

ROOT = Path(__file__).resolve().parent.parent


class DenseSelfAttention(torch.nn.Module):
    """SparseSelfAttention's projections around dense causal SDPA: the baseline."""

    def __init__(self, embed_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = torch.nn.Linear(embed_dim, embed_dim)
        self.kv_proj = torch.nn.Linear(embed_dim, 2 * embed_dim)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim)

    def forward(self, x):
        batch, n, width = x.shape
        head_dim = width // self.num_heads
        q = self.q_proj(x).view(batch, n, self.num_heads, head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(batch, n, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(batch, n, width))


class Block(torch.nn.Module):
    def __init__(self, width, attention):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attention = attention
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(torch.nn.Module):
    def __init__(self, vocab, width, layers, context, make_attention):
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab, width)
        self.positions = torch.nn.Embedding(context, width)
        self.blocks = torch.nn.ModuleList(Block(width, make_attention()) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, tokens):
        x = self.tokens(tokens) + self.positions(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def corpus() -> str:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files if f.is_file())


def parse_define(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    return name.strip(), int(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", type=Path, default=ROOT / "examples" / "strided.attn")
    parser.add_argument("-D", dest="params", action="append", type=parse_define, default=[],
                        metavar="NAME=VALUE", help="override a pattern parameter (default for strided: l=16)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) both models")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "out" / "train_lm.png")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = dict(args.params) or ({"l": 16} if args.pattern.name == "strided.attn" else {})

    text = corpus()
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text], dtype=torch.int64)
    split = int(0.9 * len(data))
    train, valid = data[:split], data[split:]
    print(f"corpus: {len(text)} characters, {len(vocab)} symbols; context {args.context}, batch {args.batch}")

    def make_model(sparse: bool):
        torch.manual_seed(0)  # the same initial weights for both (the attention projections included)
        def make_attention():
            if sparse:
                return patterncc.nn.SparseSelfAttention(args.width, args.heads, args.pattern, **params)
            return DenseSelfAttention(args.width, args.heads)
        return TinyLM(len(vocab), args.width, args.layers, args.context, make_attention)

    def batch(source, generator):
        start = torch.randint(0, len(source) - args.context - 1, (args.batch,), generator=generator)
        rows = torch.stack([source[s:s + args.context + 1] for s in start.tolist()])
        return rows[:, :-1], rows[:, 1:]

    curves = {}
    for name, sparse in ((f"patterncc ({args.pattern.stem})", True), ("dense causal SDPA", False)):
        model = make_model(sparse)
        step_fn = torch.compile(model, fullgraph=True) if args.compile else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(1)  # the same batches for both
        losses, started = [], time.perf_counter()
        for step in range(args.steps):
            x, y = batch(train, generator)
            loss = F.cross_entropy(step_fn(x).flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if step % 50 == 0 or step == args.steps - 1:
                print(f"  {name}: step {step:4d}  loss {loss.item():.3f}")
        elapsed = time.perf_counter() - started
        with torch.no_grad():
            x, y = batch(valid, torch.Generator().manual_seed(2))
            valid_loss = F.cross_entropy(step_fn(x).flatten(0, 1), y.flatten()).item()
        print(f"{name}: train loss {losses[0]:.2f} -> {sum(losses[-20:]) / min(20, len(losses)):.2f} (last 20), "
              f"validation {valid_loss:.2f}, {elapsed / args.steps * 1e3:.0f} ms/step")
        curves[name] = losses
        assert all(math.isfinite(v) for v in losses), f"{name}: loss became NaN or inf"

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        ax.plot(losses, label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy, nats)")
    ax.set_title(f"character LM, context {args.context}: patterncc vs dense attention")
    ax.legend()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
