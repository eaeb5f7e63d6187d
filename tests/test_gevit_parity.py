"""The published GE-ViT checkpoints through gevit_lib compute what the original code computed (parity vectors in
../shared/reference/parity, see its README): float64 logits, per-layer features, lifting output and attention
probabilities, float32 logits; plus the converter's checks of the derived buffers."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from gevit_lib.hub import IncompatibleCheckpointError, load_original_state_dict
from gevit_lib.models import load_published, published_weights
from gevit_lib.models.gevit import GEViT, from_original_state_dict

P4, P4M = "gevit_p4sa_patch5_rotmnist", "gevit_p4msa_patch5_rotmnist"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def parity(shared_dir: Path):
    def load(name: str) -> dict:
        return torch.load(shared_dir / "reference" / "parity" / f"{name}.pt", weights_only=True)
    return load


def published(name: str, **options) -> GEViT:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_published(name, download=False, **options)
    assert isinstance(model, GEViT)
    return model


def check_features(model: GEViT, ref: dict, rows: list[int]) -> None:
    """One float64 forward of ``rows`` (starting with inputs 0, 1): features_f64 (inputs 0, 1), logits_f64 of the
    rows, lift_out_f64 and lift_attn_probs (input 0)."""
    assert rows[:2] == [0, 1]
    x = ref["inputs"][rows].double()
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        assert len(feats) == len(ref["features_f64"]) == 7
        for ours, theirs in zip(feats, ref["features_f64"]):
            assert ours[:2].shape == theirs.shape and rel_err(ours[:2], theirs) < 1e-6
        assert rel_err(model.pool(feats[-1]), ref["logits_f64"][rows]) < 1e-6
        assert rel_err(model.lift(x[:1])[0], ref["lift_out_f64"]) < 1e-6
    pos = ref["lift_attn_probs_positions"]
    probs = model.attention_maps(x[:1], 0)[0][:, :, pos][:, :, :, pos]
    assert probs.shape == ref["lift_attn_probs"].shape
    assert float((probs - ref["lift_attn_probs"]).abs().max()) < 1e-9


def test_p4_checkpoint_matches_the_original(parity) -> None:
    ref = parity(P4)
    model = published(P4)
    m64 = model.double()
    check_features(m64, ref, list(range(16)))
    inv = ref["invariance_check"]  # rows 0-3: torch.rot90 k = 0..3 of one digit; row 4: bilinear rotation by 0
    with torch.no_grad():
        logits = m64(inv["inputs"][:5].double())
    assert rel_err(logits, inv["logits_f64"][:5]) < 1e-6
    assert float((logits[:4] - logits[:1]).abs().max()) < 1e-9  # exact rot90 invariance
    m32 = model.float()
    with torch.no_grad():
        logits32 = m32(ref["inputs"])
    assert float((logits32 - ref["logits_f32"]).abs().max()) < 2e-4
    assert torch.equal(logits32.argmax(1), ref["logits_f32"].argmax(1))


def test_p4_checkpoint_with_the_reference_table(parity) -> None:
    """For p4 the original table is the corrected one: group_index="reference" gives the same outputs."""
    ref = parity(P4)
    model = published(P4, group_index="reference").double()
    rows = [0, 7, 13]
    with torch.no_grad():
        assert rel_err(model(ref["inputs"][rows].double()), ref["logits_f64"][rows]) < 1e-6


def test_p4m_checkpoint_matches_the_original_with_the_reference_table(parity) -> None:
    ref = parity(P4M)
    model = published(P4M)  # the registry's config asks for group_index="reference"
    assert model.config.group_index == "reference"
    m64 = model.double()
    check_features(m64, ref, [0, 1, 12])
    inv = ref["invariance_check"]
    with torch.no_grad():
        logits = m64(inv["inputs"][:2].double())
    assert rel_err(logits, inv["logits_f64"][:2]) < 1e-6
    assert float((logits[1] - logits[0]).abs().max()) > 0.1  # the published p4m model is not rot90-invariant


@pytest.mark.slow
def test_p4m_checkpoint_all_inputs(parity) -> None:
    ref = parity(P4M)
    model = published(P4M)
    with torch.no_grad():
        assert rel_err(model.double()(ref["inputs"].double()), ref["logits_f64"]) < 1e-6
        logits32 = model.float()(ref["inputs"])
    assert float((logits32 - ref["logits_f32"]).abs().max()) < 2e-4
    assert torch.equal(logits32.argmax(1), ref["logits_f32"].argmax(1))


def test_p4m_checkpoint_with_the_corrected_table_warns_and_is_exactly_invariant(parity) -> None:
    ref = parity(P4M)
    with pytest.warns(UserWarning, match="non-equivariant.*group_index='reference'"):
        model = load_published(P4M, download=False, group_index="corrected")
    x = ref["invariance_check"]["inputs"][:2].double()  # one digit, torch.rot90 k = 0, 1
    with torch.no_grad():
        logits = model.double()(x)
    assert float((logits - logits[:1]).abs().max()) < 1e-9


def test_converter_rejects_wrong_buffers_and_keys(shared_dir: Path) -> None:
    state = load_original_state_dict(published_weights(P4), download=False)
    tampered = dict(state)
    key = "transformer.0.attention.2.g_indices"
    tampered[key] = torch.roll(state[key], 1, dims=0)
    with pytest.raises(IncompatibleCheckpointError, match="g_indices.*matches neither"):
        from_original_state_dict(tampered, "rotmnist", "p4", 5, 10)
    with pytest.raises(IncompatibleCheckpointError, match="offset grid differs"):
        from_original_state_dict(state, "rotmnist", "p4", 5, 10, positional="gsa")
    broken = {k: v for k, v in state.items() if k != "transformer.3.mlp.0.weight"}
    broken["transformer.3.mlp.9.weight"] = torch.zeros(1)
    with pytest.raises(IncompatibleCheckpointError,
                       match=r"(?s)missing keys: \['blocks\.3\.mlp_in\.weight'\].*unexpected keys: "
                             r"\['transformer\.3\.mlp\.9\.weight'\]"):
        from_original_state_dict(broken, "rotmnist", "p4", 5, 10)
    with pytest.raises(IncompatibleCheckpointError, match="shape mismatches: \\['blocks.6.weight"):
        from_original_state_dict(state, "rotmnist", "p4", 5, 2)
    with pytest.raises(IncompatibleCheckpointError, match="group has 4 elements, p4m has 8"):
        from_original_state_dict(state, "rotmnist", "p4m", 5, 10)
