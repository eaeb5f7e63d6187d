"""Group axioms, Cayley tables, and that every action is a homomorphism (exact for 90-degree rotations and flips)."""

from __future__ import annotations

import itertools

import pytest
import torch

from gevit_lib.groups import GROUP_NAMES, get_group


@pytest.mark.parametrize("name", GROUP_NAMES)
def test_group_axioms(name: str) -> None:
    g = get_group(name)
    n = len(g)
    table = g.cayley
    assert table.shape == (n, n)
    # identity, closure (Latin square), inverses, associativity
    assert torch.equal(table[0], torch.arange(n)) and torch.equal(table[:, 0], torch.arange(n))
    for row in table:
        assert sorted(row.tolist()) == list(range(n))
    for a in range(n):
        assert g.mul(a, g.inv(a)) == 0 and g.mul(g.inv(a), a) == 0
    for a, b, c in itertools.product(range(n), repeat=3):
        assert g.mul(g.mul(a, b), c) == g.mul(a, g.mul(b, c))


def test_orders_and_names() -> None:
    assert [len(get_group(n)) for n in GROUP_NAMES] == [1, 4, 8, 12, 16, 2, 8, 16]
    assert len(get_group("C16")) == 16 and len(get_group("D4")) == 8
    assert get_group("D4").cayley.equal(get_group("p4m").cayley)
    with pytest.raises(ValueError, match="unknown group 'p5'.*valid names: z2, p4"):
        get_group("p5")


def test_dihedral_product_rule() -> None:
    """(k1,s1)(k2,s2) = ((-1)^s2 k1 + k2, s1 xor s2) for D4 with matrices M^s R(k*90)."""
    g = get_group("p4m")
    for (k1, s1), (k2, s2) in itertools.product(g.elements, repeat=2):
        expected = g.index(((-1) ** s2) * k1 + k2, s1 ^ s2)
        assert g.mul(g.index(k1, s1), g.index(k2, s2)) == expected
    assert [g.inv(i) for i in range(8)] == [0, 3, 2, 1, 4, 5, 6, 7]


def test_cyclic_is_addition_mod_n() -> None:
    g = get_group("p12")
    for a, b in itertools.product(range(12), repeat=2):
        assert g.mul(a, b) == (a + b) % 12


@pytest.mark.parametrize("name", GROUP_NAMES)
def test_regular_representations_are_homomorphisms(name: str) -> None:
    g = get_group(name)
    f = torch.randn(len(g), dtype=torch.float64)
    for a, b in itertools.product(range(len(g)), repeat=2):
        ab = g.mul(a, b)
        # L_a L_b f == L_ab f and R_a R_b f == R_ab f
        assert torch.equal(f[g.left_regular(b)][g.left_regular(a)], f[g.left_regular(ab)])
        assert torch.equal(f[g.right_regular(b)][g.right_regular(a)], f[g.right_regular(ab)])


@pytest.mark.parametrize("name", GROUP_NAMES)
def test_image_action_is_exact_homomorphism_on_exact_subgroup(name: str) -> None:
    g = get_group(name)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    exact = g.exact_elements
    assert 0 in exact
    for a, b in itertools.product(exact, repeat=2):
        lhs = g.act_on_image(g.act_on_image(x, b), a)
        assert torch.equal(lhs, g.act_on_image(x, g.mul(a, b)))


def test_image_action_conventions() -> None:
    """Element (1,0) of p4 turns the displayed image clockwise; rot90_element/flip_element match torch."""
    g = get_group("p4m")
    x = torch.arange(9.0).reshape(1, 3, 3)
    assert torch.equal(g.act_on_image(x, g.index(1)), torch.rot90(x, -1, dims=(-2, -1)))
    for k in range(4):
        assert torch.equal(g.act_on_image(x, g.rot90_element(k)), torch.rot90(x, k, dims=(-2, -1)))
    assert torch.equal(g.act_on_image(x, g.flip_element()), torch.flip(x, (-1,)))
    # mirror after rotation: (1, 1) = flip(rot_cw(x))
    assert torch.equal(g.act_on_image(x, g.index(1, 1)), torch.flip(torch.rot90(x, -1, dims=(-2, -1)), (-1,)))
    with pytest.raises(ValueError, match="does not contain rotations by 90"):
        get_group("C6").rot90_element()


def test_image_action_matches_coordinate_action() -> None:
    """Moving a single pixel with the image action moves it as the matrix moves its (x, y-down) coordinates."""
    g = get_group("p8m")
    size, c = 7, 3.0
    for e in g.exact_elements:
        img = torch.zeros(size, size, dtype=torch.float64)
        row, col = 1, 5
        img[row, col] = 1.0
        moved = g.act_on_image(img, e)
        new = g.act_on_coordinates(torch.tensor([col - c, row - c], dtype=torch.float64), e)
        assert moved[int(round(new[1].item() + c)), int(round(new[0].item() + c))] == 1.0


def test_interpolated_rotation_is_approximate_homomorphism() -> None:
    """45-degree steps are interpolated: composition is close on a smooth image, not exact (measured, not exact)."""
    g = get_group("p8")
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 33), torch.linspace(-1, 1, 33), indexing="ij")
    blob = torch.exp(-((xx - 0.2) ** 2 + yy**2) / 0.05)[None]
    two_steps = g.act_on_image(g.act_on_image(blob, 1), 1)
    err = (two_steps - g.act_on_image(blob, 2)).abs().max().item()
    assert 0 < err < 0.1


def test_group_signal_action_is_homomorphism() -> None:
    g = get_group("p4m")
    x = torch.randn(2, 3, len(g), 5, 5, dtype=torch.float64)
    for side in ("left", "right"):
        for a, b in itertools.product(range(len(g)), repeat=2):
            lhs = g.act_on_group_signal(g.act_on_group_signal(x, b, side), a, side)
            assert torch.equal(lhs, g.act_on_group_signal(x, g.mul(a, b), side))
    with pytest.raises(ValueError, match="group axis"):
        g.act_on_group_signal(torch.zeros(1, 1, 4, 5, 5), 1)


def test_non_square_rotation_is_refused() -> None:
    g = get_group("p4")
    with pytest.raises(ValueError, match="non-square"):
        g.act_on_image(torch.zeros(1, 4, 6), 1)
