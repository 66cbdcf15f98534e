"""owngpt's own CPU kernels for one-row decoding (native_gemv.cpp: fp32; native_gemv_int8.cpp: int8), built on first
use, with torch's kernels as fallback.

What it is for: at batch 1 a decode step is a chain of matrix-vector products whose speed is how fast the weights
stream from memory. torch's best kernel for that (oneDNN's inner product on weights packed once, what
owngpt.decode_kernels uses for several rows) took 13.9 ms for gpt2's 49 products on one thread and 11.1 ms on two,
where llama.cpp's whole step took 13.2 and 10.6 ms (quiet machine): no step built on torch's kernels reaches
llama.cpp there, so native_gemv.cpp does that product by hand (why and how: the comment at its top; its numbers:
docs/benchmarks.md, decode-step section). Several rows (batch 8, a prompt) keep oneDNN on AVX-512, where it was
faster; on AVX2 a decode step's few rows come here too (BATCH_ROWS).

How it is built: with the system C++ compiler (`$CXX`, else g++, c++ or clang++), no torch headers (a few seconds for the three sources),
into torch's extension cache (`$TORCH_EXTENSIONS_DIR`, else ~/.cache/torch_extensions/owngpt/), once per machine
and source version; one line on stderr says so. Builds of several processes at once wait on a file lock; the library
is written aside and renamed, so a half-written file is never loaded. It is loaded with ctypes (plain C functions).

The int8 kernel (native_gemv_int8.cpp: int8 weights with per-output-channel scales, activations quantized per call
in blocks of 32 columns, int32 sums; why and how: the comment at its top) serves owngpt.quantize's `Int8Linear` at one
row, where fbgemm's `quantized::linear_dynamic` serves batches. Both live in one library, built and loaded together.

When torch's kernels are used instead, silently except for one logged line saying why: `OWNGPT_NATIVE_KERNELS=0` in
the environment (read at each model load), no compiler, a failed build, a CPU without AVX-512F or AVX2+FMA, a
platform other than x86-64 Linux. The arithmetic is the same up to the order of the sums (fp32 accumulation):
tests/test_decode_kernels.py checks greedy tokens and logits with the kernel on and off. The int8 kernel rounds
activations differently from fbgemm (per block of 32 vs per tensor), so int8 logits move by about a rounding step
(the same test file bounds it, and the perplexity).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("owngpt.native_kernels")

ENV = "OWNGPT_NATIVE_KERNELS"  # "0" turns the kernel off
SOURCE = Path(__file__).with_name("native_gemv.cpp")
# compiled into one library: the fp32 and int8 products, and GPT-2's whole decode block (native_block.cpp)
SOURCES = [SOURCE, SOURCE.with_name("native_gemv_int8.cpp"), SOURCE.with_name("native_block.cpp")]
# -O3 without -march: the AVX-512 and AVX2 functions carry their own target attributes and are chosen at run time
# from the CPU's flags, so the library runs on any x86-64 CPU (owngpt_isa() says 0 where neither set exists)
FLAGS = ["-O3", "-shared", "-fPIC", "-std=c++17"]
OPENMP = ["-fopenmp"]  # threads; without it (a compiler lacking OpenMP) the kernel runs on one thread

# Up to how many rows (a decode step's batch) the fp32 kernel beats oneDNN's packed inner product, per instruction
# set; more rows (prompts, big batches) keep oneDNN. Measured with bench/bench_decode_step.py (gpt2 size, the 49
# products alone, medians of paired ratios): on the 2-core AVX2 CPU (AMD EPYC) the kernel ran 1.24x oneDNN at 8 rows
# on one thread and 1.33x on two (quiet machine), and 1.05-1.17x at 2 to 16 rows on one thread beside other work;
# on the 2-core AVX-512 CPU it ran 0.74-0.86x oneDNN at 8 rows, so there batches keep oneDNN.
BATCH_ROWS = {1: 16, 2: 1}

_loaded: dict[str, Any] = {}  # "kernel": NativeGemv | None once tried (one build attempt per process)


class Product(ctypes.Structure):
    """One projection of a native decode block (native_block.cpp's OwngptProduct): the packed weight, its per-channel
    scales (int8; None for fp32) and its bias (or None)."""

    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class NativeGemv:
    """The loaded library: `pack` a weight once, then `kernel` gives the y = act(x W^T + b) callable."""

    def __init__(self, lib: Any, path: Path, isa: int) -> None:
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.owngpt_packed_size.argtypes, lib.owngpt_packed_size.restype = [i64, i64], i64
        lib.owngpt_pack.argtypes, lib.owngpt_pack.restype = [ptr, ptr, i64, i64], None
        lib.owngpt_gemv.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, c_int, c_int]
        lib.owngpt_gemv.restype = None
        lib.owngpt_int8_packed_size.argtypes, lib.owngpt_int8_packed_size.restype = [i64, i64], i64
        lib.owngpt_int8_pack.argtypes, lib.owngpt_int8_pack.restype = [ptr, ptr, i64, i64], None
        lib.owngpt_int8_quantize.argtypes, lib.owngpt_int8_quantize.restype = [ptr, i64, i64, ptr, ptr], None
        lib.owngpt_int8_gemv.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, i64, c_int, c_int]
        lib.owngpt_int8_gemv.restype = None
        lib.owngpt_has_f16c.argtypes, lib.owngpt_has_f16c.restype = [], c_int
        lib.owngpt_gemv_f16.argtypes = [ptr, i64, ptr, ptr, i64, i64, c_int, c_int]
        lib.owngpt_gemv_f16.restype = None
        lib.owngpt_greedy_head.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ctypes.c_float, ptr, i64, i64, c_int, c_int]
        lib.owngpt_greedy_head.argtypes += [i64, ptr, i64]
        lib.owngpt_greedy_head.restype = c_int
        f32, products = ctypes.c_float, ctypes.POINTER(Product)
        lib.owngpt_gpt2_block.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, f32, products, c_int]
        lib.owngpt_gpt2_block.argtypes += [ptr, ptr, i64, i64, ptr, f32, ptr, c_int, c_int, c_int]
        lib.owngpt_gpt2_block.restype = None
        lib.owngpt_llama_block.argtypes = [ptr, *[i64] * 6, ptr, ptr, f32, f32, products, ptr, ptr, ptr]
        lib.owngpt_llama_block.argtypes += [ptr, ptr, i64, i64, ptr, f32, ptr, c_int, c_int, c_int]
        lib.owngpt_llama_block.restype = None
        self.lib, self.path = lib, path
        self.level = isa  # 2: AVX-512F, 1: AVX2 + FMA (tests lower it to check the AVX2 code)
        # the int8 kernel's: 3 AVX512-VNNI, 2 AVX512BW, 1 AVX2 + FMA, 0 none (then Int8Linear keeps fbgemm)
        self.int8_level = lib.owngpt_isa_int8()

    @property
    def isa(self) -> str:
        return {2: "avx512", 1: "avx2"}[self.level]

    @property
    def batch_rows(self) -> int:
        """The most rows a decode step sends to this kernel rather than oneDNN (see BATCH_ROWS)."""
        return BATCH_ROWS[self.level]

    @property
    def isa_int8(self) -> str:
        return {3: "avx512vnni", 2: "avx512bw", 1: "avx2", 0: "none"}[self.int8_level]

    def pack(self, weight: Any) -> Any:
        """weight [out, in] fp32 -> the kernel's blocked layout (a 1-D tensor; see native_gemv.cpp)."""
        import torch

        w = weight.detach().float().contiguous()
        out, in_ = w.shape
        packed = torch.zeros(self.lib.owngpt_packed_size(out, in_), dtype=torch.float32)
        # the kernel's aligned loads need 64 bytes; torch's CPU allocator gives that (checked, not assumed)
        if packed.data_ptr() % 64:
            raise RuntimeError("torch's allocation is not 64-byte aligned")
        self.lib.owngpt_pack(w.data_ptr(), packed.data_ptr(), out, in_)
        return packed

    def kernel(self, packed: Any, out: int, in_: int, bias: Any, post: tuple[str, str]) -> Any:
        """A callable x (B, in) fp32 -> post(x W^T + b) (B, out) over `packed` (from `pack`) and `bias` (or None)."""
        import torch

        gemv, wp, level = self.lib.owngpt_gemv, packed.data_ptr(), self.level
        bp = None if bias is None else bias.data_ptr()
        threads = torch.get_num_threads
        empty, f32 = torch.empty, torch.float32

        def linear(x: Any) -> Any:
            x = x.contiguous()
            if x.dtype != f32 or x.shape[-1] != in_:
                raise ValueError(f"native kernel: expected (rows, {in_}) fp32, got {tuple(x.shape)} {x.dtype}")
            y = empty(x.shape[0], out, dtype=f32)
            gemv(x.data_ptr(), x.shape[0], wp, bp, y.data_ptr(), out, in_, threads(), level)
            return y

        linear.keep_alive = (packed, bias)  # the raw pointers above are only valid while these tensors live
        return _then_in_place(linear, post)

    @property
    def has_f16c(self) -> bool:
        """Whether the fp16 product (`pack_f16`, `gemv_f16`) runs here."""
        return bool(self.lib.owngpt_has_f16c())

    def pack_f16(self, packed: Any) -> Any:
        """`pack`'s fp32 layout -> the same layout in fp16 (rounded to nearest by torch; the padding stays 0)."""
        import torch

        half = packed.to(torch.float16)
        if half.data_ptr() % 64:  # the kernel's aligned loads (see pack)
            raise RuntimeError("torch's allocation is not 64-byte aligned")
        return half

    def row_norms(self, packed: Any, out: int, in_: int) -> Any:
        """The Euclidean norm of each of the `out` weight rows in `pack`'s layout, (out,) fp32."""
        import torch

        r, chunk = 8, 16  # native_gemv.cpp's R and CHUNK: [block][chunk][row in block][16 columns]
        blocked = packed.view(-(-out // r), -(-in_ // chunk), r, chunk)
        return torch.linalg.vector_norm(blocked, dim=(1, 3)).reshape(-1)[:out]

    def gemv_f16(self, x: Any, packed: Any, out: int) -> Any:
        """x (B, in) fp32 contiguous -> x H^T (B, out) fp32 over `packed` (from `pack_f16`), fp32 accumulation."""
        import torch

        y = torch.empty(x.shape[0], out, dtype=torch.float32)
        self.lib.owngpt_gemv_f16(
            x.data_ptr(),
            x.shape[0],
            packed.data_ptr(),
            y.data_ptr(),
            out,
            x.shape[1],
            torch.get_num_threads(),
            self.level,
        )
        return y

    def pack_int8(self, q: Any) -> Any:
        """q [out, in] int8 -> the int8 kernel's blocked layout (a 1-D int8 tensor; see native_gemv_int8.cpp)."""
        import torch

        w = q.detach().to(torch.int8).contiguous()
        out, in_ = w.shape
        packed = torch.zeros(self.lib.owngpt_int8_packed_size(out, in_), dtype=torch.int8)
        if packed.data_ptr() % 64:  # the kernel's aligned loads (see pack)
            raise RuntimeError("torch's allocation is not 64-byte aligned")
        self.lib.owngpt_int8_pack(w.data_ptr(), packed.data_ptr(), out, in_)
        return packed

    def quantize_int8(self, x: Any) -> tuple[Any, Any]:
        """x (rows, in) fp32 -> (q (rows, in padded to 32) int8, d (rows, blocks) fp32) as the int8 kernel quantizes
        its input: one symmetric scale per block of 32 columns (for tests and benchmarks; the kernel does it itself)."""
        import torch

        x = x.detach().float().contiguous()
        rows, in_ = x.shape
        nb = (in_ + 31) // 32
        q, d = torch.empty(rows, nb * 32, dtype=torch.int8), torch.empty(rows, nb, dtype=torch.float32)
        self.lib.owngpt_int8_quantize(x.data_ptr(), rows, in_, q.data_ptr(), d.data_ptr())
        return q, d

    def kernel_int8(self, packed: Any, scale: Any, out: int, in_: int, bias: Any, post: tuple[str, str]) -> Any:
        """A callable x (B, in) fp32 -> post((x W^T) * scale + b) (B, out) over `packed` (from `pack_int8`), the
        per-output-channel fp32 `scale` and `bias` (or None); x is quantized per call (native_gemv_int8.cpp)."""
        import torch

        if self.int8_level <= 0:
            raise RuntimeError("this CPU has no instruction set the int8 kernel is written for")
        scale = scale.detach().float().contiguous()
        bias = None if bias is None else bias.detach().float().contiguous()
        if scale.shape != (out,) or (bias is not None and bias.shape != (out,)):
            raise ValueError(f"native int8 kernel: scale and bias must have {out} values")
        gemv, wp, sp, level = self.lib.owngpt_int8_gemv, packed.data_ptr(), scale.data_ptr(), self.int8_level
        bp = None if bias is None else bias.data_ptr()
        threads = torch.get_num_threads
        empty, f32 = torch.empty, torch.float32

        def linear(x: Any) -> Any:
            x = x.contiguous()
            if x.dtype != f32 or x.shape[-1] != in_:
                raise ValueError(f"native int8 kernel: expected (rows, {in_}) fp32, got {tuple(x.shape)} {x.dtype}")
            y = empty(x.shape[0], out, dtype=f32)
            gemv(x.data_ptr(), x.shape[0], wp, sp, bp, y.data_ptr(), out, in_, threads(), level)
            return y

        linear.keep_alive = (packed, scale, bias)  # the raw pointers above are only valid while these tensors live
        return _then_in_place(linear, post)


def _then_in_place(linear: Any, post: tuple[str, str]) -> Any:
    """linear followed by the activation `post` (oneDNN's post-op names), applied in place on its fresh output."""
    import torch
    import torch.nn.functional as F

    # torch's own elementwise kernels: ~2 us, and the same function as oneDNN's fused post-ops and the model's
    # modules up to ~1e-7
    gelu_ = torch.ops.aten.gelu_
    acts = {
        ("none", ""): None,
        ("gelu", "tanh"): lambda y: gelu_(y, approximate="tanh"),
        ("gelu", "none"): lambda y: gelu_(y),
        ("swish", ""): lambda y: F.silu(y, inplace=True),
    }
    act = acts[post]
    if act is None:
        return linear
    return lambda x: act(linear(x))


def enabled_by_user() -> bool:
    """False when the user turned the kernel off (OWNGPT_NATIVE_KERNELS=0)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def native_gemv() -> NativeGemv | None:
    """The native kernel, built on first use; None where torch's kernels are to be used (see the module doc)."""
    if not enabled_by_user():
        return None
    if "kernel" not in _loaded:
        try:
            _loaded["kernel"] = _load()
        except _NotHere as e:
            log.info("owngpt's native decode kernel is not used: %s", e)
            _loaded["kernel"] = None
        except Exception as e:  # a broken compiler, a full disk, ...: decoding still works, on torch's kernels
            log.warning("owngpt's native decode kernel is not used (decoding uses torch's kernels): %s", e)
            _loaded["kernel"] = None
    return _loaded["kernel"]


class _NotHere(Exception):
    """This machine cannot have the kernel (expected; logged at info level)."""


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return next((p for p in map(shutil.which, ("g++", "c++", "clang++")) if p), None)


def build_dir() -> Path:
    """Where the library is built: torch's extension cache (honouring TORCH_EXTENSIONS_DIR), owngpt's folder."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    return Path(root) / "owngpt"


def _load() -> NativeGemv:
    import torch  # noqa: F401  (first: the library's libgomp must resolve to the one torch loaded, not a second)

    if not (sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")):
        raise _NotHere(f"written for x86-64 Linux, this is {sys.platform} {platform.machine()}")
    cxx = _compiler()
    if cxx is None:
        raise _NotHere("no C++ compiler found (set CXX, or install g++)")
    source = b"".join(p.read_bytes() for p in SOURCES)
    key = hashlib.sha256(source + cxx.encode() + " ".join(FLAGS + OPENMP).encode()).hexdigest()[:16]
    lib_path = build_dir() / f"native_gemv_{key}.so"
    if not lib_path.exists():
        _build(cxx, lib_path)
    lib = ctypes.CDLL(str(lib_path))
    isa = lib.owngpt_isa()
    if isa == 0:
        raise _NotHere("this CPU has neither AVX-512F nor AVX2 with FMA")
    return NativeGemv(lib, lib_path, isa)


def _build(cxx: str, lib_path: Path) -> None:
    import fcntl

    lib_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lib_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process building the same library: wait for it, then reuse it
        if lib_path.exists():
            return
        print("building owngpt's CPU decode kernels (once, a few seconds)", file=sys.stderr, flush=True)
        tmp = lib_path.with_name(f"{lib_path.name}.{os.getpid()}.tmp")
        t = time.perf_counter()
        errors = []
        for extra in (OPENMP, []):  # with threads, else (a compiler without OpenMP) on one thread
            cmd = [cxx, *FLAGS, *extra, *map(str, SOURCES), "-o", str(tmp)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.replace(tmp, lib_path)
                log.info("built %s in %.1f s", lib_path, time.perf_counter() - t)
                return
            errors.append(f"{' '.join(cmd)}: {done.stderr.strip()[-500:]}")
        tmp.unlink(missing_ok=True)
        raise RuntimeError("the build failed: " + " | ".join(errors))
