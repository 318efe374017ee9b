"""Every tool and benchmark answers --help; train_tokenizer, plot_metrics, padding_report, export_hf and the demo from the command
line."""
from __future__ import annotations

import json

import pytest

from gptneox.cli.export_hf import main as export_main
from gptneox.cli.reference_logits import main as reference_logits_main
from gptneox.training.metrics import last_per_step

from tests.helpers import REPO, run_main, run_python

SCRIPTS = sorted(str(p.relative_to(REPO)) for p in [*(REPO / "tools").glob("*.py"), *(REPO / "bench").glob("*.py")])


# Runs each script as `python SCRIPT --help` would (its own __main__, sys.argv and stdout), all in one fresh
# interpreter so that torch is imported once, not once a script; prints one JSON line per script.
HELP_EACH = """
import contextlib, io, json, os, runpy, sys, traceback
search_path = sys.path[1:]  # without -c's current folder
for script in sys.argv[1:]:
    out, err, status = io.StringIO(), io.StringIO(), 0
    sys.argv = [script, "--help"]
    sys.path[:] = [os.path.dirname(os.path.abspath(script)), *search_path]  # as `python SCRIPT` puts its folder first
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit_:
            status = exit_.code
        except BaseException:
            traceback.print_exc()
            status = "raised"
    print(json.dumps({"script": script, "status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}))
"""


@pytest.mark.slow
def test_every_tool_and_benchmark_answers_help():
    done = run_python("-c", HELP_EACH, *SCRIPTS, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["script"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert sorted(results) == SCRIPTS
    for script, result in results.items():
        assert result["status"] in (0, None) and "usage:" in result["stdout"], (script, result["stderr"][-2000:])
        assert "Traceback" not in result["stderr"], (script, result["stderr"][-2000:])


@pytest.mark.slow
def test_train_tokenizer_rebuilds_the_bundled_tokenizer_exactly(tmp_path):
    """The README's way to regenerate data/sample/tokenizer.json: a reader change that alters the sample's
    texts, or a tool that no longer runs, shows here."""
    done = run_python("tools/train_tokenizer.py", "--output", str(tmp_path / "tokenizer.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "tokenizer.json").read_bytes() == (REPO / "data/sample/tokenizer.json").read_bytes()


@pytest.mark.slow
def test_plot_metrics_draws_a_png_and_rejects_a_bad_line(tmp_path):
    records = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 11)]
    records.insert(5, {"step": 5, "eval_sample_loss": 4.8, "eval_sample_accuracy": 0.1})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    done = run_python("tools/plot_metrics.py", str(tmp_path), "--output", str(tmp_path / "plot.png"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics.write_text(metrics.read_text() + "{oops\n")
    bad = run_python("tools/plot_metrics.py", str(metrics))
    assert bad.returncode == 2 and f"{metrics}:12: not a JSON line" in bad.stderr


def test_plot_metrics_keeps_the_newest_record_of_a_step():
    run = [{"step": s, "loss": 1.0} for s in (1, 2, 3, 4)]
    resumed = [{"step": s, "loss": 2.0} for s in (3, 4, 5)]  # appended after a resume from step 2
    assert [(r["step"], r["loss"]) for r in last_per_step(run + resumed)] == \
           [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0), (5, 2.0)]


@pytest.mark.slow
def test_padding_report_runs_from_another_directory(tmp_path):
    done = run_python(str(REPO / "tools" / "padding_report.py"), "--max_length", "128", "--cache_dir",
                      REPO / "data" / "sample", "--tokenizer_path", REPO / "data" / "sample" / "tokenizer.json",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| 128 | 8 |" in done.stdout


def test_export_hf_names_a_directory_that_is_not_a_checkpoint(tmp_path):
    done = run_main(export_main, "export_hf.py", tmp_path, tmp_path / "out")
    assert done.returncode == 2 and "is not a checkpoint directory written by train.py" in done.stderr
    # a run's output directory, or one of its tags, given instead: the message says what to pass
    (tmp_path / "run" / "checkpoints" / "model").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "model" / "config.json").write_text("{}")
    done = run_main(export_main, "export_hf.py", tmp_path / "run", tmp_path / "out")
    assert f"(it is a run's output directory: pass {tmp_path / 'run' / 'checkpoints'})" in done.stderr
    (tmp_path / "run" / "checkpoints" / "step00000004").mkdir()
    done = run_main(export_main, "export_hf.py", tmp_path / "run" / "checkpoints" / "step00000004", tmp_path / "out")
    assert f"(it is one checkpoint: pass {tmp_path / 'run' / 'checkpoints'} --tag step00000004)" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_trains_exports_and_answers(tmp_path):
    """The `make demo` pipeline, one epoch instead of the default sixteen."""
    done = run_python("tools/demo.py", "--output", str(tmp_path / "demo"), "--epochs", "1",
                    "--max_new_tokens", "8", timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    first, last = (float(x) for x in done.stdout.split("training loss: first step ")[1].split(" (")[0].split(" -> last step "))
    assert last < first
    assert "<|assistant|>" in done.stdout and "What is a meme" in done.stdout
    assert (tmp_path / "demo" / "model.safetensors").is_file()


@pytest.mark.slow
def test_dtype_flags_take_both_spellings_and_name_a_bad_one():
    short, long = (run_python("bench/matmul_peak.py", "--dtype", d, "--size", "64", "--repeats", "1")
                   for d in ("fp32", "float32"))
    assert short.returncode == long.returncode == 0 and "cpu fp32 matmul peak" in long.stdout
    bad = run_main(export_main, "export_hf.py", "a", "b", "--dtype", "fp8")
    assert bad.returncode == 2 and "--dtype: invalid dtype_name value: 'fp8'" in bad.stderr


def test_reference_logits_names_a_missing_model_and_bad_prompts_in_one_line(tmp_path):
    missing = f"{tmp_path / 'config.json'}: config.json not found"
    for argv, message in ((["--model", tmp_path, "--prompts", "1 2"], missing),
                          (["--model", REPO / "tests/fixtures/tiny-gptneox", "--prompts", "a b"],
                           "--prompts must be space-separated token ids")):
        done = run_main(reference_logits_main, "reference_logits.py", *argv, "--output", tmp_path / "out.safetensors",
                        "--engine", "gptneox")
        assert done.returncode == 2 and done.stderr.startswith(f"reference_logits.py: error: {message}"), done.stderr
