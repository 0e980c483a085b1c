"""scripts/gpu_check.py, end to end in its dry run (what CI can run without a GPU), so the GPU check cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def test_dry_run_writes_both_reports_and_checks_every_step(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "example-1.0-py3-none-any.whl").write_bytes(b"not a real wheel: a dry run never installs it")
    out = tmp_path / "out"
    environment = {key: value for key, value in os.environ.items() if key != "REQUIRE_CUDA"}  # a GPU CI's
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--bundle", str(bundle)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["dry_run"] is True
    steps = {step["name"]: step for step in report["steps"]}
    assert steps["install the bundle"]["wheels"] == ["example-1.0-py3-none-any.whl"]
    collected = steps["CUDA tests (collected only: dry run)"]
    assert collected["status"].startswith("collected, not run: ") and " tests collected" in collected["collected"][0]
    assert int(collected["collected"][0].split("/")[0]) >= 10  # the CUDA-marked tests are there to run
    benches = [step for name, step in steps.items() if name.startswith("bench: ")]
    assert len(benches) == 5 and all(step["status"] == "skipped (dry run): parsed" for step in benches)
    assert any("--ema-device cpu" in step["command"] for step in benches)
    assert any("--peers" in step["command"] for step in benches)
    assert any("--channels-last" in step["command"] for step in benches)
    markdown = (out / "gpu-check.md").read_text()
    assert "**Dry run**" in markdown and "| bench: peers | skipped (dry run): parsed |" in markdown
    assert "| passed |" not in markdown  # nothing ran, nothing passed


def test_require_cuda_fails_without_a_device_instead_of_a_dry_run(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--require-cuda", "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and "CUDA required" in done.stdout
    assert not (tmp_path / "gpu-check.json").exists()


def test_bundle_check_counts_the_size(tmp_path, capsys):
    gpu_check = load_script()
    assert gpu_check.check_bundle(tmp_path) == 1  # empty: nothing to install there
    (tmp_path / "small-1.0-py3-none-any.whl").write_bytes(b"x" * 1000)
    assert gpu_check.check_bundle(tmp_path) == 0
    assert "1 wheels" in capsys.readouterr().out
    with open(tmp_path / "huge-1.0-py3-none-any.whl", "wb") as huge:
        huge.truncate(gpu_check.MAX_BUNDLE_BYTES)  # sparse: takes no disk
    assert gpu_check.check_bundle(tmp_path) == 1


def test_bench_tables_show_times_ratios_and_compile_seconds():
    from dataclasses import asdict

    from fastema.bench import METHODS, ModelResult

    ms = {method: 1.0 + index for index, method in enumerate(METHODS)}
    ms["foreach_lerp"] = None  # a method that cannot run is left out, not shown as 0
    row = ModelResult("toy", 3, 100, ms, {}, None, {"fastema compiled": 2.5, "flat compiled": 0.5})
    tables = load_script().bench_tables({"results": [asdict(row)]})
    assert "foreach_lerp" not in tables and "| fastema compiled |" in tables.splitlines()[0]
    assert f"{ms['fastema'] / ms['floor']:.2f}x" in tables  # fastema / floor
    assert "fastema compiled 2.5, flat compiled 0.5" in tables


def load_script():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return gpu_check
