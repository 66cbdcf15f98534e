"""owngpt's native one-row kernels (owngpt.native_kernels: native_gemv.cpp fp32, native_gemv_int8.cpp int8) against
torch's product and an integer reference, and their fallbacks.

Oracle: x @ W.T + b (then the activation) in torch on the same fp32 tensors, at odd sizes, so that every ragged edge
of the kernel's layout is crossed: `in` not a multiple of 16 (the masked last chunk), `out` not a multiple of 8 (the
padded last block), rows not a multiple of 3 (its 3-row passes). The AVX2 code is checked too, on a CPU that has
AVX-512, by lowering the instruction set the kernel is called with. Where this machine has no compiler (or the build
fails) the kernel tests are skipped and the fallback tests still run. The int8 kernel's oracle is described above its
tests; its AVX-512 variants run only on a CPU that has them (the one this was written on has AVX2 only).
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


# ---- the int8 kernel (native_gemv_int8.cpp) ----------------------------------------------------------------------
# Oracle: the same quantization written in torch (one symmetric scale per block of 32 columns: d = max|x| / 127,
# q = round_half_even(x * (1 / d))), then the products summed exactly (float64 holds these integer sums exactly) per
# block, times d, summed over blocks, times the weight's scale, plus the bias. The kernel sums each block in int32
# (exact) and combines the blocks in fp32, so the results agree up to fp32 rounding of that last sum (checked to
# ~1e-6 of its terms' magnitude; and exactly where every float step is exact, see the test below).

INT8_SIZES = [  # (out, in, rows): `in` across the 32-column blocks, `out` across the 8-row blocks
    (1, 1, 1),
    (7, 5, 1),
    (8, 32, 1),
    (9, 33, 2),
    (13, 31, 1),
    (31, 47, 3),
    (24, 100, 1),
    (65, 130, 2),
    (130, 2051, 1),
    (520, 2051, 1),  # >= 1 MiB of weights: the kernel splits the blocks over two threads
]


def ref_quantize(x):
    """x (rows, in) fp32 -> (q (rows, in padded to 32) int8, d (rows, blocks) fp32): the kernel's scheme in torch."""
    rows, n = x.shape
    nb = -(-n // 32)
    blocks = torch.zeros(rows, nb * 32)
    blocks[:, :n] = x
    blocks = blocks.view(rows, nb, 32)
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return torch.round(blocks * inv[..., None]).to(torch.int8).view(rows, nb * 32), d


def ref_int8_product(x, q, scale, bias):
    """(x quantized as the kernel does) @ q.T per block, exact integer sums, combined in float64."""
    qx, d = ref_quantize(x)
    rows, nb = d.shape
    w = torch.zeros(q.shape[0], nb * 32, dtype=torch.float64)
    w[:, : q.shape[1]] = q.double()
    isum = torch.einsum("rbk,obk->rob", qx.double().view(rows, nb, 32), w.view(-1, nb, 32))  # exact integers
    terms = isum * d.double()[:, None, :]  # (rows, out, blocks)
    y = terms.sum(-1) * scale.double() + (0 if bias is None else bias.double())
    return y, terms.abs().sum(-1) * scale.double().abs()


def random_int8(out, in_, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (out, in_), generator=g, dtype=torch.int8)
    scale = torch.rand(out, generator=g) * 0.01 + 1e-4
    return q, scale, g


@pytest.fixture(params=["avx512vnni", "avx512bw", "avx2"])
def isa8(request, native):
    level = {"avx512vnni": 3, "avx512bw": 2, "avx2": 1}[request.param]
    if native.int8_level < level:
        pytest.skip(f"this CPU has no {request.param}")
    before = native.int8_level
    native.int8_level = level
    yield native
    native.int8_level = before


def test_the_int8_kernel_quantizes_activations_as_the_torch_reference(native):
    torch.manual_seed(0)
    for n in (1, 5, 31, 32, 33, 100, 2051):
        x = torch.randn(3, n) * torch.rand(3, n) * 5
        x[1, : min(n, 40)] = 0  # a block of zeros: d = 0, q = 0
        x[2, 0] = 300.0  # an outlier coarsens its own block only
        q, d = native.quantize_int8(x)
        want_q, want_d = ref_quantize(x)
        assert torch.equal(d, want_d) and torch.equal(q, want_q)
        assert q.abs().max() <= 127  # never -128: the sign trick would turn it into -128 again


@pytest.mark.parametrize("out,in_,rows", INT8_SIZES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_int8_kernel_equals_the_integer_reference_at_odd_sizes(isa8, out, in_, rows, with_bias):
    q, scale, g = random_int8(out, in_, out * 1000 + in_)
    x = torch.randn(rows, in_, generator=g) * 2
    bias = torch.randn(out, generator=g) if with_bias else None
    kernel = isa8.kernel_int8(isa8.pack_int8(q), scale, out, in_, bias, ("none", ""))
    want, magnitude = ref_int8_product(x, q, scale, bias)
    # fp32 rounding of the sum over blocks; one integer product more or less (a dropped lane, a wrong sign) moves a
    # result by ~d * 127 * scale, about 1 / in of `magnitude`: far outside this
    tol = 1e-6 * (in_ / 32 + 4) * magnitude + 1e-6
    for threads in (1, 2):
        torch.set_num_threads(threads)
        got = kernel(x)
        assert got.shape == (rows, out) and got.dtype == torch.float32
        assert ((got.double() - want).abs() <= tol).all(), float(((got.double() - want).abs() / tol).max())
    torch.set_num_threads(1)


@pytest.mark.parametrize("out,in_", [(9, 33), (130, 2051)])
def test_the_int8_kernel_is_exact_where_every_float_step_is(isa8, out, in_):
    """Integer activations with a 127 in every block (so d = 1 and q = x), power-of-two weight scales and biases,
    sums below 2^24: every fp32 step is exact, so the kernel must equal the integer product bit for bit."""
    q, _, g = random_int8(out, in_, in_)
    x = torch.randint(-20, 21, (1, in_), generator=g).float()
    x[0, ::32] = 127.0 * torch.where(torch.rand(len(x[0, ::32]), generator=g) < 0.5, -1.0, 1.0)
    scale = 2.0 ** torch.randint(-8, 0, (out,), generator=g).float()
    bias = torch.randint(-64, 64, (out,), generator=g).float() / 4
    got = isa8.kernel_int8(isa8.pack_int8(q), scale, out, in_, bias, ("none", ""))(x)
    want = (x.double() @ q.double().T) * scale.double() + bias.double()
    assert torch.equal(got, want.float())


def test_the_int8_kernel_does_not_saturate_at_full_range(isa8):
    """|w| = 127 times |q| = 127 in every lane, both signs: vpmaddubsw's 16-bit pair sums (2 * 127 * 127 = 32258)
    are the closest to saturation they can be, and must still be exact."""
    in_ = 96
    q = torch.full((16, in_), 127, dtype=torch.int8)
    q[1::2] = -127
    q[2::4, ::3] *= -1
    x = torch.full((2, in_), 127.0)  # d = 1, so q = x and every float step is exact (as in the test above)
    x[1, 1::2] = -127.0
    got = isa8.kernel_int8(isa8.pack_int8(q), torch.full((16,), 1.0), 16, in_, None, ("none", ""))(x)
    assert torch.equal(got, (x.double() @ q.double().T).float())


@pytest.mark.parametrize("post", list(POSTS))
def test_the_int8_kernel_applies_each_activation_the_step_fuses(native, post):
    q, scale, g = random_int8(37, 70, 5)
    b, x = torch.randn(37, generator=g), torch.randn(1, 70, generator=g)
    got = native.kernel_int8(native.pack_int8(q), scale, 37, 70, b, post)(x)
    want, _ = ref_int8_product(x, q, scale, b)
    torch.testing.assert_close(got, POSTS[post](want.float()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("few", [1, 4])
def test_packed_linear_sends_a_few_rows_to_the_kernel_and_more_to_onednn(native, monkeypatch, few):
    """owngpt.decode_kernels' PackedLinear: kernel(one_row=True) is the native kernel; kernel(one_row=False) (a
    decode step's batch) is the native kernel up to `batch_rows` rows (the CPU's BATCH_ROWS entry: 16 on AVX2, 1 on
    AVX-512, where oneDNN measured faster) and oneDNN's product (the module's forward) above it."""
    from owngpt.decode_kernels import _packed_linear_class

    monkeypatch.setitem(native_kernels.BATCH_ROWS, native.level, few)
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(40, 70, generator=g), torch.randn(40, generator=g)
    lin = _packed_linear_class()(w, b, native=native)
    direct = native.kernel(native.pack(w), 40, 70, b, ("none", ""))
    x = torch.randn(7, 70, generator=g)
    assert native.batch_rows == few
    for rows in range(1, 8):
        got, onednn = lin.kernel(False)(x[:rows]), lin(x[:rows])
        torch.testing.assert_close(got, x[:rows] @ w.T + b, rtol=1e-5, atol=1e-5)
        assert torch.equal(got, direct(x[:rows]) if few > 1 and rows <= few else onednn), rows
        assert torch.equal(lin.kernel(True)(x[:rows]), direct(x[:rows]))
    # the two kernels sum in different orders: bitwise equality above says which one ran
    assert not torch.equal(direct(x), lin(x))


def test_int8_linear_uses_the_kernel_at_one_row_and_fbgemm_otherwise(native):
    """owngpt.quantize's Int8Linear: kernel(one_row=True) on one row is the native kernel's product, on several rows
    (and the module's forward, and kernel(one_row=False)) fbgemm's op."""
    from owngpt.quantize import _int8_linear

    q, scale, g = random_int8(40, 70, 7)
    b = torch.randn(40, generator=g)
    lin = _int8_linear(q, scale, b)
    assert lin.native is not None and "kernel at one row" in repr(lin)
    x = torch.randn(3, 70, generator=g)
    want, _ = ref_int8_product(x[:1], q, scale, b)
    torch.testing.assert_close(lin.kernel(True)(x[:1]).double(), want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(lin.kernel(True)(x[:1]), lin(x[:1]))  # a different activation rounding: not fbgemm's
    assert torch.equal(lin.kernel(True)(x), lin(x)) and torch.equal(lin.kernel(False)(x[:1]), lin(x[:1]))


def test_int8_linear_keeps_fbgemm_when_the_user_turns_the_kernels_off(native, monkeypatch):
    from owngpt.quantize import _int8_linear

    monkeypatch.setenv(native_kernels.ENV, "0")
    q, scale, g = random_int8(40, 70, 8)
    lin = _int8_linear(q, scale, None)
    x = torch.randn(1, 70, generator=g)
    assert lin.native is None and torch.equal(lin.kernel(True)(x), lin(x))


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


def test_every_kernel_source_ships_in_the_package():
    """The library is built from its sources on the user's machine: each must be package data of a non-editable
    install (pyproject's [tool.setuptools.package-data]), or an installed owngpt cannot build it."""
    import fnmatch
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["owngpt"]
    package = Path(native_kernels.__file__).parent
    for source in native_kernels.SOURCES:
        name = source.relative_to(package).as_posix()
        assert source.is_file() and any(fnmatch.fnmatch(name, p) for p in patterns), name
