"""The device check: everything GPU-related the README reports, measured in one run (< 8 minutes on one GPU).

    bash benchmarks/gpu_check.sh                    # on a machine with a CUDA GPU: writes runs/gpu_check/results.json
    bash benchmarks/gpu_check.sh --dry-run          # CPU, tiny stand-ins for every step: checks the script itself

Steps (each in its own process, with a time limit; a failing step is recorded and the rest still run):

1. ``kernel_tests``: tests/test_triton_attention.py on CUDA (the Triton kernels compiled, against the plain path).
2. ``speed``: benchmarks/gevit_speed.py rows (its ``--worker`` measurement) for GE-ViT p4 and p4m, patch 5, at
   batch 8 and 64: ours with the Triton kernels, ours with the chunked torch path, and the plain transcription of
   the original algorithm (materialised 9-D logits), in that order, side by side in this one run.
3. ``epoch``: one epoch of GE-ViT p4 / patch 5 training on the full rotated-MNIST training split (10,000 digits,
   batch 8 as in the post, Adam), then accuracy on the 2,000 validation digits; images per second.
4. ``posthoc``: notebook 06 (post-hoc equivariance on rotated MNIST, experiment 1) at the full profile.

``--dry-run`` prints every row the real run would measure and runs each step with a CPU stand-in (the interpreter
for the kernel tests, batch 1 on the chunked path for the speed rows, 16 synthetic digits for the epoch, the smoke profile for the
notebook), so that the script cannot rot unnoticed (tests/test_gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SPEED_ROWS = [(group, batch, impl) for group in ("p4", "p4m") for batch in (8, 64)
              for impl in ("triton", "chunked", "plain")]
STEPS = ("kernel_tests", "speed", "epoch", "posthoc")
LIMITS = {"kernel_tests": 150, "speed_row": 45, "epoch": 150, "posthoc": 200}  # seconds (GPU run)


DRY_ENV: dict[str, str] = {}  # the dry run's children: GEVIT_CPU_KERNEL=0 (no C++ build, no wait on its lock)


def _run(cmd: list[str], timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(REPO), **DRY_ENV})
        rc, out = proc.returncode, (proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired as err:
        text = [t.decode(errors="replace") if isinstance(t, bytes) else (t or "") for t in (err.stdout, err.stderr)]
        rc, out = "timeout", "".join(text)
    return {"command": " ".join(cmd), "returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
            "tail": out.strip().splitlines()[-15:]}


# ---- step 3 in a child process: one training epoch ------------------------------------------------------------
def epoch_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from gevit_lib.models.gevit import build_gevit

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    if spec["synthetic"]:  # dry run: random stand-in digits
        train = TensorDataset(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
        val = TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
        data = "16 synthetic 28x28 images (dry run)"
    else:
        from gevit_lib.data import rotated_mnist

        train, val = (rotated_mnist(split, root=spec["data_dir"]) for split in ("train", "val"))
        data = f"rotated MNIST, train {len(train)}, validation {len(val)}"
    model = build_gevit("rotmnist", "p4", patch_size=5).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(train, batch_size=spec["batch"], shuffle=True, drop_last=False)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    model.train()
    sync()
    t0 = time.perf_counter()
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()
    sync()
    seconds = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(val, batch_size=256):
            correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    return {"data": data, "batch": spec["batch"], "epoch_s": seconds, "images_per_s": len(train) / seconds,
            "val_accuracy_after_one_epoch": correct / len(val), "device": str(device),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def _child_json(result: dict[str, Any], stdout_json: str | None) -> dict[str, Any]:
    if result["returncode"] == 0 and stdout_json:
        result["result"] = json.loads(stdout_json)
    return result


# ---- the steps -------------------------------------------------------------------------------------------------
def step_kernel_tests(dry: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "tests/test_triton_attention.py", "-q", "-p", "no:cacheprovider"]
    if dry:  # the interpreter on CPU: one quick case
        cmd += ["-k", "test_matches_plain_float32 and lifting"]
    return _run(cmd, LIMITS["kernel_tests"] * (3 if dry else 1))


def speed_spec(group: str, batch: int, impl: str, dry: bool) -> dict[str, Any]:
    spec = dict(group=group, patch=5, batch=batch, impl="plain" if impl == "plain" else "fast", device="cuda",
                repeats=3, threads=None, autocast=None)
    if impl != "plain":
        spec["backend"] = impl
    if dry:  # CPU stand-in: the chunked path for both "ours" rows (Triton runs on CPU only in its slow interpreter)
        spec.update(device="cpu", batch=1, repeats=1, backend="chunked" if impl != "plain" else None)
    return spec


def step_speed(dry: bool, log) -> list[dict[str, Any]]:
    rows = []
    for group, batch, impl in SPEED_ROWS:
        spec = speed_spec(group, batch, impl, dry)
        label = f"speed {group} P=5 batch {batch} {impl}"
        if dry and (group, batch) != ("p4", 8):
            log(f"{label}: would measure {json.dumps(speed_spec(group, batch, impl, False))} (dry run: skipped)")
            rows.append({"row": label, "spec": spec, "skipped": "the dry run measures the p4 batch-8 rows only"})
            continue
        log(f"{label}: measuring {json.dumps(spec)}")
        res = _run([sys.executable, "benchmarks/gevit_speed.py", "--worker", json.dumps(spec)],
                   LIMITS["speed_row"] * (3 if dry else 1))
        out = res.pop("tail")
        row = {"row": label, "spec": spec, **res}
        if res["returncode"] == 0:
            m = json.loads(out[-1])
            row.update(train_step_s=m["train_step_s"], eval_forward_s=m["eval_forward_s"], peak_gib=m["peak_gib"],
                       backend=m["backend"], train_images_per_s=spec["batch"] / m["train_step_s"],
                       device_name=m.get("device_name"))
        else:
            row["error"] = out
        rows.append(row)
        log("  " + (f"train step {row['train_step_s']:.4f} s ({row['train_images_per_s']:.0f} img/s), backend "
                    f"{row['backend']}, peak {row['peak_gib']:.2f} GiB" if "train_step_s" in row else
                    f"failed: {row.get('error', row['returncode'])}"))
    return rows


def step_epoch(dry: bool, data_dir: str | None) -> dict[str, Any]:
    spec = dict(device="cpu" if dry else "cuda", batch=8, synthetic=dry, data_dir=data_dir)
    res = _run([sys.executable, __file__, "--epoch-worker", json.dumps(spec)], LIMITS["epoch"] * (3 if dry else 1))
    return _child_json(res, res["tail"][-1] if res["tail"] else None)


def step_posthoc(dry: bool, data_dir: str | None, work: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "gevit_lib.reproduce", "--only", "06", "--profile", "smoke" if dry else "full",
           "--device", "cpu" if dry else "cuda", "--out-dir", str(work / "figures"), "--run-dir", str(work / "runs")]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    res = _run(cmd, LIMITS["posthoc"] * (3 if dry else 1))
    res["tables"] = {p.name: p.read_text() for p in sorted((work / "figures").rglob("*.csv"))}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU stand-ins for every step (checks the script)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check" / "results.json")
    ap.add_argument("--data-dir", default=os.environ.get("GEVIT_DATA_DIR"), help="datasets (default $GEVIT_DATA_DIR)")
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS, help="run only these steps")
    ap.add_argument("--epoch-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.epoch_worker:
        print(json.dumps(epoch_worker(json.loads(args.epoch_worker))))
        return

    import torch

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --dry-run to check the script on CPU")
    if args.dry_run:
        DRY_ENV["GEVIT_CPU_KERNEL"] = "0"
    started = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {"dry_run": args.dry_run, "platform": platform.platform(), "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}}
    try:
        import triton

        results["meta"]["triton"] = triton.__version__
    except ImportError:
        results["meta"]["triton"] = None
    log(f"gpu_check{' (dry run)' if args.dry_run else ''}: {results['meta']}")
    log("rows this check measures: " + "; ".join(f"speed {g} P=5 batch {b} {i}" for g, b, i in SPEED_ROWS)
        + "; epoch p4 P=5 batch 8 on rotated MNIST; notebook 06 at the full profile")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name, run in (("kernel_tests", lambda: step_kernel_tests(args.dry_run)),
                          ("speed", lambda: step_speed(args.dry_run, log)),
                          ("epoch", lambda: step_epoch(args.dry_run, args.data_dir)),
                          ("posthoc", lambda: step_posthoc(args.dry_run, args.data_dir, Path(tmp)))):
            if name not in args.steps:
                continue
            log(f"== {name}")
            results[name] = run()
            if isinstance(results[name], dict):
                summary = {k: results[name][k] for k in ("returncode", "seconds", "result") if k in results[name]}
                log(f"  {json.dumps(summary)}")
    results["meta"]["total_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    failed = [k for k in ("kernel_tests", "epoch", "posthoc") if k in results and results[k]["returncode"] != 0]
    failed += [r["row"] for r in results.get("speed", []) if "error" in r]
    log(f"wrote {args.out} in {results['meta']['total_s']:.0f} s" + (f"; FAILED: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
