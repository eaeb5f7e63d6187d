"""Writing figures, animations and tables with a provenance sidecar (``<name>.json``) beside each.

The sidecar names the files it describes, the data source, checkpoint, profile and seed that produced them, and
the library version, so every figure and table in ``figures/`` says where its numbers came from.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .files import atomic_write

__all__ = ["write_sidecar", "save_figure", "save_gif", "save_mp4", "save_table", "figure_to_array", "markdown_table"]


def write_sidecar(path: str | os.PathLike[str], files: Sequence[str | os.PathLike[str]], **meta: Any) -> Path:
    """Write ``<stem>.json`` next to ``path`` describing ``files`` (names relative to its folder) and ``meta``."""
    path = Path(path)
    record = {
        "files": [Path(f).name for f in files],
        **{k: v for k, v in meta.items() if v is not None},
        "library_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    sidecar = path.with_suffix(".json")
    with atomic_write(sidecar) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str))
    return sidecar


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = 100, **meta: Any) -> Path:
    """Save a matplotlib figure (PNG by the suffix) and its sidecar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
             loop: int = 0, sidecar: bool = True, **meta: Any) -> Path:
    """Write RGB frames as an animated GIF (infinite loop by default) and its sidecar."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        imageio.mimsave(tmp, list(frames), format="GIF", duration=duration_ms / 1000.0, loop=loop)
    if sidecar:
        write_sidecar(path, [path], frames=len(frames), frame_ms=duration_ms, **meta)
    return path


def save_mp4(frames: Sequence[np.ndarray], path: str | os.PathLike[str], *, fps: int = 60) -> Path | None:
    """Write frames as an H.264 mp4 when imageio can reach ffmpeg (imageio-ffmpeg); return None otherwise."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  # the bundled ffmpeg binary
    except ImportError:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                    pixelformat="yuv420p", macro_block_size=2)
        for frame in frames:
            writer.append_data(frame)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns or (rows[0].keys() if rows else []))
    csv_path, md_path = path.with_suffix(".csv"), path.with_suffix(".md")
    with atomic_write(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    provenance = ", ".join(f"{k}: {v}" for k, v in meta.items() if v is not None)
    text = (f"### {title}\n\n" if title else "") + markdown_table(rows, columns, floatfmt)
    if provenance:
        text += f"\n_{provenance}_\n"
    with atomic_write(md_path) as tmp:
        tmp.write_text(text)
    write_sidecar(path.with_suffix(".json"), [csv_path, md_path], rows=len(rows), **meta)
    return csv_path, md_path
