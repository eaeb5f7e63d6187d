"""The main job: execute every numbered notebook with papermill and say where each figure and table went.

``python -m gevit_lib.reproduce --profile quick --device cpu`` (what ``make reproduce`` runs). Executed notebooks land
in ``runs/notebooks/``; figures and tables in ``figures/`` (each with a ``.json`` sidecar naming its provenance).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gevit_lib.profiles import PROFILES

REPO = Path(__file__).resolve().parents[1]


def find_notebooks(folder: Path, only: list[str] | None = None) -> list[Path]:
    """Numbered notebooks ``NN_*.ipynb`` in order, optionally filtered by name prefixes."""
    books = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if only:
        books = [p for p in books if any(p.stem.startswith(o) for o in only)]
    return books


def outputs_since(out_dir: Path, start: float) -> list[tuple[Path, dict]]:
    """Files written into ``out_dir`` after ``start`` that have a provenance sidecar, with that sidecar."""
    found = []
    for sidecar in sorted(p for p in out_dir.glob("*.json") if p.stat().st_mtime >= start):
        try:
            meta = json.loads(sidecar.read_text())
        except json.JSONDecodeError:
            continue
        found += [(out_dir / name, meta) for name in meta.get("files", [])]
    return found


def batch_parameters(book: Path, params: dict) -> dict:
    """``params`` plus ``interactive=False`` for notebooks that declare it: a batch run draws static figures and
    creates no widgets (executing widget cells headless can deadlock the notebook client, jupyter/nbclient#312)."""
    import papermill as pm

    declared = pm.inspect_notebook(str(book))
    return {**params, "interactive": False} if "interactive" in declared else dict(params)


def failure_message(exc: BaseException) -> str:
    """One line naming the failing cell, the exception type and its message (papermill's own str() can be empty)."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        where = f"cell {exc.exec_count}" if exc.exec_count is not None else f"cell index {exc.cell_index}"
        message = str(exc.evalue).strip().splitlines()
        return f"{where}: {exc.ename}: {message[-1] if message else '(no message)'}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else '(no message)'}"


def default_cell_timeout(profile: str) -> int | None:
    """Seconds one cell may run: an hour at smoke / quick, unlimited at tables (a CPU loop over the whole test
    split) and full (GPU trainings run for hours)."""
    return None if profile in ("tables", "full") else 3600


def run(profile: str, device: str, *, notebooks_dir: Path, out_dir: Path, run_dir: Path, data_dir: str | None,
        seed: int, only: list[str] | None = None, cell_timeout: int | None = None) -> int:
    """Execute the notebooks one at a time and say where their outputs went; exit status 0, 1 (one failed) or 2."""
    books = find_notebooks(notebooks_dir, only)
    if not books:
        known = ", ".join(p.stem for p in find_notebooks(notebooks_dir)) or "none"
        what = f"matching {' '.join(only)}" if only else "at all"
        print(f"error: no numbered notebooks {what} in {notebooks_dir} (notebooks there: {known})", file=sys.stderr)
        return 2
    import papermill as pm  # imported late: only the notebooks extra needs it

    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = []
    for book in books:
        start = time.time()
        target = run_dir / book.name
        params = {"profile": profile, "device": device, "out_dir": str(out_dir), "seed": seed,
                  "run_dir": str(run_dir.parent / book.stem)}
        if data_dir:
            params["data_dir"] = data_dir
        print(f"=== {book.name} (profile={profile}, device={device})", flush=True)
        try:
            pm.execute_notebook(str(book), str(target), parameters=batch_parameters(book, params),
                                cwd=str(notebooks_dir), progress_bar=False, log_output=False,
                                execution_timeout=cell_timeout)
            status = "ok"
        except Exception as exc:  # noqa: BLE001 - report every failing notebook, then fail at the end
            status = f"FAILED: {failure_message(exc)}"
        seconds = time.time() - start
        summary.append((book.name, status, seconds, outputs_since(out_dir, start), target))
        print(f"    {status} in {seconds:.0f} s -> {target}", flush=True)

    print("\nWhere everything went:")
    for name, status, seconds, outputs, target in summary:
        print(f"- {name}: {status}, {seconds:.0f} s, executed notebook {target}")
        for path, meta in outputs:
            src = ", ".join(f"{k}={meta[k]}" for k in ("data_source", "checkpoint") if meta.get(k))
            print(f"    {path}" + (f"  ({src})" if src else ""))
    return 1 if any(status != "ok" for _, status, *_ in summary) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="quick", choices=PROFILES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None, help="dataset folder (default: $GEVIT_DATA_DIR, then ./data)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "figures")
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "notebooks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="run only notebooks whose name starts with one of these")
    parser.add_argument("--cell-timeout", type=int, default=None,
                        help="seconds one cell may run before its notebook fails (0: no limit; default: an hour at "
                             "smoke and quick, no limit at tables and full)")
    args = parser.parse_args(argv)
    timeout = default_cell_timeout(args.profile) if args.cell_timeout is None else (args.cell_timeout or None)
    return run(args.profile, args.device, notebooks_dir=REPO / "notebooks", out_dir=args.out_dir.resolve(),
               run_dir=args.run_dir.resolve(), data_dir=args.data_dir, seed=args.seed, only=args.only,
               cell_timeout=timeout)


if __name__ == "__main__":
    sys.exit(main())
