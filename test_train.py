"""Tests of train.py end to end: metrics and config files, learning, bad input,
exact resume after Ctrl-C, the paper's recipe, starting from another run's
checkpoint, non-finite steps, and data parallelism under torchrun."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from baselines import make_optimizer
from data import MicroBatches, load_dataset
from gn import GaussNewton
from model import GPT, PRESETS, GPTConfig

SMALL_RUN = ["--steps", "3", "--micro-batches", "2", "--batch-size", "4", "--seq-len", "16", "--eval-every", "1",
             "--eval-batches", "2", "--sample-tokens", "0"]


# Every train.py process the tests start runs in this one environment: float32 round-off depends on the
# number of threads, so two runs compared step by step must have the same, whatever the machine's default.
TRAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start_train(*args, launcher=(sys.executable,)):
    """train.py with args in its own process, in TRAIN_ENV."""
    return subprocess.Popen([*launcher, "train.py", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=TRAIN_ENV)


def run_train(*args, launcher=(sys.executable,), timeout=240):
    """train.py with args to its end (start_train); returns its exit code and output."""
    process = start_train(*args, launcher=launcher)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def read_metrics(directory):
    with open(os.path.join(directory, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("opt", ["adamw", "gn", "gn_layerwise", "gn_prox"])
def test_train_writes_metrics_and_config_and_lowers_the_loss(opt, tmp_path):
    result = run_train("--opt", opt, *SMALL_RUN, "--sample-tokens", "8", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert {"step", "tokens", "train_loss", "lr", "time_s", "val_loss"} <= set(r)
    # 2 micro-batches of 4 x 16 tokens; GN also counts its line-search micro-batches (an eighth, at least 1)
    per_step = 4 * 16 * (2 if opt == "adamw" else 3)
    assert [r["tokens"] for r in records] == [per_step, 2 * per_step, 3 * per_step]
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.1
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["opt"] == opt and config["data_fingerprint"]["sha256"]
    assert "torch_version" in config and config["device"] == "cpu"
    assert "done: 3 steps" in result.stdout and "sample:" in result.stdout
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["progress"]["step"] == 3


def test_train_lowers_the_loss_below_the_unigram_entropy(tmp_path):
    from data import load_dataset
    train_tokens = torch.as_tensor(load_dataset().train[:2_000_000].astype("int64"))
    p = torch.bincount(train_tokens, minlength=256).double() / len(train_tokens)
    unigram_entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    result = run_train("--steps", "60", "--micro-batches", "4", "--sample-tokens", "0", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    final = read_metrics(tmp_path)[-1]["val_loss"]
    assert final < unigram_entropy - 0.5, (final, unigram_entropy)


@pytest.mark.parametrize("args,message", [
    (["--opt", "sgd"], "invalid choice"),
    (["--steps", "0"], "must be positive"),
    (["--batch-size", "-3"], "must be positive"),
    (["--ema", "1.5"], "--ema"),
    (["--opt", "gn", "--lr", "0.1"], "--inner-lr"),
    (["--opt", "muon", "--inner-lr", "0.1"], "--lr"),
    (["--steps", "3", "--stop-at-step", "4"], "--stop-at-step"),
    (["--opt", "gn", "--line-search", "wolfe"], "invalid choice"),
    (["--opt", "muon", "--first-order-steps", "2"], "--first-order-steps"),
    (["--opt", "gn", "--steps", "3", "--first-order-steps", "3"], "no Gauss-Newton step"),
    (["--opt", "gn", "--inner", "cg", "--first-order-steps", "1"], "cg"),
    (["--opt", "gn", "--first-order-steps", "-1"], "0 or more"),
    (["--opt", "gn", "--merge-embedding"], "--merge-embedding"),
    (["--opt", "muon", "--adaptive-reach"], "--adaptive-reach"),
    (["--opt", "gn", "--line-search", "grid", "--adaptive-reach"], "--adaptive-reach"),
])
def test_bad_options_give_one_line_and_exit_code_2(args, message, capsys):
    with pytest.raises(SystemExit) as exited:
        train.parse_args(args)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/file.txt"], "/no/such/file.txt"),
    (["--seq-len", "500"], "context"),
    (["--resume"], "--out"),
])
def test_bad_input_gives_one_line_and_exit_code_2(args, message):
    """Errors found after parsing, in a process of its own: no traceback, exit code 2."""
    result = run_train(*args, "--steps", "1")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


@pytest.mark.parametrize("option", ["--ls-fraction", "--repeats", "--threads"])
def test_bench_rejects_a_non_positive_count_or_fraction(option, capsys):
    """bench.py would otherwise time a line search on one micro-batch, or take the median of nothing."""
    import bench
    with pytest.raises(SystemExit) as e:
        bench.main(["--outer", option, "0"])
    assert e.value.code == 2 and "must be positive" in capsys.readouterr().err


def test_stop_at_step_ends_the_run_on_the_full_schedule(tmp_path):
    """compare.py stops a learning rate early without changing its schedule: the steps it
    ran are those of the whole run, learning rates included."""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert run_train("--opt", "muon", *SMALL_RUN, "--out", str(whole)).returncode == 0
    result = run_train("--opt", "muon", *SMALL_RUN, "--stop-at-step", "2", "--out", str(stopped))
    assert result.returncode == 0, result.stderr
    assert read_metrics(stopped) == [{**r, "time_s": s["time_s"]}
                                     for r, s in zip(read_metrics(whole)[:2], read_metrics(stopped))]


def test_first_order_steps_are_the_inner_optimizers_then_gauss_newtons(tmp_path):
    """--opt gn --first-order-steps 2 takes the steps --opt muon takes at the same --lr, then GN steps
    (which also count their line-search micro-batches); a run resumed inside the first-order steps
    continues as if it had not stopped."""
    muon, gn, parts = tmp_path / "muon", tmp_path / "gn", tmp_path / "parts"
    common = [*SMALL_RUN, "--steps", "4", "--lr", "0.02"]
    assert run_train("--opt", "muon", *common, "--stop-at-step", "2", "--out", str(muon)).returncode == 0
    result = run_train("--opt", "gn", *common, "--first-order-steps", "2", "--out", str(gn))
    assert result.returncode == 0, result.stderr
    first_order, records = read_metrics(muon), read_metrics(gn)
    assert records[:2] == [{**r, "time_s": s["time_s"]} for r, s in zip(first_order, records)]
    assert [r["tokens"] for r in records] == [128, 256, 448, 640]
    assert all("step_size" in r for r in records[2:]) and records[3]["val_loss"] < records[1]["val_loss"]

    gn_args = ["--opt", "gn", *common, "--first-order-steps", "2", "--out", str(parts)]
    assert run_train(*gn_args, "--stop-at-step", "1").returncode == 0
    result = run_train(*gn_args, "--resume")
    assert result.returncode == 0, result.stderr
    assert read_metrics(parts) == [{**r, "time_s": s["time_s"]} for r, s in zip(records, read_metrics(parts))]


def test_time_counts_training_steps_but_not_evaluations(tmp_path, monkeypatch):
    """Muon takes more steps to a target than GN, so it evaluates more often: counting the
    evaluations would tilt every wall-clock comparison toward GN."""
    now = [0.0]

    def clock():  # a second per reading, whatever the machine's load; an evaluation takes 1000
        now[0] += 1.0
        return now[0]
    real_evaluate = train.evaluate
    monkeypatch.setattr(train.time, "perf_counter", clock)
    monkeypatch.setattr(train, "evaluate", lambda *a: now.__setitem__(0, now[0] + 1000) or real_evaluate(*a))
    train.main(["--opt", "adamw", *SMALL_RUN, "--out", str(tmp_path)])
    times = [r["time_s"] for r in read_metrics(tmp_path)]
    assert 0 < times[0] < times[1] < times[2] < 1000, times


def test_empty_and_too_short_data_are_rejected(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    short = tmp_path / "short.txt"
    short.write_bytes(b"too short for a window")
    for path in (empty, short):
        result = run_train("--data", str(path), "--steps", "1")
        assert result.returncode == 2 and str(path) in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_missing_corrupt_and_mismatched_checkpoints_are_rejected(tmp_path):
    result = run_train(*SMALL_RUN, "--out", str(tmp_path / "none"), "--resume")
    assert result.returncode == 2 and "no checkpoint" in result.stderr
    assert run_train(*SMALL_RUN, "--out", str(tmp_path)).returncode == 0
    # Another option than the checkpoint's.
    result = run_train(*SMALL_RUN, "--lr", "0.1", "--out", str(tmp_path), "--resume")
    assert result.returncode == 2 and "--lr" in result.stderr
    # Data whose vocabulary differs from the checkpointed model's.
    text = tmp_path / "digits.txt"
    text.write_bytes(b"0123456789" * 100)
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    for split in ("train", "val"):
        (torch.arange(2000) % 700).numpy().astype("uint16").tofile(tokens / f"{split}.bin")
    data_run = tmp_path / "data_run"
    assert run_train(*SMALL_RUN, "--data", str(text), "--out", str(data_run)).returncode == 0
    ckpt_path = data_run / "ckpt.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["args"]["data"] = str(tokens)  # as if the run had named the token data
    torch.save(ckpt, ckpt_path)
    result = run_train(*SMALL_RUN, "--data", str(tokens), "--out", str(data_run), "--resume")
    assert result.returncode == 2 and "vocabulary" in result.stderr
    # A truncated checkpoint.
    blob = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(blob[: len(blob) // 2])
    result = run_train(*SMALL_RUN, "--out", str(tmp_path), "--resume")
    assert result.returncode == 2 and "not a readable checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# The authors' settings (github.com/natalieabreu/full-gauss-newton: templates/*.sbatch,
# EasyLM/models/llama/llama_train_gn*.py), restated here so that PAPER_RECIPE has to agree with them.
AUTHORS = {
    "adamw": dict(schedule="constant", warmup=0, weight_decay=0.0, grad_clip=1.0, ema=0.0),
    "muon": dict(schedule="constant", warmup=0, weight_decay=0.0, grad_clip=1.0, adamw_lr_ratio=1.0),
    "gn": dict(schedule="constant", warmup=0, inner="muon", adamw_lr_ratio=1.0, betas=(0.9, 0.999),
               weight_decay=0.001, muon_weight_decay=0.0, keep_iterate=True, no_warm_start=False, ema=0.999,
               line_search="paper", min_step_size=2 ** -2, ls_micro_batches=8),  # as many as the inner loop's
}
AUTHORS["gn_layerwise"] = dict(AUTHORS["gn"], min_step_size=2 ** (-9 / 2))


@pytest.mark.parametrize("opt", list(AUTHORS))
def test_paper_recipe_sets_the_authors_values_and_given_flags_win(opt):
    paper = vars(train.parse_args(["--recipe", "paper", "--opt", opt]))
    assert {k: paper[k] for k in AUTHORS[opt]} == AUTHORS[opt]
    recipe = train.paper_recipe(opt)
    assert {k: paper[k] for k in recipe} == recipe
    ours = vars(train.parse_args(["--opt", opt]))
    assert {k for k in recipe if ours[k] != recipe[k]} >= {"schedule", "adamw_lr_ratio"}
    # A flag given on the command line wins over the recipe; the rest of the recipe stays.
    given = vars(train.parse_args(["--recipe", "paper", "--opt", opt, "--schedule", "cosine", "--weight-decay", "0.1"]
                                  + (["--no-keep-iterate", "--ls-micro-batches", "3"] if opt.startswith("gn") else [])))
    assert given["schedule"] == "cosine" and given["weight_decay"] == 0.1
    assert given["adamw_lr_ratio"] == 1.0
    if opt.startswith("gn"):
        assert not given["keep_iterate"] and given["ls_micro_batches"] == 3 and given["ema"] == 0.999


@pytest.mark.parametrize("opt", ["muon", "gn"])
def test_init_from_starts_at_the_checkpoints_weights_with_fresh_state_and_continues_its_data(opt, tmp_path,
                                                                                               monkeypatch):
    """A run from another's checkpoint: that run's weights (and the EMA's start), a new optimizer whose
    groups follow the recipe, a new constant schedule from step 1, and the training batches that come
    after the ones the checkpoint's run drew."""
    first = tmp_path / "first"
    train.main(["--opt", opt, *SMALL_RUN, "--steps", "2", "--out", str(first)])
    saved = torch.load(first / "ckpt.pt", weights_only=True)
    steps = []  # before each step: the weights, the optimizer's state and its param groups
    first_order_step, gn_step = train.first_order_step, GaussNewton.step

    def record(model, state, groups):
        steps.append(({k: v.clone() for k, v in model.state_dict().items()}, state, [dict(g) for g in groups]))

    def record_first_order(model, opt, *a):
        record(model, dict(opt.state), opt.param_groups)
        return first_order_step(model, opt, *a)

    def record_gn(self, *a):  # GN's state: the inner optimizers', the outer steps, the inner iterate at the weights
        state = ([dict(o.state) for o in self.inner_opts], self.outer_steps,
                 all(torch.equal(t, self.named[n]) for n, t in self.iterate.items()))
        record(self.model, state, [g for o in self.inner_opts for g in o.param_groups])
        return gn_step(self, *a)
    monkeypatch.setattr(train, "first_order_step", record_first_order)
    monkeypatch.setattr(GaussNewton, "step", record_gn)
    second = tmp_path / "second"
    train.main(["--opt", opt, *SMALL_RUN, "--steps", "2", "--recipe", "paper", "--ema", "0.5",
                "--init-from", str(first / "ckpt.pt"), "--out", str(second)])

    weights, state, groups = steps[0]
    assert weights.keys() == saved["model"].keys()
    assert all(torch.equal(weights[k], saved["model"][k]) for k in saved["model"])
    if opt == "muon":
        assert state == {}
    else:  # the kept inner iterate starts at the checkpoint's weights too
        assert state == ([{}], 0, True)
        assert {g["betas"] for g in groups if not g["use_muon"]} == {(0.9, 0.999)}
        assert all(g["weight_decay"] == (0.0 if g["use_muon"] else 0.001) for g in groups)
    assert {g["use_muon"] for g in groups} == {True, False} and len({g["lr"] for g in groups}) == 1

    records = read_metrics(second)
    assert [r["step"] for r in records] == [1, 2] and 2 * records[0]["tokens"] == records[1]["tokens"]
    base = train.parse_args(["--opt", opt])
    assert records[0]["lr"] == records[1]["lr"] == (base.inner_lr if opt.startswith("gn") else base.lr)
    end = torch.load(second / "ckpt.pt", weights_only=True)
    for k, start in saved["model"].items():  # the EMA started at the checkpoint's weights
        assert torch.allclose(end["ema"][k], start.lerp(steps[1][0][k], 0.5).lerp(end["model"][k], 0.5))
    # The batches: the checkpoint's run drew 2 steps' worth, this run 2 more.
    runs = [train.parse_args(["--opt", opt, *SMALL_RUN, *recipe]) for recipe in ([], ["--recipe", "paper"])]
    stream = MicroBatches(load_dataset().train, 4, 16, seed=0)
    stream.draw(sum(2 * (a.micro_batches + (a.ls_micro_batches if opt.startswith("gn") else 0)) for a in runs))
    assert torch.equal(end["batches"]["generator"], stream.state_dict()["generator"])


def test_bad_init_from_gives_one_line_and_exit_code_2(tmp_path, capsys):
    other = tmp_path / "other.pt"  # a checkpoint of a model with another vocabulary
    model = GPT(dataclasses.replace(PRESETS["tiny"], vocab_size=300))
    torch.save({"model": model.state_dict(), "args": {"model": "tiny"}, "batches": None}, other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for argv, message in [(["--init-from", str(tmp_path / "none.pt")], "no checkpoint"),
                          (["--init-from", str(garbage)], "not a readable checkpoint"),
                          (["--init-from", str(other)], "vocabulary 300) does not match"),
                          (["--init-from", str(other), "--resume", "--out", str(tmp_path)], "not allowed with")]:
        with pytest.raises(SystemExit) as e:
            train.main([*argv, *SMALL_RUN])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("opt", ["gn_layerwise", "muon"])
def test_interrupted_and_resumed_run_matches_uninterrupted(opt, tmp_path):
    args = ["--opt", opt, "--steps", "8", "--eval-every", "2", "--micro-batches", "2", "--batch-size", "4",
            "--seq-len", "16", "--sample-tokens", "0"]
    assert run_train(*args, "--out", str(tmp_path / "whole")).returncode == 0
    parts = tmp_path / "parts"
    process = start_train(*args, "--out", str(parts))
    metrics = parts / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2) and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)  # Ctrl-C: finish the step, checkpoint, exit
    _, err = process.communicate(timeout=120)
    stopped_at = len(read_metrics(parts))
    if process.returncode != 0:  # the run may have finished before the signal landed
        assert process.returncode == 130, err
        assert stopped_at < 8
        result = run_train(*args, "--out", str(parts), "--resume")
        assert result.returncode == 0, result.stderr
    whole, resumed = read_metrics(tmp_path / "whole"), read_metrics(parts)
    for record in whole + resumed:
        record.pop("time_s")
    assert resumed == whole


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("opt", ["muon", "gn"])
def test_cuda_run_starts_from_a_cpu_checkpoint_and_resumes_its_own(opt, tmp_path):
    """compare.py's GPU race starts every run from the warm-up's checkpoint: its sampler state must load
    into a CUDA run, as must the run's own checkpoint on --resume."""
    assert run_train("--opt", "adamw", *SMALL_RUN, "--device", "cpu", "--out", str(tmp_path / "warm")).returncode == 0
    run = ["--opt", opt, *SMALL_RUN, "--device", "cuda", "--out", str(tmp_path / "run")]
    result = run_train(*run, "--init-from", str(tmp_path / "warm" / "ckpt.pt"), "--stop-at-step", "2")
    assert result.returncode == 0, result.stderr
    result = run_train(*run, "--resume")
    assert result.returncode == 0, result.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_parameters_are_unchanged_by_a_non_finite_step():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, mlp_hidden=12))
    x = torch.randint(0, 11, (4, 8))
    y = torch.randint(0, 11, (4, 8))
    poisoned = [False]
    forward = model.forward
    model.forward = lambda *a, **k: forward(*a, **k) * (float("nan") if poisoned[0] else 1.0)

    for opt in (make_optimizer("adamw", list(model.named_parameters()), lr=1e-2),
                GaussNewton(model, inner="muon")):
        before = [p.detach().clone() for p in model.parameters()]
        poisoned[0] = True
        if isinstance(opt, GaussNewton):
            stats = opt.step([(x, y)])
            assert stats["rejected"] and not stats["finite"] and opt.lr_backoff == 0.5
        else:
            assert train.first_order_step(model, opt, [(x, y)], grad_clip=1.0) is None
        for a, b in zip(before, model.parameters()):
            assert torch.equal(a, b.detach())
        poisoned[0] = False  # and the next step goes on normally
        if isinstance(opt, GaussNewton):
            assert opt.step([(x, y)])["finite"]
        else:
            assert train.first_order_step(model, opt, [(x, y)], grad_clip=1.0) is not None
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("opt", ["adamw", "gn"])
def test_run_continues_past_an_injected_non_finite_step(opt, tmp_path, monkeypatch):
    poisoned_step = 2
    current = {}
    real_factor = train.lr_factor
    monkeypatch.setattr(train, "lr_factor", lambda step, *a: current.update(step=step + 1) or real_factor(step, *a))
    real_forward = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, *a, **k: real_forward(self, *a, **k) * (
        float("nan") if current.get("step") == poisoned_step and self.training else 1.0))
    train.main(["--opt", opt, *SMALL_RUN, "--steps", "4", "--out", str(tmp_path)])
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[1]["train_loss"] is None
    assert all(r["train_loss"] is not None and r["val_loss"] < 10 for r in records[2:])


@pytest.mark.parametrize("opt", ["adamw", "gn_layerwise"])
def test_torchrun_two_processes_match_one(opt, tmp_path):
    args = ["--opt", opt, *SMALL_RUN]
    single = run_train(*args, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    double = run_train(*args, "--out", str(tmp_path / "two"),
                       launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert double.returncode == 0, double.stderr
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    for a, b in zip(one, two, strict=True):
        assert a["tokens"] == b["tokens"]
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 and abs(a["val_loss"] - b["val_loss"]) < 1e-5


def test_attention_backward_reuse_and_recompute_train_alike(tmp_path):
    """--attention-backward (model.py's GPTConfig.attention_backward): GN's passes reusing attention's
    probabilities in the backward or letting SDPA recompute them give the same run to float32 round-off."""
    runs = {}
    for branch in ("reuse", "recompute"):
        out = tmp_path / branch
        result = run_train("--opt", "gn_layerwise", *SMALL_RUN, "--attention-backward", branch, "--out", str(out))
        assert result.returncode == 0, result.stderr
        assert json.loads((out / "config.json").read_text())["attention_backward"] == branch
        runs[branch] = read_metrics(out)
    for a, b in zip(runs["reuse"], runs["recompute"], strict=True):
        assert a["tokens"] == b["tokens"]
        for key in ("train_loss", "val_loss", "loss_after", "model_decrease", "step_size", "direction_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)
    with pytest.raises(SystemExit) as exited:
        train.parse_args(["--attention-backward", "cuda"])
    assert exited.value.code == 2
