"""Launch helpers of the Triton kernels: the contract of a kernel (``KernelSpec``), kernel arguments
(keys, dtypes, projection and dropout), where A/B tiles come from and the launch choices shared by several
ops."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..core import interpreting
from . import rehearsal

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def autotuning() -> bool:
    """False under the interpreter or with ``VERA_KERNELS_AUTOTUNE=0``: then one config per kernel."""
    return not interpreting() and os.environ.get("VERA_KERNELS_AUTOTUNE", "1") != "0"


def dot_args(dtype: torch.dtype) -> dict:
    """The constexpr arguments that set how a kernel multiplies, for inputs of ``dtype``.

    ``IN_DTYPE``: the input dtype (A/B tiles are rounded to it). ``DOT_DTYPE``: what ``IN_DTYPE``
    products run in (float32 for bfloat16 under the interpreter, whose ``tl.dot`` multiplies raw
    bfloat16 bits). ``DOT_PRECISION``: IEEE float32 products unless ``torch.get_float32_matmul_precision()``
    allows TF32. ``RANK_PRECISION``: the products with a float32 scaled operand (``rank_mma``): TF32 for
    16-bit inputs, else ``DOT_PRECISION``. ``INTERPRETER``: Triton's interpreter runs the kernel, which
    then does the GPU's roundings (TF32 operands, float32 -> bfloat16) on the bits itself.
    """
    in_dtype = _TL_DTYPES[dtype]
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    dot_precision = "tf32" if tf32 else "ieee"
    rank_precision = dot_precision if dtype == torch.float32 else "tf32"
    return dict(
        IN_DTYPE=in_dtype,
        DOT_DTYPE=tl.float32 if (dtype == torch.bfloat16 and interpreting()) else in_dtype,
        DOT_PRECISION=dot_precision,
        RANK_PRECISION=rank_precision,
        INTERPRETER=interpreting(),
    )


def to_i32(word: int) -> int:
    """A uint32 word as the signed int32 with the same bits (kernel arguments are then always i32)."""
    word &= 0xFFFFFFFF
    return word - (1 << 32) if word >= (1 << 31) else word


def key_args(seed: int) -> Tuple[int, int]:
    """A 64-bit Philox seed split into key words ``(seed mod 2**32, seed >> 32)`` as i32 kernel args."""
    return to_i32(seed), to_i32(seed >> 32)


# Where the kernels take A/B tiles from for a seeded projection: "generate" them from the seed in
# registers, or "load" them from a copy in the input dtype cached on the projection (2 * r * (K_max + N_max)
# values shared by every layer). VERA_KERNELS_AB_SOURCE forces one; unset, ``default_ab_source`` decides.
AB_SOURCE_ENV = "VERA_KERNELS_AB_SOURCE"
AB_SOURCES = ("generate", "load")


def default_ab_source(M: int, K: int, N: int, R: int, dtype: torch.dtype) -> str:
    """The launchers' own choice per shape: "generate" everywhere until a GPU measurement says otherwise."""
    return "generate"


def ab_source(M: int, K: int, N: int, R: int, dtype: torch.dtype) -> str:
    """``VERA_KERNELS_AB_SOURCE`` ("generate" or "load") when set, else ``default_ab_source``."""
    env = os.environ.get(AB_SOURCE_ENV, "").strip().lower()
    if env == "":
        return default_ab_source(M, K, N, R, dtype)
    if env not in AB_SOURCES:
        raise ValueError(f"{AB_SOURCE_ENV} must be one of {', '.join(AB_SOURCES)} (or unset), got {env!r}")
    return env


class MatrixArgs(NamedTuple):
    """One projection matrix as a kernel takes it: generate it (key words, bound) or load ``tensor``."""

    generate: bool
    key0: int
    key1: int
    bound: float
    tensor: Optional[torch.Tensor]  # None when generated


class DropoutArgs(NamedTuple):
    """A call's dropout as a kernel takes it (inert values without dropout)."""

    active: bool
    key0: int
    key1: int
    threshold: int
    scale: float


def matrix_args(projection, matrix: int, device, dtype=torch.float32, shape=(0, 0, 0), offset: int = 0) -> MatrixArgs:
    """Kernel arguments for ``A`` (``matrix = 0``) or ``B`` (``matrix = 1``) of a projection.

    Seeded projections pass their key and bound (the tensor is then ``None``: never allocated), unless
    ``ab_source`` for ``shape = (M, K, N)`` says "load": then the copy of ``A``/``B`` in ``dtype`` cached on
    the projection is passed. Stored projections pass their float32 tensors on ``device``. A passed tensor
    starts at the layer's shard: ``A[:, offset:]`` (``in_offset``), ``B[offset:]`` (``out_offset``).
    """
    if projection.is_seeded:
        k0, k1 = key_args(projection.seed)
        if ab_source(*shape, projection.rank, dtype) == "generate":
            return MatrixArgs(True, k0, k1, projection.bound_a if matrix == 0 else projection.bound_b, None)
        A, B = projection.materialize(dtype, device, cache=True)
    else:
        A, B = projection.tensors_on(device)
    return MatrixArgs(False, 0, 0, 1.0, A[:, offset:] if matrix == 0 else B[offset:])


def dropout_args(dropout) -> DropoutArgs:
    """A call's dropout (``vera_kernels.core.Dropout`` or ``None``) as kernel arguments."""
    if dropout is None:
        return DropoutArgs(False, 0, 0, 0, 1.0)
    k0, k1 = key_args(dropout.seed)
    return DropoutArgs(True, k0, k1, int(dropout.threshold), float(dropout.scale))


def device_guard(device: torch.device):
    """A context in which ``device`` is the current CUDA device (Triton launches on the current device, like
    ``c10::cuda::CUDAGuard`` in the native ops, so tensors on ``cuda:1`` are not launched on ``cuda:0``);
    does nothing for other devices. Every launcher launches its kernel inside one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device`` (the rehearsed GPU's for the CPU tensors of the GPU rehearsal;
    a small stand-in under the interpreter)."""
    if device.type == "cuda" or rehearsal.active_arch() is not None:
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def pick_configs(gpu_configs: List[triton.Config], interpreter_config: triton.Config) -> List[triton.Config]:
    """The autotune list: every GPU config, or only ``interpreter_config`` / the first one when not tuning."""
    if interpreting():
        return [interpreter_config]
    if not autotuning():
        return gpu_configs[:1]
    return gpu_configs


class Launch(NamedTuple):
    """What a launcher picks on the host for one call: the tuner ``kind``, the constexprs it sets itself
    (``host``, e.g. ``BLOCK_M``), and for a split reduction ``splits`` ranges of ``span`` each."""

    kind: str
    host: dict
    splits: int = 1
    span: int = 0


@dataclass(frozen=True)
class KernelSpec:
    """The contract of one Triton kernel: ``SPEC`` of its op module, read by its launcher, the AOT compile
    (``ops/aot.py``), the GPU rehearsal and the static report.

    - ``kernel``: the ``@triton.jit`` function.
    - ``configs``: the GPU autotune list per tuner kind (``"prefill"``, ``"decode-fp32"``, ...); the first
      config of a kind is the one used with autotuning off.
    - ``interpreter``, ``keys``: per base kind (the part before ``-fp32``: float32 kernels get their own,
      smaller tiles) the interpreter's one config and the autotune key.
    - ``launch(M, K, N, R, dtype, sms=None, **options) -> Launch``: the launcher's choice for a call
      (``sms``: the GPU's SMs, needed by a split reduction); ``None``: kind ``name``, nothing chosen.
    - ``host_choices``: per kind, every ``Launch.host`` that ``launch`` can return on a GPU (default
      ``[{}]``), so that the AOT compile covers each.
    - the kernel's signature for the AOT compile: ``flags`` (constexpr booleans and the values they take),
      ``none_if`` (pointers that are ``None`` when a flag has a value), ``io_ptrs`` (pointers in the input
      dtype; other pointers are float32), ``int_ptrs`` (int64 pointers), ``ab_ptr`` (the A/B pointer: in
      the input dtype when it is the cached copy) and ``layouts`` (per weight layout, its unit strides).

    ``tuners`` (built from the above): one autotuner of ``kernel`` per kind.
    """

    name: str
    kernel: Callable
    configs: Dict[str, List[triton.Config]]
    interpreter: Dict[str, triton.Config]
    keys: Dict[str, List[str]]
    launch: Optional[Callable[..., Launch]] = None
    host_choices: Dict[str, List[dict]] = field(default_factory=dict)
    flags: Sequence[Tuple[str, tuple]] = ()
    none_if: Dict[str, Tuple[str, bool]] = field(default_factory=dict)
    io_ptrs: Sequence[str] = ()
    int_ptrs: Sequence[str] = ()
    ab_ptr: Optional[str] = None
    layouts: Dict[str, Sequence[str]] = field(default_factory=lambda: {"contiguous": ()})
    tuners: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        tuners = {}
        for kind, gpu in self.configs.items():
            base = kind.split("-")[0]
            tuners[kind] = triton.autotune(configs=pick_configs(gpu, self.interpreter[base]),
                                           key=self.keys[base])(self.kernel)
        object.__setattr__(self, "tuners", tuners)


# The two GEMMs with a rank-r epilogue (fused_forward, grad_input) run a "prefill" kernel (autotuned
# tiles, tuned per M: a training run sees few distinct token counts) or, for M <= DECODE_MAX_M, a
# "decode" kernel with one row block whose BLOCK_M the host picks (tuned per BLOCK_M).
DECODE_MAX_M = 64
GEMM_HOST_CHOICES = {"decode": [dict(BLOCK_M=b) for b in (16, 32, DECODE_MAX_M)],
                     "decode-fp32": [dict(BLOCK_M=b) for b in (16, 32, DECODE_MAX_M)]}
GEMM_KEYS = {"prefill": ["N", "K", "R", "M"], "decode": ["N", "K", "R", "BLOCK_M"]}


def gemm_launch(M: int, K: int, N: int, R: int, dtype: torch.dtype, sms=None, decode=None) -> Launch:
    """The launch of a GEMM with a rank-r epilogue (fused_forward, grad_input): with ``decode`` (default:
    ``M <= DECODE_MAX_M``) the kernel with one row block of a host-chosen ``BLOCK_M`` (W streamed once),
    otherwise the autotuned prefill tiles."""
    if decode is None:
        decode = M <= DECODE_MAX_M
    if decode:
        return Launch(kind_of("decode", dtype), dict(BLOCK_M=min(next_pow2(M), DECODE_MAX_M)))
    return Launch(kind_of("prefill", dtype), {})


def gemm_grid(M: int, cols: int, launch: Launch, col_block: str):
    """The grid of a GEMM launch writing ``[M, cols]`` in column tiles of ``meta[col_block]``."""
    if "BLOCK_M" in launch.host:
        num_m = triton.cdiv(M, launch.host["BLOCK_M"])
        return lambda meta: (num_m * triton.cdiv(cols, meta[col_block]),)
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(cols, meta[col_block]),)


def vector_args(vec: torch.Tensor, ids) -> tuple:
    """``(tensor, row stride)`` of a scaling vector ``[L]`` or, with per-row ``ids``, a bank ``[n, L]``
    (made contiguous along L: the kernels index its rows)."""
    if ids is None:
        return vec.contiguous(), 0
    vec = vec.contiguous()
    return vec, vec.stride(0)


def kind_of(base: str, dtype: torch.dtype) -> str:
    """The tuner kind for ``base`` (e.g. ``"prefill"``) and inputs of ``dtype``."""
    return base + "-fp32" if dtype == torch.float32 else base


def split_reduction(length: int, programs: int, sms: Optional[int], split, align: int) -> Tuple[int, int]:
    """``(splits, span)``: how many ranges of ``span`` (a multiple of ``align``) cover ``length``.

    With ``split=None``, enough ranges to give every one of ``sms`` SMs a program when ``programs`` alone
    do not.
    """
    if split is None:
        split = max(1, min(triton.cdiv(sms, programs), triton.cdiv(length, align)))
    span = triton.cdiv(triton.cdiv(length, split), align) * align
    return triton.cdiv(length, span), span


def next_pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two >= max(n, lo)."""
    return max(lo, triton.next_power_of_2(max(1, n)))
