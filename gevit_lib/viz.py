"""Figures, animations and tables, each with a provenance sidecar (``<name>.json``: the files, data source,
checkpoint, profile, seed and library version); the renderers several notebooks share; :func:`knobs`, the widgets a
reader turns. Metadata never names a path of the machine that made it (:func:`portable`). Fixed-size figures come
from :func:`new_figure`; ``save_figure(fig, path, dpi=fig.dpi, ...)`` keeps that size.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .files import atomic_write, file_digest

__all__ = ["portable", "portable_path", "write_sidecar", "save_figure", "save_gif", "save_mp4", "save_table",
           "figure_to_array", "markdown_table", "plot_accuracy_vs_time", "plot_accuracy_vs_cost",
           "new_figure", "plot_group_panels", "knobs"]


REPO = Path(__file__).resolve().parents[1]
_ABS_PATH = re.compile(r"(?<![\w.:/~-])(/[\w.+@-]+)+/?")  # a POSIX absolute path inside a longer text


def portable_path(path: str | os.PathLike[str]) -> str:
    """``path`` as it may be committed: relative paths unchanged, a path inside the repository relative to it, any
    other file as ``name (sha256 ...)``, any other folder by its name."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        return str(path)
    p = p.resolve()
    if p.is_relative_to(REPO):
        return p.relative_to(REPO).as_posix() or "."
    return f"{p.name} (sha256 {file_digest(p)})" if p.is_file() else p.name


def portable(value: Any) -> Any:
    """``value`` (str, path, or nested dicts / lists of them) with every absolute path made :func:`portable_path`."""
    if isinstance(value, os.PathLike):
        return portable_path(value)
    if isinstance(value, str):
        if Path(value).is_absolute() and not any(c.isspace() for c in value):
            return portable_path(value)
        # inside a text only paths with two or more parts ("/a/b"), so that "3 /4" or "/s" stay as written
        return _ABS_PATH.sub(lambda m: portable_path(m[0]) if m[0].rstrip("/").count("/") > 1 else m[0], value)
    if isinstance(value, Mapping):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    return value


def write_sidecar(path: str | os.PathLike[str], files: Sequence[str | os.PathLike[str]], **meta: Any) -> Path:
    """Write ``<stem>.json`` next to ``path`` describing ``files`` (names relative to its folder) and ``meta``."""
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    record = {"files": [Path(f).name for f in files], **{k: portable(v) for k, v in meta.items() if v is not None},
              "library_version": __version__, "created": created}
    sidecar = Path(path).with_suffix(".json")
    with atomic_write(sidecar) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str))
    return sidecar


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = 100, **meta: Any) -> Path:
    """Save a matplotlib figure (PNG by the suffix) and its sidecar."""
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    write_sidecar(path, [path], **meta)
    return path


def figure_to_array(fig: Any, dpi: int = 100) -> np.ndarray:
    """Render a matplotlib figure to an RGB uint8 array [H, W, 3]."""
    fig.set_dpi(dpi)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_gif(frames: Sequence[np.ndarray], path: str | os.PathLike[str], *, duration_ms: float = 100,
             sidecar: bool = True, **meta: Any) -> Path:
    """Looping animated GIF of RGB frames (each shown ``duration_ms``) and its sidecar."""
    from PIL import Image

    path = Path(path)
    images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    if not images:
        raise ValueError(f"no frames to write to {path}")
    with atomic_write(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(round(duration_ms)),
                       loop=0, disposal=1)
    if sidecar:
        write_sidecar(path, [path], frames=len(images), frame_ms=duration_ms, **meta)
    return path


def save_mp4(frames: Sequence[np.ndarray], path: str | os.PathLike[str], *, fps: int = 60) -> Path | None:
    """H.264 mp4 (yuv420p) of RGB frames through imageio-ffmpeg's bundled ffmpeg; None when it is not installed."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    path = Path(path)
    h, w = frames[0].shape[:2]
    with atomic_write(path) as tmp:  # the temporary name has no .mp4 suffix: name the container explicitly
        writer = imageio_ffmpeg.write_frames(str(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                             macro_block_size=2, output_params=["-f", "mp4"])
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame[..., :3], dtype=np.uint8))
        writer.close()
    return path


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                   floatfmt: str = ".2f") -> str:
    """A GitHub markdown table from a list of dicts."""
    columns = list(columns or (rows[0].keys() if rows else []))

    def fmt(v: Any) -> str:
        return format(v, floatfmt) if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def save_table(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *,
               columns: Sequence[str] | None = None, title: str | None = None, floatfmt: str = ".2f",
               **meta: Any) -> tuple[Path, Path]:
    """Write ``rows`` as ``<stem>.csv`` and ``<stem>.md`` (with a provenance line) plus the sidecar."""
    path = Path(path).with_suffix("")
    columns = list(columns or (rows[0].keys() if rows else []))
    rows = [portable(dict(r)) for r in rows]  # a checkpoint column names files the way the sidecar does
    csv_path, md_path = path.with_suffix(".csv"), path.with_suffix(".md")
    with atomic_write(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    provenance = ", ".join(f"{k}: {portable(v)}" for k, v in meta.items() if v is not None)
    text = (f"### {title}\n\n" if title else "") + markdown_table(rows, columns, floatfmt)
    if provenance:
        text += f"\n_{provenance}_\n"
    with atomic_write(md_path) as tmp:
        tmp.write_text(text)
    write_sidecar(path.with_suffix(".json"), [csv_path, md_path], rows=len(rows), **meta)
    return csv_path, md_path


def plot_accuracy_vs_time(points: Sequence[Mapping[str, Any]], *, title: str,
                          reference: tuple[str, float] | None = None) -> Any:
    """Test accuracy against epoch time, a point per row (``epoch_s``, ``test_acc``, ``n_train``, ``patch_size``);
    ``reference``: (name, epoch seconds) drawn as a dashed line on a log axis."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    for i, r in enumerate(points):
        ax.scatter(r["epoch_s"], r["test_acc"], s=100, alpha=0.7, edgecolors="white",
                   color=plt.get_cmap("tab10")(i % 10), label=f"patch {r['patch_size']}")
        ax.annotate(str(r["patch_size"]), (r["epoch_s"], r["test_acc"]), textcoords="offset points", xytext=(10, 8))
    if reference is not None:
        label = f"{reference[0]} (epoch time from its measured throughput)"
        ax.axvline(reference[1], ls="--", color="grey", label=label)
        ax.set_xscale("log")
    ax.set_title(title, fontweight="bold", fontsize=14)
    n_train = sorted({r["n_train"] for r in points})
    on = f" on {n_train[0]:,} training images" if len(n_train) == 1 else ""
    ax.set_xlabel(f"Epoch time{on} (s, training + validation pass)")
    ax.set_ylabel("Test accuracy (%)")
    ax.legend(title="Patch size", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)
    ax.grid(True, ls="--", alpha=0.5)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def plot_accuracy_vs_cost(rows: Sequence[Mapping[str, Any]], *, title: str) -> Any:
    """Test accuracy against images/s, a panel per finetuning ``mode`` of the post-hoc table ``rows``: colour the
    method, shape the group, filled for the post's methods, hollow for ours."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    shapes = dict(zip(dict.fromkeys(r["group"] for r in rows), "oDs^v<>phX"))
    fig = new_figure((1200, 520), dpi=100)
    axes = fig.subplots(1, len(modes), sharey=True, squeeze=False)[0]
    for ax, mode in zip(axes, modes):
        for r in (r for r in rows if r["mode"] == mode):
            colour = f"C{methods.index(r['method']) % 10}"
            ax.scatter(r["img_s"], r["test_acc"], s=60, marker=shapes[r["group"]], edgecolors=colour,
                       facecolors=colour if r["in_post"] else "none", linewidths=1.5)
            ax.annotate(f"{r['method']} {r['group']} ({r['passes']}x)".replace(" - ", " "),
                        (r["img_s"], r["test_acc"]), textcoords="offset points", xytext=(4, 3), fontsize=6)
        ax.set_xscale("log")
        ax.set_title(f"finetune: {mode}", fontsize=10)
        ax.set_xlabel("images/s (measured, log scale; in parentheses: backbone passes per image)")
        ax.grid(True, ls="--", alpha=0.5)
    axes[0].set_ylabel("test accuracy (%)")
    fig.suptitle(f"{title} (filled: the post's methods; hollow: ours)", fontsize=11)
    fig.tight_layout()
    return fig


def new_figure(size_px: tuple[int, int], dpi: int) -> Any:
    """A white matplotlib figure of exactly ``size_px`` = (width, height) pixels at ``dpi`` on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w, h = size_px
    fig = Figure(figsize=(w / dpi, h / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def plot_group_panels(values: Any, title: str, size_px: tuple[int, int], dpi: int = 72, vmin: float | None = None,
                      vmax: float | None = None, colorbar: bool = False) -> Any:
    """``values`` [G, H, W] as one panel per group element, titled g_i, in two rows (and a colour bar)."""
    g = values.shape[0]
    cols = math.ceil(g / 2) if g > 1 else 1
    fig = new_figure(size_px, dpi)
    axes = fig.subplots(math.ceil(g / cols), cols, squeeze=False).ravel()
    im = None
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i < g:
            im = ax.imshow(values[i].cpu().numpy(), cmap="viridis", vmin=vmin, vmax=vmax)
            ax.set_title(f"$g_{{{i}}}$")
    if colorbar and im is not None:
        fig.colorbar(im, ax=axes[g - 1])
    fig.suptitle(title)
    return fig


def knobs(draw: Callable[..., Any], interactive: bool, **controls: Any) -> Any:
    """Display ``ipywidgets.interactive(draw, **controls)`` (``interact`` abbreviations), each control starting at
    ``draw``'s default, and return it; for batch runs (``interactive`` False) or without ipywidgets, ``draw()``."""
    import inspect

    from IPython.display import display

    params = inspect.signature(draw).parameters
    missing = [k for k in controls if k not in params or params[k].default is inspect.Parameter.empty]
    if missing:
        raise TypeError(f"knobs: {draw.__name__}() needs a default for {missing} (what a batch run draws)")
    if interactive:
        try:
            import ipywidgets
        except ImportError:
            print("ipywidgets is not installed: no knobs, the default view instead (pip install ipywidgets)")
        else:
            knob = ipywidgets.interactive(draw, **controls)
            for control in knob.children[:-1]:  # redraw when a slider is released, not at every step of a drag
                if hasattr(control, "continuous_update"):
                    control.continuous_update = False
            display(knob)
            return knob
    draw()
    return None
