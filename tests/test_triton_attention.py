"""The Triton kernels of the local attention (gevit_lib.nn.triton_attention) against the plain path.

On a machine with CUDA the kernels are compiled and run on the GPU; without one they run in triton's interpreter on
CPU tensors (``TRITON_INTERPRET=1``, set below before the kernels are first imported). The interpreter's cost is per
operation, so the shapes are tiny; the checks are the same on both.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from gevit_lib.nn import attention, triton_attention
from gevit_lib.nn.fast_attention import fast_local_attention

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()

# (name, Gv, Gq, Gk, with group term): the lifting layer (one query/key element) and the group layers of p4, p4m
LAYERS = {"lifting-p4": (4, 1, 1, False), "p4": (4, 4, 4, True), "p4m": (8, 8, 8, True)}


@pytest.fixture(scope="module")
def device():
    """CUDA when there is one, else CPU through triton's interpreter (set up here, restored afterwards)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (it ships with torch's CUDA builds): the kernels cannot run, not even "
                    "in triton's CPU interpreter")
    if CUDA:
        yield torch.device("cuda")
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, i.e. when their module is imported
    name = "gevit_lib.nn._triton_kernels"
    if name in sys.modules:  # imported earlier without the interpreter: decorate the kernels again
        importlib.reload(sys.modules[name])
    triton_attention._KERNELS, triton_attention._ERROR = None, None
    if not triton_attention.available():
        pytest.skip(f"triton does not import: {triton_attention.unavailable_reason()}")
    yield torch.device("cpu")
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


def make_inputs(layer: str, device: torch.device, dtype: torch.dtype, n: int = 1, h: int = 4, w: int = 4,
                patch: int = 3, d: int = 7, dv: int = 5, seed: int = 0) -> dict:
    """Random q, k, v, tables and group index of one attention call; D and Dv not powers of two on purpose."""
    gv, gq, gk, group = LAYERS[layer] if layer in LAYERS else layer
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    dpos = 2 if group else 3
    inputs = dict(q=rand(n, h, w, gq, d), k=rand(n, h, w, gk, d), v=rand(n, h, w, gk, dv), pos=rand(gv, patch ** 2, dpos),
                  grp=rand(gv, 3) if group else None,
                  gidx=torch.randint(0, gv, (gv, gq, gk), generator=gen).to(device) if group else None)
    return inputs


def plain(inputs: dict, scale: float, patch: int, keep: torch.Tensor | None = None, keep_scale: float = 1.0):
    """The plain path (materialised logits), with the given dropout mask instead of F.dropout."""
    q, k, v, pos, grp, gidx = (inputs[key] for key in ("q", "k", "v", "pos", "grp", "gidx"))
    if keep is None:
        return attention.local_attention(q, k, v, pos, grp, gidx, scale=scale, patch_size=patch, impl="plain")
    scores = attention.reference_logits(q, k, pos, grp, gidx, scale=scale, patch_size=patch)  # [N, Gv, Gq, H, W, Gk, P, P]
    shape = scores.shape
    probs = torch.softmax(scores.reshape(*shape[:-3], -1), -1).view(shape) * keep * keep_scale
    n, h, w, gk, dv = v.shape
    v_local = F.unfold(v.permute(0, 4, 3, 1, 2).reshape(n, dv * gk, h, w), patch, padding=patch // 2)
    out = torch.einsum("bvgijmkl,bcmklij->bcvij", probs, v_local.view(n, dv, gk, patch, patch, h, w))
    return out.permute(0, 3, 4, 2, 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def check_against_plain(layer: str, device: torch.device, dtype: torch.dtype, dropout: float, tol: float,
                        **shape) -> None:
    patch, scale, seed = shape.get("patch", 3), 0.6, 1234
    inputs = make_inputs(layer, device, dtype, **shape)
    names = [key for key in ("q", "k", "v", "pos", "grp") if inputs[key] is not None]
    ours = {key: (t.clone().requires_grad_() if key in names else t) for key, t in inputs.items()}
    ref = {key: (t.double().clone().requires_grad_() if key in names else t) for key, t in inputs.items()}
    out = triton_attention.triton_local_attention(*ours.values(), scale=scale, patch_size=patch, dropout=dropout,
                                                  seed=seed)
    keep = None
    if dropout > 0:
        keep = triton_attention.dropout_keep_mask(ours["q"], ours["k"], ours["pos"], patch_size=patch,
                                                  dropout=dropout, seed=seed)
        assert 0 < keep.float().mean().item() < 1
    expected = plain(ref, scale, patch, keep, triton_attention.keep_scale(dropout))
    assert out.dtype == dtype and out.shape == expected.shape
    assert rel_err(out, expected) <= tol, f"output: relative error {rel_err(out, expected):.2e}"
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device)
    grads = torch.autograd.grad(out, [ours[key] for key in names], grad_out.to(dtype))
    expected_grads = torch.autograd.grad(expected, [ref[key] for key in names], grad_out)
    for key, g, e in zip(names, grads, expected_grads):
        assert g.dtype == dtype and g.shape == e.shape
        assert rel_err(g, e) <= tol, f"d{key}: relative error {rel_err(g, e):.2e}"


@pytest.mark.parametrize("layer", list(LAYERS))
def test_matches_plain_float32(device, layer):
    check_against_plain(layer, device, torch.float32, dropout=0.0, tol=1e-5)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_matches_plain_with_dropout_float32(device, layer):
    check_against_plain(layer, device, torch.float32, dropout=0.3, tol=1e-5)


@pytest.mark.parametrize("layer, dropout", [("lifting-p4", 0.0), ("p4", 0.2)])
def test_matches_plain_float64(device, layer, dropout):
    check_against_plain(layer, device, torch.float64, dropout=dropout, tol=1e-10)


def test_patch_larger_than_image_and_non_square(device):
    # every offset of a 5x5 neighbourhood reaches outside a 3x4 image for some pixel: the borders
    check_against_plain("lifting-p4", device, torch.float32, dropout=0.0, tol=1e-5, n=2, h=3, w=4, patch=5)


def test_every_tile_loop(device, monkeypatch):
    # small tiles: several pixel blocks and column chunks per row (the online softmax rescales), the query pass's
    # programs looping over blocks, partial table sums accumulated across them; a toy group of 2 keeps it quick
    monkeypatch.setattr(triton_attention, "TILES", dict(BX=2, BR=8, KX=4, BS=8))
    check_against_plain((2, 2, 2, True), device, torch.float32, dropout=0.25, tol=1e-5, n=1, h=3, w=3)


def test_dropout_is_a_function_of_the_seed(device):
    inputs = make_inputs("p4", device, torch.float32)
    run = lambda seed: triton_attention.triton_local_attention(  # noqa: E731
        *inputs.values(), scale=0.5, patch_size=3, dropout=0.5, seed=seed)
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
    keep = triton_attention.dropout_keep_mask(inputs["q"], inputs["k"], inputs["pos"], patch_size=3, dropout=0.5,
                                              seed=3)
    assert keep.shape == (1, 4, 4, 4, 4, 4, 3, 3)
    assert abs(keep.float().mean().item() - 0.5) < 0.03  # 9216 draws


def test_through_fast_local_attention(device):
    # the backend switch of the fast path; the seed of the dropout mask comes from torch's generator
    inputs = make_inputs("p4", device, torch.float32)
    kw = dict(scale=0.5, patch_size=3, dropout=0.1, backend="triton")
    torch.manual_seed(5)
    a = fast_local_attention(*inputs.values(), **kw)
    torch.manual_seed(5)
    b = fast_local_attention(*inputs.values(), **kw)
    assert torch.equal(a, b)
    no_drop = fast_local_attention(*inputs.values(), **{**kw, "dropout": 0.0})
    assert rel_err(no_drop, plain({k: (t.double() if t is not None and t.is_floating_point() else t)
                                   for k, t in inputs.items()}, 0.5, 3)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_computed_in_float32(device, dtype):
    inputs = make_inputs("lifting-p4", device, torch.float32)
    half = {k: (t.to(dtype) if t is not None and t.is_floating_point() else t) for k, t in inputs.items()}
    out = triton_attention.triton_local_attention(*half.values(), scale=0.5, patch_size=3)
    exact = triton_attention.triton_local_attention(*{k: (t.float() if t is not None and t.is_floating_point() else t)
                                                      for k, t in half.items()}.values(), scale=0.5, patch_size=3)
    assert out.dtype == dtype
    assert torch.equal(out, exact.to(dtype))  # same float32 computation, one rounding at the end


def test_selection(monkeypatch):
    # no kernel runs here: only the choice (GEVIT_CUDA_KERNEL) and the errors
    cuda = torch.device("cuda")
    assert not triton_attention.selected("auto", torch.device("cpu"))
    assert not triton_attention.selected("chunked", cuda)
    monkeypatch.setenv(triton_attention.ENV_SWITCH, "chunked")
    assert not triton_attention.selected("auto", cuda)
    monkeypatch.setenv(triton_attention.ENV_SWITCH, "fastest")
    with pytest.raises(ValueError, match="GEVIT_CUDA_KERNEL"):
        triton_attention.selected("auto", cuda)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        triton_attention.selected("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend"):
        fast_local_attention(*make_inputs("p4", torch.device("cpu"), torch.float32).values(), scale=1.0,
                             patch_size=3, backend="cuda")


def test_gevit_layers_on_cuda_use_the_kernels():
    if not (CUDA and HAS_TRITON):
        pytest.skip("needs a CUDA GPU (the automatic choice of the Triton kernels happens on CUDA only)")
    from gevit_lib.nn import GroupSelfAttention, LiftingSelfAttention

    torch.manual_seed(0)
    for layer, x in ((LiftingSelfAttention("p4", 3, 8, 2, patch_size=5), torch.randn(2, 3, 9, 9)),
                     (GroupSelfAttention("p4m", 4, 8, 2, patch_size=5), torch.randn(2, 4, 8, 9, 9))):
        layer = layer.cuda().eval()
        x = x.cuda()
        assert triton_attention.selected("auto", x.device)
        fast = layer(x)
        layer.impl = "plain"
        assert rel_err(fast, layer(x)) <= 1e-5


def test_dropout_backward_is_the_gradient_of_its_forward(device):
    """Finite differences (float64, fixed seed): the backward pass redraws exactly the forward's dropout mask."""
    inputs = make_inputs((2, 2, 2, True), device, torch.float64, h=3, w=3, d=5, dv=2)
    names = ["q", "k", "v", "pos", "grp"]
    args = tuple(inputs[key].requires_grad_() for key in names)

    def f(*tensors):
        return triton_attention.triton_local_attention(*tensors, inputs["gidx"], scale=0.7, patch_size=3,
                                                       dropout=0.3, seed=99)

    assert torch.autograd.gradcheck(f, args, fast_mode=True)


def test_huge_logits_and_a_large_neighbourhood(device):
    """Logits of a few thousand (a saturated softmax, where only the exact row maximum keeps exp finite) and a 9x9
    neighbourhood on a 7x6 image (most offsets outside; two column blocks, so the running maximum is rescaled)."""
    gen = torch.Generator().manual_seed(2)
    n, h, w, g, d, p = 1, 7, 6, 4, 5, 9
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device)  # noqa: E731
    q = rand(n, h, w, g, d) * 40
    q[..., 2:4] = q[..., :2].abs() * 40
    inputs = dict(q=q, k=rand(n, h, w, g, d) * 40, v=rand(n, h, w, g, d), pos=rand(g, p * p, 2) * 40,
                  grp=rand(g, 1) * 40, gidx=torch.randint(0, g, (g, g, g), generator=gen).to(device))
    args = {k: (t.clone().requires_grad_() if t.is_floating_point() else t) for k, t in inputs.items()}
    ref_args = {k: (t.clone().requires_grad_() if t.is_floating_point() else t) for k, t in inputs.items()}
    out = triton_attention.triton_local_attention(*args.values(), scale=1.0, patch_size=p)
    ref = plain(ref_args, 1.0, p)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-10
    weight = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(device)
    names = ["q", "k", "v", "pos", "grp"]
    grads = torch.autograd.grad((out * weight).sum(), [args[k] for k in names])
    ref_grads = torch.autograd.grad((ref * weight).sum(), [ref_args[k] for k in names])
    scale = max(float(b.abs().max()) for b in ref_grads)  # saturated softmax: some gradients are ~1e-17
    for a, b in zip(grads, ref_grads):
        assert float((a - b).abs().max()) < 1e-12 * scale
