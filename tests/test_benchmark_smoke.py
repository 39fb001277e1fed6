"""The benchmark script works (tiny models, one repeat); timings are not asserted here."""
import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_smoke(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/run.py", "--smoke", "--models", "vgg16", "--out",
                             str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "latest.csv") as handle:
        rows = list(csv.DictReader(handle))
    methods = {row["method"] for row in rows}
    assert {"input gradient", "torchlrp Epsilon", "torchlrp EpsilonGammaBox", "zennit EpsilonGammaBox"} <= methods
    assert all(float(row["seconds"]) > 0 for row in rows if not row["error"])
    assert "| x gradient |" in (tmp_path / "latest.md").read_text()


def test_dataset_benchmark_smoke():
    result = subprocess.run([sys.executable, "benchmarks/dataset.py", "--images", "8", "--size", "32",
                             "--batch-size", "4"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "torchrun 2 processes" in result.stdout and "x the bare loop's time" in result.stdout
