"""Ahead-of-time compilation of every kernel variant the launchers can pick, with no GPU (docs/DESIGN.md §11).

``python -m vera_kernels.ops.aot --arch 80 90`` compiles each variant with
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))``, which runs
the whole pipeline down to ptxas (``--jobs`` processes), and prints one JSON line per failure, a summary line,
and on stderr a progress line as each kernel kind is done. It must run with
``TRITON_INTERPRET`` unset (under the interpreter ``triton.jit`` builds interpreter functions).

Variants (see ``variants``): for each kernel (its ``KernelSpec``) and each tuner kind (prefill/decode,
16-bit/float32), its GPU autotune configs, the block sizes its launcher picks on the host, its flag
combinations (GENERATE_AB, ALIGNED, DROPOUT, HAS_BIAS, HAS_IDS, NEED_G/NEED_GB, BASE_GEMM), the dtype
modes of the kind (float16, bfloat16; float32 IEEE and TF32), where loaded A/B come from (a stored float32
projection or the cached copy in the input dtype) and the weight layouts (contiguous, transposed); by
default a covering set in which every value of every one of these appears, with ``--full`` their whole
product. A variant also fails when it needs more shared memory than the architecture has (the launch would
fail).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from typing import Dict, Iterator, List

import torch
import triton

from . import SPECS
from ._launch import dot_args

_DTYPE_MODES = [
    ("fp32-ieee", torch.float32, "ieee"),
    ("fp32-tf32", torch.float32, "tf32"),
    ("fp16", torch.float16, "ieee"),
    ("bf16", torch.bfloat16, "ieee"),
]
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
# where a loaded A/B comes from: a stored float32 projection, or the copy in the input dtype cached on a
# seeded projection (VERA_KERNELS_AB_SOURCE=load)
_AB_SOURCES = ["stored-fp32", "cached-input"]
_FLOAT_ARGS = {"bound_a", "bound_b", "drop_scale"}


class Variant:
    """One specialisation of ``kernel`` (a ``@triton.jit`` function): constexpr values, pointer dtypes and
    launch options."""

    def __init__(self, name, kernel, dtype, precision, constexprs, io_ptrs, none_ptrs, unit_strides,
                 num_warps, num_stages, int_ptrs=()):
        self.name = name
        self.kernel = kernel
        self.dtype = dtype
        dot = dot_args(dtype)
        dot.update(DOT_PRECISION=precision, DOT_DTYPE=dot["IN_DTYPE"], INTERPRETER=False)  # GPU values
        if dtype == torch.float32:
            dot["RANK_PRECISION"] = precision
        self.constexprs = {k: v for k, v in dict(dot, **constexprs).items() if k in kernel.arg_names}
        self.io_ptrs = set(io_ptrs)
        self.int_ptrs = set(int_ptrs)
        self.none_ptrs = set(none_ptrs)
        self.unit_strides = set(unit_strides)
        self.num_warps = num_warps
        self.num_stages = num_stages

    def source(self):
        fn = self.kernel
        sig: Dict[str, str] = {}
        const = dict(self.constexprs)
        for arg in fn.arg_names:
            if arg in const:
                sig[arg] = "constexpr"
            elif arg in self.none_ptrs:
                sig[arg], const[arg] = "constexpr", None
            elif arg in self.unit_strides:
                sig[arg], const[arg] = "constexpr", 1  # what Triton specialises a stride of 1 to
            elif arg.endswith("_ptr"):
                sig[arg] = "*i64" if arg in self.int_ptrs else (_PTR[self.dtype] if arg in self.io_ptrs else "*fp32")
            elif arg in _FLOAT_ARGS:
                sig[arg] = "fp32"
            else:
                sig[arg] = "i32"
        return triton.compiler.ASTSource(fn, sig, const)

    def __repr__(self):
        return self.name


def _flag_sets(flags):
    names = [n for n, _ in flags]
    sets = [dict(zip(names, vals)) for vals in itertools.product(*(v for _, v in flags))]
    # rank_grads is never launched with neither output; the adapter-only GEMM kernels never with a bias, a row
    # scale or per-row ids
    return [f for f in sets if (f.get("NEED_G", True) or f.get("NEED_GB", True))
            and (f.get("BASE_GEMM", True) or not (f.get("HAS_BIAS") or f.get("HAS_ROW_SCALE") or f.get("HAS_IDS")))]


def _kernel_variants(op: str, full: bool) -> Iterator[Variant]:
    """Each kind's configs x host block sizes x flag sets x dtype modes x A/B sources x weight layouts.

    ``full``: the whole product. Otherwise a covering set: variant i takes entry i (cyclically) of every
    dimension, so each config, host block size, flag set, dtype mode, A/B source and layout is compiled at
    least once per kind, and the number of variants is the longest of the dimensions.
    """
    spec = SPECS[op]
    for kind, configs in spec.configs.items():
        fp32 = kind.endswith("-fp32")
        dims = [
            list(configs),
            spec.host_choices.get(kind, [{}]),
            _flag_sets(spec.flags),
            [m for m in _DTYPE_MODES if (m[1] == torch.float32) == fp32] if spec.io_ptrs else _DTYPE_MODES[:1],
            _AB_SOURCES if spec.ab_ptr else _AB_SOURCES[:1],
            list(spec.layouts),
        ]
        rows = itertools.product(*dims) if full else (
            [d[i % len(d)] for d in dims] for i in range(max(len(d) for d in dims)))
        for config, host, flags, (mode, dtype, precision), source, layout in rows:
            none = [p for p, (flag, value) in spec.none_if.items() if flags[flag] == value]
            io = list(spec.io_ptrs)
            if source == "cached-input" and spec.ab_ptr not in none:
                io.append(spec.ab_ptr)
            constexprs = dict(config.kwargs, **host, **flags)
            name = f"{op}[{kind}]/{mode}/{layout}/{source}/{constexprs}/w{config.num_warps}s{config.num_stages}"
            yield Variant(name, spec.kernel, dtype, precision, constexprs, io, none,
                          spec.layouts[layout], config.num_warps, config.num_stages, int_ptrs=spec.int_ptrs)


def variants(full: bool = False) -> List[Variant]:
    """Every kernel variant to compile (a covering set; the whole product with ``full``)."""
    return [v for op in SPECS for v in _kernel_variants(op, full)]


# shared memory a block may use (bytes): A100 / H100-H200
SHARED_LIMIT = {80: 166912, 90: 232448}


def compile_variant(variant: Variant, arch: int):
    """Compile one variant for ``sm_<arch>`` through ptxas; returns the compiled kernel."""
    from triton.backends.compiler import GPUTarget

    return triton.compile(variant.source(), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=variant.num_warps, num_stages=variant.num_stages))


_TODO: list = []  # the (variant, arch) pairs of one main() run, read by _check in forked workers


def _check(i: int):
    """Compile ``_TODO[i]``: ``None``, or why it fails (an error, or more shared memory than the arch has)."""
    v, a = _TODO[i]
    try:
        compiled = compile_variant(v, a)
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
        if compiled.metadata.shared > SHARED_LIMIT[a]:
            raise RuntimeError(f"needs {compiled.metadata.shared} bytes of shared memory, sm_{a} has "
                               f"{SHARED_LIMIT[a]}: the launch would fail")
    except Exception as e:  # report every failure, keep going
        return f"{type(e).__name__}: {e}"[:4000]
    return None


def main(argv=None) -> int:
    global _TODO
    parser = argparse.ArgumentParser(prog="python -m vera_kernels.ops.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--shard", default="0/1", help="i/n: compile every n-th variant starting at i")
    parser.add_argument("--full", action="store_true", help="the whole product of configs and block sizes")
    parser.add_argument("--match", default="", help="only variants whose name contains this text")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compiling processes")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress line on stderr after each kernel kind (count, failures, seconds)")
    args = parser.parse_args(argv)
    i, n = (int(v) for v in args.shard.split("/"))
    todo = [(v, a) for v in variants(args.full) if args.match in v.name for a in args.arch][i::n]
    if args.list:
        for v, a in todo:
            print(f"sm_{a} {v.name}")
        return 0
    _TODO = todo
    failures = group_failures = group_start = 0
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        if args.jobs > 1 and len(todo) > 1:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(min(args.jobs, len(todo))))
            results = pool.imap(_check, range(len(todo)))
        else:
            results = map(_check, range(len(todo)))
        for k, error in enumerate(results):
            v, a = todo[k]
            if error:
                failures += 1
                group_failures += 1
                print(json.dumps({"variant": v.name, "arch": a, "error": error}), flush=True)
            kind = v.name.split("/")[0]
            if k + 1 == len(todo) or todo[k + 1][0].name.split("/")[0] != kind:
                if not args.quiet:
                    print(f"[{k + 1}/{len(todo)} {time.time() - t0:.0f}s] {kind} for "
                          f"{', '.join(f'sm_{x}' for x in args.arch)}: {k + 1 - group_start - group_failures} compiled, "
                          f"{group_failures} failed", file=sys.stderr, flush=True)
                group_start, group_failures = k + 1, 0
    print(json.dumps({"compiled": len(todo) - failures, "failed": failures, "seconds": round(time.time() - t0, 1)}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
