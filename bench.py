"""How much a Gauss-Newton inner step costs against a training step, in one run.

    python bench.py --preset tiny [--json FILE]

On one micro-batch of the preset's model, interleaving the four so that a
noisy machine slows them alike, the median wall-clock time of:
  train      a training step: forward, cross-entropy, backward (no optimizer step)
  gn         a full-GN inner step: ∇Q over all parameters (one JVP and one VJP)
  layerwise  a layerwise-GN inner step: every block's ∇Q, as gn.py computes it
  naive      the naive layerwise step, as the paper's code takes it: every block's
             ∇Q from a whole forward and backward pass over all parameters, the
             tangent zero outside the block: L+2 full-GN steps
  pruned     gn.py without cached block inputs: a whole forward per block, but
             forward-mode AD carries only the block's tangent and the backward
             stops at the block (reported, not a target)
  stock_*    train, gn and layerwise on nanoGPT's GPT of the same depth and
             width built from stock modules (test_stock_models.NanoGPT: SDPA,
             LayerNorm, GELU, a tied head), which GN runs with autograd's own
             tangents and SDPA's math backend: what a user pays for a model
             without hand-written tangents, each as a ratio to its own
             training step
and the peak memory of each (see `peak_memory`). The inner optimizer's own
update is left out of every GN time, as the optimizer step is left out of
the training step. The cost model in /work/shared/DESIGN.md puts the floor of
a full-GN inner step near 5/3 of a training step.

    python bench.py --preset tiny --outer [--json FILE]

times whole outer steps instead, interleaved, on the same K micro-batches of
the embedded corpus (K = 32 on tiny): a first-order one (Muon: gradients accumulated over the K
micro-batches, clipping, the optimizer step), a full-GN and a layerwise-GN one
(K inner steps with inner Muon, then the line search on K/8 fresh
micro-batches, η* estimated on half of them: train.py's defaults, --ls-fraction
sets the first), a layerwise one
with --combine span, one with --merge-embedding (four blocks on tiny), and
the line search inside the full-GN step.
"""
import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from baselines import make_optimizer
from compare import provenance
from data import MicroBatches, load_dataset
from gn import GaussNewton
from model import GPT, PRESETS
from train import LS_FRACTION, default_ls_micro_batches, embedding_with_first_block, first_order_step, positive

# model preset, sequences per micro-batch, sequence length, timed repeats, CPU threads.
# tiny's matmuls are too small to gain from a second thread, and when another
# process keeps the cores busy, two threads stall each other at every op (20x slower).
BENCH_PRESETS = {
    "tiny": ("tiny", 16, 64, 9, 1),        # train.py's defaults; CPU
    "small": ("small", 8, 128, 5, None),   # CPU, a few minutes
    "45m": ("45m", 8, 1024, 10, None),     # GPU
    "150m": ("150m", 8, 1024, 10, None),   # GPU
    "paper45m": ("paper45m", 8, 1024, 10, None),    # GPU: the authors' architectures (model.py)
    "paper150m": ("paper150m", 8, 1024, 10, None),  # GPU
    "smoke": ("tiny", 2, 32, 1, 1),        # seconds, for the tests: not a measurement
}
KINDS = ("train", "gn", "layerwise", "naive", "pruned", "stock_train", "stock_gn", "stock_layerwise")
OUTER_MICRO_BATCHES = {"tiny": 32, "small": 16, "45m": 32, "150m": 32}
OUTER_REPEATS = {"tiny": 5, "small": 3, "45m": 5, "150m": 5}


def setup(preset, device, dtype, seed=0):
    """The models, one micro-batch and the function that runs each kind once."""
    from test_stock_models import NanoGPT  # the tests' nanoGPT from stock modules
    name, batch, seq, *_ = BENCH_PRESETS[preset]
    torch.manual_seed(seed)
    model = GPT(PRESETS[name]).to(device=device, dtype=dtype)
    c = model.config
    stock = NanoGPT(c.vocab_size, seq, c.n_layer, c.n_embd, c.n_head).to(device=device, dtype=dtype)
    x = torch.randint(0, c.vocab_size, (batch, seq), device=device)
    y = torch.randint(0, c.vocab_size, (batch, seq), device=device)
    stock_inputs = (x, y)  # nanoGPT's model(tokens, targets): every position's logits only with targets

    def gn_optimizer(mode, cached=True, model=model):
        opt = GaussNewton(model, mode=mode, inner="adamw")
        opt.cached_inputs = opt.cached_inputs and cached
        # An inner iterate away from θ0, as after a few inner steps.
        with torch.no_grad():
            for t in opt.iterate.values():
                t.add_(torch.randn_like(t), alpha=1e-3)
        return opt

    full, layerwise, pruned = gn_optimizer("full"), gn_optimizer("layerwise"), gn_optimizer("layerwise", cached=False)

    def train(model=model):
        logits = model(x) if model is not stock else model(*stock_inputs)[0]
        F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).backward()
        # Freed here, not at the next call's start: a peak measured from before a
        # call then counts the gradients, as GN's counts the ∇Q it returns.
        for p in model.parameters():
            p.grad = None

    def gn_inner(opt, model=model, inputs=x):
        def run():
            # As inside GaussNewton.step: θ0 is a constant during the inner loop.
            for p in model.parameters():
                p.requires_grad_(False)
            try:
                opt.inner_gradients(inputs, y)
            finally:
                for p in model.parameters():
                    p.requires_grad_(True)
        return run

    class PaperLayerwise:  # every block: full GN's pass with the tangent zero outside the block
        def inner_gradients(self, x, y):
            delta = full._delta(full.blocks[0])
            out = []
            for block in layerwise.blocks:
                tangent = {n: t if n in block else torch.zeros_like(t) for n, t in delta.items()}
                grad = full._model_gradient(lambda p: functional_call(model, p, (x,)), full.blocks[0], tangent, y)
                out.append({n: grad[n] for n in block})
            return out

    fns = {"train": train, "gn": gn_inner(full), "layerwise": gn_inner(layerwise),
           "naive": gn_inner(PaperLayerwise()), "pruned": gn_inner(pruned), "stock_train": lambda: train(stock),
           "stock_gn": gn_inner(gn_optimizer("full", model=stock), stock, stock_inputs),
           "stock_layerwise": gn_inner(gn_optimizer("layerwise", model=stock), stock, stock_inputs)}
    return model, stock, fns, len(layerwise.blocks)


def outer_steps(preset, device, dtype, k, ls_micro_batches, seed=0):
    """Functions that each take one whole outer step on the same k micro-batches from the same weights.

    Each restores the weights first, so every timed step starts where the first
    did. Returns the functions and the line-search times of the full-GN steps.
    """
    name, batch, seq, *_ = BENCH_PRESETS[preset]
    torch.manual_seed(seed)
    model = GPT(PRESETS[name]).to(device=device, dtype=dtype)
    # Real text (the embedded byte corpus), so that the line search sees a real GN direction.
    stream = MicroBatches(load_dataset(None).train, batch, seq, seed=seed, device=device)
    batches, ls_batches = stream.draw(k), stream.draw(ls_micro_batches)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    muon = make_optimizer("muon", list(model.named_parameters()), lr=0.02)
    full = GaussNewton(model, mode="full", inner_lr=0.01)
    layerwise = GaussNewton(model, mode="layerwise", inner_lr=0.01)
    span = GaussNewton(model, mode="layerwise", inner_lr=0.01, combine="span")
    merged = GaussNewton(model, mode="layerwise", inner_lr=0.01, blocks=embedding_with_first_block(model))
    line_search_s = []

    def restore():
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])

    def first_order():
        restore()
        first_order_step(model, muon, batches, grad_clip=1.0)

    def gn(opt):
        def run():
            restore()
            stats = opt.step(batches, ls_batches)
            if opt is full:
                line_search_s.append(stats["line_search_s"])
        return run

    return {"first_order": first_order, "gn": gn(full), "gn_layerwise": gn(layerwise),
            "gn_layerwise_span": gn(span), "gn_layerwise_merged": gn(merged)}, line_search_s


def bench_outer(args, device, dtype):
    k, repeats = OUTER_MICRO_BATCHES.get(args.preset, 32), args.repeats or OUTER_REPEATS.get(args.preset, 5)
    ls_k = default_ls_micro_batches(k, args.ls_fraction)
    fns, line_search_s = outer_steps(args.preset, device, dtype, k, ls_k)
    times = time_all(fns, device, repeats)
    line_search = statistics.median(line_search_s[1:])  # [0] is the warm-up's
    print(f"preset {args.preset}: outer steps on {k} micro-batches (line search on {ls_k}), "
          f"{args.device} {args.dtype}, {torch.get_num_threads()} threads, median of {repeats}")
    print(f"{'':20} {'time s':>8} {'x first-order':>14}")
    for name, t in [*times.items(), ("line_search", line_search)]:
        print(f"{name:20} {t:8.2f} {t / times['first_order']:14.2f}")
    ratios = {"gn / first-order (target <= 2.0)": times["gn"] / times["first_order"],
              "line search / first-order (target <= 0.15)": line_search / times["first_order"],
              "gn_layerwise / first-order (no target)": times["gn_layerwise"] / times["first_order"],
              "gn_layerwise_span / first-order (no target)": times["gn_layerwise_span"] / times["first_order"],
              "gn_layerwise_merged / first-order (no target)": times["gn_layerwise_merged"] / times["first_order"]}
    for name, v in ratios.items():
        verdict = "" if "<=" not in name else "met" if v <= float(name.split("<= ")[1][:-1]) else "NOT met"
        print(f"{name:46} {v:6.2f}  {verdict}")
    return {"outer_first_order_s": times["first_order"], "outer_gn_s": times["gn"],
            "outer_gn_layerwise_s": times["gn_layerwise"], "outer_gn_layerwise_span_s": times["gn_layerwise_span"],
            "outer_gn_layerwise_merged_s": times["gn_layerwise_merged"],
            "outer_line_search_s": line_search, "outer_micro_batches": k,
            "outer_line_search_micro_batches": ls_k, "repeats": repeats,
            "preset": args.preset, "device": args.device, "dtype": args.dtype}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_all(fns, device, repeats):
    """Median seconds per call of each function, interleaved round by round."""
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _rss_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory(fn, device):
    """MB above the memory in use before one call of fn (after a warm-up call).

    CUDA: torch.cuda.max_memory_allocated over the call. CPU (Linux): the rise of
    the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
    over its resident set just before the call. Run it in a fresh process (see
    `--memory-of`) with glibc's mmap threshold fixed, so freed tensors go back to
    the OS and the previous kind's peak cannot hide this one's.
    """
    fn()
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    before = _rss_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    fn()
    return _rss_mb("VmHWM") - before


def memory_in_fresh_process(args, kind):
    if args.device.startswith("cuda"):  # the allocator's own counters need no fresh process
        return None
    if not os.path.exists("/proc/self/clear_refs"):
        return float("nan")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--preset", args.preset, "--device", args.device, "--dtype", args.dtype,
           "--matmul-precision", args.matmul_precision, "--threads", str(torch.get_num_threads()), "--memory-of", kind]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=BENCH_PRESETS, default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--matmul-precision", default="highest", choices=["highest", "high", "medium"],
                   help="torch.set_float32_matmul_precision, as train.py's (high: TF32 on CUDA)")
    p.add_argument("--repeats", type=positive(int), default=None, help="timed rounds (default: the preset's)")
    p.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads (default: the preset's, else torch's)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON (with the command, commit and date)")
    p.add_argument("--outer", action="store_true", help="time whole outer steps (see above)")
    p.add_argument("--ls-fraction", type=positive(float), default=LS_FRACTION,
                   help="--outer: line-search micro-batches as a fraction of K (default: train.py's)")
    p.add_argument("--memory-of", choices=KINDS, help=argparse.SUPPRESS)  # internal: one peak-memory probe
    args = p.parse_args(argv)
    threads = args.threads or BENCH_PRESETS[args.preset][4]
    if threads:
        torch.set_num_threads(threads)
    torch.set_float32_matmul_precision(args.matmul_precision)
    device = torch.device(args.device)
    if args.outer:
        results = {**provenance("bench.py", argv), **bench_outer(args, device, getattr(torch, args.dtype))}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return results
    _, stock, fns, n_blocks = setup(args.preset, device, getattr(torch, args.dtype))

    if args.memory_of:
        print(peak_memory(fns[args.memory_of], device))
        return None

    repeats = args.repeats or BENCH_PRESETS[args.preset][3]
    start = time.perf_counter()
    times = time_all(fns, device, repeats)
    if device.type == "cuda":
        memory = {k: peak_memory(fn, device) for k, fn in fns.items()}
    else:
        # One fresh process per kind, each reading its own high-water mark, so they may run side by side
        # (two at a time: at the large presets each holds a whole model).
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            memory = dict(zip(KINDS, pool.map(lambda kind: memory_in_fresh_process(args, kind), KINDS)))
    name, batch, seq, *_ = BENCH_PRESETS[args.preset]
    print(f"preset {args.preset}: model {name} ({GPT(PRESETS[name]).num_params() / 1e6:.2f}M params), "
          f"micro-batch {batch}x{seq}, {args.device} {args.dtype}, {torch.get_num_threads()} threads, "
          f"{n_blocks} blocks, median of {repeats}")
    print(f"stock: nanoGPT from stock modules, {sum(p.numel() for p in stock.parameters()) / 1e6:.2f}M params; "
          "x train: over its own model's training step")
    print(f"{'':16} {'time ms':>9} {'x train':>8} {'peak MB':>9} {'x train':>8}")
    for k in KINDS:
        train_kind = "stock_train" if k.startswith("stock") else "train"
        print(f"{k:16} {1e3 * times[k]:9.1f} {times[k] / times[train_kind]:8.2f} "
              f"{memory[k]:9.1f} {memory[k] / memory[train_kind]:8.2f}")
    ratios = {
        "gn / train (target <= 1.8)": times["gn"] / times["train"],
        "layerwise / naive (target <= 0.55)": times["layerwise"] / times["naive"],
        "layerwise / pruned (no target)": times["layerwise"] / times["pruned"],
        "gn peak memory / train's (target <= 2)": memory["gn"] / memory["train"],
        "stock gn / stock train (no target)": times["stock_gn"] / times["stock_train"],
        "stock layerwise / stock train (no target)": times["stock_layerwise"] / times["stock_train"],
    }
    for k, v in ratios.items():
        verdict = "" if "<=" not in k else "met" if v <= float(k.split("<= ")[1][:-1]) else "NOT met"
        print(f"{k:40} {v:6.2f}  {verdict}")
    print(f"({time.perf_counter() - start:.0f} s)")
    results = {
        **provenance("bench.py", argv),
        "train_step_s": times["train"], "gn_inner_s": times["gn"], "layerwise_inner_s": times["layerwise"],
        "naive_layerwise_inner_s": times["naive"], "n_blocks": n_blocks,
        "train_step_peak_mb": memory["train"], "gn_inner_peak_mb": memory["gn"],
        "layerwise_inner_peak_mb": memory["layerwise"], "naive_layerwise_inner_peak_mb": memory["naive"],
        "pruned_layerwise_inner_s": times["pruned"], "pruned_layerwise_inner_peak_mb": memory["pruned"],
        "stock_train_step_s": times["stock_train"], "stock_gn_inner_s": times["stock_gn"],
        "stock_layerwise_inner_s": times["stock_layerwise"], "stock_train_step_peak_mb": memory["stock_train"],
        "stock_gn_inner_peak_mb": memory["stock_gn"], "stock_layerwise_inner_peak_mb": memory["stock_layerwise"],
        "stock_parameters": sum(p.numel() for p in stock.parameters()),
        "preset": args.preset, "device": args.device, "dtype": args.dtype, "matmul_precision": args.matmul_precision,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
