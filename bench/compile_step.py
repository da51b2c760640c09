"""Training step time of examples/train_lm.py's model, eager vs torch.compile, side by side in one run (CPU).

    python bench/compile_step.py --threads 1 2 --context 1024 --steps 20

Per thread count, four models are timed in the same process with the same batches: patterncc attention eager and
compiled (torch.compile(fullgraph=True), inductor), dense causal SDPA eager and compiled. Each step is forward,
backward and an AdamW update; compilation and the first steps are warm-up, not timed; the median of `--steps`
steps is reported. Run it with the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch
import torch.nn.functional as F
from common import ROOT, write_results

spec = importlib.util.spec_from_file_location("train_lm", ROOT / "examples" / "train_lm.py")
train_lm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_lm)


def step_times(model, compiled, batches, steps, warmup):
    run = torch.compile(model, fullgraph=True) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for index in range(warmup + steps):
        x, y = batches[index % len(batches)]
        started = time.perf_counter()
        loss = F.cross_entropy(run(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--l", type=int, default=32, help="strided(l) of examples/strided.attn")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()

    vocab = 96
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, vocab, (args.batch, args.context), generator=generator),
                torch.randint(0, vocab, (args.batch, args.context), generator=generator)) for _ in range(4)]
    pattern = ROOT / "examples" / "strided.attn"

    def make(sparse):
        torch.manual_seed(0)
        import patterncc.nn

        def attention():
            if sparse:
                return patterncc.nn.SparseSelfAttention(args.width, args.heads, pattern, l=args.l)
            return train_lm.DenseSelfAttention(args.width, args.heads)
        return train_lm.TinyLM(vocab, args.width, args.layers, args.context, attention)

    rows = []
    print(f"context {args.context}, batch {args.batch}, width {args.width}, {args.heads} heads, {args.layers} layers, "
          f"strided(l={args.l}); torch {torch.__version__}; median of {args.steps} steps after {args.warmup}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for label, sparse in (("patterncc strided", True), ("dense causal SDPA", False)):
            eager = step_times(make(sparse), False, batches, args.steps, args.warmup)
            torch._dynamo.reset()
            compiled = step_times(make(sparse), True, batches, args.steps, args.warmup)
            rows.append({"threads": threads, "model": label, "eager_ms": eager * 1e3, "compiled_ms": compiled * 1e3,
                         "compiled_speedup": eager / compiled})
            print(f"threads {threads}  {label:18s}  eager {eager * 1e3:8.1f} ms  compiled {compiled * 1e3:8.1f} ms  "
                  f"eager/compiled {eager / compiled:.2f}x")
    write_results(args.json, args, rows)


if __name__ == "__main__":
    main()
