"""The notebooks' bookkeeping layer: the figure profiles, how the figure digits are chosen, batched predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gevit_lib.notebook import load_digits, normalize, pick_digits, predict
from gevit_lib.profiles import figure_profile


def test_figure_profiles() -> None:
    with pytest.raises(ValueError, match="unknown profile"):
        figure_profile("huge")
    smoke, quick, full = figure_profile("smoke"), figure_profile("quick"), figure_profile("full")
    assert smoke.rotation_frames < quick.rotation_frames < full.rotation_frames
    assert len(smoke.sweep_angles) < len(quick.sweep_angles) < len(full.sweep_angles)
    assert quick.exact_transforms == ("rot90", "rot180", "rot270", "flip") and quick.latent_transforms[0] == "original"


def test_digit_selection_rules() -> None:
    class Labels:
        labels = np.array([1, 3, 8, 2, 3, 8, 8, 3])

    ds = Labels()
    assert pick_digits(ds, [3, 8], among=None) == [1, 2]
    assert pick_digits(ds, [8], start=4) == [6]  # the 3s and 8s are 1, 2, 4, 5, 6, 7: from the 5th of them on
    assert pick_digits(ds, n=3) == [1, 2, 4]
    assert pick_digits(ds, n=2, start=3) == [5, 6]
    assert pick_digits(ds, [3, 8], n=2) == [1, 4, 2, 5]
    with pytest.raises(ValueError, match="label 5"):
        pick_digits(ds, [5])
    with pytest.raises(ValueError, match="only"):
        pick_digits(ds, n=9)


def test_load_digits_in_smoke_and_its_fallback(tmp_path) -> None:
    digits = load_digits("test", "smoke", tmp_path, labels=(3, 8))  # no MNIST there: the synthetic stand-in
    assert "stand-in" in digits.data_source and digits.labels.tolist() == [3, 8]
    assert digits.images.shape == (2, 1, 28, 28) and 0 <= digits.images.min() and digits.images.max() <= 1
    assert digits.describe() == {"split": "test", "indices": digits.indices, "labels": [3, 8]}
    with pytest.raises(ValueError):
        load_digits("test", "smoke", tmp_path, labels=(8,), start=10**6)
    late = load_digits("test", "smoke", tmp_path, labels=(8,), start=10**6, fallback_start=0)
    assert late.indices == pick_digits(_dataset(tmp_path), [8])


def _dataset(root):
    from gevit_lib.notebook import rotated_digits

    return rotated_digits("test", "smoke", root, normalize=False)[0]


def test_predict_batches_on_the_models_dtype() -> None:
    model = torch.nn.Linear(4, 3).double()
    x = torch.randn(70, 4)
    out = predict(model, x, batch_size=32)
    assert out.dtype == torch.float64 and out.shape == (70, 3)
    torch.testing.assert_close(out, model(x.double()))
    assert torch.allclose(normalize(torch.full((1,), 0.1307)), torch.zeros(1))


def test_published_model_takes_weights_of_a_cli_run(tmp_path) -> None:
    """Notebooks 06-08 evaluate a ViT trained by the command line (its best.pt) instead of the published one."""
    import torch

    from gevit_lib.hub import IncompatibleCheckpointError
    from gevit_lib.models import create_model
    from gevit_lib.notebook import published_model

    torch.manual_seed(3)
    trained = create_model("vit_rotmnist")
    torch.save(trained.state_dict(), tmp_path / "best.pt")
    model, label = published_model("vit_rotmnist", "quick", tmp_path / "best.pt")
    assert not model.training and "best.pt (sha256 " in label and str(tmp_path) not in label  # no machine path
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    torch.save(create_model("gevit_p4sa_patch5_rotmnist").state_dict(), tmp_path / "other.pt")
    with pytest.raises(IncompatibleCheckpointError, match="other.pt"):
        published_model("vit_rotmnist", "quick", tmp_path / "other.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "best.pt").read_bytes()[:100])  # a truncated file
    with pytest.raises(ValueError, match="cannot read .*cut.pt") as info:
        published_model("vit_rotmnist", "quick", tmp_path / "cut.pt")
    assert "weights_only" not in str(info.value)
