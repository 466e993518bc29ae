"""compare.py: the steps-to-target logic on synthetic metrics, results.json from the smoke preset, bad input."""
import json
import os
import subprocess
import sys

import pytest

import compare

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
    text = compare.table({"target_loss": 2.0, "preset": "cpu", "runs": runs})
    assert "| adamw | 0.001 | 4 | 1.00x |" in text
    assert "| gn | 0.001 | 2 | 2.00x |" in text


@pytest.mark.parametrize("argv", [["--preset", "nope"], ["--opts", "adamw,sgd"], ["--preset", "smoke", "--opts", "gn"],
                                  ["--preset", "45m", "--batch-sweep"], ["--jobs", "0"]])
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


def test_smoke_preset_writes_results_measured_against_the_best_baseline(tmp_path, capsys):
    out = tmp_path / "out"
    results = compare.main(["--preset", "smoke", "--out", str(out)])
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["preset"] == "smoke" and set(results["runs"]) == {"adamw", "gn"}
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
    assert gn["tokens_to_target"] is None or gn["tokens_to_target"] == 2 * 2 * 4 * 32 * gn["steps_to_target"]
    assert gn["peak_memory_bytes"] > 0 and gn["memory_kind"] == "process_max_rss"
    assert "| optimizer | lr | steps to target |" in capsys.readouterr().out
    # the same command again reuses every finished run and measures the same
    assert compare.main(["--preset", "smoke", "--out", str(out)]) == results
    n_runs = sum(len(sweep) for sweep in results["lr_sweeps"].values())
    assert capsys.readouterr().out.count("reusing the finished run") == n_runs
