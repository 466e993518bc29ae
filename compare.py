"""Compare Gauss-Newton against tuned first-order baselines: steps to a target loss.

    python compare.py --quick                  # the newcomer's race: Muon, full and layerwise GN at defaults (3 min)
    python compare.py                          # the headline: every optimizer at 64K tokens per step (about 1 h)
    python compare.py --batch-sweep            # Muon and GN from 4K to 256K tokens per step (65 min)
    python compare.py --robust                 # GN's defaults on five seeds at 64K and 256K, no sweep (3 h)
    python compare.py --model-sizes --out results/model_sizes   # the model-size ladder: tiny, mini, small (hours)
    python compare.py --preset gpu-quick       # the paper's race shrunk to ~8 minutes of one H100 (--smoke: CPU)
    python compare.py --preset 45m --data DIR  # the paper's 45M model on a GPU (C4, T5 tokens)

GN's advantage lives at large batch: a first-order method stops needing fewer
steps once its batch passes its critical batch size, GN keeps gaining (the
paper: AdamW and Muon saturate near 12M tokens per step at 150M parameters, GN
near 40M). The cpu preset's default batch, 64K tokens, is past Muon's critical
batch on the tiny model; --batch-sweep measures the whole curve.

Fair budgets. At a given outer batch (batch-size x micro-batches sequences per
step) every optimizer gets the same step budget, the same data and seed, and
its own learning-rate sweep (GN: its inner lr). A sweep whose fewest steps
to the target are reached at the edge of its grid (alone or tied with an lr
inside it) is extended by a factor of 2 beyond that edge, up to twice. Every
run stops when its validation loss, evaluated at every step, reaches the
target; a learning rate that has not reached it by the step where
the best one so far did stops there, since it can no longer win (its schedule
still spans the whole budget, so the runs it is compared with are unchanged).
The target is the preset's (fixed in advance), or else the lowest final
validation loss of any baseline run. At the headline batch AdamW, SOAP and
Shampoo also sweep their warmup (2, 5 and 10 of the 40 steps), each warmup
with its own lr grid. The GPU presets (45m, 150m) follow the
authors' recipe (train.py --recipe paper) and start every run from the same
AdamW warm-up, trained once (train.py --init-from).

The batch sweep fits each optimizer's steps to target S against the batch B
with the model of McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training": S(B) = S_min (1 + B_noise / B). B_noise is the critical batch:
below it more data per step buys fewer steps, above it hardly any.

The robust-defaults study (--robust) asks whether GN's defaults hold without
any sweep: Muon, full and layerwise GN at their default lrs at 64 and 256
micro-batches on seeds 0-4, full GN at 256 also at inner lrs 0.005, 0.02 and
0.04. The baselines run their whole budget, and their median final loss at a
batch joins the study's targets (2.6, 2.35, 2.2); each GN run stops at the
lowest. For reference, GN also runs with its inner lr fixed (no adaptive
reach) at the tuned lrs and at one scaled by the number of inner steps.
Every run records its steps to each target and its longest run of
rejected steps (robust_defaults.json, robust_defaults.png).

The model-size ladder (--model-sizes) asks whether GN's step advantage
holds as the model grows: at each of tiny (0.38M parameters), mini (1.3M)
and small (4.9M), Muon at 16 and 64 micro-batches with its lr swept on seed
0 (the grid extended while its lowest final loss is at an edge) and seeds 1
and 2 at the best lr, 40 steps each; then full and layerwise GN at their
defaults on seeds 0-2 at 64, each stopping at the lower of 2.35 and Muon's
median final loss at 64 (rounded up to two decimals, so that Muon's median
seed reaches it). model_sizes.json and its plot are written after every
rung; the runs live in --out (commit them to carry the study on).

Every run is `train.py` in its own process (--jobs at a time, each with its
share of the cores), so the peak memory is per run: torch.cuda.max_memory_allocated
on CUDA, the process's maximum resident set size on CPU. Writes to --out DIR:
results.json and results.png (or batch.json, batch.png, batch_loss.png), one
directory per run with train.py's metrics.jsonl, config.json and train.log
(--results FILE puts the JSON there instead, the plots beside it). Every JSON
names the command, the commit and the date that made it. A finished run with
the same train.py arguments is reused, so an interrupted comparison continues
where it stopped (delete DIR to run everything again).
"""
import dataclasses
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np

from baselines import DEFAULT_LR
from train import FIRST_ORDER, GN_INNER_LR, GN_VARIANTS, ArgumentParser

HERE = os.path.dirname(os.path.abspath(__file__))

# A preset: the model and micro-batch shape, the micro-batches per outer step
# of the headline comparison and of the batch sweep, the step budget at each
# of those (the same for every optimizer), the target loss, the learning-rate
# grids (GN: inner lr), the optimizers, extra train.py options, and optionally
# a warm-up run (init) that every run starts from.
CPU = dict(
    model="tiny", batch_size=16, seq_len=64, eval_batches=8, target_loss=2.35,
    micro_batches=64, batch_sweep=[4, 16, 64, 256], budget={4: 160, 16: 80, 64: 40, 256: 40},
    # The baselines' grids are train.py's tuned defaults times 0.5, 1 and 2.
    lrs={"adamw": [1.5e-3, 3e-3, 6e-3], "muon": [0.03, 0.06, 0.12], "soap": [4.5e-3, 9e-3, 1.8e-2],
         "shampoo": [1.5e-3, 3e-3, 6e-3], "gn": [0.005, 0.01, 0.02], "gn_layerwise": [0.005, 0.01, 0.02],
         "gn_prox": [0.005, 0.01, 0.02], "gn_layerwise_prox": [0.005, 0.01, 0.02]},
    opts=["adamw", "muon", "soap", "shampoo", "gn", "gn_layerwise"],
    # The headline comparison also sweeps these optimizers' warmup (steps of
    # the budget at the headline batch; train.py's default is 5%: 2 of 40),
    # each warmup with its whole lr grid.
    warmups={"adamw": [2, 5, 10], "soap": [2, 5, 10], "shampoo": [2, 5, 10]},
    # The batch sweep runs Muon, the best baseline of the headline comparison,
    # against GN; AdamW, SOAP and Shampoo run at the headline batch only (each
    # would add up to an hour at 256K tokens per step on 2 cores).
    sweep_opts=["muon", "gn", "gn_layerwise"], seed_opts=["muon", "gn"],
    # The robust-defaults study (--robust): every optimizer at its default lr
    # (the middle of its grid) at these batches and seeds, full GN also at
    # other starting inner lrs, each GN run measured at these targets and at
    # the reference baseline's median final loss at its batch. For reference,
    # GN with its inner lr fixed (no adaptive reach): at the batch sweep's best
    # lrs, and full GN at 64 micro-batches' 0.01 divided by the number of inner
    # steps (0.0025 at 256), the candidate that scales the reach by hand.
    robust=dict(opts=["muon", "gn", "gn_layerwise"], batches=[64, 256], seeds=[0, 1, 2, 3, 4],
                targets=[2.6, 2.35, 2.2], inner_lrs={"gn": {256: [0.005, 0.02, 0.04]}},
                fixed_inner_lrs={"gn": {64: [0.01], 256: [0.02, 0.0025]}, "gn_layerwise": {64: [0.04], 256: [0.01]}}),
    # The model-size ladder (--model-sizes): at each model, the baseline's lr
    # grid (this preset's) swept on the first seed at each batch, the other
    # seeds at each batch's best lr, then GN at its defaults on every seed at
    # the largest batch, to the study's targets and the baseline's median
    # final loss there. One step budget at every batch.
    model_sizes=dict(models=["tiny", "mini", "small"], baseline="muon", gn_opts=["gn", "gn_layerwise"],
                     batches=[16, 64], budget=40, seeds=[0, 1, 2], targets=[2.35]),
    train_args=[], gn_args=[])

# The paper's 45M and 150M setups (DESIGN.md) with the authors' recipe
# (train.py --recipe paper): 122 micro-batches of 32 sequences, inner Muon lr
# 0.01, 227 outer steps (the sweep's smaller batches get as many tokens), every
# optimizer started from one AdamW warm-up of 1000 steps of 32 sequences, whose
# data the runs continue. The authors' warm-up recipe is not in their code: it
# runs train.py's own (warmup, cosine) at the middle of the AdamW grid. No
# fixed target: the best baseline's final loss.
PAPER = dict(
    batch_size=32, seq_len=1024, eval_batches=16, target_loss=None,
    micro_batches=122, batch_sweep=[30, 61, 122], budget={m: round(227 * 122 / m) for m in (30, 61, 122)},
    opts=["adamw", "muon", "soap", "shampoo", "gn", "gn_layerwise"], sweep_opts=["muon", "gn"], seed_opts=[],
    train_args=["--recipe", "paper"], gn_args=[])
PAPER_INIT = dict(opt="adamw", steps=1000, micro_batches=1)
PAPER_GN_LR = {"gn": [0.01], "gn_layerwise": [0.01], "gn_prox": [0.01], "gn_layerwise_prox": [0.01]}

PRESETS = {
    "cpu": CPU,
    # The newcomer's race (--quick): Muon against full and layerwise GN at 64K
    # tokens per step, past Muon's critical batch on tiny, each at train.py's
    # default lr (no sweep), to the cpu preset's target.
    "quick": dict(CPU, opts=["muon", "gn", "gn_layerwise"],
                  lrs={"muon": [DEFAULT_LR["muon"]], "gn": [GN_INNER_LR["muon"]],
                       "gn_layerwise": [GN_INNER_LR["muon"]]}),
    "45m": dict(PAPER, model="paper45m", init=dict(PAPER_INIT, lr=2e-3),
                lrs={"adamw": [1e-3, 2e-3, 4e-3], "muon": [0.01, 0.02, 0.04],
                     "soap": [1.5e-3, 3e-3, 6e-3], "shampoo": [1e-3, 2e-3, 4e-3], **PAPER_GN_LR}),
    "150m": dict(PAPER, model="paper150m", init=dict(PAPER_INIT, lr=1e-3),
                 lrs={"adamw": [5e-4, 1e-3, 2e-3], "muon": [0.01, 0.02, 0.04],
                      "soap": [1e-3, 2e-3, 4e-3], "shampoo": [5e-4, 1e-3, 2e-3], **PAPER_GN_LR}),
    # A few seconds per run, for the tests: not a measurement.
    "smoke": dict(CPU, batch_size=4, seq_len=32, eval_batches=2, target_loss=None, micro_batches=2,
                  batch_sweep=[1, 2], budget={1: 4, 2: 4},
                  lrs={"adamw": [3e-3, 1e-2], "muon": [0.06], "soap": [9e-3], "shampoo": [3e-3], "gn": [0.02],
                       "gn_layerwise": [0.04], "gn_prox": [0.02], "gn_layerwise_prox": [0.04]},
                  opts=["adamw", "gn"], sweep_opts=["adamw", "gn"], seed_opts=["gn"], warmups={},
                  robust=dict(opts=["adamw", "gn", "gn_layerwise"], batches=[2], seeds=[0, 1], targets=[5.0, 4.0],
                              inner_lrs={"gn": {2: [0.01]}}, fixed_inner_lrs={"gn": {2: [0.02]}}),
                  model_sizes=dict(models=["tiny", "mini"], baseline="muon", gn_opts=["gn_layerwise"],
                                   batches=[1, 2], budget=3, seeds=[0, 1], targets=[5.0])),
}
# The paper's comparison shrunk to fit about 8 minutes of one H100 or H200
# (--preset gpu-quick), fixed before any GPU ran it: the authors' 45M
# architecture on the data's vocabulary (the embedded byte corpus: 256 tokens,
# 13M parameters; T5's 32100: 45M), float32 with TF32 matmuls, one AdamW
# warm-up of 200 steps of 16K tokens shared by every run, then Muon, full and
# layerwise GN at train.py's defaults (no sweep, the adaptive reach on) at
# 512K tokens per step for 20 steps, to Muon's final loss; bench.py at the
# paper45m and paper150m shapes; the CUDA tests. --smoke: the same code path
# at tiny sizes on the CPU.
TF32 = ["--matmul-precision", "high"]  # train.py's and bench.py's: float32 matmuls in TF32 on CUDA
GPU_QUICK = dict(
    model="paper45m", batch_size=16, seq_len=1024, eval_batches=8, target_loss=None,
    micro_batches=32, batch_sweep=[32], budget={32: 20},
    lrs={"muon": [DEFAULT_LR["muon"]], "gn": [GN_INNER_LR["muon"]], "gn_layerwise": [GN_INNER_LR["muon"]]},
    opts=["muon", "gn", "gn_layerwise"], sweep_opts=[], seed_opts=[],
    init=dict(opt="adamw", steps=200, micro_batches=1, lr=DEFAULT_LR["adamw"], args=TF32),
    train_args=TF32, gn_args=[], bench=["paper45m", "paper150m"], bench_args=TF32, cuda_tests=True)
GPU_QUICK_SMOKE = dict(GPU_QUICK, model="tiny", batch_size=4, seq_len=32, eval_batches=2, micro_batches=2,
                       batch_sweep=[2], budget={2: 3}, init=dict(GPU_QUICK["init"], steps=3),
                       bench=["smoke"], cuda_tests=False)
PRESETS.update({"gpu-quick": GPU_QUICK, "gpu-quick-smoke": GPU_QUICK_SMOKE})
FIXED_REACH = "--no-adaptive-reach"  # train.py's flag for GN's inner lr without the adaptive reach
RELATIVE_COST = {"gn": 2, "gn_prox": 2, "gn_layerwise": 4, "gn_layerwise_prox": 4}  # per step, to start long sweeps first
MAX_GRID_EXTENSIONS = 2  # a best lr at the edge of its grid extends the grid by a factor 2, this many times
MAX_LADDER_EXTENSIONS = 6  # the model-size ladder's baseline grid extends while its best lr is at an edge

# What each run process does: train.py's main, then its peak memory into DIR/memory.json.
# A crash (an exception train.py does not handle: CUDA out of memory, a bug)
# exits with CRASHED, not with the 1 of a run that diverged, so that it is
# not kept as a finished run.
CRASHED = 3
CHILD = """
import json, os, resource, sys, traceback
sys.path.insert(0, sys.argv.pop(1))
import torch, train
from data import DataError
argv = sys.argv[1:]
try:
    train.main(argv)
except DataError as e:
    train.fail(str(e))
except Exception:
    traceback.print_exc()
    sys.exit(%d)
cuda = torch.cuda.is_available() and argv[argv.index('--device') + 1] != 'cpu'
peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
kind = 'cuda_max_allocated' if cuda else 'process_max_rss'
with open(os.path.join(argv[argv.index('--out') + 1], 'memory.json'), 'w') as f:
    json.dump({'peak_memory_bytes': peak, 'kind': kind}, f)
""" % CRASHED


class RunRejected(Exception):
    """train.py refused a run as bad input (exit 2): every other run would fail the same way."""


def fail(message):
    print(f"compare.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def provenance(script, argv):
    """What made a results file: the command, the commit it ran at and the date (UTC).

    The commit is suffixed "-dirty" when tracked files differ from it, and is
    None outside a git checkout.
    """
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return {"command": shlex.join(["python", script, *argv]), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def parse_args(argv=None):
    p = ArgumentParser(description="Steps to a target loss: Gauss-Newton against tuned first-order baselines.")
    p.add_argument("--preset", default="cpu", choices=list(PRESETS), help="model, batches, budgets and grids")
    p.add_argument("--quick", action="store_true",
                   help="the newcomer's race (--preset quick): Muon, full and layerwise GN at their defaults")
    p.add_argument("--out", default=None, help="output directory (default: runs/compare-PRESET)")
    p.add_argument("--results", default=None, metavar="FILE",
                   help="where the results JSON goes, the plots beside it (default: in --out)")
    p.add_argument("--target-loss", type=float, default=None,
                   help="validation loss to reach (default: the preset's, else the best baseline's final loss)")
    p.add_argument("--opts", default=None,
                   help="comma-separated optimizers (default: the preset's; any of "
                        f"{', '.join(FIRST_ORDER + tuple(GN_VARIANTS))})")
    p.add_argument("--batch-sweep", action="store_true",
                   help="steps to target against the outer batch size, with the critical-batch fit")
    p.add_argument("--robust", action="store_true",
                   help="the robust-defaults study: Muon, full and layerwise GN at their defaults at two batches on "
                        "five seeds, full GN also at other starting inner lrs (--seeds: other seeds)")
    p.add_argument("--model-sizes", action="store_true",
                   help="the model-size ladder: Muon (lr swept) at two batches, full and layerwise GN at their defaults "
                        "at the larger, on three seeds, at each of the preset's models")
    p.add_argument("--smoke", action="store_true",
                   help="with --preset gpu-quick: the same code path at tiny sizes on the CPU, in under a minute")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time, each with its share of the cores (default: 2 on CPU, 1 on CUDA)")
    p.add_argument("--data", default=None, help="train.py's --data (default: the embedded corpus)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="train.py's --device")
    p.add_argument("--seed", type=int, default=0, help="the seed of every run (the batch sweep adds seed+1)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds: the comparison on each, with medians and ranges (needs a fixed target)")
    args = p.parse_args(argv)
    if args.quick:
        if args.preset not in ("cpu", "quick") or args.batch_sweep:
            p.error("--quick is its own preset: not with --preset or --batch-sweep")
        args.preset = "quick"
    if args.smoke:
        if args.preset != "gpu-quick":
            p.error("--smoke shrinks --preset gpu-quick: give --preset gpu-quick")
        args.preset = "gpu-quick-smoke"
    if sum((args.quick, args.batch_sweep, args.robust, args.model_sizes)) > 1:
        p.error("--quick, --batch-sweep, --robust and --model-sizes are studies of their own: give one")
    preset = PRESETS[args.preset]
    for flag in ("robust", "model_sizes"):
        if getattr(args, flag) and flag not in preset:
            p.error(f"--{flag.replace('_', '-')}: preset {args.preset} defines no such study")
    if args.opts:
        args.opts = args.opts.split(",")
    else:
        args.opts = (preset["sweep_opts"] if args.batch_sweep else
                     preset["robust"]["opts"] if args.robust else
                     [preset["model_sizes"]["baseline"], *preset["model_sizes"]["gn_opts"]] if args.model_sizes else
                     preset["opts"])
    for name in args.opts:
        if name not in FIRST_ORDER and name not in GN_VARIANTS:
            p.error(f"--opts: unknown optimizer {name!r}")
    if args.target_loss is None:
        args.target_loss = preset["target_loss"]
    if not any(name in FIRST_ORDER for name in args.opts) and args.target_loss is None:
        p.error("without a baseline in --opts there is no default target: give --target-loss")
    if args.batch_sweep and args.target_loss is None:
        p.error(f"--batch-sweep needs a fixed target: give --target-loss (preset {args.preset} has none)")
    if args.robust or args.model_sizes:
        args.seeds = args.seeds or ",".join(map(str, preset["robust" if args.robust else "model_sizes"]["seeds"]))
    if args.seeds is not None:
        try:
            args.seeds = sorted({int(seed) for seed in args.seeds.split(",")})
        except ValueError:
            p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
        if not (args.robust or args.model_sizes) and (args.batch_sweep or args.target_loss is None):
            p.error("--seeds needs a fixed target and is not for --batch-sweep")
        args.seed = args.seeds[0]
    else:
        args.seeds = [args.seed]
    if args.jobs is None:
        import torch  # only to see whether runs will share a GPU
        on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        args.jobs = 1 if on_cuda else min(2, os.cpu_count() or 1)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.out is None:
        args.out = os.path.join("runs", f"compare-{args.preset}")
    if args.data is not None:
        args.data = os.path.abspath(args.data)
    if args.results is None:
        args.results = os.path.join(args.out, "batch.json" if args.batch_sweep else
                                    "robust_defaults.json" if args.robust else
                                    "model_sizes.json" if args.model_sizes else
                                    "gpu_quick.json" if "bench" in preset else "results.json")
    args.init_from = None  # the warm-up's checkpoint, once main has run it
    return args


# ---------------------------------------------------------------------------
# Reading runs


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


def summarize(run, target):
    """The numbers results.json keeps for one run, measured against target."""
    reached = first_reaching(run["records"], target) if target is not None else None
    return {"steps_to_target": reached["step"] if reached else None,
            "tokens_to_target": reached["tokens"] if reached else None,
            "time_to_target_s": round(reached["time_s"], 2) if reached else None,
            "final_val_loss": final_val_loss(run["records"]), "lr": run["lr"], "seed": run.get("seed"),
            "warmup": int(run["extra"][run["extra"].index("--warmup") + 1]) if "--warmup" in run.get("extra", ()) else None,
            "steps_run": run["records"][-1]["step"] if run["records"] else 0,
            "tokens_per_step": run.get("tokens_per_step"),
            "peak_memory_bytes": run["peak_memory_bytes"], "memory_kind": run["memory_kind"],
            "exit_code": run["exit_code"]}


def best_of(summaries):
    """The run that reaches the target in the fewest steps; ties (or none reaching it): the lowest final loss."""
    def key(s):
        return (s["steps_to_target"] if s["steps_to_target"] is not None else math.inf,
                s["final_val_loss"] if s["final_val_loss"] is not None else math.inf)
    return min(summaries, key=key)


# ---------------------------------------------------------------------------
# Running them


def train_argv(args, run_dir, opt, lr, micro_batches, seed, target_loss=None, stop_at=None, extra=()):
    """train.py's arguments for one run of the comparison; extra: more of them, for this run only."""
    preset = PRESETS[args.preset]
    is_gn = opt in GN_VARIANTS
    steps = preset["budget"][micro_batches]
    argv = ["--opt", opt, "--model", preset["model"], "--batch-size", str(preset["batch_size"]),
            "--seq-len", str(preset["seq_len"]), "--micro-batches", str(micro_batches), "--steps", str(steps),
            "--eval-every", "1", "--eval-batches", str(preset["eval_batches"]), "--seed", str(seed),
            "--device", args.device, "--sample-tokens", "0", "--ckpt-every", str(steps + 1), "--out", run_dir,
            "--inner-lr" if is_gn else "--lr", str(lr), *preset["train_args"], *(preset["gn_args"] if is_gn else []),
            *extra]
    if args.data is not None:
        argv += ["--data", args.data]
    if target_loss is not None:
        argv += ["--target-loss", repr(target_loss)]
    if stop_at is not None and stop_at < steps:
        argv += ["--stop-at-step", str(stop_at)]
    if args.init_from is not None:
        argv += ["--init-from", args.init_from]
    return argv


def warm_up(args):
    """Train the preset's warm-up (init, with its own train.py args) once; returns its checkpoint, which
    every run starts from (the only one it writes)."""
    preset = PRESETS[args.preset]
    init = preset["init"]
    run_dir = os.path.join(args.out, "runs", f"init-{init['opt']}-lr{init['lr']:g}-steps{init['steps']}")
    argv = ["--opt", init["opt"], "--lr", str(init["lr"]), "--model", preset["model"],
            "--batch-size", str(preset["batch_size"]), "--seq-len", str(preset["seq_len"]),
            "--micro-batches", str(init["micro_batches"]), "--steps", str(init["steps"]),
            "--eval-batches", str(preset["eval_batches"]), "--seed", str(args.seed), "--device", args.device,
            "--sample-tokens", "0", "--ckpt-every", str(init["steps"]), "--out", run_dir, *init.get("args", [])]
    argv += ["--data", args.data] if args.data is not None else []
    if launch(args, run_dir, argv) != 0:
        raise RuntimeError(f"the warm-up run in {run_dir} diverged: every run would start from it")
    return os.path.join(run_dir, "ckpt.pt")


def launch(args, run_dir, argv):
    """train.py with argv in its own process (output in run_dir/train.log), or the finished run already there
    with the same argv; returns its exit code."""
    finished = os.path.join(run_dir, "finished.json")  # train.py's arguments and exit code of a finished run
    if os.path.exists(finished) and json.load(open(finished))["argv"] == argv:
        print(f"reusing the finished run in {run_dir}", flush=True)
        code = json.load(open(finished))["exit_code"]
    else:
        os.makedirs(run_dir, exist_ok=True)
        for stale in (finished, os.path.join(run_dir, "memory.json")):
            if os.path.exists(stale):
                os.remove(stale)
        stop = f" (stops by step {argv[argv.index('--stop-at-step') + 1]})" if "--stop-at-step" in argv else ""
        print(f"start  {os.path.basename(run_dir)}{stop}", flush=True)
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with open(os.path.join(run_dir, "train.log"), "w") as log:
            code = subprocess.run([sys.executable, "-c", CHILD, HERE, *argv], stdout=log, stderr=subprocess.STDOUT,
                                  env=env).returncode
        if code == 2:
            with open(os.path.join(run_dir, "train.log")) as log:
                print(log.read().strip().splitlines()[-1], file=sys.stderr)
            raise RunRejected(f"train.py rejected the run in {run_dir} (its message is above)")
        if code == CRASHED:
            raise RuntimeError(f"the run in {run_dir} crashed: its train.log ends with the traceback")
        if code not in (0, 1):  # interrupted or killed: not a finished run (1 is a run that diverged)
            raise RuntimeError(f"the run in {run_dir} stopped with exit code {code}; rerun to continue")
        with open(finished, "w") as f:
            json.dump({"argv": argv, "exit_code": code}, f)
    return code


def train_run(args, run_dir, opt, lr, micro_batches, seed, target_loss=None, stop_at=None, extra=()):
    """One run of the comparison (see launch); returns its metrics and memory."""
    code = launch(args, run_dir, train_argv(args, run_dir, opt, lr, micro_batches, seed, target_loss, stop_at, extra))
    memory = {}
    if os.path.exists(os.path.join(run_dir, "memory.json")):
        with open(os.path.join(run_dir, "memory.json")) as f:
            memory = json.load(f)
    preset = PRESETS[args.preset]
    records = read_metrics(run_dir)
    reached = first_reaching(records, target_loss) if target_loss is not None else None
    print(f"done   {os.path.basename(run_dir)}: "
          + (f"target at step {reached['step']}" if reached else f"final loss {final_val_loss(records)}"), flush=True)
    return {"opt": opt, "lr": lr, "seed": seed, "micro_batches": micro_batches, "extra": list(extra),
            "records": records, "run_dir": run_dir,
            "tokens_per_step": micro_batches * preset["batch_size"] * preset["seq_len"],
            "exit_code": code, "peak_memory_bytes": memory.get("peak_memory_bytes"), "memory_kind": memory.get("kind")}


def run_dir_of(args, opt, micro_batches, lr, seed, extra=()):
    return os.path.join(args.out, "runs", f"{opt}-mb{micro_batches}-lr{lr:g}" + (f"-seed{seed}" if seed else "")
                        + "".join("-" + a.lstrip("-") for a in extra))


def sweep(args, opt, micro_batches, target_loss, seed=None, grid=None, extra=()):
    """opt's learning-rate grid at this outer batch, the middle lr first; returns every run.

    Once a run has reached the target, later lrs stop at that step: they can no
    longer win. An lr at an edge of the grid that reached the target in the
    fewest steps (alone or tied: either way the grid has not bracketed the
    best lr) extends it (MAX_GRID_EXTENSIONS): the extension is there to find
    the fewest steps. Where no lr reaches the target (or there is none), the
    lowest final loss at an edge extends it the same way.
    """
    seed = args.seed if seed is None else seed
    grid = list(grid or PRESETS[args.preset]["lrs"][opt])
    order = sorted(grid, key=lambda lr: abs(grid.index(lr) - (len(grid) - 1) / 2))
    runs, extensions = [], 0
    while order:
        lr = order.pop(0)
        best = best_of([summarize(r, target_loss) for r in runs]) if runs else None
        stop_at = best["steps_to_target"] if best else None
        runs.append(train_run(args, run_dir_of(args, opt, micro_batches, lr, seed, extra), opt, lr, micro_batches,
                              seed, target_loss, stop_at, extra))
        if not order and len(grid) > 1 and extensions < MAX_GRID_EXTENSIONS:
            summaries = [summarize(r, target_loss) for r in runs]
            best = best_of(summaries)
            edges = (min(grid), max(grid))
            if best["steps_to_target"] is not None:
                at_edge = [s for s in summaries if s["lr"] in edges and s["steps_to_target"] == best["steps_to_target"]]
            else:
                at_edge = [best] if best["lr"] in edges and best["final_val_loss"] is not None else []
            if at_edge:
                edge_lr = best_of(at_edge)["lr"]
                order.append(edge_lr / 2 if edge_lr == min(grid) else edge_lr * 2)
                grid.append(order[-1])
                extensions += 1
    return runs


def run_all(args, jobs):
    """Run the (opt, micro_batches, seed, target[, grid[, extra train.py args]]) sweeps of jobs, args.jobs at a
    time, longest first."""
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {job: pool.submit(sweep, args, *job[:2], job[3], job[2], *job[4:])
                   for job in sorted(jobs, key=lambda j: -j[1] * RELATIVE_COST.get(j[0], 1))}
        try:
            return {job: future.result() for job, future in futures.items()}
        except RunRejected as e:
            for future in futures.values():
                future.cancel()
            fail(str(e))


def compare(args, micro_batches, target_loss):
    """Every optimizer of args.opts at one outer batch, those with warmups in the preset at each (every
    warmup its own lr sweep). Without a target, the baselines run first and the lowest final validation
    loss of any of their runs becomes it.

    Returns (target, {opt: summary of its best run}, {opt: its best run}, {opt: every run's summary}).
    """
    warmups = PRESETS[args.preset].get("warmups", {})

    def runs_of(opts, target):
        jobs = [(o, micro_batches, args.seed, target, None, ("--warmup", str(w)) if w is not None else ())
                for o in opts for w in warmups.get(o, [None])]
        runs = {}
        for job, job_runs in run_all(args, jobs).items():
            runs.setdefault(job[0], []).extend(job_runs)
        return runs

    baselines = [o for o in args.opts if o in FIRST_ORDER]
    all_runs = runs_of(baselines if target_loss is None else args.opts, target_loss)
    if target_loss is None:
        finals = [f for runs in all_runs.values() for f in (final_val_loss(r["records"]) for r in runs) if f]
        if not finals:
            fail("no baseline run finished with a finite validation loss: no target to measure against")
        target_loss = min(finals)
        all_runs.update(runs_of([o for o in args.opts if o not in all_runs], target_loss))
    all_runs = {o: all_runs[o] for o in args.opts}
    summaries = {opt: [summarize(r, target_loss) for r in runs] for opt, runs in all_runs.items()}
    best = {opt: best_of(s) for opt, s in summaries.items()}
    best_runs = {opt: all_runs[opt][summaries[opt].index(best[opt])] for opt in all_runs}
    return target_loss, best, best_runs, summaries


def compare_seeds(args, micro_batches, target_loss):
    """compare() at a fixed target on every seed of args.seeds, all their sweeps in one pool.

    Returns {seed: ({opt: summary of its best run}, {opt: its best run}, {opt: every lr's summary})}.
    """
    runs = run_all(args, [(o, micro_batches, s, target_loss) for s in args.seeds for o in args.opts])
    by_seed = {}
    for seed in args.seeds:
        summaries = {o: [summarize(r, target_loss) for r in runs[(o, micro_batches, seed, target_loss)]]
                     for o in args.opts}
        best = {o: best_of(v) for o, v in summaries.items()}
        best_runs = {o: runs[(o, micro_batches, seed, target_loss)][summaries[o].index(best[o])] for o in args.opts}
        by_seed[seed] = (best, best_runs, summaries)
    return by_seed


def median_and_range(values):
    """Median, min and max of values, where None (the target not reached) counts as worse than any number:
    a median or max that falls on it is None."""
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)
    middle = ordered[(len(ordered) - 1) // 2: len(ordered) // 2 + 1]
    median = None if None in middle else sum(middle) / len(middle)
    return {"median": median, "min": ordered[0], "max": ordered[-1]}


def over_seeds(by_seed):
    """Per optimizer: steps, tokens and seconds to target on each seed, with their medians and ranges."""
    opts = next(iter(by_seed.values()))[0]
    return {opt: {key: {"by_seed": [by_seed[s][0][opt][key] for s in by_seed],
                        **median_and_range([by_seed[s][0][opt][key] for s in by_seed])}
                  for key in ("steps_to_target", "tokens_to_target", "time_to_target_s")}
            for opt in opts}


# ---------------------------------------------------------------------------
# The critical batch


def fit_critical_batch(batches, steps):
    """Fit S(B) = S_min (1 + B_noise / B) to steps to target S at batch sizes B.

    Linear in 1/B: S = S_min + (S_min·B_noise)/B, fit by least squares on the
    relative error (each point weighted by 1/S), with both coefficients kept
    non-negative. Returns (S_min, B_noise); B_noise is None when S_min is 0
    (the steps keep falling as 1/B: no saturation in the measured range).
    """
    B, S = np.asarray(batches, dtype=float), np.asarray(steps, dtype=float)
    if len(B) < 2 or len(set(B)) < 2:
        raise ValueError("the fit needs steps to target at two or more batch sizes")
    w = 1 / S
    design = np.stack([np.ones_like(B), 1 / B], axis=1) * w[:, None]
    (a, b), *_ = np.linalg.lstsq(design, S * w, rcond=None)
    if b <= 1e-9 * a:  # no gain from a bigger batch: constant steps
        a, b = float(np.sum(w * w * S) / np.sum(w * w)), 0.0
    if a <= 1e-9 * S.max():  # pure 1/B: perfect scaling, S_min = 0
        x = w / B
        a, b = 0.0, float(np.sum(x * S * w) / np.sum(x * x))
    return float(a), (float(b / a) if a > 0 else None)


def batch_sweep(args, target):
    """Every optimizer of args.opts at every batch of the preset, plus a second seed at the largest batch."""
    preset = PRESETS[args.preset]
    largest = max(preset["batch_sweep"])
    jobs = [(o, m, args.seed, target) for o in args.opts for m in preset["batch_sweep"]]
    runs = run_all(args, jobs)
    best = {job: best_of([summarize(r, target) for r in rs]) for job, rs in runs.items()}
    seeds = [(o, largest, args.seed + 1, target, (best[(o, largest, args.seed, target)]["lr"],))
             for o in preset["seed_opts"] if o in args.opts]
    seed_runs = run_all(args, seeds)

    results = {"target_loss": target, "preset": args.preset, "seeds": [args.seed, args.seed + 1],
               "budget_steps": {str(preset["batch_size"] * preset["seq_len"] * m): preset["budget"][m]
                                for m in preset["batch_sweep"]},
               "optimizers": {}}
    for opt in args.opts:
        rows = [best[(opt, m, args.seed, target)] for m in preset["batch_sweep"]]
        entry = {key: [row[k] for row in rows] for key, k in
                 (("tokens_per_step", "tokens_per_step"), ("steps_to_target", "steps_to_target"),
                  ("best_lr", "lr"), ("time_to_target_s", "time_to_target_s"),
                  ("tokens_to_target", "tokens_to_target"), ("final_val_loss", "final_val_loss"))}
        reached = [(b, s) for b, s in zip(entry["tokens_per_step"], entry["steps_to_target"]) if s]
        entry["s_min"], entry["b_noise"] = fit_critical_batch(*zip(*reached)) if len(reached) >= 2 else (None, None)
        entry["lr_sweeps"] = [[{k: s[k] for k in ("lr", "steps_to_target", "steps_run", "final_val_loss")}
                               for s in (summarize(r, target) for r in runs[(opt, m, args.seed, target)])]
                              for m in preset["batch_sweep"]]
        job = next((j for j in seed_runs if j[0] == opt), None)
        if job:
            other = summarize(seed_runs[job][0], target)
            pair = [best[(opt, largest, args.seed, target)]["steps_to_target"], other["steps_to_target"]]
            entry["seeds_at_largest_batch"] = {"seeds": [args.seed, args.seed + 1], "lr": other["lr"],
                                               "steps_to_target": pair,
                                               "spread": (max(pair) - min(pair)) if None not in pair else None}
        results["optimizers"][opt] = entry
    best_runs = {opt: next(r for r in runs[(opt, largest, args.seed, target)]
                           if r["lr"] == results["optimizers"][opt]["best_lr"][-1]) for opt in args.opts}
    return results, best_runs


# ---------------------------------------------------------------------------
# The robust-defaults study


def default_lr(args, opt):
    """The lr a study without a sweep runs opt at: the middle of the preset's grid (train.py's default)."""
    grid = PRESETS[args.preset]["lrs"][opt]
    return grid[(len(grid) - 1) // 2]


def max_consecutive_rejections(records):
    longest = current = 0
    for r in records:
        current = current + 1 if r.get("step_size") == 0 else 0
        longest = max(longest, current)
    return longest


def robust_record(run, targets):
    """One run of the study: its steps to each target (keys with two decimals) and its longest rejection run."""
    reached = {f"{t:.2f}": (first_reaching(run["records"], t) or {}).get("step") for t in targets}
    is_gn = run["opt"] in GN_VARIANTS
    return {"opt": run["opt"], "micro_batches": run["micro_batches"], "seed": run["seed"],
            ("inner_lr" if is_gn else "lr"): run["lr"],
            **({"adaptive_reach": FIXED_REACH not in run["extra"]} if is_gn else {}), "steps_to_target": reached,
            "max_consecutive_rejections": max_consecutive_rejections(run["records"]),
            "final_val_loss": final_val_loss(run["records"]), "steps_run": len(run["records"]),
            "val_losses": [r.get("val_loss") for r in run["records"]],
            "reach": [r["reach"] for r in run["records"] if "reach" in r],
            "time_s": round(run["records"][-1]["time_s"], 2) if run["records"] else None,
            "exit_code": run["exit_code"]}


def robust_groups(runs):
    """Runs grouped by (opt, micro_batches, lr, adaptive reach: None for a baseline) in the order they first appear."""
    groups = {}
    for r in runs:
        key = (r["opt"], r["micro_batches"], r.get("inner_lr", r.get("lr")), r.get("adaptive_reach"))
        groups.setdefault(key, []).append(r)
    return groups


def robust_study(args):
    """The baselines at every batch and seed of the preset's study over the whole budget, then GN at its
    defaults (and full GN at the study's other inner lrs), each GN run stopping at the lowest target:
    the study's targets and the first baseline's median final loss at that batch, to two decimals. Then,
    for reference, GN at the study's fixed inner lrs (--no-adaptive-reach)."""
    study = PRESETS[args.preset]["robust"]
    baselines = [o for o in args.opts if o in FIRST_ORDER]
    gn_opts = [o for o in args.opts if o in GN_VARIANTS]
    first = run_all(args, [(o, m, s, None, (default_lr(args, o),))
                           for o in baselines for m in study["batches"] for s in args.seeds])
    reference = {}
    for m in study["batches"]:
        finals = [final_val_loss(first[(baselines[0], m, s, None, (default_lr(args, baselines[0]),))][0]["records"])
                  for s in args.seeds] if baselines else []
        reference[m] = round(median_and_range(finals)["median"], 2) if finals and None not in finals else None
    targets = {m: sorted({*study["targets"], *([reference[m]] if reference[m] is not None else [])}, reverse=True)
               for m in study["batches"]}
    jobs = [(o, m, s, min(targets[m]), (lr,)) for o in gn_opts for m in study["batches"] for s in args.seeds
            for lr in [default_lr(args, o), *study["inner_lrs"].get(o, {}).get(m, [])]]
    second = run_all(args, jobs)
    third = run_all(args, [(o, m, s, min(targets[m]), (lr,), (FIXED_REACH,)) for o in gn_opts for m in study["batches"]
                           for s in args.seeds for lr in study.get("fixed_inner_lrs", {}).get(o, {}).get(m, [])])
    runs = [robust_record(rs[0], targets[job[1]]) for job, rs in [*first.items(), *second.items(), *third.items()]]
    summary = []
    for (opt, m, lr, adaptive), group in robust_groups(runs).items():
        steps = {t: median_and_range([r["steps_to_target"][t] for r in group]) for t in group[0]["steps_to_target"]}
        summary.append({"opt": opt, "micro_batches": m, "lr": lr, "adaptive_reach": adaptive,
                        "default": lr == default_lr(args, opt) and adaptive is not False, "steps_to_target": steps,
                        "max_consecutive_rejections": max(r["max_consecutive_rejections"] for r in group)})
    return {"preset": args.preset, "seeds": args.seeds, "budget_steps": {str(m): PRESETS[args.preset]["budget"][m]
                                                                          for m in study["batches"]},
            "reference": baselines[0] if baselines else None,
            "reference_median_final_loss": {str(m): v for m, v in reference.items()},
            "targets": {str(m): t for m, t in targets.items()}, "summary": summary, "runs": runs}


def robust_table(results):
    """Markdown table: per optimizer, batch and lr, the median (range) steps to each target over the seeds."""
    keys = sorted({t for s in results["summary"] for t in s["steps_to_target"]}, key=float, reverse=True)
    def cell(e):
        fmt = lambda v: "-" if v is None else f"{v:g}"
        return f"{fmt(e['median'])} ({fmt(e['min'])}-{fmt(e['max'])})" if e else ""
    lines = [f"steps to validation loss, median (range) over seeds {results['seeds']}; - is not reached; "
             f"{results['reference']}'s median final loss per batch: {results['reference_median_final_loss']}", "",
             "| optimizer | micro-batches | lr | " + " | ".join(keys) + " | most rejections in a row |",
             "|---|---|---|" + "---|" * (len(keys) + 1)]
    for s in results["summary"]:
        cells = [cell(s["steps_to_target"].get(t)) for t in keys]
        lr = f"{s['lr']:g}" + (" fixed" if s.get("adaptive_reach") is False else "")
        lines.append(f"| {s['opt']} | {s['micro_batches']} | {lr}{'' if s['default'] else ' (not default)'} | "
                     + " | ".join(cells) + f" | {s['max_consecutive_rejections']} |")
    return "\n".join(lines)


def steps_to_losses(val_losses, losses):
    """The first step (1-based) whose validation loss is at or below each of losses, or None."""
    records = [{"step": i + 1, "val_loss": v} for i, v in enumerate(val_losses)]
    return [(first_reaching(records, loss) or {}).get("step") for loss in losses]


def plot_robust(path, results):
    """Per batch: steps to target against the target loss (median and range over the seeds) and the
    reference baseline's median steps over each optimizer's. Solid: the baselines; dashed: GN at its
    defaults; dotted: GN from other inner lrs; dash-dot: GN with a fixed inner lr."""
    plt = pyplot()
    if plt is None:
        return
    batches = [int(m) for m in results["targets"]]
    fig, axes = plt.subplots(2, len(batches), figsize=(6 * len(batches), 7), sharex=True, squeeze=False)
    lowest = min(min(t) for t in results["targets"].values())
    losses = np.linspace(lowest, max(max(t) for t in results["targets"].values()) + 0.3, 40)
    for col, m in enumerate(batches):
        groups = {k: g for k, g in robust_groups(results["runs"]).items() if k[1] == m}
        medians = {}
        defaults = {(s["opt"], s["lr"], s.get("adaptive_reach")): s["default"]
                    for s in results["summary"] if s["micro_batches"] == m}
        for (opt, _, lr, adaptive), group in groups.items():
            per_seed = np.array([[np.inf if s is None else s for s in steps_to_losses(r["val_losses"], losses)]
                                 for r in group])
            median = np.median(per_seed, axis=0)
            style = ("-" if opt in FIRST_ORDER else "--" if defaults[(opt, lr, adaptive)] else
                     "-." if adaptive is False else ":")
            label = f"{opt} (lr {lr:g}{', fixed' if adaptive is False else ''})"
            line, = axes[0][col].plot(losses, np.where(np.isfinite(median), median, np.nan), style, label=label)
            medians[label] = opt, median, line.get_color(), style
            low, high = per_seed.min(axis=0), per_seed.max(axis=0)
            axes[0][col].fill_between(losses, np.where(np.isfinite(low), low, np.nan),
                                      np.where(np.isfinite(high), high, np.nan), color=line.get_color(), alpha=0.12)
        reference = next((v[1] for v in medians.values() if v[0] == results["reference"]), None)
        for label, (opt, median, color, style) in medians.items():
            if reference is not None and opt != results["reference"]:
                with np.errstate(invalid="ignore"):
                    ratio = np.where(np.isfinite(reference) & np.isfinite(median), reference / median, np.nan)
                axes[1][col].plot(losses, ratio, style, color=color, label=label)
        tokens = m * PRESETS[results["preset"]]["batch_size"] * PRESETS[results["preset"]]["seq_len"]
        axes[0][col].set(title=f"{m} micro-batches ({tokens // 1024}K tokens per step)", ylabel="steps to target",
                         yscale="log")
        axes[1][col].set(xlabel="target validation loss", ylabel=f"{results['reference']}'s steps / steps")
        axes[0][col].invert_xaxis()
        axes[0][col].legend(fontsize=7)
        axes[1][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


# ---------------------------------------------------------------------------
# The model-size ladder


def size_record(run, model, parameters, targets, measured):
    """One run of the ladder: steps and seconds to each target (keys with two decimals); measured is False for
    an lr of the baseline's sweep other than the best."""
    reached = {f"{t:.2f}": first_reaching(run["records"], t) or {} for t in targets}
    return {"opt": run["opt"], "preset": model, "parameters": parameters, "micro_batches": run["micro_batches"],
            "lr": run["lr"], "seed": run["seed"], "measured": measured,
            "steps_to_target": {t: r.get("step") for t, r in reached.items()},
            "seconds_to_target": {t: round(r["time_s"], 2) if r else None for t, r in reached.items()},
            "final_val_loss": final_val_loss(run["records"]), "steps_run": len(run["records"]),
            "max_consecutive_rejections": max_consecutive_rejections(run["records"]), "exit_code": run["exit_code"]}


def step_ratios(baseline, gn):
    """The baseline's median over GN's median, with the range GN's seeds give: median / max to median / min."""
    if baseline["median"] is None or gn["median"] is None:
        return {"median": None, "min": None, "max": None}
    return {"median": baseline["median"] / gn["median"],
            "min": baseline["median"] / gn["max"] if gn["max"] is not None else None,
            "max": baseline["median"] / gn["min"]}


def parallel_sweeps(args, opt, batches, seed):
    """opt's lr grid at each batch without a target, every lr its own job (args.jobs at a time, the
    largest batch first); a batch whose runs are all done and whose lowest final loss lies at an edge
    of its grid gets the lr 2x beyond that edge, while it does (up to MAX_LADDER_EXTENSIONS times), without
    waiting for the other batches. Returns {batch: every run}."""
    runs = {m: [] for m in batches}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        def submit(m, lr):
            running[pool.submit(train_run, args, run_dir_of(args, opt, m, lr, seed), opt, lr, m, seed)] = m

        running = {}
        for m in sorted(batches, reverse=True):
            for lr in PRESETS[args.preset]["lrs"][opt]:
                submit(m, lr)
        while running:
            for future in wait(running, return_when=FIRST_COMPLETED).done:
                m = running.pop(future)
                runs[m].append(future.result())
                lrs = [r["lr"] for r in runs[m]]
                best = best_of([summarize(r, None) for r in runs[m]])["lr"]
                extensions = len(lrs) - len(PRESETS[args.preset]["lrs"][opt])
                if (m not in running.values() and len(lrs) > 1 and best in (min(lrs), max(lrs))
                        and extensions < MAX_LADDER_EXTENSIONS):
                    submit(m, best / 2 if best == min(lrs) else best * 2)
    return runs


def model_size_rung(args, model, study):
    """One model of the ladder, its runs in args.out/MODEL: the baseline's lr swept on the first seed at each
    batch, its other seeds at each batch's best lr, then GN at its defaults on every seed at the largest batch,
    stopping at the lower target. Returns (rung summary, run records)."""
    base = args.preset
    args.preset, args.out = f"{base}:{model}", os.path.join(args.out, model)
    PRESETS[args.preset] = dict(PRESETS[base], model=model, budget={m: study["budget"] for m in study["batches"]})
    try:
        opt, largest, first = study["baseline"], max(study["batches"]), args.seeds[0]
        sweeps = parallel_sweeps(args, opt, study["batches"], first)
        best_lr, baseline_runs = {}, {}
        for m in study["batches"]:
            swept = sweeps[m]
            best_lr[m] = best_of([summarize(r, None) for r in swept])["lr"]
            baseline_runs[m] = [next(r for r in swept if r["lr"] == best_lr[m])]
        others = run_all(args, [(opt, m, s, None, (best_lr[m],)) for m in study["batches"] for s in args.seeds[1:]])
        for (_, m, _, _, _), rs in others.items():
            baseline_runs[m].append(rs[0])
        finals = [final_val_loss(r["records"]) for r in baseline_runs[largest]]
        if None in finals:
            raise RuntimeError(f"{model}: a {opt} run at {largest} micro-batches diverged: no target to measure against")
        reference = math.ceil(median_and_range(finals)["median"] * 100) / 100  # up: the median seed reaches it
        targets = sorted({*study["targets"], reference}, reverse=True)
        gn_runs = run_all(args, [(o, largest, s, min(targets), (default_lr(args, o),))
                                 for o in study["gn_opts"] for s in args.seeds])
    finally:
        args.preset, args.out = base, os.path.dirname(args.out)
    some_run = baseline_runs[largest][0]["run_dir"]
    parameters = json.load(open(os.path.join(some_run, "config.json")))["n_params"]
    measured = [r for rs in baseline_runs.values() for r in rs] + [rs[0] for rs in gn_runs.values()]
    swept_only = [r for rs in sweeps.values() for r in rs if all(r is not m for m in measured)]
    runs = ([size_record(r, model, parameters, targets, True) for r in measured]
            + [size_record(r, model, parameters, targets, False) for r in swept_only])

    def over(opt_, m, key):
        group = [r for r in runs if r["measured"] and r["opt"] == opt_ and r["micro_batches"] == m]
        return {t: median_and_range([r[key][t] for r in group]) for t in group[0][key]}

    rung = {"preset": model, "parameters": parameters, "targets": [f"{t:.2f}" for t in targets],
            "baseline_median_final_loss": reference,
            "best_lr": {str(m): best_lr[m] for m in study["batches"]},
            "best_lr_at_grid_edge": {str(m): best_lr[m] in (min(r["lr"] for r in sweeps[m]),
                                                            max(r["lr"] for r in sweeps[m])) for m in study["batches"]},
            "baseline_final_loss": {str(m): median_and_range([final_val_loss(r["records"]) for r in baseline_runs[m]])
                                    for m in study["batches"]},
            "steps_to_target": {f"{o}@{m}": over(o, m, "steps_to_target") for o, m in
                                [*((opt, m) for m in study["batches"]), *((o, largest) for o in study["gn_opts"])]},
            "seconds_to_target": {f"{o}@{largest}": over(o, largest, "seconds_to_target")
                                  for o in [opt, *study["gn_opts"]]}}
    rung["ratios"] = {o: {key: {t: step_ratios(rung[key][f"{opt}@{largest}"][t], rung[key][f"{o}@{largest}"][t])
                                for t in rung["targets"]} for key in ("steps_to_target", "seconds_to_target")}
                      for o in study["gn_opts"]}
    return rung, runs


def model_size_study(args, report):
    """The ladder: model_size_rung at every model of the preset's study, smallest first, so that a rung is
    finished (and its runs can be kept) before the next starts; report(results) after every rung, with
    "complete" False until the last."""
    study = PRESETS[args.preset]["model_sizes"]
    tokens = {str(m): m * PRESETS[args.preset]["batch_size"] * PRESETS[args.preset]["seq_len"]
              for m in study["batches"]}
    results = {"preset": args.preset, "seeds": args.seeds, "baseline": study["baseline"],
               "budget_steps": study["budget"], "tokens_per_step": tokens,
               "common_targets": [f"{t:.2f}" for t in study["targets"]], "models": study["models"],
               "complete": False, "rungs": [], "runs": []}
    for model in study["models"]:
        rung, rung_runs = model_size_rung(args, model, study)
        results["rungs"].append(rung)
        results["runs"].extend(rung_runs)
        results["complete"] = len(results["rungs"]) == len(study["models"])
        report(results)
    return results


def model_size_table(results):
    """Markdown table: per model, the baseline's steps at each batch and GN's, median (range) over the seeds,
    to the common target and to the baseline's median final loss, with the ratios."""
    opt, (small, large) = results["baseline"], sorted(map(int, results["tokens_per_step"]))[::len(results["tokens_per_step"]) - 1]
    fmt = lambda v, d=0: "-" if v is None else f"{v:.{d}f}"
    cell = lambda e, d=0: f"{fmt(e['median'], d)} [{fmt(e['min'], d)}, {fmt(e['max'], d)}]"
    gn_opts = [k.split("@")[0] for k in results["rungs"][0]["steps_to_target"] if not k.startswith(opt + "@")]
    lines = [f"steps to target, median [range] over seeds {results['seeds']}; - is not reached in "
             f"{results['budget_steps']} steps; ratio: {opt}'s median over GN's, [range] over GN's seeds", "",
             f"| model | parameters | target | {opt} @{small} | {opt} @{large} | "
             + " | ".join(f"{o} @{large} | ratio" for o in gn_opts) + " | seconds ratio |",
             "|---|---|---|---|---|" + "---|---|" * len(gn_opts) + "---|"]
    for rung in results["rungs"]:
        for t in rung["targets"]:
            steps = rung["steps_to_target"]
            label = t + (f" ({opt}'s final)" if float(t) == rung["baseline_median_final_loss"] else "")
            row = [rung["preset"], f"{rung['parameters'] / 1e6:.2f}M", label, cell(steps[f"{opt}@{small}"][t]),
                   cell(steps[f"{opt}@{large}"][t])]
            for o in gn_opts:
                row += [cell(steps[f"{o}@{large}"][t]), cell(rung["ratios"][o]["steps_to_target"][t], 2)]
            row.append(" / ".join(fmt(rung["ratios"][o]["seconds_to_target"][t]["median"], 2) for o in gn_opts))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_model_sizes(path, results):
    """Top: the baseline's median steps over GN's (range over GN's seeds) against parameters, one panel per
    target; bottom: the same for seconds."""
    plt = pyplot()
    if plt is None:
        return
    rungs, opt = results["rungs"], results["baseline"]
    columns = [(t, f"validation loss {t}") for t in results["common_targets"]] + [(None, f"{opt}'s median final loss")]
    fig, axes = plt.subplots(2, len(columns), figsize=(5.5 * len(columns), 7), sharex=True, squeeze=False)
    params = [r["parameters"] for r in rungs]
    gn_opts = list(rungs[0]["ratios"])
    for col, (target, title) in enumerate(columns):
        for row, key in enumerate(("steps_to_target", "seconds_to_target")):
            ax = axes[row][col]
            for i, o in enumerate(gn_opts):
                entries = [r["ratios"][o][key][target or f"{r['baseline_median_final_loss']:.2f}"] for r in rungs]
                points = [(p, e) for p, e in zip(params, entries) if e["median"] is not None]
                if not points:
                    continue
                x, e = zip(*points)
                y = np.array([v["median"] for v in e])
                low = y - np.array([v["min"] if v["min"] is not None else 0 for v in e])
                high = np.array([v["max"] for v in e]) - y
                ax.errorbar(np.array(x) * (1.04 if i else 1), y, yerr=[low, high], fmt="o--", capsize=3, label=o)
            ax.axhline(1, color="gray", linewidth=0.8, linestyle=":")
            ax.set(xscale="log", xlim=(min(params) / 2, max(params) * 2),
                   ylabel=f"{opt}'s {'steps' if row == 0 else 'seconds'} / GN's")
            ax.set_xticks(params, [f"{p / 1e6:.2f}M\n{r['preset']}" for p, r in zip(params, rungs)])
            ax.xaxis.set_minor_locator(plt.NullLocator())
            if row == 0:
                ax.set_title(f"to {title}")
            else:
                ax.set_xlabel("parameters")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


# ---------------------------------------------------------------------------
# The GPU race


def device_name(args):
    import torch
    if args.device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


def bench_ratios(args, preset):
    """bench.py's inner-step times and peak memories at one of its presets, as ratios to a training step,
    at the race's matmul precision; {"error": its last line} when it fails."""
    path = os.path.join(args.out, f"bench-{preset}.json")
    device = ["--device", args.device] if args.device != "auto" else []
    code = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--preset", preset, *device,
                           *PRESETS[args.preset]["bench_args"], "--json", path],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if code.returncode != 0:
        print(f"bench.py --preset {preset} failed (exit code {code.returncode})", file=sys.stderr)
        return {"error": (code.stderr.strip().splitlines() or [f"exit code {code.returncode}"])[-1]}
    with open(path) as f:
        b = json.load(f)
    return {"gn_inner_over_train_step": b["gn_inner_s"] / b["train_step_s"],
            "layerwise_inner_over_train_step": b["layerwise_inner_s"] / b["train_step_s"],
            "layerwise_over_naive_layerwise": b["layerwise_inner_s"] / b["naive_layerwise_inner_s"],
            "gn_peak_memory_over_train_step": b["gn_inner_peak_mb"] / b["train_step_peak_mb"],
            "layerwise_peak_memory_over_train_step": b["layerwise_inner_peak_mb"] / b["train_step_peak_mb"],
            "stock_gn_inner_over_train_step": b["stock_gn_inner_s"] / b["stock_train_step_s"],
            "stock_layerwise_inner_over_train_step": b["stock_layerwise_inner_s"] / b["stock_train_step_s"],
            "train_step_s": b["train_step_s"], "train_step_peak_mb": b["train_step_peak_mb"], "n_blocks": b["n_blocks"]}


def cuda_tests():
    """The suite's CUDA tests (those named for CUDA), in a child pytest; returns its summary line."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", HERE], capture_output=True, text=True,
                            cwd=HERE)
    lines = result.stdout.strip().splitlines()
    return {"exit_code": result.returncode, "summary": lines[-1] if lines else result.stderr.strip()[-200:]}


def gpu_quick(args, made_by, plots):
    """The preset's race at its one batch to the best baseline's final loss, bench.py at the preset's
    shapes and the CUDA tests: what results/gpu_quick.json keeps. The file is written after the race
    and again after each bench and the tests, so that a failure or a time limit after the race loses
    only what had not run yet."""
    import torch
    preset = PRESETS[args.preset]
    target, best, best_runs, _ = compare(args, preset["micro_batches"], args.target_loss)
    from model import GPT, PRESETS as MODELS
    vocab = json.load(open(os.path.join(best_runs[args.opts[0]]["run_dir"], "config.json"))).get("vocab_size")
    runs = {opt: {k: s[k] for k in ("lr", "steps_to_target", "tokens_to_target", "time_to_target_s",
                                     "final_val_loss", "steps_run", "peak_memory_bytes", "memory_kind")}
            for opt, s in best.items()}
    results = {**made_by, "device": device_name(args), "torch": torch.__version__, "preset": args.preset,
               "model": preset["model"],
               "parameters": GPT(dataclasses.replace(MODELS[preset["model"]], vocab_size=vocab)).num_params()
               if vocab else None, "vocab_size": vocab,
               "outer_batch_tokens": preset["micro_batches"] * preset["batch_size"] * preset["seq_len"],
               "budget_steps": preset["budget"][preset["micro_batches"]], "target_loss": target,
               "target_rule": "best baseline's final val loss" if args.target_loss is None else "given",
               "warm_up": preset["init"], "seeds": args.seeds, "runs": runs, "bench": {}, "cuda_tests": None}
    print("\n" + table(results))
    save_results(args.results, results)
    plot_losses(plots + ".png", best_runs, results["target_loss"],
                f"{preset['model']}, {results['outer_batch_tokens']} tokens per outer step, {results['device']}")
    for name in preset["bench"]:
        results["bench"][name] = bench_ratios(args, name)
        save_results(args.results, results)
    if preset["cuda_tests"]:
        results["cuda_tests"] = cuda_tests()
        save_results(args.results, results)
    return results


# ---------------------------------------------------------------------------
# Reporting


def table(results):
    """Markdown table of the best run per optimizer, with steps relative to the best baseline."""
    runs = results["runs"]
    baseline_steps = [s["steps_to_target"] for o, s in runs.items() if o in FIRST_ORDER and s["steps_to_target"]]
    reference = min(baseline_steps) if baseline_steps else None
    lines = [f"target validation loss {results['target_loss']:.4f} (preset {results['preset']}, "
             f"seed {results['seeds'][0]})", "",
             "| optimizer | lr | steps to target | best baseline's steps / steps | tokens to target | "
             "time to target (s) | final val loss | peak memory (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for opt, s in runs.items():
        steps = s["steps_to_target"]
        ratio = f"{reference / steps:.2f}x" if steps and reference else "-"
        memory = f"{s['peak_memory_bytes'] / 2**20:.0f}" if s["peak_memory_bytes"] else "-"
        final = f"{s['final_val_loss']:.4f}" if s["final_val_loss"] is not None else "diverged"
        reached = steps if steps else f"not in {s['steps_run']}"
        warmup = f", warmup {s['warmup']}" if s.get("warmup") is not None else ""
        lines.append(f"| {opt} | {s['lr']:g}{warmup} | {reached} | {ratio} | {s['tokens_to_target'] or '-'} | "
                     f"{s['time_to_target_s'] or '-'} | {final} | {memory} |")
    return "\n".join(lines)


def seeds_table(results):
    """Markdown table: steps, tokens and seconds to target per optimizer, median and range over the seeds."""
    def cell(entry, scale=1, digits=0):
        fmt = lambda v: "-" if v is None else f"{v / scale:.{digits}f}"
        return f"{fmt(entry['median'])} ({fmt(entry['min'])}-{fmt(entry['max'])})"
    lines = [f"validation loss {results['target_loss']:.4f}, seeds {results['seeds']}: median (range); "
             "- is not reached", "",
             "| optimizer | lr | steps to target | tokens to target (M) | time to target (s) |", "|---|---|---|---|---|"]
    for opt, e in results["over_seeds"].items():
        lines.append(f"| {opt} | {results['runs'][opt]['lr']:g} | {cell(e['steps_to_target'])} | "
                     f"{cell(e['tokens_to_target'], 1e6, 2)} | {cell(e['time_to_target_s'])} |")
    return "\n".join(lines)


def batch_table(results):
    """Markdown table: steps to target per optimizer and batch, best lr, and the fit."""
    opts = results["optimizers"]
    batches = next(iter(opts.values()))["tokens_per_step"]
    lines = [f"steps to validation loss {results['target_loss']} (best lr) against tokens per step", "",
             "| optimizer | " + " | ".join(f"{b // 1024}K" if b >= 1024 else str(b) for b in batches) + " | S_min | B_noise (tokens) |",
             "|---|" + "---|" * (len(batches) + 2)]
    for opt, e in opts.items():
        cells = [f"{s} ({lr:g})" if s else f"- ({lr:g})" for s, lr in zip(e["steps_to_target"], e["best_lr"])]
        s_min = f"{e['s_min']:.1f}" if e["s_min"] is not None else "-"
        b_noise = f"{e['b_noise']:.0f}" if e["b_noise"] is not None else ("unbounded" if e["s_min"] == 0 else "-")
        lines.append(f"| {opt} | " + " | ".join(cells) + f" | {s_min} | {b_noise} |")
    return "\n".join(lines)


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("plots skipped: pip install matplotlib")
        return None


def plot_losses(path, best_runs, target, title):
    plt = pyplot()
    if plt is None:
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


def plot_batch(path, results):
    """Steps to target against tokens per step, log-log, with each optimizer's fitted curve."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (opt, e) in enumerate(results["optimizers"].items()):
        color = f"C{i}"
        points = [(b, s) for b, s in zip(e["tokens_per_step"], e["steps_to_target"]) if s]
        if points:
            ax.plot(*zip(*points), "o", color=color)
        if e["s_min"] is not None:
            B = np.geomspace(min(e["tokens_per_step"]), max(e["tokens_per_step"]), 50)
            fit = e["s_min"] * (1 + e["b_noise"] / B) if e["b_noise"] is not None else None
            if fit is not None:
                label = f"{opt}: S_min {e['s_min']:.1f}, B_noise {e['b_noise'] / 1024:.1f}K"
                ax.plot(B, fit, "-" if opt in FIRST_ORDER else "--", color=color, label=label)
            else:
                ax.plot([], [], "o", color=color, label=f"{opt} (no saturation)")
        elif points:
            ax.plot([], [], "o", color=color, label=opt)
    ax.set(xlabel="tokens per outer step", ylabel=f"steps to validation loss {results['target_loss']}",
           xscale="log", yscale="log", title="steps to target against the batch (fit: McCandlish et al. 2018)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def save_results(path, results):
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"results: {path}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    plots = os.path.splitext(args.results)[0]
    made_by = provenance("compare.py", argv)
    try:
        if "init" in preset:
            args.init_from = warm_up(args)
        if args.robust:
            results = {**made_by, **robust_study(args)}
            print("\n" + robust_table(results))
            save_results(args.results, results)
            plot_robust(plots + ".png", results)
            return results
        if args.model_sizes:
            def report(partial):
                print("\n" + model_size_table(partial))
                save_results(args.results, {**made_by, **partial})
                plot_model_sizes(plots + ".png", partial)
            return {**made_by, **model_size_study(args, report)}
        if "bench" in preset:
            return gpu_quick(args, made_by, plots)
        if args.batch_sweep:
            results, best_runs = batch_sweep(args, args.target_loss)
            results = {**made_by, **results}
            print("\n" + batch_table(results))
            save_results(args.results, results)
            plot_batch(plots + ".png", results)
            largest = max(preset["batch_sweep"]) * preset["batch_size"] * preset["seq_len"]
            plot_losses(plots + "_loss.png", best_runs, results["target_loss"],
                        f"{preset['model']}, {largest} tokens per outer step")
            return results
        mb = preset["micro_batches"]
        if len(args.seeds) > 1:
            by_seed = compare_seeds(args, mb, args.target_loss)
            target, (best, best_runs, summaries) = args.target_loss, by_seed[args.seeds[0]]
        else:
            target, best, best_runs, summaries = compare(args, mb, args.target_loss)
    except (RuntimeError, RunRejected) as e:
        fail(str(e))
    results = {**made_by, "target_loss": target, "preset": args.preset, "seeds": args.seeds,
               "target_rule": "preset's" if preset["target_loss"] is not None and args.target_loss == target
               else ("given" if args.target_loss is not None else "best baseline's final val loss"),
               "outer_batch_tokens": mb * preset["batch_size"] * preset["seq_len"],
               "budget_steps": preset["budget"][mb], "runs": best, "lr_sweeps": summaries}
    if len(args.seeds) > 1:
        results["over_seeds"] = over_seeds(by_seed)
        results["by_seed"] = {str(seed): {"runs": b, "lr_sweeps": s} for seed, (b, _, s) in by_seed.items()}
    print("\n" + table(results))
    if len(args.seeds) > 1:
        print("\n" + seeds_table(results))
    for opt in args.opts:
        grid = [s["lr"] for s in summaries[opt]]
        if len(grid) > 1 and best[opt]["lr"] in (min(grid), max(grid)):
            print(f"note: {opt}'s best lr {best[opt]['lr']:g} is at the edge of its grid {sorted(grid)}")
    plot_losses(plots + ".png", best_runs, target,
                f"{preset['model']}, {results['outer_batch_tokens']} tokens per outer step")
    save_results(args.results, results)
    return results


if __name__ == "__main__":
    main()
