"""The main job's runner: finds numbered notebooks, refuses a filter that matches nothing, and reports a failing
or hanging notebook with its cell, exception type and message."""

from __future__ import annotations

from pathlib import Path

import pytest

from gevit_lib import reproduce


def _notebook(path: Path, *sources: str) -> Path:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("profile = 'quick'\ndevice = 'cpu'\nout_dir = '.'\nseed = 0\nrun_dir = '.'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def _run(folder: Path, **kw) -> int:
    return reproduce.run("smoke", "cpu", notebooks_dir=folder, out_dir=folder / "f", run_dir=folder / "r",
                         data_dir=None, seed=0, **kw)


def test_empty_notebook_folder_is_an_error(tmp_path: Path, capsys) -> None:
    assert _run(tmp_path) == 2
    assert "no numbered notebooks at all" in capsys.readouterr().err


def test_only_matching_nothing_is_an_error_naming_the_notebooks(tmp_path: Path, capsys) -> None:
    (tmp_path / "01_a.ipynb").write_text("{}")
    assert _run(tmp_path, only=["07"]) == 2
    err = capsys.readouterr().err
    assert "matching 07" in err and "01_a" in err


def test_find_notebooks_orders_and_filters(tmp_path: Path) -> None:
    for name in ("02_b.ipynb", "01_a.ipynb", "scratch.ipynb", "10_c.ipynb"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in reproduce.find_notebooks(tmp_path)] == ["01_a.ipynb", "02_b.ipynb", "10_c.ipynb"]
    assert [p.name for p in reproduce.find_notebooks(tmp_path, ["10"])] == ["10_c.ipynb"]


def test_failing_and_hanging_notebooks_are_reported_with_cell_and_message(tmp_path: Path, capsys) -> None:
    pytest.importorskip("papermill")
    _notebook(tmp_path / "01_fails.ipynb", "x = 1", "raise ValueError('the digit is missing')")
    _notebook(tmp_path / "02_hangs.ipynb", "import time\ntime.sleep(120)")
    _notebook(tmp_path / "03_fine.ipynb", "y = 2")
    assert _run(tmp_path, cell_timeout=5) == 1
    out = capsys.readouterr().out
    assert "01_fails.ipynb: FAILED: cell" in out and "ValueError: the digit is missing" in out
    hang = next(line for line in out.splitlines() if line.startswith("- 02_hangs.ipynb"))
    assert "FAILED" in hang and "imeout" in hang, hang
    assert "- 03_fine.ipynb: ok" in out


def test_full_profile_has_no_cell_timeout() -> None:
    assert reproduce.default_cell_timeout("full") is None and reproduce.default_cell_timeout("quick") == 3600
