"""Compare Gauss-Newton against tuned first-order baselines: steps to a target loss.

    python compare.py --preset cpu                  # the whole comparison on a laptop (under 30 min, 2 cores)
    python compare.py --preset cpu --batch-sweep    # and steps to target against the outer batch size
    python compare.py --preset 45m --data DIR       # the paper's 45M recipe on a GPU (C4, T5 tokens)

Every optimizer trains the same model on the same data, seed and outer batch
(batch-size x micro-batches sequences per outer step). Each baseline runs its
preset's learning-rate grid for a fixed step budget with the validation loss
evaluated at every step. The target is --target-loss, or else the lowest final
validation loss any baseline reaches: so "GN needs N times fewer steps" is
measured against the best tuned baseline, never assumed. Each optimizer keeps
the run that reaches the target in the fewest steps (ties: the lower final
loss). Gauss-Newton runs its preset settings and stops at the target.

Every run is `train.py` in its own process, so the peak memory is per run:
torch.cuda.max_memory_allocated on CUDA, the process's maximum resident set
size on CPU (the model and the optimizer, plus torch and the data: a baseline
of a few hundred MB).

Writes to --out DIR: results.json, loss.png (and batch_sweep.png), one
directory per run with train.py's metrics.jsonl and config.json; prints a
markdown table at the end. A run directory holding a finished run with the
same train.py arguments is reused, so an interrupted comparison continues
where it stopped (delete DIR to run everything again).
"""
import argparse
import json
import math
import os
import subprocess
import sys

from train import FIRST_ORDER, GN_VARIANTS, ArgumentParser

HERE = os.path.dirname(os.path.abspath(__file__))

# A run: shape (model, micro-batch, sequence length, micro-batches per outer
# step), the baselines' step budget and learning-rate grids, GN's step cap and
# inner learning rate, extra train.py options, and the micro-batches per outer
# step that --batch-sweep tries (the comparison's own is the largest).
PRESETS = {
    # tiny model, 16 x 16 x 64 = 16K tokens per outer step. The grids are the
    # tuned defaults of README.md (at 8 micro-batches) times 0.5, 1 and 2.
    "cpu": dict(model="tiny", batch_size=16, seq_len=64, micro_batches=16, eval_batches=8,
                baseline_steps=80, gn_steps=40,
                lrs={"adamw": [3e-3, 6e-3, 1.2e-2], "muon": [0.03, 0.06, 0.12],
                     "soap": [4.5e-3, 9e-3, 1.8e-2], "shampoo": [1.5e-3, 3e-3, 6e-3]},
                inner_lr={"gn": 0.02, "gn_layerwise": 0.04, "gn_prox": 0.02, "gn_layerwise_prox": 0.04},
                opts=["adamw", "muon", "soap", "shampoo", "gn", "gn_layerwise"],
                train_args=[], gn_args=[], batch_sweep=[4, 8, 16]),
    # The paper's 45M recipe (DESIGN.md): 122 micro-batches of 32 sequences,
    # inner Muon lr 0.01, weight decay 0.001, EMA 0.999, 227 outer steps. The
    # paper also started GN from a 1000-step AdamW checkpoint; this does not.
    "45m": dict(model="45m", batch_size=32, seq_len=1024, micro_batches=122, eval_batches=16,
                baseline_steps=1000, gn_steps=227,
                lrs={"adamw": [1e-3, 2e-3, 4e-3], "muon": [0.01, 0.02, 0.04],
                     "soap": [1.5e-3, 3e-3, 6e-3], "shampoo": [1e-3, 2e-3, 4e-3]},
                inner_lr={"gn": 0.01, "gn_layerwise": 0.01, "gn_prox": 0.01, "gn_layerwise_prox": 0.01},
                opts=["adamw", "muon", "soap", "shampoo", "gn", "gn_layerwise"],
                train_args=["--weight-decay", "0.001"], gn_args=["--ema", "0.999"], batch_sweep=[30, 61, 122]),
    "150m": dict(model="150m", batch_size=32, seq_len=1024, micro_batches=122, eval_batches=16,
                 baseline_steps=1000, gn_steps=227,
                 lrs={"adamw": [5e-4, 1e-3, 2e-3], "muon": [0.01, 0.02, 0.04],
                      "soap": [1e-3, 2e-3, 4e-3], "shampoo": [5e-4, 1e-3, 2e-3]},
                 inner_lr={"gn": 0.01, "gn_layerwise": 0.01, "gn_prox": 0.01, "gn_layerwise_prox": 0.01},
                 opts=["adamw", "muon", "soap", "shampoo", "gn", "gn_layerwise"],
                 train_args=["--weight-decay", "0.001"], gn_args=["--ema", "0.999"], batch_sweep=[30, 61, 122]),
    # A few seconds per run, for the tests: not a measurement.
    "smoke": dict(model="tiny", batch_size=4, seq_len=32, micro_batches=2, eval_batches=2,
                  baseline_steps=4, gn_steps=3,
                  lrs={"adamw": [3e-3, 1e-2], "muon": [0.06], "soap": [9e-3], "shampoo": [3e-3]},
                  inner_lr={"gn": 0.02, "gn_layerwise": 0.04, "gn_prox": 0.02, "gn_layerwise_prox": 0.04},
                  opts=["adamw", "gn"], train_args=[], gn_args=[], batch_sweep=[1, 2]),
}

# What each run process does: train.py's main, then its peak memory into DIR/memory.json.
CHILD = """
import json, os, resource, sys
sys.path.insert(0, sys.argv.pop(1))
import torch, train
from data import DataError
argv = sys.argv[1:]
try:
    train.main(argv)
except DataError as e:
    train.fail(str(e))
cuda = torch.cuda.is_available() and argv[argv.index('--device') + 1] != 'cpu'
peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
kind = 'cuda_max_allocated' if cuda else 'process_max_rss'
with open(os.path.join(argv[argv.index('--out') + 1], 'memory.json'), 'w') as f:
    json.dump({'peak_memory_bytes': peak, 'kind': kind}, f)
"""


def fail(message):
    print(f"compare.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = ArgumentParser(description="Steps to a target loss: Gauss-Newton against tuned first-order baselines.")
    p.add_argument("--preset", default="cpu", choices=list(PRESETS), help="model, batch, budgets and grids")
    p.add_argument("--out", default=None, help="output directory (default: runs/compare-PRESET)")
    p.add_argument("--target-loss", type=float, default=None,
                   help="validation loss to reach (default: the best baseline's final validation loss)")
    p.add_argument("--opts", default=None,
                   help="comma-separated optimizers (default: the preset's; any of "
                        f"{', '.join(FIRST_ORDER + tuple(GN_VARIANTS))})")
    p.add_argument("--inner-lr-sweep", action="store_true",
                   help="run each GN variant at 0.5x, 1x and 2x its preset inner lr and keep the best")
    p.add_argument("--batch-sweep", action="store_true",
                   help="then steps to target against the outer batch size, for the best baseline and full GN")
    p.add_argument("--data", default=None, help="train.py's --data (default: the embedded corpus)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="train.py's --device")
    p.add_argument("--seed", type=int, default=0, help="one seed for every run")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    args.opts = args.opts.split(",") if args.opts else preset["opts"]
    for name in args.opts:
        if name not in FIRST_ORDER and name not in GN_VARIANTS:
            p.error(f"--opts: unknown optimizer {name!r}")
    if not any(name in FIRST_ORDER for name in args.opts) and args.target_loss is None:
        p.error("without a baseline in --opts there is no default target: give --target-loss")
    if args.batch_sweep and "gn" not in args.opts:
        p.error("--batch-sweep compares full GN ('gn') with the best baseline: put gn in --opts")
    if args.out is None:
        args.out = os.path.join("runs", f"compare-{args.preset}")
    if args.data is not None:
        args.data = os.path.abspath(args.data)
    return args


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def first_reaching(records, target):
    """The first record whose validation loss is at or below target, or None."""
    for record in records:
        if record.get("val_loss") is not None and record["val_loss"] <= target:
            return record
    return None


def final_val_loss(records):
    losses = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    return losses[-1] if losses and math.isfinite(losses[-1]) else None


def train_argv(args, run_dir, opt, lr, micro_batches, steps, target_loss=None):
    """train.py's arguments for one run of the comparison."""
    preset = PRESETS[args.preset]
    is_gn = opt in GN_VARIANTS
    argv = ["--opt", opt, "--model", preset["model"], "--batch-size", str(preset["batch_size"]),
            "--seq-len", str(preset["seq_len"]), "--micro-batches", str(micro_batches), "--steps", str(steps),
            "--eval-every", "1", "--eval-batches", str(preset["eval_batches"]), "--seed", str(args.seed),
            "--device", args.device, "--sample-tokens", "0", "--ckpt-every", str(steps + 1), "--out", run_dir,
            "--inner-lr" if is_gn else "--lr", str(lr), *preset["train_args"], *(preset["gn_args"] if is_gn else [])]
    if args.data is not None:
        argv += ["--data", args.data]
    if target_loss is not None:
        argv += ["--target-loss", repr(target_loss)]
    return argv


def train_run(args, run_dir, opt, lr, micro_batches, steps, target_loss=None):
    """One train.py run in its own process; returns its metrics, memory and exit status."""
    argv = train_argv(args, run_dir, opt, lr, micro_batches, steps, target_loss)
    finished = os.path.join(run_dir, "finished.json")  # train.py's arguments and exit code of a finished run
    if os.path.exists(finished) and json.load(open(finished))["argv"] == argv:
        print(f"reusing the finished run in {run_dir}")
        code = json.load(open(finished))["exit_code"]
    else:
        os.makedirs(run_dir, exist_ok=True)
        for stale in (finished, os.path.join(run_dir, "memory.json")):
            if os.path.exists(stale):
                os.remove(stale)
        code = subprocess.run([sys.executable, "-c", CHILD, HERE, *argv]).returncode
        if code == 2:  # train.py's bad-input exit: every other run would fail the same way
            fail(f"train.py rejected the run in {run_dir} (its message is above)")
        if code not in (0, 1):  # interrupted or killed: not a finished run (1 is a run that diverged)
            print(f"compare.py: the run in {run_dir} stopped with exit code {code}", file=sys.stderr)
            sys.exit(code if code > 0 else 1)
        with open(finished, "w") as f:
            json.dump({"argv": argv, "exit_code": code}, f)
    memory = {}
    if os.path.exists(os.path.join(run_dir, "memory.json")):
        with open(os.path.join(run_dir, "memory.json")) as f:
            memory = json.load(f)
    return {"opt": opt, "lr": lr, "micro_batches": micro_batches, "records": read_metrics(run_dir),
            "exit_code": code, "peak_memory_bytes": memory.get("peak_memory_bytes"), "memory_kind": memory.get("kind")}


def summarize(run, target):
    """The numbers results.json keeps for one run, measured against target."""
    reached = first_reaching(run["records"], target)
    return {"steps_to_target": reached["step"] if reached else None,
            "tokens_to_target": reached["tokens"] if reached else None,
            "time_to_target_s": round(reached["time_s"], 2) if reached else None,
            "final_val_loss": final_val_loss(run["records"]), "lr": run["lr"],
            "steps_run": run["records"][-1]["step"] if run["records"] else 0,
            "tokens_per_step": run["records"][0]["tokens"] if run["records"] else None,
            "peak_memory_bytes": run["peak_memory_bytes"], "memory_kind": run["memory_kind"],
            "exit_code": run["exit_code"]}


def best_of(summaries):
    """The run that reaches the target in the fewest steps; ties (or none reaching it): the lowest final loss."""
    def key(s):
        return (s["steps_to_target"] if s["steps_to_target"] is not None else math.inf,
                s["final_val_loss"] if s["final_val_loss"] is not None else math.inf)
    return min(summaries, key=key)


def sweep(args, runs_dir, opt, micro_batches, target_loss=None, step_scale=1.0):
    """Every learning rate of opt's grid at this outer batch; returns the runs."""
    preset = PRESETS[args.preset]
    if opt in GN_VARIANTS:
        lr = preset["inner_lr"][opt]
        grid = [lr / 2, lr, lr * 2] if args.inner_lr_sweep else [lr]
        steps = preset["gn_steps"]
    else:
        grid = preset["lrs"][opt]
        steps = preset["baseline_steps"]
    steps = max(1, round(steps * step_scale))
    runs = []
    for lr in grid:
        print(f"\n== {opt} lr {lr:g}, {micro_batches} x {preset['batch_size']} x {preset['seq_len']} tokens "
              f"per step, up to {steps} steps", flush=True)
        run_dir = os.path.join(runs_dir, f"{opt}-mb{micro_batches}-lr{lr:g}")
        runs.append(train_run(args, run_dir, opt, lr, micro_batches, steps, target_loss))
    return runs


def compare(args, micro_batches, runs_dir, target_loss, baselines, step_scale=1.0):
    """Baselines first, then the target (when not given), then GN. A run stops at the target when it is
    known beforehand: the baselines run their whole budget only when they set the target.

    Returns (target, {opt: summary of its best run}, {opt: its best run}, {opt: every lr's summary}).
    """
    all_runs = {opt: sweep(args, runs_dir, opt, micro_batches, target_loss, step_scale) for opt in baselines}
    if target_loss is None:
        finals = [final_val_loss(r["records"]) for runs in all_runs.values() for r in runs]
        finals = [f for f in finals if f is not None]
        if not finals:
            fail("no baseline run finished with a finite validation loss: no target to measure against")
        target_loss = min(finals)
    for opt in args.opts:
        if opt in GN_VARIANTS:
            all_runs[opt] = sweep(args, runs_dir, opt, micro_batches, target_loss, step_scale)
    summaries = {opt: [summarize(r, target_loss) for r in runs] for opt, runs in all_runs.items()}
    best = {opt: best_of(s) for opt, s in summaries.items()}
    best_runs = {opt: all_runs[opt][summaries[opt].index(best[opt])] for opt in all_runs}
    return target_loss, best, best_runs, summaries


def table(results):
    """Markdown table of the best run per optimizer, with steps relative to the best baseline."""
    runs = results["runs"]
    baseline_steps = [s["steps_to_target"] for o, s in runs.items() if o in FIRST_ORDER and s["steps_to_target"]]
    reference = min(baseline_steps) if baseline_steps else None
    lines = [f"target validation loss {results['target_loss']:.4f} (preset {results['preset']})", "",
             "| optimizer | lr | steps to target | best baseline's steps / steps | tokens to target | "
             "time to target (s) | final val loss | peak memory (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for opt, s in runs.items():
        steps = s["steps_to_target"]
        ratio = f"{reference / steps:.2f}x" if steps and reference else "-"
        memory = f"{s['peak_memory_bytes'] / 2**20:.0f}" if s["peak_memory_bytes"] else "-"
        final = f"{s['final_val_loss']:.4f}" if s["final_val_loss"] is not None else "diverged"
        reached = steps if steps else f"not in {s['steps_run']}"
        lines.append(f"| {opt} | {s['lr']:g} | {reached} | {ratio} | {s['tokens_to_target'] or '-'} | "
                     f"{s['time_to_target_s'] or '-'} | {final} | {memory} |")
    return "\n".join(lines)


def plot(path, best_runs, target, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"plot skipped ({path}): pip install matplotlib")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for opt, run in best_runs.items():
        points = [(r["step"], r["val_loss"]) for r in run["records"] if r.get("val_loss") is not None]
        if points:
            ax.plot(*zip(*points), label=f"{opt} (lr {run['lr']:g})", linestyle="-" if opt in FIRST_ORDER else "--")
    ax.axhline(target, color="gray", linewidth=0.8, linestyle=":", label=f"target {target:.3f}")
    ax.set(xlabel="outer step", ylabel="validation loss", title=title, xscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def plot_batch_sweep(path, rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"plot skipped ({path}): pip install matplotlib")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for opt in rows[0]["runs"]:
        points = [(row["outer_batch_tokens"], row["runs"][opt]["steps_to_target"]) for row in rows
                  if row["runs"][opt]["steps_to_target"]]
        if points:
            ax.plot(*zip(*points), marker="o", label=opt)
    ax.set(xlabel="outer batch (tokens)", ylabel="steps to target", xscale="log", yscale="log",
           title="steps to target against the outer batch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def main(argv=None):
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    os.makedirs(args.out, exist_ok=True)
    baselines = [o for o in args.opts if o in FIRST_ORDER]
    mb = preset["micro_batches"]
    target, best, best_runs, summaries = compare(args, mb, os.path.join(args.out, "runs"), args.target_loss,
                                                 baselines)
    results = {"target_loss": target, "preset": args.preset,
               "target_rule": "given" if args.target_loss is not None else "best baseline's final val loss",
               "outer_batch_tokens": mb * preset["batch_size"] * preset["seq_len"], "runs": best,
               "lr_sweeps": summaries}
    print("\n" + table(results))
    for opt in baselines:
        grid = preset["lrs"][opt]
        if len(grid) > 1 and best[opt]["lr"] in (grid[0], grid[-1]):
            print(f"note: {opt}'s best lr {best[opt]['lr']:g} is at the edge of its grid {grid}")
    plot(os.path.join(args.out, "loss.png"), best_runs, target,
         f"{preset['model']}, {results['outer_batch_tokens']} tokens per outer step")

    if args.batch_sweep and baselines:
        best_baseline = min(baselines, key=lambda o: (best[o]["steps_to_target"] or math.inf))
        rows = []
        for m in preset["batch_sweep"]:
            if m == mb:
                row_best = {o: best[o] for o in (best_baseline, "gn")}
            else:  # the same token budget: more steps at a smaller batch
                sweep_args = argparse.Namespace(**{**vars(args), "opts": [best_baseline, "gn"]})
                _, row_best, _, _ = compare(sweep_args, m, os.path.join(args.out, "runs"), target, [best_baseline],
                                            step_scale=mb / m)
            rows.append({"micro_batches": m, "outer_batch_tokens": m * preset["batch_size"] * preset["seq_len"],
                         "runs": row_best})
        results["batch_sweep"] = rows
        print(f"\nsteps to target {target:.4f} against the outer batch (tokens)\n")
        print(f"| outer batch | {best_baseline} | gn |\n|---|---|---|")
        for row in rows:
            print(f"| {row['outer_batch_tokens']} | {row['runs'][best_baseline]['steps_to_target'] or '-'} | "
                  f"{row['runs']['gn']['steps_to_target'] or '-'} |")
        plot_batch_sweep(os.path.join(args.out, "batch_sweep.png"), rows)

    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"results: {os.path.join(args.out, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
