"""figures/README.md is the gallery of the committed figures: it shows every output the notebooks declare (or says
why one is not committed), every file it links exists, every committed figure and table has a provenance sidecar
and is in the gallery, and no committed text names a path of the machine that made it."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "figures"
GALLERY = FIGURES / "README.md"
NOT_COMMITTED = "not committed"  # a gallery line naming an output in `backticks` with this phrase explains its absence
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/[\w.+@-]+/[\w.+@-]+|\b[A-Za-z]:\\\\?[\w.+@-]+")


def declared_outputs() -> list[dict]:
    manifest = json.loads((REPO / "notebooks" / "manifest.json").read_text())
    return [out for book in manifest.values() for out in book["outputs"]]


def gallery_links(text: str) -> set[str]:
    """Local files the gallery shows or links (markdown links and images, html img), without anchors."""
    targets = re.findall(r"\]\(<?([^)>\s]+)>?\)", text) + re.findall(r"<img[^>]*\ssrc=\"([^\"]+)\"", text)
    return {t.split("#")[0] for t in targets if "://" not in t and not t.startswith("#")}


def explained_absences(text: str) -> set[str]:
    return {name for line in text.splitlines() if NOT_COMMITTED in line for name in re.findall(r"`([^`]+)`", line)}


def committed_files() -> list[str]:
    """Files of figures/ (and its subfolders, e.g. tables/) under version control, relative to figures/ (the
    folder's content when this is not a git checkout)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", "figures"], cwd=REPO, capture_output=True,
                                check=True).stdout.decode()
        names = [Path(p).relative_to("figures").as_posix() for p in listed.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        names = [p.relative_to(FIGURES).as_posix() for p in FIGURES.rglob("*") if p.is_file()]
    return sorted(n for n in names if n != "README.md" and not n.endswith((".json", ".json.tmp")))


def table_files(name: str) -> set[str]:
    stem = name.rsplit(".", 1)[0]
    return {f"{stem}.csv", f"{stem}.md"}


def test_every_declared_output_is_in_the_gallery() -> None:
    text = GALLERY.read_text()
    links, absent = gallery_links(text), explained_absences(text)
    missing = []
    for out in declared_outputs():
        names = table_files(out["file"]) if out["kind"] == "table" else {out["file"]}
        if not (names & links or out.get("optional") or out["file"] in absent):
            missing.append(out["file"])
    assert not missing, (f"figures/README.md neither shows nor links {missing} (declared in notebooks/manifest.json); "
                         f"add them, or name them in `backticks` on a line saying why they are {NOT_COMMITTED}")


def test_every_gallery_link_exists() -> None:
    missing = sorted(t for t in gallery_links(GALLERY.read_text()) if not (FIGURES / t).resolve().is_file())
    assert not missing, f"figures/README.md links files that are not in figures/: {missing}"


def test_every_committed_file_has_a_sidecar_and_is_in_the_gallery() -> None:
    described = set()
    for sidecar in FIGURES.rglob("*.json"):  # a sidecar names the files beside it
        folder = sidecar.parent.relative_to(FIGURES)
        described.update((folder / f).as_posix() for f in json.loads(sidecar.read_text()).get("files", []))
    files = committed_files()
    links = gallery_links(GALLERY.read_text())
    assert not [f for f in files if f not in described], \
        f"figures/ files without a provenance sidecar naming them: {[f for f in files if f not in described]}"
    assert not [f for f in files if f not in links], \
        f"figures/ files the gallery does not show or link: {[f for f in files if f not in links]}"


def test_no_committed_text_names_a_machine_path() -> None:
    found = {}
    for path in sorted(FIGURES.rglob("*")):
        if path.suffix in (".json", ".md", ".csv"):
            hits = ABSOLUTE_PATH.findall(path.read_text())
            if hits:
                found[path.relative_to(FIGURES).as_posix()] = hits[:3]
    assert not found, f"absolute paths in figures/ (name files relative to the repository or by URL): {found}"
