"""fastema's GPU check in one go, on a machine with a CUDA GPU, a preinstalled torch and no network.

`make gpu-bundle` (on a machine with network) puts the wheels a stock CUDA PyTorch image lacks into
build/gpu-bundle/; `make gpu-check` (on the GPU machine) runs this script, which:

1. installs those wheels from the folder only (`pip install --no-index --no-deps --target`);
2. runs every CUDA-marked test;
3. checks that `ModelEMA.update()` is captured by a CUDA graph and compiled by `torch.compile(fullgraph=True)`,
   and that an eager update never synchronises with the host;
4. runs `fastema bench --device cuda` in float32, bf16 -> fp32, offloaded, channels-last and with `--peers`;
5. writes gpu-check.md and gpu-check.json into --out ($OUT, else build/gpu-check/).

Without CUDA (or with --dry-run) it runs end to end all the same, skipping what needs the GPU: the bundle
is listed, the CUDA tests are only collected, the bench commands only parsed. The test suite runs that dry
run, so this script cannot rot unnoticed. Each step has a time limit, and steps that would start after
--budget seconds (300) are skipped; no step runs past 3 minutes (a bench 2), so the whole check ends
within 8 minutes (install 1, tests 3, benches from there until the budget is spent plus one more).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Extra arguments of `fastema bench --device cuda` for each setting.
BENCHES = {
    "float32": [],
    "bf16 model, fp32 EMA": ["--dtype", "bfloat16", "--ema-dtype", "float32"],
    "offloaded (bf16 model, fp32 EMA on the host)": [
        "--dtype",
        "bfloat16",
        "--ema-dtype",
        "float32",
        "--ema-device",
        "cpu",
    ],
    "channels-last": ["--channels-last"],
    "peers": ["--peers"],
}
MAX_BUNDLE_BYTES = 64 << 20  # what travels with the working tree to a lent GPU machine


def bundle_wheels(bundle: Path) -> list[Path]:
    return sorted(bundle.glob("*.whl")) if bundle.is_dir() else []


def check_bundle(bundle: Path) -> int:
    """Print the bundle's wheels and total size; a non-zero exit if it is empty or over the limit."""
    wheels = bundle_wheels(bundle)
    total = sum(wheel.stat().st_size for wheel in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 1e6:8.2f} MB  {wheel.name}")
    print(f"{len(wheels)} wheels, {total / 2**20:.2f} MiB in {bundle} (limit {MAX_BUNDLE_BYTES >> 20} MiB)")
    return 0 if wheels and total <= MAX_BUNDLE_BYTES else 1


class Check:
    """The steps run so far, their outcome and what they measured; written as markdown and JSON."""

    def __init__(self, out: Path, dry_run: bool, budget_s: float) -> None:
        self.out, self.dry_run, self.budget_s = out, dry_run, budget_s
        self.began = time.perf_counter()
        self.steps: list[dict] = []
        self.env = dict(os.environ)

    def record(self, name: str, status: str, seconds: float = 0.0, command: str = "", **details: object) -> dict:
        step = dict(name=name, status=status, seconds=round(seconds, 1), command=command, **details)
        self.steps.append(step)
        print(f"[gpu-check] {name}: {status} ({seconds:.1f} s)", flush=True)
        return step

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.began > self.budget_s

    def run(self, name: str, command: list[str], timeout_s: float, success: str = "passed", **details: object) -> dict:
        """Run `command` (from the repository root) unless the budget is spent; keep its output's tail.

        `success`: the status an exit code of 0 gets ("passed", or what a dry run's step really did)."""
        shown = " ".join(command)
        if self.out_of_time():
            return self.record(name, "skipped: time budget spent", command=shown, **details)
        began = time.perf_counter()
        try:
            done = subprocess.run(
                command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as expired:
            output = (expired.stdout or "") + (expired.stderr or "")
            tail = output if isinstance(output, str) else output.decode(errors="replace")
            return self.record(name, f"timed out after {timeout_s:.0f} s", time.perf_counter() - began, shown,
                               output_tail=tail[-3000:], **details)  # fmt: skip
        status = success if done.returncode == 0 else f"failed (exit {done.returncode})"
        step = self.record(name, status, time.perf_counter() - began, shown, **details)
        step["stdout"], step["stderr_tail"] = done.stdout, done.stderr[-3000:]
        return step

    def write(self, environment: dict) -> tuple[Path, Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        for step in self.steps:
            step.pop("stdout", None)  # kept in JSON as parsed data only
        report = {"dry_run": self.dry_run, "environment": environment, "steps": self.steps}
        json_path = self.out / "gpu-check.json"
        json_path.write_text(json.dumps(report, indent=2, default=str))
        md_path = self.out / "gpu-check.md"
        md_path.write_text(markdown(report))
        return md_path, json_path


def markdown(report: dict) -> str:
    environment = report["environment"]
    lines = ["# fastema GPU check", ""]
    if report["dry_run"]:
        lines += ["**Dry run**: no CUDA device here (or --dry-run); what needs the GPU was skipped.", ""]
    lines += [", ".join(f"{key}: {value}" for key, value in environment.items()), ""]
    lines += ["| step | status | seconds |", "|---|---|---:|"]
    lines += [f"| {step['name']} | {step['status']} | {step['seconds']} |" for step in report["steps"]]
    for step in report["steps"]:
        if step.get("tables"):
            lines += ["", f"## {step['name']}", "", f"`{step['command']}`", "", step["tables"]]
        if step.get("output_tail") or (step["status"].startswith(("failed", "timed")) and step.get("stderr_tail")):
            tail = step.get("output_tail") or step.get("stderr_tail")
            lines += ["", f"## {step['name']}: output", "", "```", tail.strip()[-2000:], "```"]
        if step.get("results"):
            lines += ["", f"## {step['name']}", ""] + [f"- {key}: {value}" for key, value in step["results"].items()]
    return "\n".join(lines) + "\n"


def bench_tables(payload: dict) -> str:
    """The bench's JSON as two small tables: ms per method, and fastema's ratios and compile times."""
    results = payload["results"]
    if not results:
        return ""
    methods = [method for method, value in results[0]["ms"].items() if value is not None]
    lines = ["| model | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for row in results:
        lines.append(f"| {row['model']} | " + " | ".join(f"{row['ms'][m]:.3f}" for m in methods) + " |")
    ratios = [name for name in results[0]["ratios"] if "/ floor" in name or "/ fastema" in name]
    lines += ["", "| model | " + " | ".join(ratios) + " | compile s |", "|---|" + "---:|" * (len(ratios) + 1)]
    for row in results:
        cells = " | ".join(f"{row['ratios'].get(name, float('nan')):.2f}x" for name in ratios)
        compile_s = ", ".join(f"{name} {seconds:.1f}" for name, seconds in row.get("compile_seconds", {}).items())
        lines.append(f"| {row['model']} | {cells} | {compile_s} |")
    return "\n".join(lines)


def capture_checks() -> dict:
    """ModelEMA.update() in a CUDA graph, under torch.compile(fullgraph=True), compiled steps; all against eager."""
    import torch
    from torch import nn

    from fastema import ModelEMA

    results: dict[str, str] = {}
    torch.manual_seed(0)

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 8)).cuda()

    def perturb(net: nn.Module) -> None:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net.train()(torch.randn(16, 64, device="cuda"))

    def max_difference(a: ModelEMA, b: ModelEMA) -> float:
        return max(
            (x.double() - y.double()).abs().max().item()
            for x, y in zip(a._tracker.binding.ema_tensors, b._tracker.binding.ema_tensors)
            if x.is_floating_point()
        )

    def agreeing(ema: ModelEMA, eager: ModelEMA, updates: int, kind: str) -> str:
        """What was measured, or an AssertionError (the step fails) if the counts or the values disagree."""
        difference = max_difference(ema, eager)
        report = f"{ema.num_updates} updates, max |{kind} - eager| = {difference:.2e}"
        # float32 EMAs of values near 1: a few ulps apart (fused or not), never a missed or doubled update.
        if ema.num_updates != updates or ema.num_updates != eager.num_updates or not difference <= 1e-5:
            raise AssertionError(f"{report}; expected {updates} updates and at most 1e-05")
        return report

    for name, kwargs in (("fp32", {}), ("bf16 model, fp32 EMA", {"ema_dtype": torch.float32})):
        net = model() if not kwargs else model().bfloat16()
        for compile_step in (False, True):
            ema, eager = ModelEMA(net, 0.9, compile=compile_step, **kwargs), ModelEMA(net, 0.9, **kwargs)
            decay = torch.tensor(0.9, dtype=torch.float64, device="cuda")
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                ema.update(decay=decay)  # warm-up (and the compile) outside the capture
            torch.cuda.current_stream().wait_stream(side)
            eager.update(0.9)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                ema.update(decay=decay)
            for step in range(5):
                if net[0].weight.dtype == torch.bfloat16:
                    with torch.no_grad():
                        for p in net.parameters():
                            p.add_(0.01)
                else:
                    perturb(net)
                decay.fill_(0.9 - 0.01 * step)
                graph.replay()
                eager.update(0.9 - 0.01 * step)
            torch.cuda.synchronize()
            label = f"CUDA graph, {name}, compile={compile_step}"
            results[label] = agreeing(ema, eager, 6, "captured")

    net = model()
    ema, eager = ModelEMA(net, 0.9), ModelEMA(net, 0.9)
    train_step = torch.compile(lambda d: ema.update(decay=d), fullgraph=True)
    for step in range(4):
        perturb(net)
        train_step(torch.tensor(0.9 - 0.01 * step, dtype=torch.float64, device="cuda"))
        eager.update(0.9 - 0.01 * step)
    results["torch.compile(fullgraph=True) of update(decay=tensor)"] = agreeing(ema, eager, 4, "compiled")

    ema = ModelEMA(model(), 0.9)
    ema.update()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema.update()
        ema.update(decay=torch.tensor(0.8, dtype=torch.float64, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    results["eager update under set_sync_debug_mode('error')"] = "no host sync"
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "build" / "gpu-check"))
    parser.add_argument("--bundle", default=str(ROOT / "build" / "gpu-bundle"), help="the wheels of make gpu-bundle")
    parser.add_argument("--dry-run", action="store_true", help="skip what needs a GPU (automatic without CUDA)")
    parser.add_argument(
        "--require-cuda",
        action="store_true",
        help="fail at once without a CUDA device (else a dry run); also REQUIRE_CUDA=1, unless --dry-run",
    )
    parser.add_argument("--check-bundle", metavar="DIR", help="only list a bundle's wheels and check its size")
    parser.add_argument("--models", default="vit_small_patch16_224,convnext_tiny,mobilenetv3_small_100")
    parser.add_argument("--bench-budget", type=float, default=0.2, help="seconds of timing per method and model")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds after which no new step starts")
    args = parser.parse_args(argv)
    if args.check_bundle:
        return check_bundle(Path(args.check_bundle))

    import torch  # preinstalled; the bundle never holds it

    cuda = torch.cuda.is_available() and not args.dry_run
    if (args.require_cuda or (os.environ.get("REQUIRE_CUDA") == "1" and not args.dry_run)) and not cuda:
        seen = "a" if torch.cuda.is_available() else "no"
        print(f"gpu-check: CUDA required (--require-cuda, REQUIRE_CUDA=1) but not used: torch sees {seen} CUDA device")
        return 2
    out, bundle = Path(args.out), Path(args.bundle)
    site = out / "site"
    check = Check(out, not cuda, args.budget)
    paths = [str(site), str(ROOT / "src"), check.env.get("PYTHONPATH", "")]
    check.env["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    check.env["PYTHONUNBUFFERED"] = "1"
    sys.path[:0] = [str(site), str(ROOT / "src")]
    environment = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }

    wheels = bundle_wheels(bundle)
    if not wheels:
        check.record("install the bundle", f"skipped: no wheels in {bundle} (make gpu-bundle)")
    elif not cuda:
        check.record("install the bundle", "skipped (dry run)", wheels=[wheel.name for wheel in wheels])
    else:
        install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile"]
        check.run("install the bundle", [*install, "--target", str(site), *map(str, wheels)], 60)

    pytest = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests"]
    if cuda:
        check.run("CUDA tests", [*pytest, "-rs"], 180)
    else:
        step = check.run("CUDA tests (collected only: dry run)", [*pytest, "--collect-only"], 240, "collected, not run")
        collected = (step.get("stdout") or "").strip().splitlines()[-1:]
        step["collected"] = collected
        if step["status"] == "collected, not run":  # none of them ran
            step["status"] += f": {collected[0] if collected else '?'}"

    if not cuda:
        check.record("CUDA graph capture, torch.compile and no-sync checks", "skipped (dry run)")
    elif check.out_of_time():
        check.record("CUDA graph capture, torch.compile and no-sync checks", "skipped: time budget spent")
    else:
        began = time.perf_counter()
        try:
            results = capture_checks()
            check.record("CUDA graph capture, torch.compile and no-sync checks", "passed", time.perf_counter() - began,
                         results=results)  # fmt: skip
        except Exception as error:  # reported, not raised: the other steps' results still matter
            check.record("CUDA graph capture, torch.compile and no-sync checks", f"failed: {error!r}",
                         time.perf_counter() - began)  # fmt: skip

    from fastema.__main__ import build_parser

    for name, extra in BENCHES.items():
        command = ["bench", "--device", "cuda", "--json", "--train-batch", "0", "--budget", str(args.bench_budget)]
        command += ["--models", args.models, *extra]
        if not cuda:
            build_parser().parse_args(command)  # the command line must stay valid: an error here fails the dry run
            check.record(f"bench: {name}", "skipped (dry run): parsed", command="fastema " + " ".join(command))
            continue
        step = check.run(f"bench: {name}", [sys.executable, "-m", "fastema", *command], 120)
        try:
            payload = json.loads(step.get("stdout") or "")
        except json.JSONDecodeError:
            continue
        step["results_json"], step["tables"] = payload, bench_tables(payload)

    md_path, json_path = check.write(environment)
    print(f"[gpu-check] wrote {md_path} and {json_path}")
    failed = [step["name"] for step in check.steps if step["status"].startswith(("failed", "timed"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
