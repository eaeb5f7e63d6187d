"""Speed and memory of GE-ViT: the fast attention path against the original, same machine, same run.

Two references, both measured in this run:

- "reference (original algorithm)" is ``impl="plain"``: gevit_lib's transcription of the original computation
  (materialised 9-D logits, :func:`gevit_lib.nn.attention.reference_attention`).
- with ``--original PATH`` (a checkout of the original repository, github.com/WouterBant/GEVit-DL2-Project), also
  the original repository's code itself: its ``src/model.py`` ``get_model`` builds its ``GroupTransformer`` for
  rotMNIST with our preset's settings (group, patch size, dropout 0.1 / 0.1, Swish, LayerNorm, whitening); its
  ``src`` goes on ``sys.path`` in that row's child process only (nothing of it is copied into this project). The
  table then gives every ratio against the original code, and the commit it was measured at; the two models'
  parameter counts are printed and compared layer by layer. Without ``--original`` the ratios are against the
  plain transcription, and the output says so.

Columns: parameters, eval forward time (no grad), training step time (forward + backward + Adam step, train mode,
dropout on as in the presets), peak memory. Times are medians over ``--repeats`` runs after one warm-up run. Below
the table, for each CPU row: the CPU seconds per training step in user code and in the operating system, and the
page faults per step (``getrusage`` around the timed steps), which show where a row's time goes.

Freed memory: by default glibc's malloc hands large freed blocks back to the OS, and the next step faults them in
again, one zeroed page at a time. The original code allocates its logit tensors anew every step, so on a machine
where page faults are expensive a large part of its step is spent in the OS. That is how it runs
for its users, so the default measures it so; ``--keep-freed-memory`` runs every process, ours and the original
alike, with glibc keeping what it frees, which shows the ratio without that cost.

Memory: every (configuration, implementation) runs in a fresh subprocess. On CPU the peak is the process's peak
resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, read in the child at the end), reported both as
is and minus the child's peak before the first step (the interpreter, torch and the model: the baseline); on CUDA
it is ``torch.cuda.max_memory_allocated``. If the plain path (or the original code) would not fit in memory at the
requested batch size (predicted from a batch-2 run: baseline + batch/2 x the batch-2 increase, against 80% of
MemAvailable), it is measured at batch 2, the row says so, and its ratios are per image.

Lockstep (with ``--original``, on CPU): the rows above are measured one after another, minutes apart, and a shared
machine's speed can drift by tens of percent in that time. So ours and the original code then also run side by side
in two persistent processes that take turns (``--lockstep ROUNDS`` turns each, the order reversed every round; a
turn is one untimed step, to warm the caches the other process used, then timed steps for at least a second); the
ratio of each round's two medians is steadier. Our steps in lockstep have measured both slower and faster than in
their own row (a probe found them slower after 12 s of sleep than after the original's step: the machine's state,
not the original's process, sets their speed).

    python benchmarks/gevit_speed.py                 # CPU (and CUDA when available), full table
    python benchmarks/gevit_speed.py --quick         # small run (batch 2, p4 patch 5 only)
    python benchmarks/gevit_speed.py --device cpu --original ../GEVit-DL2-Project   # against the original code
    python benchmarks/gevit_speed.py --out runs/bench/gevit_speed.json
    python benchmarks/gevit_speed.py --device cpu --chunked   # also the chunked torch backend of the fast path
    python benchmarks/gevit_speed.py --device cpu --configs p4:5   # one row of the table

On CPU "fast" is the fused C++ kernel (gevit_lib.nn.cpu_kernel, built on first use) when it builds, on CUDA the
Triton kernels (gevit_lib.nn.triton_attention) when triton runs, otherwise the chunked torch path; the row says
which. On CUDA the original's forward runs under its own fp16 autocast (its ``GroupTransformer.forward`` is
decorated with ``torch.cuda.amp.autocast()``); on CPU that decorator does nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]

CONFIGS = [  # (group, patch size, batch)
    ("p4", 5, 8),
    ("p4", 9, 8),
    ("p4m", 5, 8),
]


# ---- the original repository's code, in a fresh process ------------------------------------------------------
class OriginalCheckoutError(ValueError):
    """``--original PATH`` is not a usable checkout of the original repository."""


def original_checkout(path: str | Path) -> dict[str, Any]:
    """Check that ``path`` is a checkout of the original repository; its ``src`` folder, the commit (``git
    rev-parse HEAD``; None when it is not a git checkout) and whether ``src`` has local changes."""
    root = Path(path).expanduser()
    if not root.exists():
        raise OriginalCheckoutError(f"--original {path}: no such directory")
    if not root.is_dir():
        raise OriginalCheckoutError(f"--original {path}: not a directory")
    for need in ("src/g_selfatt", "src/models", "src/model.py"):
        if not (root / need).exists():
            raise OriginalCheckoutError(f"--original {path}: not a checkout of the original GE-ViT repository "
                                        f"(no {need})")

    def git(*cmd: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {"src": str((root / "src").resolve()), "commit": commit,
            "modified": bool(commit and git("status", "--porcelain", "--", "src"))}


def original_label(checkout: dict[str, Any], short: bool = True) -> str:
    commit = checkout.get("commit")
    if not commit:
        return "original repository code (not a git checkout: commit unknown)"
    return (f"original repository code (commit {commit[:12] if short else commit}"
            + (", with local changes in src/)" if checkout.get("modified") else ")"))


def import_original(src: str) -> Any:
    """The original's ``src/model.py`` as a module, with ``src`` put on ``sys.path`` (call it in a child process
    only); a one-line SystemExit naming the problem when it does not import."""
    sys.path.insert(0, src)
    try:
        import model as original  # the original's src/model.py
    except ModuleNotFoundError as err:
        top = (err.name or "").split(".")[0]
        if top and not any((Path(src) / name).exists() for name in (top, top + ".py")):
            raise SystemExit(f"the original code needs the package {top!r}, which this Python environment lacks "
                             f"(install it there to run --original)") from None
        raise SystemExit(f"cannot import the original code (src/model.py): {type(err).__name__}: {err}") from None
    except Exception as err:  # noqa: BLE001 - any failure of the user's checkout, in one line
        raise SystemExit(f"cannot import the original code (src/model.py): {type(err).__name__}: {err}") from None
    if not Path(original.__file__).resolve().is_relative_to(Path(src).resolve()):
        raise SystemExit(f"'import model' found {original.__file__}, not the original's src/model.py")
    return original


def build_original(src: str, group: str, patch: int) -> Any:
    """The original repository's rotMNIST ``GroupTransformer``, built by its own ``model.get_model`` with our
    rotmnist preset's settings, imported from ``src`` (put on ``sys.path`` in this process only)."""
    import contextlib
    from types import SimpleNamespace

    from gevit_lib.models.gevit import PRESETS

    original = import_original(src)
    cfg = PRESETS["rotmnist"]
    config = SimpleNamespace(  # the fields get_model reads; the architecture (20 channels, 9 heads, ...) is its own
        dataset="rotMNIST", model=f"{group}sa", attention_type="Local", patch_size=patch, only_3_and_8=False,
        norm_type=cfg.norm, activation_function=cfg.activation, dropout_att=cfg.attention_dropout,
        dropout_values=cfg.value_dropout, whitening_scale=cfg.whitening_scale)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # get_model prints; stdout carries the result
            net = original.get_model(config)
    except KeyError as err:
        raise SystemExit(f"the original code has no group {group!r} (get_model: KeyError {err})") from None
    except Exception as err:  # noqa: BLE001
        raise SystemExit(f"the original code cannot build {group} patch {patch}: {type(err).__name__}: {err}") \
            from None
    return getattr(net, "module", net)  # get_model wraps it in DataParallel


def param_sections(model: Any, original: bool) -> dict[str, int]:
    """Parameters per layer, under gevit_lib's names (the original's ``lifting_self_attention`` is ``lift``,
    ``lifting_normalization`` ``lift_norm``, ``transformer.i`` ``blocks.i``: the same modules in the same order)."""
    rename = {"lifting_self_attention": "lift", "lifting_normalization": "lift_norm", "transformer": "blocks"}
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        head = rename.get(parts[0], parts[0]) if original else parts[0]
        key = f"{head}.{parts[1]}" if head == "blocks" and len(parts) > 1 else head
        out[key] = out.get(key, 0) + p.numel()
    return out


# ---- the measurement, in a fresh process --------------------------------------------------------------------
def _public(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` without the original's path (a path of this machine: not for tables or JSON files)."""
    return {k: v for k, v in spec.items() if k != "original_src"}


def _setup(spec: dict[str, Any]) -> SimpleNamespace:
    """The model of ``spec`` (ours or the original code's), its optimiser and batch: ``forward`` (eval, no grad) and
    ``train_step`` (forward + backward + Adam step) closures, ``sections`` (parameters per layer), ``device``."""
    if spec.get("backend") == "chunked":  # the torch path of the fast attention instead of a fused kernel
        os.environ["GEVIT_CPU_KERNEL"] = "0"
        os.environ["GEVIT_CUDA_KERNEL"] = "chunked"
    elif spec.get("backend") == "triton":  # CUDA: insist on the Triton kernels (an error if they cannot run)
        os.environ["GEVIT_CUDA_KERNEL"] = "triton"
    import torch

    sys.path.insert(0, str(REPO))
    from gevit_lib.models.gevit import build_gevit
    from gevit_lib.train import TrainConfig, build_optimizer

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    original = spec["impl"] == "original"
    if original:
        model = build_original(spec["original_src"], spec["group"], spec["patch"]).to(device)
    else:
        model = build_gevit("rotmnist", spec["group"], patch_size=spec["patch"], impl=spec["impl"]).to(device)
    sections = param_sections(model, original)
    # each code's own optimiser: the original's torch.optim.Adam, ours as gevit_lib.train.fit builds it (foreach)
    opt = (torch.optim.Adam(model.parameters(), lr=1e-3) if original
           else build_optimizer(model, TrainConfig(epochs=1, optimizer="adam", lr=1e-3)))
    x = torch.randn(spec["batch"], 1, 28, 28, device=device)
    y = torch.randint(0, 10, (spec["batch"],), device=device)
    amp = spec.get("autocast")
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp == "bf16" else None

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

    return SimpleNamespace(model=model, forward=forward, train_step=train_step, sections=sections, device=device,
                           original=original)


def cpu_usage(before: Any, after: Any, steps: int) -> dict[str, float]:
    """Per step, from two ``getrusage`` readings around ``steps`` training steps (all the process's threads): CPU
    seconds in user code and in the operating system, and page faults."""
    return {"train_user_s": (after.ru_utime - before.ru_utime) / steps,
            "train_system_s": (after.ru_stime - before.ru_stime) / steps,
            "train_page_faults": (after.ru_minflt + after.ru_majflt - before.ru_minflt - before.ru_majflt) / steps}


def cpu_time_text(rows: list[dict[str, Any]], checkout: dict[str, Any] | None = None) -> str:
    """Where each CPU row's training-step time went: user and system CPU seconds per step and page faults."""
    lines = []
    for r in rows:
        if r["device"] != "cpu" or "error" in r or "train_user_s" not in r:
            continue
        impl = ("fast" if r["impl"] == "fast" else "plain" if r["impl"] == "plain"
                else original_label(checkout or {}))
        if r.get("backend") == "chunked":
            impl += " (chunked)"
        user, system = r["train_user_s"], r["train_system_s"]
        lines.append(f"- {r['group']} P={r['patch']} batch {r['batch']} {impl}: user {user:.2f} s, system "
                     f"{system:.2f} s ({system / max(user + system, 1e-12):.0%} in the OS), "
                     f"{r['train_page_faults']:,.0f} page faults")
    if not lines:
        return ""
    return ("CPU time per training step (getrusage over the timed steps, all threads; wall time x threads when every "
            "thread is busy). Page faults are memory freed after one step and touched again in the next: the OS hands "
            "back a zeroed page each time, and what that costs depends on the machine):\n" + "\n".join(lines))


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One row (``spec``: group, patch, batch, impl, device, repeats, ...), or with ``import_only`` just whether
    the original code imports, with ``build_only`` just the parameter counts."""
    if spec.get("import_only"):  # --original's first check: does the user's checkout import here?
        import_original(spec["original_src"])
        return _public(spec)
    import torch

    sys.path.insert(0, str(REPO))
    from gevit_lib.benchmark import peak_rss_bytes, time_calls
    from gevit_lib.nn import cpu_kernel, triton_attention

    built = _setup(spec)
    model, forward, train_step, device, sections = (built.model, built.forward, built.train_step, built.device,
                                                    built.sections)
    if spec.get("build_only"):
        return {**_public(spec), "params": sum(sections.values()), "param_sections": sections}

    def timed(fn) -> tuple[list[float], dict[str, float]]:
        """Seconds of each timed call after one warm-up, and the CPU time and page faults per call."""
        fn()  # warm-up
        before = resource.getrusage(resource.RUSAGE_SELF)
        times = time_calls(fn, spec["repeats"], device)
        return times, cpu_usage(before, resource.getrusage(resource.RUSAGE_SELF), len(times))

    baseline = peak_rss_bytes() / 2**30
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.eval()
    fwd, _ = timed(forward)
    model.train()
    step, usage = timed(train_step)
    out = {**_public(spec), "params": sum(sections.values()), "param_sections": sections,
           "eval_forward_s": statistics.median(fwd), "train_step_s": statistics.median(step), **usage,
           "eval_forward_all_s": fwd, "train_step_all_s": step, "threads": torch.get_num_threads(),
           "torch": torch.__version__,
           "backend": ("plain" if spec["impl"] == "plain" else "original" if built.original else
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


# glibc's malloc hands large freed blocks (and the heap's free top) back to the OS, and the next step faults them in
# again, one zeroed page at a time. Read by glibc at process start, these keep every freed block in the process.
KEEP_MEMORY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
KEEP_MEMORY_TEXT = " ".join(f"{k}={v}" for k, v in KEEP_MEMORY_ENV.items())


def child_env(spec: dict[str, Any]) -> dict[str, str]:
    """The environment of ``spec``'s process: ours, plus :data:`KEEP_MEMORY_ENV` with ``keep_memory``."""
    return {**os.environ, **(KEEP_MEMORY_ENV if spec.get("keep_memory") else {})}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          cwd=REPO, env=child_env(spec))
    if proc.returncode != 0:
        return {**_public(spec), "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- lockstep: ours and the original stepping in turn ------------------------------------------------------------
ROUND_SECONDS = 1.0  # each process's timed steps in a lockstep round last at least this long (at least one step)


def serve(spec: dict[str, Any]) -> None:
    """A persistent worker: builds ``spec``'s model, takes one warm-up step, prints ``ready``; then for every line
    read from stdin takes one untimed step (its caches warm again after the other process ran) and timed steps for
    at least ROUND_SECONDS (at least one), and prints their seconds on one line."""
    built = _setup(spec)
    built.model.train()
    import torch

    sync = torch.cuda.synchronize if built.device.type == "cuda" else (lambda: None)
    built.train_step()
    print("ready", flush=True)
    for _ in sys.stdin:
        built.train_step()
        times: list[float] = []
        while not times or sum(times) < spec.get("round_seconds", ROUND_SECONDS):
            sync()
            t0 = time.perf_counter()
            built.train_step()
            sync()
            times.append(time.perf_counter() - t0)
        print(" ".join(f"{t:.6f}" for t in times), flush=True)


def lockstep(specs: list[dict[str, Any]], rounds: int) -> list[list[list[float]]]:
    """Training-step times of ``specs`` (per spec, per round: the round's timed steps), each in its own persistent
    process, the processes taking their turns one at a time (the order reversed every round; see :func:`serve`). A
    machine whose speed drifts over seconds or minutes (a shared host) then slows every process in the same rounds,
    so per-round ratios are steadier than ratios of rows measured minutes apart."""
    procs = [subprocess.Popen([sys.executable, __file__, "--serve", json.dumps(spec)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env=child_env(spec)) for spec in specs]

    def read(proc: subprocess.Popen) -> str:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            err = proc.stderr.read().strip().splitlines()[-1:] if proc.stderr else []  # type: ignore[union-attr]
            raise RuntimeError("a lockstep worker stopped: " + (" ".join(err) or "no message"))
        return line.strip()

    try:
        for proc in procs:
            while read(proc) != "ready":  # anything printed while building (the kernel's build notice)
                pass
        times: list[list[list[float]]] = [[] for _ in specs]
        for r in range(rounds):
            for i in (range(len(procs)) if r % 2 == 0 else reversed(range(len(procs)))):
                procs[i].stdin.write("step\n")  # type: ignore[union-attr]
                procs[i].stdin.flush()  # type: ignore[union-attr]
                times[i].append([float(t) for t in read(procs[i]).split()])
        return times
    finally:
        for proc in procs:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(timeout=60)


def lockstep_summary(ours: list[list[float]], original: list[list[float]]) -> dict[str, float]:
    """Medians of all steps of each, and the median and quartiles over rounds of the ratio of the round's medians,
    original / ours."""
    ratios = sorted(statistics.median(o) / statistics.median(f) for f, o in zip(ours, original))
    quart = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"ours_s": statistics.median([t for r in ours for t in r]),
            "original_s": statistics.median([t for r in original for t in r]),
            "ratio": statistics.median(ratios), "ratio_q1": quart[0], "ratio_q3": quart[2], "rounds": len(ratios)}


def lockstep_text(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        head = f"{r['device']} {r['group']} P={r['patch']} batch {r['batch']}" + (
            " (both; the original's rows ran at this batch for memory)" if r.get("reduced_batch") else "")
        if "error" in r:
            lines.append(f"- {head}: not measured ({r['error']})")
            continue
        lines.append(f"- {head}: train step ours {r['ours_s']:.3f} s, original {r['original_s']:.3f} s (medians); "
                     f"original / ours per round: median {r['ratio']:.1f}x (quartiles {r['ratio_q1']:.1f}x - "
                     f"{r['ratio_q3']:.1f}x, {r['rounds']} rounds)")
    return ("Lockstep (ours and the original code in two processes taking turns, each turn one untimed step and "
            f"then timed steps for at least {ROUND_SECONDS:g} s; steadier on a machine whose speed drifts):\n"
            + "\n".join(lines))


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


def fitting_batch(spec: dict[str, Any], log) -> int:
    """Batch size at which the plain path or the original code fits (CPU): predicted from a batch-2 run."""
    batch = spec["batch"]
    if spec["device"] != "cpu" or batch <= 2:
        return batch
    probe = run_child({**spec, "batch": 2, "repeats": 1})
    if "error" in probe:
        return 2
    predicted = probe["baseline_rss_gib"] + probe["peak_gib"] * batch / 2
    available = _mem_available_gib()
    log(f"  {spec['impl']} {spec['group']} P={spec['patch']}: batch 2 peak {probe['peak_rss_gib']:.2f} GiB -> batch "
        f"{batch} predicted {predicted:.1f} GiB, available {available:.1f} GiB")
    return batch if predicted < 0.8 * available else 2


def fmt_row(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"


def _ratios(r: dict[str, Any], ref: dict[str, Any] | None) -> list[str]:
    """Training speed-up of row ``r`` over ``ref`` and its peak memory (above the baseline) as a fraction of
    ``ref``'s; per image when they ran at different batch sizes."""
    if not ref or "error" in ref or "error" in r or ref is r:
        return ["", ""]
    scale = r["batch"] / ref["batch"]
    speed = f"{ref['train_step_s'] * scale / r['train_step_s']:.1f}x"
    ratio = f"{r['peak_gib'] / (ref['peak_gib'] * scale):.2f}"
    if "peak_rss_gib" in r and scale == 1:
        ratio += f" (RSS {r['peak_rss_gib'] / ref['peak_rss_gib']:.2f})"
    return [speed, ratio]


def param_note(ours: dict[str, Any] | None, orig: dict[str, Any]) -> str | None:
    """None when the original's parameters equal ours layer by layer, else what differs."""
    if not ours or "error" in ours or "error" in orig:
        return None
    a, b = ours.get("param_sections", {}), orig.get("param_sections", {})
    if a == b:
        return None
    diff = [f"{k}: ours {a.get(k, 0):,}, original {b.get(k, 0):,}" for k in sorted(set(a) | set(b), key=str)
            if a.get(k, 0) != b.get(k, 0)]
    return (f"{orig['group']} P={orig['patch']}: the original has {orig['params']:,} parameters, ours "
            f"{ours['params']:,}; they differ in " + "; ".join(diff))


def _by_key(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Rows by (device, group, patch, autocast, impl); the first of several "fast" rows (the kernel, before
    --chunked's) stands for ours."""
    by_key: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        by_key.setdefault((r["device"], r["group"], r["patch"], r.get("autocast"), r["impl"]), r)
    return by_key


def table(rows: list[dict[str, Any]], checkout: dict[str, Any] | None = None) -> str:
    """The markdown table: ratios against the plain transcription, and against the original code when measured."""
    with_original = any(r["impl"] == "original" for r in rows)
    head = ["device", "model", "batch", "params", "impl", "eval fwd (s)", "train step (s)", "peak mem (GiB)",
            "speed-up vs plain (train)", "memory vs plain"]
    if with_original:
        head += ["speed-up vs original (train)", "memory vs original"]
    by_key = _by_key(rows)
    body = []
    for r in rows:
        key = (r["device"], r["group"], r["patch"], r.get("autocast"))
        name = f"rotmnist {r['group']} P={r['patch']}" + (f" {r['autocast']}" if r.get("autocast") else "")
        impl = ({"kernel": "fast (fused CPU kernel)", "chunked": "fast (chunked torch)",
                 "triton": "fast (Triton kernel)"}.get(r.get("backend", ""), "fast") if r["impl"] == "fast" else
                "reference (original algorithm)" if r["impl"] == "plain" else original_label(checkout or {}))
        extra = [""] * (len(head) - 8)
        if "error" in r:
            body.append([r["device"], name, str(r["batch"]), "", impl, "error", " ".join(r["error"]), ""] + extra)
            continue
        mem = f"{r['peak_gib']:.2f}" + (f" (RSS {r['peak_rss_gib']:.2f})" if "peak_rss_gib" in r else "")
        params = f"{r['params']:,}"
        ours = by_key.get((*key, "fast")) or by_key.get((*key, "plain"))
        if r["impl"] == "original" and ours and "error" not in ours:
            params += " (= ours)" if param_note(ours, r) is None else f" (ours {ours['params']:,})"
        cells = _ratios(r, by_key.get((*key, "plain"))) if r["impl"] == "fast" else ["", ""]
        if with_original:
            cells += _ratios(r, by_key.get((*key, "original"))) if r["impl"] != "original" else ["", ""]
        batch = str(r["batch"]) + (" (memory)" if r.get("reduced_batch") else "")
        body.append([r["device"], name, batch, params, impl, f"{r['eval_forward_s']:.3f}", f"{r['train_step_s']:.3f}",
                     mem] + cells)
    widths = [max(len(x[i]) for x in body + [head]) for i in range(len(head))]
    lines = [fmt_row(head, widths), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(lines + [fmt_row(b, widths) for b in body])


def reference_text(rows: list[dict[str, Any]], checkout: dict[str, Any] | None) -> str:
    """What the ratios are against, which original rows are missing and why, and any parameter difference."""
    if checkout is None:
        return ("Reference: the plain transcription of the original computation in gevit_lib (impl=\"plain\"), not "
                "the original repository's code (give --original PATH, a checkout of the original repository, to "
                "measure that too).")
    lines = [f"Reference: the {original_label(checkout, short=False)}, built by its get_model and measured in this "
             "run, each row in its own process; \"plain\" is gevit_lib's transcription of the original computation."]
    by_key = _by_key(rows)
    for r in rows:
        if r["impl"] != "original":
            continue
        key = (r["device"], r["group"], r["patch"], r.get("autocast"))
        if "error" in r:
            lines.append(f"Missing: the original code on {r['device']} {r['group']} P={r['patch']}: "
                         + " ".join(r["error"]))
            continue
        ours = by_key.get((*key, "fast")) or by_key.get((*key, "plain"))
        note = param_note(ours, r)
        lines.append(f"Parameters {r['group']} P={r['patch']}: original {r['params']:,}, ours "
                     + (f"{ours['params']:,}" if ours and "error" not in ours else "not measured")
                     + (f" ({note})" if note else " (the same in every layer)" if ours and "error" not in ours
                        else ""))
    if any(r["impl"] == "original" and r["device"] == "cuda" for r in rows):
        lines.append("On CUDA the original's forward runs under its own fp16 autocast (torch.cuda.amp.autocast).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 2, p4 patch 5 only, 2 repeats")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (after one warm-up)")
    ap.add_argument("--configs", nargs="+", default=None, metavar="GROUP:PATCH",
                    help="only these configurations of the table, e.g. p4:5 (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--skip-plain", action="store_true", help="only the fast path (and the original with --original)")
    ap.add_argument("--chunked", action="store_true",
                    help="also time the fast path's chunked torch backend (the default is the fused kernel on CPU, "
                         "the Triton kernels on CUDA)")
    ap.add_argument("--original", type=str, default=None, metavar="PATH",
                    help="a checkout of the original repository (WouterBant/GEVit-DL2-Project): also measure its "
                         "code, and give every ratio against it")
    ap.add_argument("--lockstep", type=int, default=5, metavar="ROUNDS",
                    help="with --original: also step ours and the original in turn, ROUNDS turns each, and give the "
                         "median per-round ratio (default 5; 0: off)")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="run every process (ours and the original alike) with glibc's malloc keeping the memory it "
                         "frees (" + KEEP_MEMORY_TEXT + "): no step then "
                         "pays page faults for memory the previous step freed; peak RSS can grow. Linux (glibc) only")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--serve", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return
    if args.serve:
        serve(json.loads(args.serve))
        return
    if args.lockstep < 0:
        sys.exit(f"error: --lockstep {args.lockstep}: give a number of rounds >= 0")
    if args.keep_freed_memory and platform.libc_ver()[0] != "glibc":
        sys.exit("error: --keep-freed-memory sets glibc's malloc environment variables; this Python does not run on "
                 f"glibc ({platform.libc_ver()[0] or 'C library unknown'})")

    checkout = None
    if args.original is not None:
        try:
            checkout = original_checkout(args.original)
        except OriginalCheckoutError as err:
            sys.exit(f"error: {err}")
        probe = run_child(dict(group="p4", patch=5, batch=1, impl="original", original_src=checkout["src"],
                               device="cpu", repeats=1, import_only=True))
        if "error" in probe:
            sys.exit(f"error: --original {args.original}: " + " ".join(probe["error"]))

    import torch

    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else ["cpu", "cuda"]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    configs = [("p4", 5, 2)] if args.quick else CONFIGS
    if args.configs:
        known = {f"{g}:{p}" for g, p, _ in configs}
        if set(args.configs) - known:
            sys.exit(f"error: --configs {' '.join(sorted(set(args.configs) - known))}: not in the table; choose among "
                     f"{' '.join(sorted(known))}")
        configs = [c for c in configs if f"{c[0]}:{c[1]}" in args.configs]
    repeats = 2 if args.quick else args.repeats
    rows: list[dict[str, Any]] = []
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"load average before: {_load()}")
    if checkout:
        log(f"original: {original_label(checkout, short=False)}")
    for device in devices:
        variants = [(None, None)] if device == "cpu" else [(None, None), ("bf16", None), (None, 64), ("bf16", 64)]
        for group, patch, batch in configs:
            for amp, big_batch in variants:
                b = big_batch or batch
                impls = ["fast"] if args.skip_plain or (device == "cuda" and big_batch) else ["fast", "plain"]
                if args.chunked:
                    impls.insert(1, "fast-chunked")
                if checkout and amp is None and big_batch is None:
                    impls.append("original")
                for impl in impls:
                    spec = dict(group=group, patch=patch, batch=b, impl=impl, device=device, repeats=repeats,
                                threads=args.threads, autocast=amp, keep_memory=args.keep_freed_memory)
                    if impl == "fast-chunked":
                        spec.update(impl="fast", backend="chunked")
                    if impl == "original":
                        spec.update(original_src=checkout["src"])
                    if impl in ("plain", "original"):
                        b_fit = fitting_batch(spec, log)
                        if b_fit != b:
                            spec.update(batch=b_fit, reduced_batch=True)
                    log(f"{device} {group} P={patch} batch {spec['batch']} {impl} {amp or ''} ... (load {_load()})")
                    t0 = time.perf_counter()
                    result = run_child(spec)
                    log(f"  done in {time.perf_counter() - t0:.0f}s: " + (
                        f"train {result['train_step_s']:.3f}s, eval {result['eval_forward_s']:.3f}s, "
                        f"peak {result['peak_gib']:.2f} GiB, {result['params']:,} params" if "error" not in result
                        else f"error {result['error']}"))
                    rows.append(result)
    steps: list[dict[str, Any]] = []
    if checkout and args.lockstep:
        by_key = _by_key(rows)
        for r in rows:  # the original's CPU rows at full batch, beside ours
            ours = by_key.get((r["device"], r["group"], r["patch"], None, "fast"))
            if r["impl"] != "original" or r["device"] != "cpu" or "error" in r or not ours or "error" in ours:
                continue
            key = {k: r[k] for k in ("device", "group", "patch", "batch")}  # ours too at the original's batch
            log(f"lockstep {r['group']} P={r['patch']} batch {r['batch']}: {args.lockstep} rounds ... (load {_load()})")
            spec = dict(key, repeats=1, threads=args.threads, keep_memory=args.keep_freed_memory)
            try:
                fast, orig = lockstep([{**spec, "impl": "fast"}, {**spec, "impl": "original",
                                                                  "original_src": checkout["src"]}], args.lockstep)
            except RuntimeError as err:
                steps.append({**key, "error": str(err)})
                continue
            steps.append({**key, **lockstep_summary(fast, orig), "ours_all_s": fast, "original_all_s": orig,
                          "reduced_batch": bool(r.get("reduced_batch"))})
    text = table(rows, checkout)
    reference = reference_text(rows, checkout)
    if args.keep_freed_memory:
        reference += ("\nEvery process here (ours and the original alike) ran with glibc's malloc keeping the memory "
                      "it frees (" + KEEP_MEMORY_TEXT + "), not with the "
                      "default, which hands it back to the OS and faults it in again the next step.")
    usage = cpu_time_text(rows, checkout)
    print(reference + "\n\n" + text + ("\n\n" + usage if usage else "")
          + ("\n\n" + lockstep_text(steps) if steps else ""))
    sys.path.insert(0, str(REPO))
    from gevit_lib.benchmark import machine_description

    print(f"\nCPU: {machine_description('cpu')}, torch {torch.__version__}, load average after: {_load()}. "
          "Peak memory on CPU = peak RSS minus the process's peak before the first step (interpreter + torch + model); RSS in brackets. Times: median of "
          f"{repeats} runs after one warm-up. Memory ratios: peak above the baseline, this row over the reference.")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                "memory_method": "CPU: ru_maxrss of a fresh subprocess per row (peak_rss_gib), minus its peak before "
                                 "the first step (baseline_rss_gib) = peak_gib; CUDA: torch.cuda.max_memory_allocated",
                "reference": "impl='plain' = transcription of the original algorithm (materialised 9-D logits)"
                             + ("; impl='original' = " + original_label(checkout, short=False) if checkout else
                                "; the original repository's code was not measured"),
                "original_commit": checkout["commit"] if checkout else None,
                "original_modified": checkout["modified"] if checkout else None,
                "repeats": repeats, "keep_freed_memory": args.keep_freed_memory}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows, "lockstep": steps, "reference_text": reference,
                                        "table": text}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
