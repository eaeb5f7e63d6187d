"""The measuring helpers: exact invariance is detected as ~0, a non-invariant map is not."""

from __future__ import annotations

import torch

from gevit_lib.equivariance import invariance_errors, relative_error, rotation_sweep
from gevit_lib.groups import get_group


def test_invariance_errors_detect_invariant_and_non_invariant_maps() -> None:
    x = torch.randn(2, 1, 9, 9, dtype=torch.float64)
    g = get_group("p4m")
    invariant = invariance_errors(lambda t: t.sum((-2, -1)), x, g)
    assert set(invariant) == set(range(8)) and max(invariant.values()) < 1e-12
    weights = torch.randn(9, 9, dtype=torch.float64)
    not_invariant = invariance_errors(lambda t: (t * weights).sum((-2, -1)), x, g)
    assert not_invariant[0] == 0 and min(v for k, v in not_invariant.items() if k) > 1e-3


def test_rotation_sweep_is_exact_at_quarter_turns_only() -> None:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 21), torch.linspace(-1, 1, 21), indexing="ij")
    img = torch.exp(-((xx - 0.3) ** 2 + (yy + 0.1) ** 2) / 0.1)[None, None].double()
    errs = rotation_sweep(lambda t: t.flatten(1).norm(dim=1), img, [0, 45, 90, 180, 270])
    assert errs[[0, 2, 3, 4]].abs().max() < 1e-12 and errs[1] > 0
    assert relative_error(torch.ones(2), torch.zeros(2)) == 1.0
