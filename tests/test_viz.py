"""Figures, GIFs and tables are written with their provenance sidecars."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v2 as imageio
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gevit_lib import viz  # noqa: E402


def test_save_figure_and_sidecar(tmp_path: Path) -> None:
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    path = viz.save_figure(fig, tmp_path / "line.png", data_source="regenerated", checkpoint="vit_mnist", seed=3)
    plt.close(fig)
    img = imageio.imread(path)
    assert img.shape[:2] == (100, 200) and len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 1
    meta = json.loads((tmp_path / "line.json").read_text())
    assert meta["files"] == ["line.png"] and meta["checkpoint"] == "vit_mnist" and meta["seed"] == 3


def test_save_gif_frames(tmp_path: Path) -> None:
    frames = [np.full((8, 10, 3), i * 40, np.uint8) for i in range(4)]
    path = viz.save_gif(frames, tmp_path / "anim.gif", duration_ms=50, profile="smoke")
    assert len(imageio.mimread(path)) == 4
    from PIL import Image

    with Image.open(path) as gif:
        assert gif.info["duration"] == 50 and gif.info["loop"] == 0
    assert json.loads((tmp_path / "anim.json").read_text())["frames"] == 4


def test_save_table_csv_md(tmp_path: Path) -> None:
    rows = [{"method": "mean", "val": 98.123}, {"method": "max", "val": 97.5}]
    csv_path, md_path = viz.save_table(rows, tmp_path / "t.csv", title="T", data_source="official")
    assert csv_path.read_text().splitlines() == ["method,val", "mean,98.123", "max,97.5"]
    md = md_path.read_text()
    assert "| mean | 98.12 |" in md and "data_source: official" in md
    assert json.loads((tmp_path / "t.json").read_text())["files"] == ["t.csv", "t.md"]


def test_save_mp4(tmp_path: Path) -> None:
    frames = [np.full((16, 16, 3), i * 20, np.uint8) for i in range(6)]
    path = viz.save_mp4(frames, tmp_path / "anim.mp4", fps=10)
    if path is None:
        return  # imageio-ffmpeg not installed: GIF only, as documented
    assert path.stat().st_size > 0 and len(imageio.mimread(path, format="FFMPEG")) == 6
