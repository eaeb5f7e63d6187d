"""The main job's runner finds numbered notebooks and reports an empty folder honestly."""

from __future__ import annotations

from pathlib import Path

from gevit_lib import reproduce


def test_empty_notebook_folder_says_so(tmp_path: Path, capsys) -> None:
    rc = reproduce.run("smoke", "cpu", notebooks_dir=tmp_path, out_dir=tmp_path / "f", run_dir=tmp_path / "r",
                       data_dir=None, seed=0)
    assert rc == 0 and "nothing to run" in capsys.readouterr().out


def test_find_notebooks_orders_and_filters(tmp_path: Path) -> None:
    for name in ("02_b.ipynb", "01_a.ipynb", "scratch.ipynb", "10_c.ipynb"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in reproduce.find_notebooks(tmp_path)] == ["01_a.ipynb", "02_b.ipynb", "10_c.ipynb"]
    assert [p.name for p in reproduce.find_notebooks(tmp_path, ["10"])] == ["10_c.ipynb"]
