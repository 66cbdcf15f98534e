"""owngpt's native one-row kernel (owngpt.native_kernels, native_gemv.cpp) against torch's product, and its fallbacks.

Oracle: x @ W.T + b (then the activation) in torch on the same fp32 tensors, at odd sizes, so that every ragged edge
of the kernel's layout is crossed: `in` not a multiple of 16 (the masked last chunk), `out` not a multiple of 8 (the
padded last block), rows not a multiple of 3 (its 3-row passes). The AVX2 code is checked too, on a CPU that has
AVX-512, by lowering the instruction set the kernel is called with. Where this machine has no compiler (or the build
fails) the kernel tests are skipped and the fallback tests still run.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from owngpt import native_kernels

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

SIZES = [  # (out, in, rows)
    (1, 1, 1),
    (7, 5, 1),
    (8, 16, 1),
    (9, 17, 2),
    (13, 33, 3),
    (31, 47, 4),
    (24, 100, 5),
    (65, 130, 8),
    (130, 2051, 1),  # wide enough for the kernel to split the blocks over two threads
]
POSTS = {
    ("none", ""): lambda y: y,
    ("gelu", "tanh"): lambda y: F.gelu(y, approximate="tanh"),
    ("gelu", "none"): F.gelu,
    ("swish", ""): F.silu,
}


@pytest.fixture(scope="module")
def native():
    kernel = native_kernels.native_gemv()
    if kernel is None:
        pytest.skip("owngpt's native kernel is not available here (no compiler, or a CPU without AVX2)")
    return kernel


@pytest.fixture(params=["avx512", "avx2"])
def isa(request, native):
    if request.param == "avx512" and native.level < 2:
        pytest.skip("this CPU has no AVX-512")
    level = {"avx512": 2, "avx2": 1}[request.param]
    before = native.level
    native.level = level
    yield native
    native.level = before


@pytest.mark.parametrize("out,in_,rows", SIZES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_kernel_equals_torchs_product_at_odd_sizes(isa, out, in_, rows, with_bias):
    torch.manual_seed(out * 1000 + in_)
    w, x = torch.randn(out, in_), torch.randn(rows, in_)
    b = torch.randn(out) if with_bias else None
    kernel = isa.kernel(isa.pack(w), out, in_, b, ("none", ""))
    want = x @ w.T + (b if b is not None else 0)
    # fp32 sums in another order: ~1e-7 * sqrt(in) * |terms|; a dropped column or bias moves a result by ~1
    tol = 1e-5 * in_**0.5
    for threads in (1, 2):
        torch.set_num_threads(threads)
        torch.testing.assert_close(kernel(x), want, rtol=tol, atol=tol)
    torch.set_num_threads(1)


@pytest.mark.parametrize("post", list(POSTS))
def test_the_kernel_applies_each_activation_the_step_fuses(native, post):
    torch.manual_seed(0)
    w, b, x = torch.randn(37, 70), torch.randn(37), torch.randn(2, 70)
    got = native.kernel(native.pack(w), 37, 70, b, post)(x)
    torch.testing.assert_close(got, POSTS[post](x @ w.T + b), rtol=1e-5, atol=1e-5)


def test_the_kernel_reads_strided_rows_as_the_rows_they_are(native):
    """A non-contiguous view of x (a column slice) must give the product of the values it shows."""
    torch.manual_seed(1)
    w, x = torch.randn(9, 20), torch.randn(3, 40)[:, ::2]
    got = native.kernel(native.pack(w), 9, 20, None, ("none", ""))(x)
    torch.testing.assert_close(got, x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No kernel loaded yet in this process, and builds go to a fresh cache folder."""
    monkeypatch.setattr(native_kernels, "_loaded", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return tmp_path


def test_users_turn_the_kernel_off_with_the_environment(fresh, monkeypatch):
    monkeypatch.setenv(native_kernels.ENV, "0")
    assert native_kernels.native_gemv() is None
    assert not any(fresh.iterdir())  # nothing built either


def test_no_compiler_means_torchs_kernels_and_no_error(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CXX", "no-such-compiler-anywhere")
    with caplog.at_level(logging.INFO, logger="owngpt.native_kernels"):
        assert native_kernels.native_gemv() is None
    assert "no C++ compiler" in caplog.text


def test_a_failed_build_is_logged_once_and_torchs_kernels_are_used(fresh, monkeypatch, caplog, capsys):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger="owngpt.native_kernels"):
        assert native_kernels.native_gemv() is None
        assert native_kernels.native_gemv() is None  # not tried again in this process
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "build failed" in caplog.text
    assert "building owngpt's CPU decode kernel" in capsys.readouterr().err
    assert not [p for p in fresh.rglob("*") if p.suffix in (".so", ".tmp")]  # no half-written library left


def test_the_build_goes_to_the_extension_cache_and_is_reused(fresh, native, capsys):
    """Built once into TORCH_EXTENSIONS_DIR/owngpt (one line on stderr), then loaded from there without a build."""
    built = native_kernels.native_gemv()
    assert built is not None and built.path.parent == fresh / "owngpt" and built.path.exists()
    assert "building owngpt's CPU decode kernel" in capsys.readouterr().err
    native_kernels._loaded.clear()
    again = native_kernels.native_gemv()
    assert again is not None and again.path == built.path
    assert capsys.readouterr().err == ""
