"""The benchmark scripts run end to end (tiny shapes, a given bandwidth): their reports are
well-formed and carry correct losses. Not timing tests: no time is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_script(name, *arguments, timeout=600):
    environment = dict(os.environ, GLOG_v="3")
    completed = subprocess.run([sys.executable, str(REPO / "scripts" / name), *arguments],
                               cwd=REPO, env=environment, capture_output=True, text=True,
                               timeout=timeout, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_bench_reports_every_case_with_correct_losses(tmp_path):
    implementations = ["ms_xent_graph", "ms_xent_pynative", "mindformers_graph"]
    run_script("bench.py", "--shapes", "64x100", "--dtypes", "float32", "bfloat16", "--impls",
               *implementations, "--repeats", "2", "--bandwidth", "25,32", "--output-dir",
               str(tmp_path))
    report = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    results = {(result["impl"], result["dtype"]): result for result in report["results"]}
    assert set(results) == {(impl, dtype) for impl in implementations
                            for dtype in ("float32", "bfloat16")}
    for (impl, dtype), result in results.items():
        assert result["status"] == "ok", (impl, dtype, result["message"])
        assert len(result["fwd_bwd_ms"]) == 2 and min(result["fwd_bwd_ms"]) > 0
        relative_error = abs(result["loss"][0] / result["reference_loss"] - 1)
        assert relative_error < (1e-5 if dtype == "float32" else 1e-3), (impl, dtype)
    assert (tmp_path / "results.png").stat().st_size > 0
    assert "| 64 x 100 | float32 | ms_xent_graph |" in (tmp_path / "results.md").read_text(
        encoding="utf-8")


def test_bench_kernels_prints_a_row_per_case():
    output = run_script("bench_kernels.py", "--shapes", "64x100", "300x2049", "--dtypes",
                        "float32", "bfloat16", "--repeats", "2", "--bandwidth", "25,32")
    cases = ("| 64 x 100 |", "| 300 x 2049 |")
    rows = [line for line in output.splitlines() if line.startswith(cases)]
    assert len(rows) == 4, output
    for row in rows:
        fraction = float(row.strip(" |").split("|")[-1])
        assert fraction > 0, row


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_linear_cross_entropy_reports_fused_and_unfused(tmp_path, dtype):
    run_script("bench_linear_cross_entropy.py", "--shapes", "64x16x100", "--dtypes", dtype,
               "--impls", "fused,unfused", "--chunk-sizes", "auto,24", "--repeats", "1",
               "--modes", "graph,pynative_blocking", "--output-dir", str(tmp_path))
    report = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    records = report["results"] if isinstance(report, dict) else report
    assert len(records) == 6, records
    assert {record["mode"] for record in records} == {"graph", "pynative_blocking"}
    for record in records:
        assert record["status"] == "ok", record


def test_train_refuses_a_parallel_config_without_msrun(tmp_path):
    """A use_parallel config run as a plain process exits 2 (not 1, which means "the loss did
    not fall") with a pointer to msrun_train.py, and creates no run directory."""
    output_dir = tmp_path / "run"
    completed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--config",
         str(REPO / "configs" / "tiny_llama_ms_xent_dp2.yaml"), "--output-dir", str(output_dir)],
        cwd=tmp_path, env={key: value for key, value in os.environ.items()
                           if key not in ("MS_ROLE", "RANK_TABLE_FILE")},
        capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "this config needs msrun: use scripts/msrun_train.py" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not output_dir.exists() and not list(tmp_path.iterdir())
