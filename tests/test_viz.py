"""Figures, GIFs and tables are written with their provenance sidecars."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v2 as imageio
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from gevit_lib import viz  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


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


def test_new_figure_has_its_pixel_size(tmp_path: Path) -> None:
    """Figures of the notebooks keep a fixed pixel size (figsize x dpi, no tight bounding box), saved and rendered."""
    for size, dpi in (((600, 420), 60), ((792, 360), 72), ((960, 600), 80), ((1200, 500), 100)):
        fig = viz.new_figure(size, dpi)
        ax = fig.subplots()
        ax.imshow(np.arange(25.0).reshape(5, 5))
        assert viz.figure_to_array(fig, dpi=dpi).shape == (size[1], size[0], 3)
        path = viz.save_figure(fig, tmp_path / f"f{dpi}.png", dpi=fig.dpi, profile="smoke", extra_number=1.5)
        assert imageio.imread(path).shape[1::-1] == size
        assert json.loads(path.with_suffix(".json").read_text())["extra_number"] == 1.5


def test_plot_group_panels(tmp_path: Path) -> None:
    """One panel per group element in two rows, titled g_i (Figs. 3 and 4 of notebook 2)."""
    import torch

    from gevit_lib.nn.positional import relative_coordinates

    grids = relative_coordinates("p4m", 5)
    fig = viz.plot_group_panels(grids[..., 0], "Row embedding indices", (792, 360), vmin=-1, vmax=1, colorbar=True)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [f"$g_{{{i}}}$" for i in range(8)] and len(fig.axes) == 9  # 8 panels + the colour bar
    path = viz.save_figure(fig, tmp_path / "grids.png", dpi=72, profile="smoke")
    img = imageio.imread(path)
    assert img.shape[1::-1] == (792, 360) and len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 10
    single = viz.plot_group_panels(torch.zeros(1, 5, 5), "one", (100, 100))
    assert len(single.axes) == 1


def test_no_machine_path_survives_in_provenance(tmp_path: Path) -> None:
    """Sidecars and table footers are committed: a file outside the repository is named by its name and sha256, one
    inside it relative to the repository, a folder by its name; texts keep their words."""
    import hashlib

    weights = tmp_path / "best.pt"
    weights.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    inside = REPO / "gevit_lib" / "viz.py"
    meta = dict(checkpoint=f"vit_rotmnist architecture, weights {weights}", data_dir=str(tmp_path),
                post_numbers=tmp_path / "reference" / "results", out_dir=str(inside.parent),
                inputs={"files": [str(inside)], "note": "3 /4 of the digits, train/val split"})
    fig, ax = plt.subplots(figsize=(2, 1))
    viz.save_figure(fig, tmp_path / "fig.png", **meta)
    plt.close(fig)
    rows = [{"model": "vit", "checkpoint": str(weights)}]
    viz.save_table(rows, tmp_path / "t.csv", **meta)
    for name in ("fig.json", "t.json", "t.md", "t.csv"):
        text = (tmp_path / name).read_text()
        assert str(tmp_path) not in text and str(REPO) not in text, (name, text)
    sidecar = json.loads((tmp_path / "fig.json").read_text())
    assert sidecar["checkpoint"] == f"vit_rotmnist architecture, weights best.pt (sha256 {digest})"
    assert sidecar["data_dir"] == tmp_path.name and sidecar["post_numbers"] == "results"
    assert sidecar["out_dir"] == "gevit_lib" and sidecar["inputs"]["files"] == ["gevit_lib/viz.py"]
    assert sidecar["inputs"]["note"] == "3 /4 of the digits, train/val split"
    assert f"best.pt (sha256 {digest})" in (tmp_path / "t.csv").read_text()


def test_knobs_static_fallback_and_widgets() -> None:
    calls = []

    def draw(g: int = 1, grid: str = "b") -> None:
        calls.append((g, grid))

    assert viz.knobs(draw, False, g=(0, 7), grid=["a", "b"]) is None and calls == [(1, "b")]  # the batch run's view
    with pytest.raises(TypeError, match="needs a default for \\['g'\\]"):
        viz.knobs(lambda g: None, False, g=(0, 7))
    ipywidgets = pytest.importorskip("ipywidgets")
    knob = viz.knobs(draw, True, g=(0, 7), grid=["a", "b"])
    assert isinstance(knob, ipywidgets.interactive) and calls[-1] == (1, "b")  # starts at the defaults
    slider = knob.kwargs_widgets[0]
    assert not slider.continuous_update
    slider.value = 5
    assert calls[-1] == (5, "b")
