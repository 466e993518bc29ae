"""Train a LLaMA-style language model with Gauss-Newton or a first-order baseline.

    python train.py                               # tiny model, embedded corpus, AdamW
    python train.py --opt gn_layerwise            # layerwise Gauss-Newton
    python train.py --opt gn --model small --data input.txt --out runs/gn

One outer step sees --micro-batches micro-batches of --batch-size sequences.
First-order optimizers accumulate their gradients and take one step;
Gauss-Newton takes one inner step per micro-batch on its quadratic model, then
a line search on --ls-micro-batches fresh micro-batches. Every optimizer is
compared at the same outer batch; metrics.jsonl counts every token a step used.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from baselines import DEFAULT_LR, MUON_ADAMW_LR_RATIO, make_optimizer
from data import DataError, MicroBatches, eval_batches, load_dataset
from gn import COMBINES, INNER_SOLVERS, LINE_SEARCHES, GaussNewton, all_reduce_mean, default_blocks, reach_applies
from model import ATTENTION_BACKWARDS, GPT, PRESETS

MAX_FAILURES = 5  # non-finite steps in a row before a run gives up
FIRST_ORDER = ("adamw", "muon", "soap", "shampoo")
GN_VARIANTS = {  # name: (mode, prox_linear)
    "gn": ("full", False),
    "gn_layerwise": ("layerwise", False),
    "gn_prox": ("full", True),
    "gn_layerwise_prox": ("layerwise", True),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}

# The authors' recipe for the 45M model (github.com/natalieabreu/full-gauss-newton:
# templates/gn-template.sbatch and adam-template.sbatch, EasyLM/models/llama/
# llama_train_gn.py and llama_train_gn_layerwise.py). --recipe paper makes these
# the defaults, so a flag given on the command line still wins. They started
# every optimizer from one 1000-step AdamW checkpoint (--init-from; compare.py's
# GPU presets do).
PAPER_RECIPE = {
    # Baselines: constant lr, no warmup, no weight decay, clip 1; Muon's
    # AdamW groups at Muon's own lr.
    "first_order": dict(schedule="constant", warmup=0, weight_decay=0.0, grad_clip=1.0, adamw_lr_ratio=1.0),
    # GN: the inner lr stays the same across outer steps (a cosine only inside
    # each); inner Muon's AdamW groups (embedding, head, gains) at Muon's lr
    # with betas (0.9, 0.999) and the only weight decay; the inner iterate and
    # state kept; EMA 0.999 per outer step; the line search takes the best of
    # 2^(-i/2), i < 5, and always steps (gn.py's "paper" rule), on as many
    # fresh micro-batches as the inner loop used.
    "gauss_newton": dict(schedule="constant", adamw_lr_ratio=1.0, betas=(0.9, 0.999), weight_decay=0.001,
                         muon_weight_decay=0.0, keep_iterate=True, ema=0.999, line_search="paper",
                         min_step_size=2 ** -2, ls_fraction=1.0),
    # Layerwise GN on top of gauss_newton's: the grid reaches 2^(-i/2), i < 10.
    "layerwise": dict(min_step_size=2 ** -4.5),
}


def paper_recipe(opt):
    """PAPER_RECIPE's settings for optimizer opt."""
    if opt not in GN_VARIANTS:
        return PAPER_RECIPE["first_order"]
    layerwise = PAPER_RECIPE["layerwise"] if GN_VARIANTS[opt][0] == "layerwise" else {}
    return {**PAPER_RECIPE["gauss_newton"], **layerwise}


# GN's line search takes this fraction of the inner loop's micro-batches (the
# paper: as many): an eighth took as few steps to target as a quarter, a
# sixteenth more (results/README.md, "Earlier studies").
LS_FRACTION = 1 / 8


def default_ls_micro_batches(micro_batches, fraction=LS_FRACTION):
    return max(1, int(micro_batches * fraction))


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit code 2: no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def parse_args(argv=None):
    p = ArgumentParser(description="Train a language model with Gauss-Newton or a baseline optimizer.")
    p.add_argument("--opt", default="adamw", choices=FIRST_ORDER + tuple(GN_VARIANTS), help="optimizer")
    p.add_argument("--model", default="tiny", choices=list(PRESETS), help="model preset (model.py)")
    p.add_argument("--data", default=None, help="default: the embedded CPython corpus; or a text file, a nanoGPT "
                   "directory with train.bin/val.bin, or llm.c FineWeb shards (file, glob or directory)")
    p.add_argument("--steps", type=positive(int), default=None,
                   help="outer steps (default: 400 first-order, 40 Gauss-Newton)")
    p.add_argument("--batch-size", type=positive(int), default=16, help="sequences per micro-batch")
    p.add_argument("--micro-batches", type=positive(int), default=8,
                   help="micro-batches per outer step: the outer batch is batch-size x micro-batches sequences")
    p.add_argument("--seq-len", type=positive(int), default=64, help="tokens per sequence")
    p.add_argument("--lr", type=positive(float), default=None,
                   help="peak learning rate of a first-order optimizer, or of Gauss-Newton's --first-order-steps "
                        "(default: tuned per optimizer)")
    p.add_argument("--recipe", default="ours", choices=["ours", "paper"],
                   help="paper: the authors' settings (PAPER_RECIPE in train.py) as defaults; flags given still win")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="decoupled weight decay (Gauss-Newton: its inner optimizer's)")
    p.add_argument("--muon-weight-decay", type=float, default=None,
                   help="weight decay of Muon's hidden matrices (default: --weight-decay; the paper's inner Muon: 0)")
    p.add_argument("--adamw-lr-ratio", type=positive(float), default=MUON_ADAMW_LR_RATIO,
                   help=f"lr of Muon's AdamW groups (embedding, head, gains) as a fraction of Muon's "
                        f"(default {MUON_ADAMW_LR_RATIO})")
    p.add_argument("--betas", type=float, nargs=2, default=None, metavar=("BETA1", "BETA2"),
                   help="Adam's betas (Gauss-Newton: its inner optimizer's; default: per optimizer, baselines.py)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="first-order global gradient-norm clip (0: off)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                   help="the lr after warmup, across outer steps: cosine decay to 10%% or constant (Gauss-Newton: "
                        "its inner lr, which also follows a cosine inside every outer step)")
    p.add_argument("--warmup", type=int, default=None,
                   help="linear warmup steps before the schedule (default: 5%% of steps, 0 for Gauss-Newton)")
    p.add_argument("--eval-every", type=positive(int), default=None, help="evaluate every N steps (default: steps/10)")
    p.add_argument("--eval-batches", type=positive(int), default=8, help="validation micro-batches per evaluation")
    p.add_argument("--target-loss", type=float, default=None,
                   help="stop when the validation loss reaches this value and report the step")
    p.add_argument("--stop-at-step", type=positive(int), default=None,
                   help="end the run after this step although the schedule spans --steps (compare.py stops "
                        "a learning rate there once another reached the target sooner)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the model and the batches (with --init-from: the validation batches only)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when present")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="parameter dtype")
    p.add_argument("--matmul-precision", default="highest", choices=["highest", "high", "medium"],
                   help="torch.set_float32_matmul_precision: high lets float32 matmuls use TF32 on CUDA "
                        "(compare.py's GPU race does)")
    p.add_argument("--out", default=None, help="directory for metrics.jsonl and config.json")
    p.add_argument("--ckpt-every", type=int, default=None,
                   help="write DIR/ckpt.pt every N steps (default: every evaluation) and at the end")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in --out DIR from its ckpt.pt")
    start.add_argument("--init-from", default=None, metavar="CKPT",
                       help="start from the weights of train.py's checkpoint CKPT (the same model) with a new "
                            "optimizer and schedule; the training data continue where its run stopped")
    p.add_argument("--sample-tokens", type=int, default=200, help="length of the text sample printed at the end")
    gn = p.add_argument_group("Gauss-Newton (--opt gn, gn_layerwise, gn_prox, gn_layerwise_prox)")
    gn.add_argument("--inner", default="muon", choices=INNER_SOLVERS, help="inner solver of the quadratic model")
    gn.add_argument("--first-order-steps", type=int, default=0, metavar="N",
                    help="take the first N outer steps with the inner optimizer on the loss itself (at --lr, "
                         "with the inner optimizer's other options and a warmup over 5%% of the steps), then "
                         "Gauss-Newton (default 0; the paper started GN from a 1000-step AdamW checkpoint); metrics "
                         "count them as steps like any other")
    gn.add_argument("--inner-lr", type=positive(float), default=None,
                    help="peak inner learning rate (default: tuned per inner solver; cg has none); the outer schedule scales it")
    gn.add_argument("--inner-steps", type=positive(int), default=None,
                    help="inner steps per outer step (default: one per micro-batch)")
    gn.add_argument("--ls-micro-batches", type=positive(int), default=None,
                    help="fresh micro-batches for the line search (default: --ls-fraction of --micro-batches)")
    gn.add_argument("--ls-fraction", type=positive(float), default=LS_FRACTION,
                    help="the default --ls-micro-batches as a fraction of --micro-batches (default 1/8; the paper's: 1)")
    gn.add_argument("--ls-model-fraction", type=positive(float), default=0.5,
                    help="share of the line-search micro-batches that the GN model's step size is estimated on; "
                         "the losses that check it use all of them (default 1/2)")
    gn.add_argument("--line-search", default="model", choices=LINE_SEARCHES,
                    help="step-size rule: model (the GN model's own step, verified), grid (the paper's points, "
                         "may reject), backtracking, none, paper (the authors' rule: the grid's best, always steps)")
    gn.add_argument("--combine", default="sum", choices=COMBINES,
                    help="layerwise: one step size for the summed block directions (sum) or one per block "
                         "from the full GN model over their span (span)")
    gn.add_argument("--merge-embedding", action="store_true",
                    help="layerwise: the token embedding joins transformer block 0's quadratic instead of "
                         "having its own (one pass through the network fewer per inner step)")
    gn.add_argument("--min-step-size", type=positive(float), default=None,
                    help="smallest step the line search tries (default: 1/4 full, about 1/(4 blocks) layerwise)")
    gn.add_argument("--damping", type=float, default=0.0, help="adds damping/2 |delta|^2 to the quadratic")
    gn.add_argument("--adaptive-reach", action=argparse.BooleanOptionalAction, default=None,
                    help="scale the inner lr by a reach each line search sets for the next step: smaller after a "
                         "rejected or cut step, larger after a whole one the GN model predicted (gn.py next_reach; "
                         "default: on with --line-search model or backtracking and a first-order --inner; "
                         "--no-adaptive-reach: the inner lr follows its schedule alone)")
    gn.add_argument("--no-warm-start", action="store_true", help="reset the inner optimizer's state every outer step")
    gn.add_argument("--keep-iterate", action=argparse.BooleanOptionalAction, default=False,
                    help="start each inner loop where the last one ended instead of at the weights (the paper's)")
    gn.add_argument("--ema", type=float, default=0.0,
                    help="evaluate an exponential moving average of the weights with this decay (paper: 0.999)")
    gn.add_argument("--attention-backward", default="auto", choices=ATTENTION_BACKWARDS,
                    help="attention's backward in GN's passes: reuse the probabilities kept from the forward, or "
                         "recompute them in SDPA's backward; the same math, another round-off (default auto: "
                         "reuse on a CPU, recompute on CUDA; model.py, GPTConfig.attention_backward)")
    args = p.parse_args(argv)
    if args.recipe == "paper":
        p.set_defaults(**paper_recipe(args.opt))
        args = p.parse_args(argv)
    is_gn = args.opt in GN_VARIANTS
    if args.first_order_steps < 0:
        p.error(f"--first-order-steps must be 0 or more, got {args.first_order_steps}")
    if args.first_order_steps and not is_gn:
        p.error(f"--first-order-steps starts Gauss-Newton with first-order steps: {args.opt} is first-order")
    if args.first_order_steps and args.inner == "cg":
        p.error("--first-order-steps takes them with the inner optimizer: cg is not a first-order optimizer")
    if is_gn and args.lr is not None and not args.first_order_steps:
        p.error(f"--lr sets a first-order optimizer's learning rate: {args.opt} takes --inner-lr")
    if not is_gn and args.inner_lr is not None:
        p.error(f"--inner-lr is Gauss-Newton's: {args.opt} takes --lr")
    applies = is_gn and reach_applies(args.line_search, args.inner)
    if args.adaptive_reach and not applies:
        p.error("--adaptive-reach adapts Gauss-Newton's inner lr from its line search: it needs a GN --opt, "
                "--line-search model or backtracking and a first-order --inner")
    if args.adaptive_reach is None:  # config.json and checkpoints keep what the run did, not "auto"
        args.adaptive_reach = applies
    if args.merge_embedding and not (is_gn and GN_VARIANTS[args.opt][0] == "layerwise"):
        p.error(f"--merge-embedding groups layerwise GN's blocks: {args.opt} has none")
    if args.steps is None:
        args.steps = 40 if is_gn else 400
    if args.warmup is None:
        args.warmup = 0 if is_gn else first_order_warmup(args.steps)
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 10)
    if args.ckpt_every is None:
        args.ckpt_every = args.eval_every
    if args.lr is None and not is_gn:
        args.lr = DEFAULT_LR[args.opt]
    if args.lr is None and args.first_order_steps:
        args.lr = DEFAULT_LR[args.inner]
    if args.inner_lr is None and is_gn:
        args.inner_lr = GN_INNER_LR[args.inner]
    if args.ls_micro_batches is None:
        args.ls_micro_batches = default_ls_micro_batches(args.micro_batches, args.ls_fraction)
    if args.ls_model_fraction > 1:
        p.error(f"--ls-model-fraction is a share of the line-search micro-batches, at most 1: "
                f"got {args.ls_model_fraction}")
    if args.betas is not None:
        args.betas = tuple(args.betas)  # a list from the command line, a tuple from the recipe: compare equal
        if not all(0 <= b < 1 for b in args.betas):
            p.error(f"--betas must lie in [0, 1), got {args.betas[0]} {args.betas[1]}")
    if not 0 <= args.ema < 1:
        p.error(f"--ema must lie in [0, 1), got {args.ema}")
    if args.first_order_steps >= args.steps:
        p.error(f"--first-order-steps {args.first_order_steps} leaves no Gauss-Newton step in --steps {args.steps}")
    if args.stop_at_step is not None and args.stop_at_step > args.steps:
        p.error(f"--stop-at-step {args.stop_at_step} lies beyond --steps {args.steps}")
    if args.warmup < 0 or args.warmup >= args.steps:
        p.error(f"--warmup must lie in [0, steps), got {args.warmup}")
    return args


# Peak inner learning rates for the tiny preset, by inner solver. Inner Muon:
# 0.01 for full and layerwise GN, the best of compare.py's sweeps at 64K
# tokens per step (results/README.md, "Batch sweep"); the paper used 0.01 at 45M.
GN_INNER_LR = {"adamw": 3e-3, "muon": 0.01, "soap": 3e-3, "shampoo": 3e-3, "cg": 1.0}


def first_order_warmup(steps):
    """A first-order optimizer's default warmup: 5% of the steps."""
    return steps // 20


def lr_factor(step, steps, warmup, schedule="cosine"):
    """Linear warmup, then cosine decay to 10% of the peak or constant (step counts from 0)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, batches):
    model.eval()
    loss = sum(F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).item() for x, y in batches)
    model.train()
    return loss / len(batches)


def build_optimizer(name, named_params, lr, args):
    """make_optimizer with the command line's weight decay, betas and Muon options."""
    muon = {}
    if name == "muon":
        matrices = args.weight_decay if args.muon_weight_decay is None else args.muon_weight_decay
        muon = dict(adamw_lr=args.adamw_lr_ratio * lr, muon_weight_decay=matrices)
    return make_optimizer(name, named_params, lr=lr, weight_decay=args.weight_decay, betas=args.betas, **muon)


def first_order_step(model, opt, batches, grad_clip):
    """Accumulate the gradient over the micro-batches, then one optimizer step.

    Under torchrun the gradients and the loss are averaged over the ranks.
    Returns the mean loss, or None (and no update) when it is not finite.
    """
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for x, y in batches:
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()) / len(batches)
        loss.backward()
        total += loss.detach()
    params = [p for p in model.parameters() if p.grad is not None]
    total = all_reduce_mean([total])[0].item()
    all_reduce_mean([p.grad for p in params])
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if not (math.isfinite(total) and torch.isfinite(norm)):
        opt.zero_grad(set_to_none=True)
        return None
    opt.step()
    return total


def write_atomic(path, write):
    """write(file) into a temporary file, flushed to disk, then renamed over path:
    a crash leaves the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Options that define the run: a resumed run must be given the same ones. Not
# --device, --attention-backward or --matmul-precision: they change the round-off, not the math.
RUN_DEFINING = ("opt", "model", "data", "batch_size", "micro_batches", "seq_len", "lr", "weight_decay",
                "muon_weight_decay", "adamw_lr_ratio", "betas", "grad_clip", "schedule", "warmup", "eval_batches",
                "seed", "dtype", "inner", "inner_lr", "inner_steps", "ls_micro_batches", "ls_model_fraction",
                "line_search", "combine", "merge_embedding", "min_step_size", "damping", "no_warm_start",
                "keep_iterate", "ema", "first_order_steps", "adaptive_reach")


def read_checkpoint(path, model, args):
    """The contents of train.py's checkpoint at path, whose weights must fit model.
    A missing, unreadable or mismatched file ends the run with one line.

    It is read onto the CPU whatever the run's device: every load_state_dict
    copies its tensors to where the parameters live, and the batch sampler's
    generator state must stay a CPU tensor (set_state refuses a CUDA one)."""
    if not os.path.isfile(path):
        fail(f"{path}: no checkpoint there")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        shapes = {k: v.shape for k, v in ckpt["model"].items()}
        saved = ckpt["args"]
    except Exception as e:  # a truncated or foreign file: say so in one line
        fail(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if shapes != {k: v.shape for k, v in model.state_dict().items()}:
        vocab = shapes["head.weight"][0] if "head.weight" in shapes else "?"
        fail(f"{path}: the checkpoint's model (--model {saved.get('model')}, vocabulary {vocab}) does not match "
             f"this run's (--model {args.model}, vocabulary {model.config.vocab_size})")
    return ckpt


def embedding_with_first_block(model):
    """Layerwise GN's blocks with the token embedding inside transformer block 0's (--merge-embedding)."""
    blocks = default_blocks(model)
    return [blocks[0] + blocks[1]] + blocks[2:]


def load_checkpoint(path, model, args):
    """The checkpoint to resume from, written with the same run-defining options."""
    ckpt = read_checkpoint(path, model, args)
    saved = ckpt["args"]
    for key in RUN_DEFINING:
        if key in saved and saved[key] != getattr(args, key):  # a key absent from an older checkpoint had its default
            fail(f"{path}: --{key.replace('_', '-')} was {saved[key]!r} in the checkpoint, "
                 f"{getattr(args, key)!r} now")
    if ckpt["progress"]["step"] > args.steps:
        fail(f"{path}: the checkpoint is at step {ckpt['progress']['step']}, beyond --steps {args.steps}")
    return ckpt


def setup_distributed(args):
    """Rank, world size and device; under torchrun, join the process group."""
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but torch sees no CUDA device")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} does not split evenly over {world} processes")
    if device == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, device


def main(argv=None):
    """Run training with command-line arguments argv; returns the final progress
    (step, tokens, time_s, train_loss, val_loss, reached_step)."""
    args = parse_args(argv)
    rank, world, device = setup_distributed(args)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    torch.set_float32_matmul_precision(args.matmul_precision)

    data = load_dataset(args.data)
    data.check(args.seq_len)
    config = dataclasses.replace(PRESETS[args.model], vocab_size=data.vocab_size,
                                 attention_backward=args.attention_backward)
    if args.seq_len > config.block_size:
        fail(f"--seq-len {args.seq_len} exceeds the {args.model} model's context of {config.block_size}")
    model = GPT(config).to(device=device, dtype=DTYPES[args.dtype])
    # Every rank draws the same global micro-batches and keeps its own rows.
    train_batches = MicroBatches(data.train, args.batch_size, args.seq_len, seed=args.seed, device=device)
    val_batches = eval_batches(data.val, args.eval_batches, args.batch_size, args.seq_len, seed=args.seed + 1,
                               device=device)
    if args.init_from:  # before the EMA and the optimizer copy the weights
        ckpt = read_checkpoint(args.init_from, model, args)
        model.load_state_dict(ckpt["model"])
        train_batches.load_state_dict(ckpt["batches"])
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None

    is_gn = args.opt in GN_VARIANTS
    if is_gn:
        mode, prox = GN_VARIANTS[args.opt]
        inner = "cg" if args.inner == "cg" else lambda named, lr: build_optimizer(args.inner, named, lr, args)
        opt = GaussNewton(model, mode=mode, inner=inner, inner_lr=args.inner_lr, inner_steps=args.inner_steps,
                          prox_linear=prox, line_search=args.line_search, min_step_size=args.min_step_size,
                          ls_model_fraction=args.ls_model_fraction, damping=args.damping,
                          warm_start=not args.no_warm_start, keep_iterate=args.keep_iterate, combine=args.combine,
                          blocks=embedding_with_first_block(model) if args.merge_embedding else None,
                          adaptive_reach=args.adaptive_reach)
        base_lr = args.inner_lr
    else:
        opt = build_optimizer(args.opt, list(model.named_parameters()), args.lr, args)
        base_lr = args.lr
    base_lrs = [g["lr"] for g in opt.param_groups]
    # Gauss-Newton's first --first-order-steps steps: its inner optimizer on the
    # loss, warmed up as --opt INNER is by default.
    first_order = None
    if args.first_order_steps:
        first_order = build_optimizer(args.inner, list(model.named_parameters()), args.lr, args)
        first_order_lrs = [g["lr"] for g in first_order.param_groups]
    share = args.batch_size // world

    def draw(k):
        return [(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
                for x, y in train_batches.draw(k)]

    ckpt_path = os.path.join(args.out, "ckpt.pt") if args.out else None
    progress = {"step": 0, "tokens": 0, "time_s": 0.0, "train_loss": float("nan"), "val_loss": float("nan"),
                "failures": 0}
    if args.resume:
        if not args.out:
            fail("--resume needs --out DIR, the directory holding ckpt.pt")
        ckpt = load_checkpoint(ckpt_path, model, args)
        args.init_from = ckpt["args"].get("init_from")  # config.json keeps where the run started
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        if first_order is not None:
            first_order.load_state_dict(ckpt["first_order"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        train_batches.load_state_dict(ckpt["batches"])
        torch.set_rng_state(ckpt["rng"])
        progress = ckpt["progress"]

    def save_checkpoint():
        if not (ckpt_path and master):
            return
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict() if ema else None,
                 "first_order": first_order.state_dict() if first_order else None,
                 "batches": train_batches.state_dict(), "rng": torch.get_rng_state(), "progress": progress,
                 "args": vars(args)}
        write_atomic(ckpt_path, lambda f: torch.save(state, f))

    say(f"{args.opt} on {data.name}: {model.num_params() / 1e6:.2f}M parameters ({args.model}), "
        f"{args.micro_batches} x {args.batch_size} x {args.seq_len} tokens per step, {device} x {world}, {args.dtype}")
    metrics_file = None
    if args.out and master:
        os.makedirs(args.out, exist_ok=True)
        write_atomic(os.path.join(args.out, "config.json"), lambda f: f.write(json.dumps({
            **vars(args), "data_fingerprint": data.fingerprint, "vocab_size": data.vocab_size,
            "n_params": model.num_params(), "torch_version": torch.__version__, "device": device,
            "world_size": world}, indent=2).encode()))
        metrics_path = os.path.join(args.out, "metrics.jsonl")
        kept = []
        if args.resume and os.path.exists(metrics_path):  # drop what was logged after the checkpoint
            with open(metrics_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= progress["step"]]
        write_atomic(metrics_path, lambda f: f.write("".join(kept).encode()))
        metrics_file = open(metrics_path, "a")

    # Ctrl-C finishes the current step, writes a checkpoint and exits; a second one stops at once.
    interrupted = []

    def on_interrupt(signum, frame):
        interrupted.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGINT, on_interrupt)

    reached_step = None
    bar = tqdm(range(progress["step"] + 1, args.steps + 1), desc=args.opt, dynamic_ncols=True, file=sys.stdout,
               initial=progress["step"], total=args.steps, disable=not master)
    for step in bar:
        # time_s adds up the training steps only: a run evaluated or
        # checkpointed at more steps is not charged for it.
        started = time.perf_counter()
        if step <= args.first_order_steps:
            stepper, lrs, peak_lr, warmup = first_order, first_order_lrs, args.lr, first_order_warmup(args.steps)
        else:
            stepper, lrs, peak_lr, warmup = opt, base_lrs, base_lr, args.warmup
        factor = lr_factor(step - 1, args.steps, warmup, args.schedule)
        for group, lr in zip(stepper.param_groups, lrs):
            group["lr"] = lr * factor
        batches = draw(args.micro_batches)
        record = {"step": step}
        if stepper is opt and is_gn:
            ls_batches = draw(args.ls_micro_batches)
            stats = opt.step(batches, ls_batches)
            progress["tokens"] += args.batch_size * args.seq_len * (len(batches) + len(ls_batches))
            loss = stats["loss_before"] if stats["finite"] else None
            record.update({k: stats[k] for k in ("step_size", "loss_after", "model_decrease", "predicted_decrease",
                                                 "inner_grad_norm_last", "direction_norm", "block_step_sizes",
                                                 "reach")})
        else:
            loss = first_order_step(model, stepper, batches, args.grad_clip)
            progress["tokens"] += args.batch_size * args.seq_len * len(batches)
        if loss is None:
            progress["failures"] += 1
            if progress["failures"] >= MAX_FAILURES:
                fail(f"{MAX_FAILURES} steps in a row had a non-finite loss or gradient (step {step}): "
                     "lower the learning rate", code=1)
            if master:
                bar.write(f"step {step}: non-finite loss or gradient, step skipped")
        else:
            progress["failures"], progress["train_loss"] = 0, loss
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - args.ema)
        progress["step"], progress["time_s"] = step, progress["time_s"] + time.perf_counter() - started
        record.update({"tokens": progress["tokens"], "train_loss": loss, "lr": peak_lr * factor,
                       "time_s": progress["time_s"]})
        if step % args.eval_every == 0 or step == args.steps or args.target_loss is not None:
            progress["val_loss"] = record["val_loss"] = evaluate(ema if ema is not None else model, val_batches)
            bar.set_postfix(train=f"{progress['train_loss']:.3f}", val=f"{progress['val_loss']:.3f}")
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if args.target_loss is not None and progress["val_loss"] <= args.target_loss:
            reached_step = step
            break
        if interrupted or step == args.stop_at_step:
            break
        if args.ckpt_every and step % args.ckpt_every == 0:
            save_checkpoint()
    bar.close()
    save_checkpoint()
    if metrics_file:
        metrics_file.close()
    if interrupted:
        say(f"interrupted after step {progress['step']}: checkpoint written, continue with --resume")
        sys.exit(130)

    say(f"done: {progress['step']} steps, {progress['tokens']:,} tokens, train loss {progress['train_loss']:.4f}, "
        f"val loss {progress['val_loss']:.4f}, {progress['time_s']:.1f}s")
    if args.target_loss is not None:
        say(f"target {args.target_loss}: " + (f"reached at step {reached_step}" if reached_step else "not reached"))
    if args.sample_tokens > 0 and master:
        print("sample:", repr(sample(ema if ema is not None else model, data, args, device)))
    if world > 1:
        dist.destroy_process_group()
    return {**progress, "reached_step": reached_step}


def sample(model, data, args, device):
    """A short continuation of the start of a validation window, to see what the model learned."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.as_tensor(np.asarray(data.val[:16], dtype=np.int64), device=device).unsqueeze(0)
    out = model.generate(prompt, args.sample_tokens, temperature=0.8, top_k=40, generator=generator)
    return data.decode(out[0].tolist())


def fail(message, code=2):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        fail(str(e))
