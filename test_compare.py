"""compare.py: the steps-to-target logic on synthetic metrics, results.json from the smoke preset, bad input."""
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

import compare
import model
import train

HERE = os.path.dirname(os.path.abspath(__file__))


def run_of(losses, lr=1e-3, tokens_per_step=100, every=1):
    records = [{"step": s, "tokens": s * tokens_per_step, "time_s": 0.5 * s}
               for s in range(1, len(losses) + 1)]
    for record, loss in zip(records, losses):
        if record["step"] % every == 0 or record["step"] == len(losses):
            record["val_loss"] = loss
    return {"opt": "adamw", "lr": lr, "micro_batches": 1, "records": records, "exit_code": 0,
            "peak_memory_bytes": None, "memory_kind": None}


def test_steps_to_target_is_the_first_evaluated_step_at_or_below_it():
    summary = compare.summarize(run_of([4.0, 3.0, 2.5, 2.6, 2.4]), target=2.5)
    assert summary["steps_to_target"] == 3
    assert summary["tokens_to_target"] == 300
    assert summary["time_to_target_s"] == 1.5
    assert summary["final_val_loss"] == 2.4
    assert summary["steps_run"] == 5


def test_only_evaluated_steps_count_and_a_missed_target_is_none():
    # evaluated at steps 2, 4, 5: the loss 2.5 at step 3 was never measured
    assert compare.summarize(run_of([4.0, 3.0, 2.5, 2.4, 2.3], every=2), 2.5)["steps_to_target"] == 4
    missed = compare.summarize(run_of([4.0, 3.0]), target=2.5)
    assert missed["steps_to_target"] is None and missed["tokens_to_target"] is None
    assert missed["final_val_loss"] == 3.0


def test_best_run_reaches_the_target_first_then_has_the_lower_final_loss():
    fast = compare.summarize(run_of([3.0, 2.0, 2.2], lr=1), target=2.1)
    slow_lower = compare.summarize(run_of([3.0, 2.5, 1.5], lr=2), target=2.1)
    tie_lower = compare.summarize(run_of([3.0, 2.0, 1.9], lr=3), target=2.1)
    never = compare.summarize(run_of([3.0, 2.9, 2.8], lr=4), target=2.1)
    assert compare.best_of([slow_lower, fast, never])["lr"] == 1
    assert compare.best_of([fast, tie_lower])["lr"] == 3
    assert compare.best_of([never, compare.summarize(run_of([3.0, 2.7]), target=2.1)])["final_val_loss"] == 2.7


def test_table_gives_steps_relative_to_the_best_baseline():
    runs = {"adamw": compare.summarize(run_of([3.0, 2.5, 2.4, 2.0]), 2.0),
            "gn": compare.summarize(run_of([2.5, 2.0]), 2.0)}
    text = compare.table({"target_loss": 2.0, "preset": "cpu", "seeds": [0], "runs": runs})
    assert "| adamw | 0.001 | 4 | 1.00x |" in text
    assert "| gn | 0.001 | 2 | 2.00x |" in text


def test_fit_recovers_the_critical_batch_of_a_known_curve():
    batches = [4096, 16384, 65536, 262144]
    for s_min, b_noise in [(20.0, 8192.0), (5.0, 300000.0), (12.0, 1000.0)]:
        steps = [s_min * (1 + b_noise / b) for b in batches]
        fit_s_min, fit_b_noise = compare.fit_critical_batch(batches, steps)
        assert fit_s_min == pytest.approx(s_min, rel=1e-9) and fit_b_noise == pytest.approx(b_noise, rel=1e-9)
    # noise of a few percent moves the estimates by about as much
    noisy = [s * f for s, f in zip([20.0 * (1 + 8192 / b) for b in batches], [1.03, 0.97, 1.02, 0.98])]
    fit_s_min, fit_b_noise = compare.fit_critical_batch(batches, noisy)
    assert fit_s_min == pytest.approx(20.0, rel=0.1) and fit_b_noise == pytest.approx(8192, rel=0.3)


def test_fit_edge_cases_flat_and_perfect_scaling():
    batches = [1000, 4000, 16000]
    assert compare.fit_critical_batch(batches, [30, 30, 30]) == pytest.approx((30.0, 0.0))
    s_min, b_noise = compare.fit_critical_batch(batches, [40, 10, 2.5])  # steps ∝ 1/B: never saturates
    assert s_min == 0 and b_noise is None
    assert compare.fit_critical_batch(batches, [10, 20, 40])[1] == 0  # bigger batches did worse: no gain
    with pytest.raises(ValueError, match="two or more"):
        compare.fit_critical_batch([1000], [5])


def test_every_optimizer_gets_the_same_step_budget_at_a_batch():
    args = compare.parse_args(["--preset", "cpu"])
    for mb, budget in compare.PRESETS["cpu"]["budget"].items():
        caps = set()
        for opt in ["adamw", "muon", "soap", "shampoo", "gn", "gn_layerwise"]:
            argv = compare.train_argv(args, "dir", opt, 0.01, mb, seed=0, target_loss=2.35)
            caps.add(int(argv[argv.index("--steps") + 1]))
            assert "--stop-at-step" not in argv
        assert caps == {budget}
    assert set(compare.PRESETS["cpu"]["budget"]) == set(compare.PRESETS["cpu"]["batch_sweep"])
    # a learning rate that runs after another one reached the target stops there, with the same schedule
    argv = compare.train_argv(args, "dir", "gn", 0.01, 64, seed=0, target_loss=2.35, stop_at=9)
    assert argv[argv.index("--stop-at-step") + 1] == "9" and argv[argv.index("--steps") + 1] == "40"


def test_sweep_stops_later_lrs_at_the_best_step_and_extends_a_grid_at_its_edge(tmp_path, monkeypatch):
    """A fake train_run: lr 0.04 reaches the target at step 5, every other lr later. The grid
    [0.01, 0.02, 0.04] runs 0.02 first, then 0.01 and 0.04; 0.04 wins at the edge, so 0.08 runs too."""
    calls = []

    def fake_run(args, run_dir, opt, lr, micro_batches, seed, target_loss=None, stop_at=None, extra=()):
        calls.append((lr, stop_at))
        reach = {0.04: 5}.get(lr, 8)
        steps = min(stop_at or 40, reach)
        return run_of([3.0] * (steps - 1) + [2.0 if steps == reach else 3.0], lr=lr)
    monkeypatch.setattr(compare, "train_run", fake_run)
    args = compare.parse_args(["--preset", "cpu", "--out", str(tmp_path)])
    runs = compare.sweep(args, "gn", 64, 2.5, grid=(0.01, 0.02, 0.04))
    assert calls == [(0.02, None), (0.01, 8), (0.04, 8), (0.08, 5)]
    assert compare.best_of([compare.summarize(r, 2.5) for r in runs])["lr"] == 0.04


def test_sweep_extends_a_grid_whose_edge_ties_the_fewest_steps(tmp_path, monkeypatch):
    """0.02 and 0.04 both reach the target at step 8, 0.02 at a lower loss (so best_of picks it);
    the edge lr 0.04 ties the fewest steps, so the grid has not bracketed the best lr: 0.08 runs.
    An edge lr that takes more steps than the best does not extend the grid."""
    calls = []

    def fake_run(args, run_dir, opt, lr, micro_batches, seed, target_loss=None, stop_at=None, extra=()):
        calls.append(lr)
        reach, final = {0.02: (8, 2.0), 0.04: (8, 2.4)}.get(lr, (20, 2.0))
        steps = min(stop_at or 40, reach)
        return run_of([3.0] * (steps - 1) + [final if steps == reach else 3.0], lr=lr)
    monkeypatch.setattr(compare, "train_run", fake_run)
    args = compare.parse_args(["--preset", "cpu", "--out", str(tmp_path)])
    runs = compare.sweep(args, "gn", 64, 2.5, grid=(0.01, 0.02, 0.04))
    assert calls == [0.02, 0.01, 0.04, 0.08]
    assert compare.best_of([compare.summarize(r, 2.5) for r in runs])["lr"] == 0.02
    calls.clear()
    compare.sweep(args, "gn", 64, 2.5, grid=(0.01, 0.02, 0.08))  # 0.08 reaches it later than 0.02
    assert calls == [0.02, 0.01, 0.08]


def test_gpu_presets_start_every_run_from_one_warm_up_with_the_papers_recipe(tmp_path, monkeypatch):
    """A fake launch checks that train.py accepts every run's arguments and writes one evaluation."""
    runs = []

    def fake_launch(args, run_dir, argv):
        runs.append(train.parse_args(argv))
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 1, "tokens": 1, "time_s": 1.0, "val_loss": 3.0 + len(runs) / 100}) + "\n")
        return 0
    monkeypatch.setattr(compare, "launch", fake_launch)
    compare.main(["--preset", "45m", "--opts", "adamw,muon,gn,gn_layerwise", "--out", str(tmp_path)])
    warm_ups = [r for r in runs if r.init_from is None]
    assert len(warm_ups) == 1 and len(runs) == 1 + 3 + 3 + 1 + 1  # the warm-up, then each optimizer's lr grid
    init = warm_ups[0]
    assert (init.opt, init.steps, init.micro_batches, init.batch_size, init.recipe) == ("adamw", 1000, 1, 32, "ours")
    for run in runs[1:]:
        assert run.init_from == os.path.join(init.out, "ckpt.pt") and run.recipe == "paper"
        assert (run.micro_batches, run.steps) == (122, 227)
    # The cpu preset runs from scratch with train.py's own recipe, as before.
    argv = compare.train_argv(compare.parse_args(["--preset", "cpu"]), "dir", "gn", 0.01, 64, seed=0)
    assert "--recipe" not in argv and "--init-from" not in argv


@pytest.mark.parametrize("argv", [["--preset", "nope"], ["--opts", "adamw,sgd"], ["--preset", "smoke", "--opts", "gn"],
                                  ["--preset", "45m", "--batch-sweep"], ["--jobs", "0"],
                                  ["--quick", "--batch-sweep"], ["--quick", "--preset", "45m"],
                                  ["--preset", "smoke", "--seeds", "0,1"], ["--seeds", "0,x"], ["--smoke"],
                                  ["--robust", "--quick"], ["--robust", "--preset", "45m"],
                                  ["--model-sizes", "--robust"], ["--model-sizes", "--preset", "45m"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        compare.parse_args(argv)
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_run_rejected_by_train_py_stops_the_comparison_with_exit_2(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "compare.py"), "--preset", "smoke", "--opts", "adamw",
                             "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("compare.py: error: train.py rejected the run")
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_run_that_crashes_is_not_kept_as_finished(tmp_path, monkeypatch):
    """An exception inside train.py (here a simulated out-of-memory) is not a diverged run (exit 1), which
    a rerun would reuse: the comparison stops, and the next launch runs it again."""
    args = compare.parse_args(["--preset", "smoke", "--out", str(tmp_path)])
    run_dir = str(tmp_path / "run")
    argv = compare.train_argv(args, run_dir, "adamw", 3e-3, 1, seed=0)
    monkeypatch.setattr(compare, "CHILD", compare.CHILD.replace("train.main(argv)", "raise MemoryError('simulated')"))
    with pytest.raises(RuntimeError, match="crashed"):
        compare.launch(args, run_dir, argv)
    assert not os.path.exists(os.path.join(run_dir, "finished.json"))
    assert "MemoryError: simulated" in open(os.path.join(run_dir, "train.log")).read()
    monkeypatch.undo()
    assert compare.launch(args, run_dir, argv) == 0 and os.path.exists(os.path.join(run_dir, "finished.json"))


def test_smoke_preset_writes_results_measured_against_the_best_baseline(tmp_path, capsys):
    out = tmp_path / "out"
    results = compare.main(["--preset", "smoke", "--out", str(out)])
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["preset"] == "smoke" and set(results["runs"]) == {"adamw", "gn"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    assert results["command"] == f"python compare.py --preset smoke --out {out}"
    assert results["commit"] is None or results["commit"].split("-")[0] == head
    assert results["date"].startswith(time.strftime("%Y-", time.gmtime()))
    keys = {"steps_to_target", "tokens_to_target", "time_to_target_s", "final_val_loss", "lr"}
    for summary in results["runs"].values():
        assert keys <= set(summary)
    # the default target is the lowest final validation loss over the whole lr grid of the baselines
    finals = [s["final_val_loss"] for s in results["lr_sweeps"]["adamw"]]
    assert len(finals) >= len(compare.PRESETS["smoke"]["lrs"]["adamw"])
    assert results["target_loss"] == min(finals)
    assert results["runs"]["adamw"]["final_val_loss"] == min(finals)
    assert results["runs"]["adamw"]["steps_to_target"] <= compare.PRESETS["smoke"]["budget"][2]
    # GN's steps to target agree with its own metrics: every earlier step was above the target
    gn = results["runs"]["gn"]
    records = compare.read_metrics(out / "runs" / f"gn-mb2-lr{gn['lr']:g}")
    assert all("val_loss" in r for r in records)
    reached = [r["step"] for r in records if r["val_loss"] <= results["target_loss"]]
    assert gn["steps_to_target"] == (reached[0] if reached else None)
    per_step = (2 + train.default_ls_micro_batches(2, train.LS_FRACTION)) * 4 * 32  # inner and line-search batches
    assert gn["tokens_to_target"] is None or gn["tokens_to_target"] == per_step * gn["steps_to_target"]
    assert gn["peak_memory_bytes"] > 0 and gn["memory_kind"] == "process_max_rss"
    assert "| optimizer | lr | steps to target |" in capsys.readouterr().out
    # the same command again reuses every finished run and measures the same
    assert {**compare.main(["--preset", "smoke", "--out", str(out)]), "date": None} == {**results, "date": None}
    n_runs = sum(len(sweep) for sweep in results["lr_sweeps"].values())
    assert capsys.readouterr().out.count("reusing the finished run") == n_runs
    # --results puts the JSON elsewhere, with the same runs
    elsewhere = tmp_path / "results" / "smoke.json"
    again = compare.main(["--preset", "smoke", "--out", str(out), "--results", str(elsewhere)])
    assert json.loads(elsewhere.read_text()) == json.loads(json.dumps(again))
    assert again["runs"] == results["runs"]


def test_seeds_give_each_seeds_runs_and_their_median_and_range(tmp_path, capsys):
    out = tmp_path / "out"
    results = compare.main(["--preset", "smoke", "--opts", "gn", "--target-loss", "4.5", "--seeds", "1,0,2",
                            "--out", str(out)])
    assert results["seeds"] == [0, 1, 2] and set(results["by_seed"]) == {"0", "1", "2"}
    steps = []
    for seed in (0, 1, 2):
        records = compare.read_metrics(out / "runs" / ("gn-mb2-lr0.02" + (f"-seed{seed}" if seed else "")))
        assert json.loads((out / "runs" / ("gn-mb2-lr0.02" + (f"-seed{seed}" if seed else "")) / "config.json")
                          .read_text())["seed"] == seed
        reached = [r["step"] for r in records if r["val_loss"] <= 4.5]
        steps.append(reached[0] if reached else None)
        assert results["by_seed"][str(seed)]["runs"]["gn"]["steps_to_target"] == steps[-1]
    entry = results["over_seeds"]["gn"]["steps_to_target"]
    assert entry["by_seed"] == steps
    if None not in steps:
        assert (entry["median"], entry["min"], entry["max"]) == (sorted(steps)[1], min(steps), max(steps))
    assert "median (range)" in capsys.readouterr().out


def test_quick_race_is_muon_and_gn_at_train_py_defaults_past_muons_critical_batch():
    args = compare.parse_args(["--quick"])
    preset = compare.PRESETS["quick"]
    assert args.preset == "quick" and args.opts == ["muon", "gn", "gn_layerwise"] and args.out == "runs/compare-quick"
    assert preset["micro_batches"] == 64 and preset["target_loss"] == compare.PRESETS["cpu"]["target_loss"]
    for opt in args.opts:
        defaults = train.parse_args(["--opt", opt])
        default_lr = defaults.inner_lr if opt.startswith("gn") else defaults.lr
        assert preset["lrs"][opt] == [default_lr]
        argv = compare.train_argv(args, "dir", opt, preset["lrs"][opt][0], preset["micro_batches"], seed=0)
        parsed = train.parse_args(argv)
        assert (parsed.micro_batches, parsed.batch_size, parsed.seq_len) == (64, 16, 64)
        assert (parsed.inner_lr if opt.startswith("gn") else parsed.lr) == default_lr


def test_longest_run_of_rejected_steps():
    sizes = [0.5, 0, 0, 1, 0, 0, 0, 0.25, 0]
    assert compare.max_consecutive_rejections([{"step_size": s} for s in sizes]) == 3
    assert compare.max_consecutive_rejections([{"lr": 0.06}] * 4) == 0  # a first-order run has no line search


def test_robust_study_measures_every_run_at_the_studys_targets_and_the_baselines_median(tmp_path, capsys):
    out = tmp_path / "out"
    results = compare.main(["--robust", "--preset", "smoke", "--opts", "adamw,gn", "--out", str(out)])
    saved = json.loads((out / "robust_defaults.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert {"command", "commit", "date", "runs"} <= set(saved)
    study = compare.PRESETS["smoke"]["robust"]
    assert results["seeds"] == study["seeds"]
    expected = {("adamw", 2, s, 3e-3, None) for s in (0, 1)}
    expected |= {("gn", 2, s, 0.02, True) for s in (0, 1)} | {("gn", 2, s, 0.01, True) for s in (0, 1)}
    expected |= {("gn", 2, s, 0.02, False) for s in (0, 1)}  # the reference with a fixed inner lr
    assert {(r["opt"], r["micro_batches"], r["seed"], r.get("inner_lr", r.get("lr")), r.get("adaptive_reach"))
            for r in results["runs"]} == expected
    for m in study["batches"]:
        finals = sorted(r["final_val_loss"] for r in results["runs"] if r["opt"] == "adamw" and r["micro_batches"] == m)
        assert results["reference_median_final_loss"][str(m)] == round(sum(finals) / 2, 2)
        assert results["targets"][str(m)] == sorted({*study["targets"], round(sum(finals) / 2, 2)}, reverse=True)
    for r in results["runs"]:
        if r["opt"] == "adamw":  # the baselines run their whole budget: their final loss sets a target
            assert r["steps_run"] == compare.PRESETS["smoke"]["budget"][r["micro_batches"]]
        lr = r.get("inner_lr", r.get("lr"))
        run_dir = out / "runs" / (f"{r['opt']}-mb{r['micro_batches']}-lr{lr:g}" + (f"-seed{r['seed']}" if r["seed"] else "")
                                  + ("-no-adaptive-reach" if r.get("adaptive_reach") is False else ""))
        records = compare.read_metrics(run_dir)
        if r["opt"] == "gn":  # the reach the run used: train.py records the option it resolved
            assert json.loads((run_dir / "config.json").read_text())["adaptive_reach"] == r["adaptive_reach"]
        targets = results["targets"][str(r["micro_batches"])]
        assert set(r["steps_to_target"]) == {f"{t:.2f}" for t in targets}
        for t in targets:
            reached = [x["step"] for x in records if x["val_loss"] <= t]
            assert r["steps_to_target"][f"{t:.2f}"] == (reached[0] if reached else None)
        assert r["max_consecutive_rejections"] == compare.max_consecutive_rejections(records)
        if r["opt"] == "gn" and r["steps_to_target"][f"{min(targets):.2f}"] is not None:
            assert r["steps_run"] == r["steps_to_target"][f"{min(targets):.2f}"]  # GN stops at the lowest target
    assert {(s["lr"], s["adaptive_reach"], s["default"]) for s in results["summary"] if s["opt"] == "gn"} == {
        (0.02, True, True), (0.01, True, False), (0.02, False, False)}
    assert "most rejections in a row" in capsys.readouterr().out


def test_gpu_quick_is_the_paper_architecture_past_muons_critical_batch_at_train_py_defaults():
    args = compare.parse_args(["--preset", "gpu-quick", "--device", "cpu"])
    preset = compare.PRESETS["gpu-quick"]
    assert args.opts == ["muon", "gn", "gn_layerwise"] and args.target_loss is None and "init" in preset
    assert preset["model"] == "paper45m" and preset["micro_batches"] * preset["batch_size"] * preset["seq_len"] == 2 ** 19
    smoke = compare.PRESETS["gpu-quick-smoke"]
    for key in ("opts", "lrs", "train_args", "gn_args", "target_loss", "cuda_tests"):  # smoke: only the sizes differ
        assert smoke[key] == preset[key] or key == "cuda_tests"
    for opt in args.opts:
        defaults = train.parse_args(["--opt", opt])
        assert preset["lrs"][opt] == [defaults.inner_lr if opt.startswith("gn") else defaults.lr]
        parsed = train.parse_args(compare.train_argv(args, "dir", opt, preset["lrs"][opt][0], 32, seed=0))
        assert (parsed.model, parsed.matmul_precision, parsed.steps) == ("paper45m", "high", 20)


def test_gpu_quick_smoke_runs_the_gpu_race_on_the_cpu(tmp_path, monkeypatch):
    out = tmp_path / "out"
    # A bench that fails (here: a preset bench.py does not know) is recorded and does not cost the race.
    monkeypatch.setitem(compare.PRESETS["gpu-quick-smoke"], "bench", ["smoke", "unknown"])
    results = compare.main(["--preset", "gpu-quick", "--smoke", "--device", "cpu", "--out", str(out)])
    assert "invalid choice: 'unknown'" in results["bench"].pop("unknown")["error"]
    saved = json.loads((out / "gpu_quick.json").read_text())
    saved["bench"].pop("unknown")
    assert saved == json.loads(json.dumps(results))
    assert {"command", "commit", "date", "device", "torch", "runs", "bench", "parameters"} <= set(saved)
    assert results["device"].startswith("cpu") and results["torch"] == torch.__version__
    config = dataclasses.replace(model.PRESETS["tiny"], vocab_size=256)
    assert results["parameters"] == model.GPT(config).num_params()
    assert set(results["runs"]) == {"muon", "gn", "gn_layerwise"}
    muon = results["runs"]["muon"]
    assert results["target_loss"] == muon["final_val_loss"]  # the target is Muon's final loss
    assert muon["steps_to_target"] is not None and muon["steps_to_target"] <= muon["steps_run"]
    warm_up = next((out / "runs").glob("init-*")) / "ckpt.pt"
    for opt, run in results["runs"].items():
        assert run["peak_memory_bytes"] > 0
        config = json.loads((out / "runs" / f"{opt}-mb2-lr{run['lr']:g}" / "config.json").read_text())
        assert config["init_from"] == str(warm_up)  # every run starts from the one warm-up
    bench = json.loads((out / "bench-smoke.json").read_text())
    ratios = results["bench"]["smoke"]
    assert ratios["gn_inner_over_train_step"] == bench["gn_inner_s"] / bench["train_step_s"]
    assert ratios["layerwise_over_naive_layerwise"] == bench["layerwise_inner_s"] / bench["naive_layerwise_inner_s"]
    assert results["cuda_tests"] is None  # the CPU smoke leaves the CUDA tests to the GPU run


def test_sweep_without_a_target_reached_extends_on_the_lowest_final_loss_at_an_edge(tmp_path, monkeypatch):
    """No lr reaches the target: the lowest final loss decides. At the grid's top edge it extends the grid
    (up to MAX_GRID_EXTENSIONS times); inside the grid it does not."""
    calls = []

    def fake_run(args, run_dir, opt, lr, micro_batches, seed, target_loss=None, stop_at=None, extra=()):
        calls.append(lr)
        return run_of([3.0] * 39 + [2.5 - lr], lr=lr)  # the larger the lr, the lower the final loss
    monkeypatch.setattr(compare, "train_run", fake_run)
    args = compare.parse_args(["--preset", "cpu", "--out", str(tmp_path)])
    runs = compare.sweep(args, "adamw", 64, 1.0, grid=(0.01, 0.02, 0.04))
    assert calls == [0.02, 0.01, 0.04, 0.08, 0.16]
    assert compare.best_of([compare.summarize(r, 1.0) for r in runs])["lr"] == 0.16
    calls.clear()
    monkeypatch.setattr(compare, "train_run", lambda *a, **k: (calls.append(a[3]), run_of([3.0, 2.0 + abs(a[3] - 0.02)],
                                                                                          lr=a[3]))[1])
    compare.sweep(args, "adamw", 64, None, grid=(0.01, 0.02, 0.04))  # no target: the middle lr is best
    assert calls == [0.02, 0.01, 0.04]


def test_headline_sweeps_each_warmup_with_its_lr_grid_and_keeps_the_best(tmp_path, monkeypatch):
    """The preset's warmups: each runs the whole lr grid through train.py's --warmup; the best run of any
    warmup is the optimizer's, and its summary names the warmup."""
    runs = []

    def fake_run(args, run_dir, opt, lr, micro_batches, seed, target_loss=None, stop_at=None, extra=()):
        runs.append((opt, lr, extra))
        warmup = int(extra[1]) if extra else None
        final = 2.0 if (warmup, lr) == (5, 0.006) else 2.8
        return {**run_of([3.0] * 39 + [final], lr=lr), "opt": opt, "extra": list(extra)}
    monkeypatch.setattr(compare, "train_run", fake_run)
    args = compare.parse_args(["--preset", "cpu", "--opts", "adamw,muon", "--target-loss", "2.1",
                               "--out", str(tmp_path)])
    target, best, _, summaries = compare.compare(args, 64, 2.1)
    grid = compare.PRESETS["cpu"]["lrs"]["adamw"]
    assert {(lr, extra) for opt, lr, extra in runs if opt == "adamw" and lr in grid} == {
        (lr, ("--warmup", str(w))) for lr in grid for w in compare.PRESETS["cpu"]["warmups"]["adamw"]}
    assert all(extra == () for opt, _, extra in runs if opt == "muon")  # Muon has no warmup sweep
    assert (best["adamw"]["lr"], best["adamw"]["warmup"], best["adamw"]["steps_to_target"]) == (0.006, 5, 40)
    assert best["muon"]["warmup"] is None
    assert len(summaries["adamw"]) == len([r for r in runs if r[0] == "adamw"])
    assert "| adamw | 0.006, warmup 5 | 40 |" in compare.table({"target_loss": target, "preset": "cpu", "seeds": [0],
                                                                "runs": best})


def test_model_size_ladder_sweeps_muon_then_runs_gn_to_each_rungs_targets(tmp_path, capsys):
    out = tmp_path / "out"
    results = compare.main(["--model-sizes", "--preset", "smoke", "--out", str(out)])
    assert json.loads((out / "model_sizes.json").read_text()) == json.loads(json.dumps(results))
    assert {"command", "commit", "date", "runs", "rungs"} <= set(results)
    study = compare.PRESETS["smoke"]["model_sizes"]
    largest = max(study["batches"])
    assert [r["preset"] for r in results["rungs"]] == study["models"] and results["seeds"] == study["seeds"]
    for rung in results["rungs"]:
        name = rung["preset"]
        vocab = json.loads(next((out / name / "runs").glob("*/config.json")).read_text())["vocab_size"]
        assert rung["parameters"] == model.GPT(dataclasses.replace(model.PRESETS[name], vocab_size=vocab)).num_params()
        runs = [r for r in results["runs"] if r["preset"] == name]
        muon = [r for r in runs if r["opt"] == "muon" and r["micro_batches"] == largest and r["measured"]]
        assert sorted(r["seed"] for r in muon) == study["seeds"]
        assert {r["lr"] for r in muon} == {rung["best_lr"][str(largest)]}
        median = statistics.median(r["final_val_loss"] for r in muon)
        assert rung["baseline_median_final_loss"] == math.ceil(median * 100) / 100
        targets = sorted({*study["targets"], rung["baseline_median_final_loss"]}, reverse=True)
        assert rung["targets"] == [f"{t:.2f}" for t in targets]
        assert {(r["opt"], r["seed"]) for r in runs if r["opt"] != "muon"} == {
            (o, s) for o in study["gn_opts"] for s in study["seeds"]}
        for r in runs:
            run_dir = out / name / "runs" / (f"{r['opt']}-mb{r['micro_batches']}-lr{r['lr']:g}"
                                             + (f"-seed{r['seed']}" if r["seed"] else ""))
            records = compare.read_metrics(run_dir)
            for t in targets:
                reached = [x for x in records if x["val_loss"] <= t]
                assert r["steps_to_target"][f"{t:.2f}"] == (reached[0]["step"] if reached else None)
                assert r["seconds_to_target"][f"{t:.2f}"] == (round(reached[0]["time_s"], 2) if reached else None)
            assert r["max_consecutive_rejections"] == compare.max_consecutive_rejections(records)
            if r["opt"] == "muon":  # the baselines run their whole budget
                assert r["steps_run"] == study["budget"]
            else:  # GN at its defaults, stopping at the lower target
                assert r["lr"] == compare.default_lr(compare.parse_args(["--preset", "smoke"]), r["opt"])
                assert r["steps_run"] == (r["steps_to_target"][f"{min(targets):.2f}"] or study["budget"])
        for o in study["gn_opts"]:
            for t in rung["targets"]:
                gn = [r["steps_to_target"][t] for r in runs if r["opt"] == o]
                muon_median = rung["steps_to_target"][f"muon@{largest}"][t]["median"]
                ratio = rung["ratios"][o]["steps_to_target"][t]
                if None not in gn and muon_median is not None:
                    assert ratio["median"] == pytest.approx(muon_median / statistics.median(gn))
                    assert ratio["min"] == pytest.approx(muon_median / max(gn))
    assert "| model | parameters | target |" in capsys.readouterr().out
    again = compare.main(["--model-sizes", "--preset", "smoke", "--out", str(out)])
    assert capsys.readouterr().out.count("reusing the finished run") == len(results["runs"])
    assert again["runs"] == results["runs"]


def test_parallel_sweeps_run_every_lr_as_its_own_job_and_extend_past_the_best_edge(tmp_path, monkeypatch):
    """No target: the lowest final loss decides. At 64 micro-batches the largest lr is best up to 0.48, so
    the grid extends while it is (0.24, 0.48, then 0.96, worse); at 16 the middle lr is best: no extension."""
    calls = []

    def fake_run(args, run_dir, opt, lr, micro_batches, seed, target_loss=None, stop_at=None, extra=()):
        calls.append((micro_batches, lr, stop_at))
        final = 2.0 + abs(lr - 0.48) if micro_batches == 64 else 2.0 + abs(lr - 0.06)
        return {**run_of([3.0] * 39 + [final], lr=lr), "micro_batches": micro_batches}
    monkeypatch.setattr(compare, "train_run", fake_run)
    args = compare.parse_args(["--preset", "cpu", "--out", str(tmp_path)])
    runs = compare.parallel_sweeps(args, "muon", [16, 64], seed=0)
    assert sorted(r["lr"] for r in runs[16]) == [0.03, 0.06, 0.12]
    assert sorted(r["lr"] for r in runs[64]) == [0.03, 0.06, 0.12, 0.24, 0.48, 0.96]
    assert all(stop is None for _, _, stop in calls) and len(calls) == 9
    assert calls[0][0] == 64  # the largest batch first
