"""Notebooks: .py/.ipynb pairs in sync, committed without outputs, a papermill `parameters` cell, and every
notebook executed in the smoke profile, checking the outputs its manifest entry declares."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gevit_lib.reproduce import batch_parameters

jupytext = pytest.importorskip("jupytext")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
MANIFEST = json.loads((NOTEBOOKS / "manifest.json").read_text()) if (NOTEBOOKS / "manifest.json").exists() else {}
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
REQUIRED_PARAMETERS = ("profile", "device", "data_dir", "out_dir", "seed")
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _cells(nb) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", ()))) for c in nb.cells]


def test_every_notebook_is_in_the_manifest() -> None:
    assert sorted(p.stem for p in SOURCES) == sorted(MANIFEST)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_pair_in_sync_and_outputs_stripped(source: Path) -> None:
    ipynb = source.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} missing: run `make notebooks`"
    from_py, from_ipynb = jupytext.read(source), jupytext.read(ipynb)
    assert _cells(from_py) == _cells(from_ipynb), f"{source.name} and {ipynb.name} differ: run `make notebooks`"
    raw = json.loads(ipynb.read_text())
    for cell in raw["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, f"{ipynb.name} has outputs"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_first_code_cell_is_parameters(source: Path) -> None:
    nb = jupytext.read(source)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", []), f"{source.name}: first code cell must be tagged parameters"
    for name in REQUIRED_PARAMETERS:
        assert f"{name} =" in first.source, f"{source.name}: parameter {name!r} missing"


def _check_cost_columns(name: str, rows: list[dict]) -> None:
    """The post-hoc tables' cost: one backbone pass for the base model and canonicalization, the group's order for a
    wrapper of transformed copies; a measured, positive images/s, the same for a method and group in every mode."""
    from gevit_lib.groups import get_group

    speeds: dict[tuple[str, str], str] = {}
    for r in rows:
        expected = 1 if r["method"] in ("base", "canonical") else len(get_group(r["group"]))
        assert int(r["passes"]) == expected, f"{name}: {r['method']} {r['group']} has {r['passes']} passes"
        assert float(r["img_s"]) > 0, f"{name}: {r['method']} {r['group']} images/s {r['img_s']}"
        assert speeds.setdefault((r["method"], r["group"]), r["img_s"]) == r["img_s"], f"{name}: {r}"
    learned = set() if "pcam" in name else {"learned_score"}  # PCam: no learned aggregators, as in the post
    assert {r["method"] for r in rows} >= {"base", "canonical", "mean"} | learned, f"{name}: rows missing"


def _check_output(path: Path, spec: dict) -> None:
    assert path.exists() and path.stat().st_size > 0, f"{path.name} was not written"
    kind = spec["kind"]
    if kind in ("figure", "gif"):
        import imageio.v2 as imageio
        import numpy as np

        frames = imageio.mimread(path) if kind == "gif" else [imageio.imread(path)]
        first = np.asarray(frames[0])
        if "size" in spec:
            assert [first.shape[1], first.shape[0]] == spec["size"], f"{path.name}: size {first.shape[1::-1]}"
        if "frames" in spec:
            assert len(frames) >= spec["frames"], f"{path.name}: {len(frames)} frames"
        colours = np.unique(first.reshape(-1, first.shape[-1] if first.ndim == 3 else 1), axis=0)
        assert len(colours) > 1, f"{path.name} is a single colour"
    elif kind == "table":
        import csv

        rows = list(csv.DictReader(path.open()))
        assert len(rows) == spec["rows"], f"{path.name}: {len(rows)} rows, expected {spec['rows']}"
        missing = [c for c in spec.get("columns", []) if c not in (rows[0] if rows else {})]
        assert not missing, f"{path.name}: columns {missing} missing"
        if "passes" in spec.get("columns", []):
            _check_cost_columns(path.name, rows)
    sidecar = path.with_suffix(".json")
    assert sidecar.exists(), f"{path.name} has no provenance sidecar"
    meta = json.loads(sidecar.read_text())
    assert meta.get("profile") == "smoke" and "data_source" in meta and "checkpoint" in meta, meta


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_profile(source: Path, tmp_path: Path) -> None:
    papermill = pytest.importorskip("papermill")
    out_dir = tmp_path / "figures"
    params = {"profile": "smoke", "device": "cpu", "out_dir": str(out_dir), "seed": 0,
              "run_dir": str(tmp_path / "run")}
    if os.environ.get("GEVIT_DATA_DIR"):
        params["data_dir"] = os.environ["GEVIT_DATA_DIR"]
    book, executed = source.with_suffix(".ipynb"), tmp_path / source.with_suffix(".ipynb").name
    # A cell that hangs fails here after 15 min instead of eating the whole CI budget.
    papermill.execute_notebook(str(book), str(executed), parameters=batch_parameters(book, params),
                               cwd=str(NOTEBOOKS), progress_bar=False, execution_timeout=900)
    widgets = [i for i, cell in enumerate(json.loads(executed.read_text())["cells"])
               for out in cell.get("outputs", []) if WIDGET_MIME in out.get("data", {})]
    assert not widgets, f"a batch run created widgets (cells {widgets}); gate them on `interactive`"
    for spec in MANIFEST[source.stem]["outputs"]:
        if spec.get("optional") and not (out_dir / spec["file"]).exists():
            continue
        _check_output(out_dir / spec["file"], spec)


# Notebooks with knobs (ipywidgets) a reader turns; each declares `interactive` and has a static fallback.
KNOB_SOURCES = [p for p in SOURCES if p.stem[:2] in ("01", "02", "03", "04", "05", "06", "07", "08")]
# The notebooks whose knobs are turned without a browser below: a cheap one of each kind (GE-ViT maps, sweep,
# post-hoc predictions).
TURNED = ("03", "05", "08")
# Runs first in the kernel: the knobs display into the cell instead of into their ipywidgets.Output, whose routing
# through nbclient can hang a headless run under load (a knob's cell then waited for its timeout here).
UNROUTE_OUTPUT = """
import ipywidgets
ipywidgets.Output.__enter__ = lambda self: self
ipywidgets.Output.__exit__ = lambda self, *exc: None
"""
# Runs after the notebook in the kernel: turn every control of `knob` to another value and check that the knob
# displays a new image each time (a broken callback displays nothing: ipywidgets prints its traceback instead).
TURN_KNOBS = '''
import ipywidgets

shown, publisher = [], get_ipython().display_pub
publish = publisher.publish
publisher.publish = lambda data, *args, **kwargs: (shown.append(data), publish(data, *args, **kwargs))[-1]
assert isinstance(knob, ipywidgets.interactive), f"`knob` is {type(knob).__name__}, not an ipywidgets.interactive"
previous = None
for control in knob.kwargs_widgets:
    if hasattr(control, "index"):  # a dropdown: the next option
        change = dict(index=(control.index + 1) % len(control.options))
    else:  # a slider: its other end
        change = dict(value=control.max if control.value != control.max else control.min)
    shown.clear()
    for name, value in change.items():
        setattr(control, name, value)
    images = [data.get("image/png") for data in shown]
    assert images and all(images), f"turning {control.description!r} displayed {len(images)} outputs, no image"
    assert images[-1] != previous, f"turning {control.description!r} did not change the image"
    previous = images[-1]
print("turned:", [c.description for c in knob.kwargs_widgets])
'''


@pytest.mark.parametrize("source", KNOB_SOURCES, ids=lambda p: p.stem)
def test_notebook_declares_interactive(source: Path) -> None:
    first = next(c for c in jupytext.read(source).cells if c.cell_type == "code")
    assert "interactive =" in first.source, f"{source.name}: parameter 'interactive' (its knobs) missing"
    text = source.read_text()
    assert any(k in text for k in ("knobs(", "posthoc_knob(", "ipywidgets")), f"{source.name} has no knob"


@pytest.mark.parametrize("source", [p for p in KNOB_SOURCES if p.stem[:2] in TURNED], ids=lambda p: p.stem)
def test_knobs_respond_without_a_browser(source: Path, tmp_path: Path) -> None:
    papermill = pytest.importorskip("papermill")
    pytest.importorskip("ipywidgets")
    import nbformat

    book = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    book.cells.insert(0, nbformat.v4.new_code_cell(UNROUTE_OUTPUT))
    book.cells.append(nbformat.v4.new_code_cell(TURN_KNOBS))
    turned = tmp_path / source.with_suffix(".ipynb").name
    nbformat.write(book, turned)
    params = {"profile": "smoke", "device": "cpu", "out_dir": str(tmp_path / "figures"), "seed": 0,
              "run_dir": str(tmp_path / "run"), "interactive": True}
    if os.environ.get("GEVIT_DATA_DIR"):
        params["data_dir"] = os.environ["GEVIT_DATA_DIR"]
    executed = papermill.execute_notebook(str(turned), str(tmp_path / "executed.ipynb"), parameters=params,
                                          cwd=str(NOTEBOOKS), progress_bar=False, execution_timeout=300)
    widgets = [out for cell in executed.cells for out in cell.get("outputs", []) if WIDGET_MIME in out.get("data", {})]
    assert widgets, "interactive=True displayed no widget"
