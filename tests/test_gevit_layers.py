"""GE-ViT / GSA-Net layers: index tables, coordinate grids, fast vs plain path, per-layer equivariance, bad input."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from gevit_lib.groups import GROUP_NAMES, get_group
from gevit_lib.nn import (
    GroupSelfAttention,
    LiftingSelfAttention,
    fast_local_attention,
    global_attention,
    group_index_table,
    local_attention,
    reference_attention,
    reference_relative_positions,
    relative_coordinates,
)
from gevit_lib.nn import cpu_kernel, fast_attention
from gevit_lib.nn.positional import RelativePositionalEncoding


requires_kernel = pytest.mark.skipif(not cpu_kernel.available(),
                                     reason=f"fused CPU kernel unavailable: {cpu_kernel.unavailable_reason()}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ---- tables and grids ------------------------------------------------------------------------------------------
def test_reference_tables_are_the_original_formulas() -> None:
    """The original code's tables: GE-ViT C4 relative positions and gidx = (2g - m - v) mod n; GSA-Nets (j - k) and
    (m + v - g); the flip group's special case."""
    assert reference_relative_positions("p4").tolist() == [[0, 3, 2, 1], [2, 1, 0, 3], [0, 3, 2, 1], [2, 1, 0, 3]]
    for name in ("p4", "p8", "p12"):
        n = len(get_group(name))
        e = torch.arange(n)
        v, g, m = e.view(-1, 1, 1), e.view(1, -1, 1), e.view(1, 1, -1)
        assert torch.equal(group_index_table(name, "reference"), (2 * g - m - v) % n)
        assert torch.equal(group_index_table(name, "reference", "gsa"), (m + v - g) % n)
        assert torch.equal(reference_relative_positions(name, "gsa"), (e.view(1, -1) - e.view(-1, 1)) % n)
    assert reference_relative_positions("mz2").tolist() == [[0, 1], [0, 1]]


@pytest.mark.parametrize("name", GROUP_NAMES)
def test_corrected_table_is_invariant_and_equals_reference_where_original_was_right(name: str) -> None:
    group = get_group(name)
    n = len(group)
    right = group_index_table(group, "corrected", "gevit")
    left = group_index_table(group, "corrected", "gsa")
    for t in range(n):
        r = group.cayley[:, t]  # h -> h t
        l_ = group.cayley[t]  # h -> t h
        assert torch.equal(right[r][:, r][:, :, r], right)  # gidx[v t, g t, m t] == gidx[v, g, m]
        assert torch.equal(left[l_][:, l_][:, :, l_], left)  # gidx[t v, t g, t m] == gidx[v, g, m]
    same = torch.equal(right, group_index_table(group, "reference", "gevit"))
    # the original table is right for the cyclic groups and the flip group, wrong for D4 and D8
    assert same == (name not in ("p4m", "p8m"))


def test_coordinate_grids_follow_the_posts_figures() -> None:
    """As in the post's row_embd_idxs.png / col_embd_idxs.png: g0 rows -1..1 top to bottom; g1 (90 deg): the row
    input varies -1..1 left to right; g4 (mirror): row grid as g0, column grid left-right reversed."""
    c = relative_coordinates("p4m", 5)
    o = torch.linspace(-1, 1, 5, dtype=torch.float64)
    torch.testing.assert_close(c[0, :, :, 0], o.view(-1, 1).expand(5, 5))
    torch.testing.assert_close(c[0, :, :, 1], o.view(1, -1).expand(5, 5))
    torch.testing.assert_close(c[1, :, :, 0], o.view(1, -1).expand(5, 5), atol=1e-12, rtol=0)
    torch.testing.assert_close(c[4, :, :, 0], c[0, :, :, 0])
    torch.testing.assert_close(c[4, :, :, 1], c[0, :, :, 1].flip(-1))


@pytest.mark.parametrize("name,positional", [("p4", "gevit"), ("p4m", "gevit"), ("p4", "gsa"), ("p4m", "gsa")])
def test_moved_tables_are_the_first_tables_rows_bit_for_bit(name: str, positional: str) -> None:
    """Rotations by 90 degrees and mirrors move the offset grid onto itself exactly (cos 90 deg is 0, not 6e-17), so
    every v's positional table holds the first one's rows, equal bit for bit: the CPU kernel then computes the
    spatial scores once for all v."""
    c = relative_coordinates(name, 5, positional).float().flatten(1, 2)
    assert all(set(map(tuple, c[v].tolist())) == set(map(tuple, c[0].tolist())) for v in range(len(c)))
    with torch.no_grad():
        pos = RelativePositionalEncoding(name, 5, 3, positional=positional).spatial()
    first = set(map(tuple, pos[0].view(torch.int32).tolist()))
    assert set(map(tuple, pos.flatten(0, 1).view(torch.int32).tolist())) == first


@pytest.mark.parametrize("name", ["p4", "p8", "p4m", "p8m"])
def test_gsa_grid_is_the_gevit_grid_of_the_inverse_element(name: str) -> None:
    """GSA-Nets' (row, col) rotation + array flip equals GE-ViT's matrix action of v^-1: a left action."""
    group = get_group(name)
    gsa, gevit = relative_coordinates(group, 5, "gsa"), relative_coordinates(group, 5, "gevit")
    for v in range(len(group)):
        torch.testing.assert_close(gsa[v], gevit[group.inv(v)], atol=1e-12, rtol=0)


def test_tables_match_published_checkpoint_buffers(shared_dir) -> None:
    for file, name in (("gevit_p4sa_patch5_rotmnist.pt", "p4"), ("gevit_p4msa_patch5_rotmnist.pt", "p4m")):
        state = torch.load(shared_dir / "reference" / "checkpoints" / file, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        assert torch.equal(state["group._relative_positions"], reference_relative_positions(name))
        coords = relative_coordinates(name, 5)
        for key, value in state.items():
            if key.endswith("g_indices"):
                assert torch.equal(value, group_index_table(name, "reference"))
            if key.endswith("row_indices"):
                torch.testing.assert_close(value.double(), coords[..., 0], atol=1e-6, rtol=0)
            if key.endswith("col_indices"):
                torch.testing.assert_close(value.double(), coords[..., 1], atol=1e-6, rtol=0)


# ---- fast path == plain path -----------------------------------------------------------------------------------
def _layers(group: str, patch: int | None, image: int | None, positional: str = "gevit",
            group_index: str = "corrected") -> tuple[LiftingSelfAttention, GroupSelfAttention]:
    lift = LiftingSelfAttention(group, 2, 8, 2, patch_size=patch, image_size=image, positional=positional)
    attn = GroupSelfAttention(group, 8, 6, 2, patch_size=patch, image_size=image, positional=positional,
                              group_index=group_index)
    for layer in (lift, attn):  # non-trivial biases and embeddings
        for p in layer.parameters():
            p.data.normal_(0.0, 0.5)
    return lift.double().eval(), attn.double().eval()


@pytest.mark.parametrize("group,patch,image,size", [
    ("p4", 3, None, (7, 7)), ("p4m", 5, None, (6, 6)), ("z2", 3, None, (5, 7)), ("mz2", 3, None, (6, 5)),
    ("p8", None, 5, (5, 5)), ("p4m", None, 4, (4, 4)),
])
@pytest.mark.parametrize("kernel", [pytest.param(True, marks=requires_kernel), False], ids=["kernel", "chunked"])
def test_fast_matches_plain_values_and_gradients(monkeypatch, group: str, patch: int | None, image: int | None,
                                                 size: tuple[int, int], kernel: bool) -> None:
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "1" if kernel else "0")
    torch.manual_seed(0)
    lift, attn = _layers(group, patch, image)
    x = torch.randn(2, 2, *size, dtype=torch.float64)
    results = {}
    for impl in ("fast", "plain"):
        lift.impl = attn.impl = impl
        xi = x.clone().requires_grad_(True)
        y = attn(lift(xi))
        params = [xi] + list(lift.parameters()) + list(attn.parameters())
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(), params)
        results[impl] = (y, grads)
    y_fast, g_fast = results["fast"]
    y_plain, g_plain = results["plain"]
    assert rel_err(y_fast, y_plain) < 1e-12
    scale = max(float(b.abs().max()) for b in g_plain)  # some gradients are exactly 0 (e.g. the key bias)
    for a, b in zip(g_fast, g_plain):
        assert float((a - b).abs().max()) < 1e-10 * scale


def _attention_inputs(n: int, h: int, w: int, g: int, d: int, p: int, dg: int) -> tuple[torch.Tensor, ...]:
    """Random float64 q, k, v ``[n, h, w, g, d]``, positional table ``[g, p*p, 2]`` and group table ``[g, dg]``."""
    q, k, v = (torch.randn(n, h, w, g, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pos = torch.randn(g, p * p, 2, dtype=torch.float64, requires_grad=True)
    grp = torch.randn(g, dg, dtype=torch.float64, requires_grad=True)
    return q, k, v, pos, grp


def test_reference_attention_is_the_formula() -> None:
    """reference_attention against the module docstring's formula, one logit at a time (loops over v, g, x, m,
    delta): content + row/column position of the offset moved by v + group embedding gidx[v, g, m], -inf outside
    the image, softmax over (m, delta), sum over g."""
    torch.manual_seed(4)
    n, h, w, g, d, p, dpos, dg = 1, 4, 3, 4, 5, 3, 2, 2
    q, k, v, pos, grp = (t.detach() for t in _attention_inputs(n, h, w, g, d, p, dg))
    pos = pos.expand(g, p * p, 2).clone() + torch.randn(g, p * p, 2, dtype=torch.float64)  # a table per v
    gidx, s, r = group_index_table("p4"), 0.7, p // 2
    out = torch.zeros(n, h, w, g, d, dtype=torch.float64)
    for vv, gg, i, j in itertools.product(range(g), range(g), range(h), range(w)):
        logits, values = [], []
        for m, di, dj in itertools.product(range(g), range(-r, r + 1), range(-r, r + 1)):
            if 0 <= i + di < h and 0 <= j + dj < w:
                qx = q[0, i, j, gg]
                term = qx @ k[0, i + di, j + dj, m] + qx[:dpos] @ pos[vv, (di + r) * p + dj + r]
                logits.append(s * (term + qx[dpos:dpos + dg] @ grp[gidx[vv, gg, m]]))
                values.append(v[0, i + di, j + dj, m])
        out[0, i, j, vv] += torch.softmax(torch.stack(logits), 0) @ torch.stack(values)
    torch.testing.assert_close(reference_attention(q, k, v, pos, grp, gidx, scale=s, patch_size=p), out,
                               atol=1e-12, rtol=0)


def test_local_and_global_attention_dispatch_on_impl() -> None:
    torch.manual_seed(5)
    q, k, v, pos, grp = (t.detach() for t in _attention_inputs(2, 3, 3, 4, 4, 5, dg=1))
    gidx = group_index_table("p4")
    for fn, extra in ((local_attention, {"patch_size": 5}), (global_attention, {})):
        plain = fn(q, k, v, pos, grp, gidx, scale=0.5, impl="plain", **extra)
        assert torch.equal(plain, reference_attention(q, k, v, pos, grp, gidx, scale=0.5,
                                                      patch_size=extra.get("patch_size")))
        assert torch.equal(fn(q, k, v, pos, grp, gidx, scale=0.5, **extra),
                           fast_local_attention(q, k, v, pos, grp, gidx, scale=0.5, patch_size=5))
        with pytest.raises(ValueError, match="impl must be one of"):
            fn(q, k, v, pos, grp, gidx, scale=0.5, impl="flash", **extra)


@pytest.mark.parametrize("pool", (True, False))
def test_fast_path_in_chunks_on_the_cpu_pool_matches_plain(monkeypatch, pool: bool) -> None:
    """Many chunks, run on the CPU thread pool (2 threads, every layer forced onto it) or serially."""
    monkeypatch.setattr(fast_attention, "POOL_MIN_ELEMENTS", 0 if pool else 1 << 62)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        n, h, w, g, d, p = 5, 6, 6, 4, 6, 3
        q, k, v, pos, grp = _attention_inputs(n, h, w, g, d, p, dg=2)
        gidx = group_index_table("p4")
        assert fast_attention._n_groups(q.device, 1000) == (2 if pool else 1)
        inputs = (q, k, v, pos, grp)
        weight = torch.linspace(-1, 1, n * h * w * g * d, dtype=torch.float64).view(n, h, w, g, d)
        fast = fast_local_attention(q, k, v, pos, grp, gidx, scale=0.7, patch_size=p, chunk_elements=500,
                                    backend="chunked")
        plain = reference_attention(q, k, v, pos, grp, gidx, scale=0.7, patch_size=p)
        assert rel_err(fast, plain) < 1e-12
        for a, b in zip(torch.autograd.grad((fast * weight).sum(), inputs),
                        torch.autograd.grad((plain * weight).sum(), inputs)):
            assert float((a - b).abs().max()) < 1e-10 * max(1.0, float(b.abs().max()))
    finally:
        torch.set_num_threads(threads)


@requires_kernel
@pytest.mark.parametrize("n,h,w,g,p,lifting,moved,channels_first", [
    (3, 28, 28, 4, 5, False, False, False),  # rows of several runs, images side by side (a 28-wide row fills 7 runs)
    (3, 28, 28, 4, 5, False, True, True),  # p4's moved tables (spatial scores computed once), channels-first memory
    (5, 9, 12, 4, 3, False, False, False),  # four 12-wide images a run group, the last group partial
    (5, 9, 12, 4, 3, False, False, True),  # the same, channels-first
    (2, 6, 24, 8, 3, False, True, False),  # two 24-wide images a group, p4m's moved tables
    (3, 7, 17, 1, 5, True, False, False),  # lifting, 17 wide: one image a group, a run of one pixel
    (3, 7, 17, 4, 5, True, True, True),  # lifting with p4's moved tables, channels-first
])
def test_kernel_packed_heads_match_chunked_on_wide_rows_and_image_groups(n, h, w, g, p, lifting, moved,
                                                                         channels_first) -> None:
    """The kernel reads q, k, v in place from a packed ``[B, H, W, G, 3, d, heads]`` projection (strided, several
    heads), over the row layouts the small layer tests miss, on 2 threads; against the chunked path, float64.
    ``moved``: every v's positional table is the first one rotated (and mirrored), as in p4 and p4m.
    ``channels_first``: the projection's memory is ``[B, 3 * d * heads, G, H, W]`` (as the GE-ViT layers make it);
    the kernel's output then is channels-first too, and its backward reads the output's gradient, channels-first
    as well, in place (runs inside one image: one vector load or store per plane; runs across images: per pixel)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(3)
        heads, d = 3, 6
        gq = 1 if lifting else g
        if channels_first:
            proj = torch.randn(n, 3 * d * heads + 2, gq, h, w, dtype=torch.float64)[:, 1:-1].permute(0, 3, 4, 2, 1)
        else:
            proj = torch.randn(n, h, w, gq, 3 * d * heads + 2, dtype=torch.float64)[..., 1:-1]  # strided, as a slice
        qkv = proj.unflatten(-1, (3, d, heads)).requires_grad_(True)
        pos = torch.randn(g, p * p, d if lifting else 3, dtype=torch.float64)
        if moved:
            base = pos[0].view(p, p, -1)
            pos = torch.stack([torch.rot90(base.flip(1) if v >= 4 else base, v % 4) for v in range(g)]).flatten(1, 2)
        pos.requires_grad_(True)
        grp = None if lifting else torch.randn(g, 2, dtype=torch.float64, requires_grad=True)
        gidx = None if lifting else torch.randint(0, g, (g, g, g))
        inputs = [t for t in (qkv, pos, grp) if t is not None]
        results = []
        for backend in ("kernel", "chunked"):
            out = fast_attention.packed_local_attention(qkv, pos, grp, gidx, scale=0.6, patch_size=p,
                                                        backend=backend)
            weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype)
            if channels_first:  # so the output's gradient is channels-first as well, as the out projection makes it
                weight = weight.view(n, d, heads, g, h, w).permute(0, 4, 5, 3, 1, 2)
            results.append((out, torch.autograd.grad((out * weight.view_as(out)).sum(), inputs)))
        (out_k, grads_k), (out_c, grads_c) = results
        assert out_k.shape == (n, h, w, g, d, heads) and rel_err(out_k, out_c) < 1e-12
        assert (out_k.stride(2) == 1) == channels_first  # the output follows the input's memory order
        for a, b in zip(grads_k, grads_c):
            assert rel_err(a, b) < 1e-11
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", [pytest.param("kernel", marks=requires_kernel), "chunked"])
def test_fast_dropout_backward_is_the_gradient_of_its_forward(backend: str) -> None:
    """With attention dropout on, the recomputing backward pass redraws the same masks (gradcheck)."""
    torch.manual_seed(1)
    n, h, w, g, d, p = 1, 3, 3, 2, 3, 3
    q, k, v, pos, grp = _attention_inputs(n, h, w, g, d, p, dg=1)
    gidx = group_index_table("mz2")

    def f(q, k, v, pos, grp):
        torch.manual_seed(123)  # the dropout seed comes from the default generator
        return fast_local_attention(q, k, v, pos, grp, gidx, scale=0.7, patch_size=p, dropout=0.3, chunk_elements=200,
                                    backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, v, pos, grp), fast_mode=True)
    out_a, out_b = f(q, k, v, pos, grp), f(q, k, v, pos, grp)
    torch.manual_seed(0)
    out_c = fast_local_attention(q, k, v, pos, grp, gidx, scale=0.7, patch_size=p, dropout=0.3, backend=backend)
    assert torch.equal(out_a, out_b) and not torch.equal(out_a, out_c)


@pytest.mark.parametrize("backend", [pytest.param("kernel", marks=requires_kernel), "chunked"])
def test_fast_dropout_is_unbiased(backend: str) -> None:
    """Dropped probabilities are rescaled: averaged over many masks the output is the output without dropout."""
    torch.manual_seed(4)
    q, k, v, pos, grp = (t.detach() for t in _attention_inputs(2, 5, 5, 4, 6, 3, dg=2))
    gidx = group_index_table("p4")
    ref = fast_local_attention(q, k, v, pos, grp, gidx, scale=0.7, patch_size=3, backend=backend)
    runs = torch.stack([fast_local_attention(q, k, v, pos, grp, gidx, scale=0.7, patch_size=3, dropout=0.3,
                                             backend=backend) for _ in range(400)])
    assert rel_err(runs[0], ref) > 0.01  # one draw differs
    assert rel_err(runs.mean(0), ref) < 0.05  # the mean converges (~1/sqrt(400) x the per-draw spread)


@pytest.mark.parametrize("backend", [pytest.param("kernel", marks=requires_kernel), "chunked"])
def test_fast_matches_plain_with_huge_logits_and_large_neighbourhoods(backend: str) -> None:
    """Logits so large that the product of the per-term exponentials underflows (the exact fallback), with the group
    term, a 9x9 neighbourhood on a 7x6 image (most offsets outside), float32 against the float64 plain path."""
    torch.manual_seed(2)
    n, h, w, g, d, p = 2, 7, 6, 4, 5, 9
    q = torch.randn(n, h, w, g, d, dtype=torch.float64) * 40
    q[..., 2:4] = q[..., :2].abs() * 40  # positional channels large and positive
    k = torch.randn(n, h, w, g, d, dtype=torch.float64) * 40
    v = torch.randn(n, h, w, g, d, dtype=torch.float64)
    pos = torch.randn(g, p * p, 2, dtype=torch.float64) * 40
    grp = torch.randn(g, 1, dtype=torch.float64) * 40
    gidx = group_index_table("p4")
    args = [t.clone().requires_grad_(True) for t in (q, k, v, pos, grp)]
    out = fast_local_attention(*args[:4], args[4], gidx, scale=1.0, patch_size=p, backend=backend)
    ref_args = [t.clone().requires_grad_(True) for t in (q, k, v, pos, grp)]
    ref = reference_attention(*ref_args[:4], ref_args[4], gidx, scale=1.0, patch_size=p)
    assert rel_err(out, ref) < 1e-10
    weight = torch.randn_like(ref)
    grads = torch.autograd.grad((out * weight).sum(), args)
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_args)
    scale = max(float(b.abs().max()) for b in ref_grads)  # saturated softmax: some gradients are ~1e-17
    for a, b in zip(grads, ref_grads):
        assert float((a - b).abs().max()) < 1e-12 * scale
    small = [t.float() for t in (q / 40, k / 40, v, pos / 40, grp / 40)]
    out32 = fast_local_attention(*small[:4], small[4], gidx, scale=1.0, patch_size=p, backend=backend)
    ref64 = reference_attention(*[t.double() for t in small[:4]], small[4].double(), gidx, scale=1.0, patch_size=p)
    assert out32.dtype == torch.float32 and rel_err(out32.double(), ref64) < 1e-5


def test_kernel_backend_choice(monkeypatch) -> None:
    q, k, v, pos, grp = (t.detach() for t in _attention_inputs(1, 3, 3, 1, 2, 3, dg=0))
    with pytest.raises(ValueError, match="backend must be one of"):
        fast_local_attention(q, k, v, pos, None, None, scale=1.0, patch_size=3, backend="cuda")
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
    assert not cpu_kernel.available() and "disabled" in str(cpu_kernel.unavailable_reason())
    with pytest.raises(RuntimeError, match="kernel is unavailable: disabled"):
        fast_local_attention(q, k, v, pos, None, None, scale=1.0, patch_size=3, backend="kernel")
    out = fast_local_attention(q, k, v, pos, None, None, scale=1.0, patch_size=3)  # auto: the chunked path
    assert torch.equal(out, fast_local_attention(q, k, v, pos, None, None, scale=1.0, patch_size=3,
                                                 backend="chunked"))


def test_kernel_builds_where_required() -> None:
    """CI (.ci/run) sets GEVIT_REQUIRE_CPU_KERNEL=1: there a failed build is an error, not a silent fallback."""
    if os.environ.get("GEVIT_REQUIRE_CPU_KERNEL") != "1":
        pytest.skip("GEVIT_REQUIRE_CPU_KERNEL is not set (the kernel may fall back to the chunked path here)")
    assert cpu_kernel.available(), cpu_kernel.unavailable_reason()


def test_fast_path_falls_back_when_the_shift_bound_underflows(monkeypatch) -> None:
    """Huge, opposing content and positional logits: the per-term shift would underflow; the exact path takes over."""
    calls = []
    original = fast_attention._exact_block

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fast_attention, "_exact_block", counting)
    torch.manual_seed(2)
    n, h, w, g, d, p = 2, 5, 5, 1, 4, 3
    q = torch.randn(n, h, w, g, d, dtype=torch.float64) * 40
    q[..., 2:] = q[..., :2].abs() * 40  # positional channels large and positive
    k = torch.randn(n, h, w, g, d, dtype=torch.float64) * 40
    v = torch.randn(n, h, w, g, d, dtype=torch.float64)
    pos = torch.randn(3, p * p, 2, dtype=torch.float64) * 40
    args = [t.clone().requires_grad_(True) for t in (q, k, v, pos)]
    fast = fast_local_attention(*args, None, None, scale=1.0, patch_size=p, backend="chunked")
    assert calls, "the fallback was not exercised"
    plain = reference_attention(q, k, v, pos, scale=1.0, patch_size=p)
    assert rel_err(fast, plain) < 1e-10
    grads = torch.autograd.grad(fast.sum(), args)
    ref_args = [t.clone().requires_grad_(True) for t in (q, k, v, pos)]
    ref = torch.autograd.grad(reference_attention(*ref_args, scale=1.0, patch_size=p).sum(), ref_args)
    for a, b in zip(grads, ref):
        assert rel_err(a, b) < 1e-8


def test_fast_path_under_bfloat16_autocast_close_to_float32() -> None:
    torch.manual_seed(3)
    lift, attn = (m.float() for m in _layers("p4", 3, None))
    x = torch.randn(1, 2, 6, 6)
    ref = attn(lift(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(lift(x))
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 0.1


# ---- equivariance of single layers -----------------------------------------------------------------------------
def _symmetries(name: str) -> list[int]:
    group = get_group(name)
    elems = [group.rot90_element(k) for k in (1, 2, 3)] if group.n_rotations % 4 == 0 else []
    return elems + ([group.flip_element()] if group.mirror else [])


@pytest.mark.parametrize("name", GROUP_NAMES)
@pytest.mark.parametrize("positional", ["gevit", "gsa"])
def test_layers_are_exactly_equivariant(name: str, positional: str) -> None:
    """Lifting then group attention: out(T_t x) == act(out(x), t) with the right (GE-ViT) / left (GSA) action."""
    torch.manual_seed(4)
    group = get_group(name)
    lift, attn = _layers(name, 3, None, positional)
    side = attn.feature_side
    assert side == ("right" if positional == "gevit" else "left")
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        lifted, out = lift(x), attn(lift(x))
        for t in _symmetries(name):
            xt = group.act_on_image(x, t)
            assert rel_err(lift(xt), group.act_on_group_signal(lifted, t, side=side)) < 1e-12
            assert rel_err(attn(lift(xt)), group.act_on_group_signal(out, t, side=side)) < 1e-12


def test_reference_table_breaks_the_p4m_group_layer() -> None:
    torch.manual_seed(5)
    group = get_group("p4m")
    lift, attn = _layers("p4m", 3, None, group_index="reference")
    attn.pos.group_embedding.weight.data.mul_(10.0)  # make the group term matter in this tiny layer
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        out = attn(lift(x))
        errs = [rel_err(attn(lift(group.act_on_image(x, t))), group.act_on_group_signal(out, t, side="right"))
                for t in _symmetries("p4m")]
    assert min(errs) > 1e-5  # the corrected table gives ~1e-15 (test_layers_are_exactly_equivariant)


def test_attention_probabilities_layout() -> None:
    torch.manual_seed(6)
    lift, attn = _layers("p4", 3, None)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    p_lift = lift.attention_probabilities(x)
    assert p_lift.shape == (2, 2, 4, 5, 5, 3, 3)
    torch.testing.assert_close(p_lift.sum((-2, -1)), torch.ones(2, 2, 4, 5, 5, dtype=torch.float64))
    assert float(p_lift[:, :, :, 0, :, 0, :].abs().max()) == 0.0  # neighbours above the top row are masked
    p_grp = attn.attention_probabilities(lift(x))
    assert p_grp.shape == (2, 2, 4, 4, 5, 5, 4, 3, 3)
    torch.testing.assert_close(p_grp.sum((-3, -2, -1)), torch.ones(2, 2, 4, 4, 5, 5, dtype=torch.float64))


# ---- bad input -------------------------------------------------------------------------------------------------
def test_layers_reject_bad_input() -> None:
    lift, attn = _layers("p4", 3, None)
    with pytest.raises(ValueError, match=r"expects images \[B, 2, H, W\]"):
        lift(torch.randn(1, 3, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs square images"):
        lift(torch.randn(1, 2, 6, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expects group signals \[B, 8, 4, H, W\]"):
        attn(torch.randn(1, 8, 2, 6, 6, dtype=torch.float64))
    glob = LiftingSelfAttention("p4", 1, 4, 1, patch_size=None, image_size=6)
    with pytest.raises(ValueError, match="built for 6x6 inputs, got 5x5"):
        glob(torch.randn(1, 1, 5, 5))
    with pytest.raises(ValueError, match="patch_size must be an odd number"):
        LiftingSelfAttention("p4", 1, 4, 1, patch_size=4)
    with pytest.raises(ValueError, match="mid_channels must be even"):
        LiftingSelfAttention("p4", 1, 6, 1)
    with pytest.raises(ValueError, match="unknown group 'p5'"):
        GroupSelfAttention("p5", 4, 4, 1)
    with pytest.raises(ValueError, match="group_index must be one of"):
        GroupSelfAttention("p4", 4, 6, 1, group_index="fixed")
    with pytest.raises(ValueError, match="impl must be one of"):
        GroupSelfAttention("p4", 4, 6, 1, impl="fastest")
    with torch.no_grad():  # a 1-pixel image: every neighbour but the pixel itself is masked
        assert math.isfinite(float(lift(torch.randn(1, 2, 1, 1, dtype=torch.float64)).sum()))
