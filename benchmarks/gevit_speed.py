"""Speed and memory of GE-ViT: the fast attention path against the original algorithm, same machine, same run.

"reference (original algorithm)" is ``impl="plain"``: gevit_lib's transcription of the original computation
(materialised 9-D logits, :func:`gevit_lib.nn.attention.reference_attention`); the original repository's code
itself is not part of this project.
Columns: parameters, eval forward time (no grad), training step time (forward + backward + Adam step, train mode,
dropout on as in the presets), peak memory. Times are medians over ``--repeats`` runs after one warm-up run.

Memory: every (configuration, implementation) runs in a fresh subprocess. On CPU the peak is the process's peak
resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, read in the child at the end), reported both as
is and minus the child's peak before the first step (the interpreter, torch and the model: the baseline); on CUDA
it is ``torch.cuda.max_memory_allocated``. If the plain path would not fit in memory at the requested batch size
(predicted from a batch-2 run: baseline + batch/2 x the batch-2 increase, against 80% of MemAvailable), it is
measured at batch 2 and the row says so.

    python benchmarks/gevit_speed.py                 # CPU (and CUDA when available), full table
    python benchmarks/gevit_speed.py --quick         # small run (batch 2, p4 patch 5 only)
    python benchmarks/gevit_speed.py --out runs/bench/gevit_speed.json
    python benchmarks/gevit_speed.py --device cpu --chunked   # also the chunked torch backend of the fast path

On CPU "fast" is the fused C++ kernel (gevit_lib.nn.cpu_kernel, built on first use) when it builds, on CUDA the
Triton kernels (gevit_lib.nn.triton_attention) when triton runs, otherwise the chunked torch path; the row says
which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

CONFIGS = [  # (group, patch size, batch)
    ("p4", 5, 8),
    ("p4", 9, 8),
    ("p4m", 5, 8),
]


# ---- the measurement, in a fresh process --------------------------------------------------------------------
def measure(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("backend") == "chunked":  # the torch path of the fast attention instead of a fused kernel
        os.environ["GEVIT_CPU_KERNEL"] = "0"
        os.environ["GEVIT_CUDA_KERNEL"] = "chunked"
    elif spec.get("backend") == "triton":  # CUDA: insist on the Triton kernels (an error if they cannot run)
        os.environ["GEVIT_CUDA_KERNEL"] = "triton"
    import torch

    sys.path.insert(0, str(REPO))
    from gevit_lib.benchmark import peak_rss_bytes, time_calls
    from gevit_lib.models.gevit import build_gevit
    from gevit_lib.nn import cpu_kernel, triton_attention

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build_gevit("rotmnist", spec["group"], patch_size=spec["patch"], impl=spec["impl"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(spec["batch"], 1, 28, 28, device=device)
    y = torch.randint(0, 10, (spec["batch"],), device=device)
    amp = spec.get("autocast")
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp == "bf16" else None

    def timed(fn) -> list[float]:
        fn()  # warm-up
        return time_calls(fn, spec["repeats"], device)

    def forward() -> None:
        with torch.no_grad():
            if ctx:
                with ctx():
                    model(x)
            else:
                model(x)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        if ctx:
            with ctx():
                loss = torch.nn.functional.cross_entropy(model(x), y)
        else:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    baseline = peak_rss_bytes() / 2**30
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.eval()
    fwd = timed(forward)
    model.train()
    step = timed(train_step)
    out = {**spec, "params": sum(p.numel() for p in model.parameters()), "eval_forward_s": statistics.median(fwd),
           "train_step_s": statistics.median(step), "eval_forward_all_s": fwd, "train_step_all_s": step,
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "backend": ("plain" if spec["impl"] == "plain" else
                       "kernel" if device.type == "cpu" and cpu_kernel.available() else
                       "triton" if triton_attention.selected("auto", device) else "chunked")}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["device_name"] = torch.cuda.get_device_name()
    else:
        out["peak_rss_gib"] = peak_rss_bytes() / 2**30
        out["baseline_rss_gib"] = baseline
        out["peak_gib"] = out["peak_rss_gib"] - baseline
    return out


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          cwd=REPO)
    if proc.returncode != 0:
        return {**spec, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- orchestration ----------------------------------------------------------------------------------------------
def _mem_available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def plain_batch(group: str, patch: int, batch: int, device: str, repeats: int, threads: int | None,
                log) -> tuple[int, dict[str, Any] | None]:
    """Batch size at which the plain path fits (CPU): predicted from a batch-2 run."""
    if device != "cpu" or batch <= 2:
        return batch, None
    probe = run_child(dict(group=group, patch=patch, batch=2, impl="plain", device=device, repeats=1, threads=threads))
    if "error" in probe:
        return 2, probe
    predicted = probe["baseline_rss_gib"] + probe["peak_gib"] * batch / 2
    available = _mem_available_gib()
    log(f"  plain {group} P={patch}: batch 2 peak {probe['peak_rss_gib']:.2f} GiB -> batch {batch} predicted "
        f"{predicted:.1f} GiB, available {available:.1f} GiB")
    return (batch, None) if predicted < 0.8 * available else (2, probe)


def fmt_row(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"


def table(rows: list[dict[str, Any]]) -> str:
    head = ["device", "model", "batch", "params", "impl", "eval fwd (s)", "train step (s)", "peak mem (GiB)",
            "speed-up (train)", "memory ratio"]
    lines = []
    by_key: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        by_key[(r["device"], r["group"], r["patch"], r.get("autocast"), r["impl"])] = r  # (fast rows: any backend)
    body = []
    for r in rows:
        name = f"rotmnist {r['group']} P={r['patch']}" + (f" {r['autocast']}" if r.get("autocast") else "")
        impl = {"kernel": "fast (fused CPU kernel)", "chunked": "fast (chunked torch)",
                "triton": "fast (Triton kernel)"}.get(
            r.get("backend", ""), "fast") if r["impl"] == "fast" else "reference (original algorithm)"
        if "error" in r:
            body.append([r["device"], name, str(r["batch"]), "", impl, "error", " ".join(r["error"]), "", "", ""])
            continue
        mem = f"{r['peak_gib']:.2f}" + (f" (RSS {r['peak_rss_gib']:.2f})" if "peak_rss_gib" in r else "")
        speed = ratio = ""
        ref = by_key.get((r["device"], r["group"], r["patch"], r.get("autocast"), "plain"))
        if r["impl"] == "fast" and ref and "error" not in ref:
            scale = r["batch"] / ref["batch"]  # per-image comparison if the reference ran at a smaller batch
            speed = f"{ref['train_step_s'] * scale / r['train_step_s']:.1f}x"
            ratio = f"{r['peak_gib'] / (ref['peak_gib'] * scale):.2f}"
            if "peak_rss_gib" in r:
                ratio += f" (RSS {r['peak_rss_gib'] / ref['peak_rss_gib']:.2f})" if scale == 1 else ""
        batch = str(r["batch"]) + (" (memory)" if r.get("reduced_batch") else "")
        body.append([r["device"], name, batch, f"{r['params']:,}", impl, f"{r['eval_forward_s']:.3f}",
                     f"{r['train_step_s']:.3f}", mem, speed, ratio])
    widths = [max(len(x[i]) for x in body + [head]) for i in range(len(head))]
    lines.append(fmt_row(head, widths))
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += [fmt_row(b, widths) for b in body]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 2, p4 patch 5 only, 2 repeats")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (after one warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--skip-plain", action="store_true", help="only the fast path")
    ap.add_argument("--chunked", action="store_true",
                    help="also time the fast path's chunked torch backend (the default is the fused kernel on CPU, "
                         "the Triton kernels on CUDA)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return

    import torch

    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else ["cpu", "cuda"]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    configs = [("p4", 5, 2)] if args.quick else CONFIGS
    repeats = 2 if args.quick else args.repeats
    rows: list[dict[str, Any]] = []
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"load average before: {_load()}")
    for device in devices:
        variants = [(None, None)] if device == "cpu" else [(None, None), ("bf16", None), (None, 64), ("bf16", 64)]
        for group, patch, batch in configs:
            for amp, big_batch in variants:
                b = big_batch or batch
                impls = ["fast"] if args.skip_plain or (device == "cuda" and big_batch) else ["fast", "plain"]
                if args.chunked:
                    impls.insert(1, "fast-chunked")
                for impl in impls:
                    spec = dict(group=group, patch=patch, batch=b, impl=impl, device=device, repeats=repeats,
                                threads=args.threads, autocast=amp)
                    if impl == "fast-chunked":
                        spec.update(impl="fast", backend="chunked")
                    if impl == "plain":
                        b_plain, _ = plain_batch(group, patch, b, device, repeats, args.threads, log)
                        if b_plain != b:
                            spec.update(batch=b_plain, reduced_batch=True)
                    log(f"{device} {group} P={patch} batch {spec['batch']} {impl} {amp or ''} ... (load {_load()})")
                    t0 = time.perf_counter()
                    result = run_child(spec)
                    log(f"  done in {time.perf_counter() - t0:.0f}s: " + (
                        f"train {result['train_step_s']:.3f}s, eval {result['eval_forward_s']:.3f}s, "
                        f"peak {result['peak_gib']:.2f} GiB" if "error" not in result else f"error {result['error']}"))
                    rows.append(result)
    text = table(rows)
    print(text)
    print(f"\nCPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, torch "
          f"{torch.__version__}, load average after: {_load()}. Peak memory on CPU = peak RSS minus the process's "
          "peak before the first step (interpreter + torch + model); RSS in brackets. Times: median of "
          f"{repeats} runs after one warm-up.")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                "memory_method": "CPU: ru_maxrss of a fresh subprocess per row (peak_rss_gib), minus its peak before "
                                 "the first step (baseline_rss_gib) = peak_gib; CUDA: torch.cuda.max_memory_allocated",
                "reference": "impl='plain' = transcription of the original algorithm (materialised 9-D logits)",
                "repeats": repeats}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows, "table": text}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
