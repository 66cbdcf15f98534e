"""Which device a command runs on, and in which precision: the one place `--device` and `precision` are decided.

    --device auto      $OWNGPT_DEVICE if set, else cuda if torch sees a CUDA GPU, else Apple's mps if available,
                       else cpu (and says which)
    --device cpu | cuda | cuda:N | mps

OWNGPT_DEVICE sets what `auto` means for every command of a shell or CI job (the test suite sets it to cpu, so
that comparisons with CPU references hold on a GPU machine too; its CUDA tests ask for cuda by name).

Precision (TrainConfig.precision, and what inference uses):

    auto   bf16 autocast where the device has it: cuda with bf16 support (Ampere and later), mps on macOS 14+
           (Metal 3.1 is where torch's MPS bf16 kernels start); fp32 elsewhere (CPU: no AMX here, bf16 is ~4x
           slower than fp32, see NOTES)
    bf16   bf16 autocast on any device (an old CUDA GPU without bf16 is refused with a clear error)
    fp32   no autocast

fp32 matmuls on cuda use TF32 (10-bit mantissa on the tensor cores; what nanoGPT and most training code run),
set once by `configure_matmul`. MPS follows the cuda code path except where torch documents a difference: no
float64 (so nothing here puts float64 on mps), no pinned memory, no NCCL (one process only).

This module decides; it moves nothing. Callers do `model.to(placement.device)` and wrap steps in
`placement.autocast()`. It is not the distributed setup (owngpt.distributed.Dist), which asks it for the device of a rank.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from owngpt.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEVICE_CHOICES = "auto | cpu | cuda | cuda:N | mps"
DEVICE_HELP = (
    "where to run: auto (cuda, else mps, else cpu; the choice is printed), cpu, cuda, cuda:N (the Nth GPU) or mps "
    "(Apple GPUs); default auto"
)
ENV = "OWNGPT_DEVICE"  # what `auto` means when set
_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_spec(spec: str) -> str:
    """`spec` normalised (lower case, stripped), or a ConfigError naming the accepted forms."""
    s = str(spec).strip().lower()
    if not _SPEC.match(s):
        raise ConfigError(f"device={spec!r}: expected one of {DEVICE_CHOICES} (e.g. --device cuda:1)")
    return s


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """The torch device `spec` names, checked against what this machine has.

    `local_rank` (under torchrun) picks the rank's GPU for `auto` and `cuda`: one device per rank. An explicit
    `cuda:N` is taken as given (the user pinned it).
    """
    import torch

    s = check_spec(spec)
    if s == "auto" and os.environ.get(ENV):
        s = check_spec(os.environ[ENV])
    if s == "auto":
        if torch.cuda.is_available():
            s = "cuda"
        elif _mps_available():
            s = "mps"
        else:
            return torch.device("cpu")
    if s == "cpu":
        return torch.device("cpu")
    if s == "mps":
        if not _mps_available():
            raise ConfigError(
                "--device mps: this torch sees no Apple GPU (torch.backends.mps.is_available() is False: not a Mac "
                "with Apple silicon / macOS 12.3+, or a torch build without MPS); use --device cpu or auto"
            )
        return torch.device("mps")
    # cuda or cuda:N
    if not torch.cuda.is_available():
        raise ConfigError(
            f"--device {s}: this torch sees no CUDA GPU (torch.cuda.is_available() is False: a CPU-only build of "
            "torch, or no NVIDIA driver); install a CUDA build of torch, or use --device cpu or auto"
        )
    index = int(s.split(":")[1]) if ":" in s else (local_rank or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"--device {spec}: this machine has {count} CUDA device(s), numbered 0 to {count - 1}")
    return torch.device("cuda", index)


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None: run in fp32)."""
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                f"precision=bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use precision=fp32 "
                "(or auto)"
            )
        return torch.bfloat16
    if precision != "auto":
        raise ConfigError(f"precision={precision!r}: expected one of auto, fp32, bf16")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "mps" and torch.backends.mps.is_macos_or_newer(14, 0):
        return torch.bfloat16
    return None


def configure_matmul(device: torch.device) -> None:
    """TF32 for fp32 matmuls and convolutions on cuda (what runs outside autocast, and under precision=fp32).

    torch >= 2.9 has the `fp32_precision` settings and refuses a mix of them with the legacy `allow_tf32` flags,
    so the new ones are used where they exist. Nothing changes on other devices.
    """
    import torch

    if device.type != "cuda":
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32"
        conv = getattr(torch.backends.cudnn, "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):
            conv.fp32_precision = "tf32"
    else:  # pragma: no cover - torch < 2.9
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@dataclass(frozen=True)
class Placement:
    """A resolved device and the autocast dtype used on it (None: fp32)."""

    device: Any  # torch.device
    dtype: Any = None  # torch.dtype | None

    def autocast(self) -> Any:
        """A fresh autocast context for this placement (disabled for fp32)."""
        import torch

        return torch.autocast(self.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None)

    @property
    def pin_memory(self) -> bool:
        """Whether host batches should be pinned: only CUDA copies asynchronously from page-locked memory."""
        return self.device.type == "cuda"

    def describe(self) -> str:
        import torch

        name = ""
        if self.device.type == "cuda":
            name = f" ({torch.cuda.get_device_name(self.device)})"
        elif self.device.type == "mps":
            name = " (Apple GPU)"
        if self.dtype is not None:
            prec = "bf16 autocast"
        else:
            prec = "fp32, TF32 matmuls" if self.device.type == "cuda" else "fp32"
        return f"{self.device}{name}, {prec}"


def choose(spec: str = "auto", precision: str = "auto", local_rank: int | None = None) -> Placement:
    """Resolve `spec` and `precision` together and set the device's matmul mode (see configure_matmul)."""
    device = resolve_device(spec, local_rank)
    configure_matmul(device)
    return Placement(device, autocast_dtype(device, precision))


def announce(placement: Placement, spec: str, file: Any = None) -> None:
    """One stderr line saying where the command runs ("says which it chose" for auto)."""
    chosen = f"device: {placement.describe()}"
    if check_spec(spec) == "auto":
        chosen += " (auto)"
    print(chosen, file=file or sys.stderr, flush=True)


def inference_device(spec: str | None, quiet: bool = False) -> Any:
    """The device an inference command (eval, generate, chat, serve, predict, export) loads its model onto.

    Inference keeps the weights in fp32 (TF32 matmuls on cuda): sampling and scores then match the CPU's up to
    rounding. Prints the choice unless `quiet` or the device is the CPU chosen by `auto` (the usual laptop case,
    where a line on every command would be noise).
    """
    spec = "auto" if spec is None else spec
    placement = choose(spec, "fp32")
    if not quiet and not (placement.device.type == "cpu" and check_spec(spec) == "auto"):
        announce(placement, spec)
    return placement.device
