"""Post-hoc experiments: profiles, end-to-end runs on generated data (tiny models), PCam offline messages, and
(slow) the reproduction of the post's experiment-1 ordering with the published checkpoint on real data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from gevit_lib.experiments import posthoc as exp
from gevit_lib.files import MissingFileError
from gevit_lib.models.vit import VisionTransformer
from gevit_lib.posthoc import METHODS, PostHoc
from gevit_lib.profiles import PROFILES, check_profile, posthoc_profile


def tiny_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(embed_dim=16, hidden_dim=32, num_heads=2, num_layers=1, patch_size=7, num_channels=1,
                             num_patches=16, num_classes=10, dropout=0.1).eval()


@pytest.fixture
def synthetic_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from gevit_lib.testing import make_synthetic_mnist

    monkeypatch.setenv("GEVIT_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "data"
    make_synthetic_mnist(root, n_train=600, n_test=100)
    return root


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_profiles() -> None:
    assert PROFILES == ("smoke", "quick", "full")
    with pytest.raises(ValueError, match="unknown profile"):
        check_profile("medium")
    with pytest.raises(ValueError, match="unknown post-hoc experiment"):
        posthoc_profile("cifar", "quick")
    full = posthoc_profile("rotmnist", "full")  # the post's settings (SPEC 5.4)
    assert (full.epochs, full.epochs_attention, full.lr, full.batch_size, full.optimizer) == (25, 60, 5e-4, 128,
                                                                                               "adam")
    assert (full.group, full.learned_group, full.tta_group, full.n_test) == ("C16", "D4", "D4", None)
    pcam = posthoc_profile("pcam", "full")
    assert (pcam.optimizer, pcam.lr, pcam.nesterov, pcam.epochs, pcam.group) == ("sgd", 1e-3, True, 3, "D4")
    for name in ("smoke", "quick"):
        small = posthoc_profile("rotmnist", name)
        assert small.n_test is not None and small.n_test <= 2000 and small.epochs <= 2


def test_augmentations() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 28, 28)
    torch.testing.assert_close(exp.random_rotation(0.0)(x, g), x)
    background = torch.full((3, 1, 28, 28), exp.MNIST_BACKGROUND)
    torch.testing.assert_close(exp.random_rotation(180.0, fill=exp.MNIST_BACKGROUND)(background, g), background)
    out = exp.random_d4()(x, g)
    for i in range(6):
        candidates = [torch.rot90(x[i], k, (-2, -1)) for k in range(4)]
        candidates += [torch.flip(c, (-1,)) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates)
    a = exp.random_rotation(180.0, flips=True)(x, torch.Generator().manual_seed(1))
    b = exp.random_rotation(180.0, flips=True)(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, x)


def test_rotmnist_end_to_end(synthetic_root: Path, tmp_path: Path) -> None:
    model = tiny_vit()
    out = tmp_path / "run"
    result = exp.rotmnist("smoke", checkpoint=model, root=synthetic_root, out_dir=out, progress=False,
                          modes=("none", "head", "model"))
    rows = read_rows(out / "results.csv")
    assert len(rows) == 3 * (1 + len(METHODS))
    for column in ("val_acc", "test_acc", "data_source", "checkpoint", "profile", "seed", "group", "mode"):
        assert column in rows[0]
    assert {r["profile"] for r in rows} == {"smoke"} and {r["seed"] for r in rows} == {"42"}
    assert all("regenerated" in r["data_source"] for r in rows)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["rotated_mnist_source"] == "regenerated" and meta["checkpoint"].startswith("model object")
    md = (out / "results.md").read_text()
    assert all(m.post_name in md for m in METHODS.values()) and "regenerated" in md
    by = {(r["mode"], r["method"]): r for r in rows}
    assert by[("none", "mean")]["trained"] == "False" and by[("none", "learned_score")]["trained"] == "True"
    assert by[("head", "mean")]["trained"] == "True"
    assert by[("none", "mean")]["group"] == "C4" and by[("none", "tta")]["group"] == "D4"
    assert len({by[(m, "base")]["test_acc"] for m in ("none", "head", "model")}) == 1
    # the shared-embedding evaluation equals running the wrapper on the images
    from gevit_lib.data import rotated_mnist
    from gevit_lib.train import evaluate

    test = rotated_mnist("test", root=synthetic_root)
    x, y = test.tensors()
    idx = exp.evenly_spaced(len(y), posthoc_profile("rotmnist", "smoke").n_test)
    for method in ("mean", "most_certain"):
        direct = evaluate(PostHoc(model, method, "C4"), (x[idx], y[idx]))["accuracy"]
        assert abs(100 * direct - result.accuracy(method, "none")) < 1e-9
    assert result.accuracy("base") == float(by[("none", "base")]["test_acc"])


def test_resume_reuses_finished_fits(synthetic_root: Path, tmp_path: Path) -> None:
    kwargs = dict(root=synthetic_root, out_dir=tmp_path / "run", progress=False, methods=("learned_score",),
                  modes=("none",))
    first = exp.low_data("smoke", checkpoint=tiny_vit(), **kwargs)
    with pytest.raises(FileExistsError):
        exp.low_data("smoke", checkpoint=tiny_vit(), **kwargs)
    again = exp.low_data("smoke", checkpoint=tiny_vit(), resume=True, **kwargs)
    assert again.accuracy("learned_score") == first.accuracy("learned_score")


def test_train_backbone_path(synthetic_root: Path, tmp_path: Path) -> None:
    result = exp.mnist_to_rotmnist("smoke", checkpoint="train", root=synthetic_root, out_dir=tmp_path / "run",
                                   methods=("mean",), modes=("none",), progress=False,
                                   overrides={"n_test": 16, "n_val": 16})
    assert (tmp_path / "run/backbone/best.pt").is_file()
    assert result.meta["backbone_training"]["data"].startswith("mnist")
    assert result.meta["checkpoint"].startswith("trained here")
    with pytest.raises(ValueError, match="unknown profile overrides"):
        exp.rotmnist("smoke", checkpoint=tiny_vit(), root=synthetic_root, overrides={"n_tests": 3})
    with pytest.raises(ValueError, match="unknown finetune modes"):
        exp.rotmnist("smoke", checkpoint=tiny_vit(), root=synthetic_root, modes=("all",), out_dir=tmp_path / "x",
                     progress=False)


def test_pcam_with_tiny_cnn(tmp_path: Path) -> None:
    import timm

    from gevit_lib.testing import write_fake_pcam

    write_fake_pcam(tmp_path / "data", n_per_split=16)
    torch.manual_seed(0)
    cnn = timm.create_model("test_resnet", pretrained=False, num_classes=2)  # BatchNorm: the unshared path
    result = exp.pcam("smoke", backbone=cnn, root=tmp_path / "data", out_dir=tmp_path / "run", progress=False,
                      methods=("mean", "most_probable"))
    rows = read_rows(tmp_path / "run/results.csv")
    assert {r["mode"] for r in rows} == {"none", "head"}  # the profile's modes for PCam (as the original)
    assert {r["method"] for r in rows} == {"base", "mean", "most_probable"}
    assert all(r["group"] in ("D4", "") for r in rows)
    assert result.meta["data"]["test"]["dataset"] == "pcam" and result.meta["normalize"] is True
    assert 0 <= result.accuracy("mean", "head") <= 100


def test_pcam_offline_messages(tmp_path: Path) -> None:
    from gevit_lib.testing import write_fake_pcam

    with pytest.raises(MissingFileError, match="camelyonpatch"):
        exp.pcam("smoke", root=tmp_path / "empty", progress=False)
    write_fake_pcam(tmp_path / "data", n_per_split=8)
    for name in exp.PCAM_BACKBONES:
        with pytest.raises(MissingFileError, match=f"huggingface.co/1aurent/{name}"):
            exp.pcam("smoke", backbone=name, root=tmp_path / "data", download=False, progress=False,
                     out_dir=tmp_path / "run")
    with pytest.raises(MissingFileError, match="not found"):
        exp.load_pcam_cnn(weights=tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="unknown PCam backbone"):
        exp.pcam("smoke", backbone="vgg16", root=tmp_path / "data")


def test_pcam_local_weights(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    arch = timm.create_model("densenet121", pretrained=False, num_classes=2)
    state = {k: v.contiguous() for k, v in arch.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(Exception, match="does not fit|missing keys"):  # densenet121 weights into densenet161
        exp.load_pcam_cnn("densenet161.tiatoolbox-pcam", weights=tmp_path / "model.safetensors")


# ---- reproduction with the published checkpoint on real data (slow) ----------------------------------------------


@pytest.mark.slow
def test_reproduces_experiment_1_ordering(shared_mnist_dir: Path, tmp_path: Path) -> None:
    """Published vit_rotmnist, no finetuning, regenerated rotated MNIST (or the official archive when present):
    the plain ViT scores below mean / max / sum / most-probable pooling over C16 (SPEC 8.1, Addendum 3)."""
    import time

    t0 = time.perf_counter()
    result = exp.rotmnist("quick", checkpoint="vit_rotmnist", root=shared_mnist_dir.parent, out_dir=tmp_path / "r",
                          modes=("none",), methods=("mean", "max", "sum", "most_probable", "most_certain"),
                          overrides={"n_val": 100, "n_test": 4000}, progress=False)
    print(result.markdown())
    print(f"seconds: {time.perf_counter() - t0:.0f}")
    base = result.accuracy("base")
    assert 95.0 < base < 99.0  # the orientation (transposed digits) is right: ~97.3 in the post / Addendum
    for method in ("mean", "max", "sum", "most_probable"):
        assert result.accuracy(method) > base, method
    assert result.accuracy("sum") == result.accuracy("mean")  # sum before the head's LayerNorm = mean
