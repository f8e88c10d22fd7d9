"""Static GPU evidence for every Triton kernel variant, with no GPU: registers, spills, shared memory and
the instruction mix of each loop, from ptxas and the cubin's SASS.

    python -m benchmarks.static --arch 90 --out benchmarks/static/sm90.json
    python -m benchmarks.static --regenerate     # sm_90 and sm_80 JSON + the tables of NOTES.md

Variants come from ``vera_kernels.ops.aot`` (the same enumeration and compile call as the AOT test).
By default the report covers every *first-choice* variant: the first autotune config of each kind (the
one used with autotuning off) crossed with every host block size, flag set, dtype mode and weight
layout; ``--configs all`` takes every autotune config, ``--configs lean`` drops the bf16 twins, the
transposed-W layout and the cached 16-bit A/B source (a third of the compiles), ``--configs smoke`` keeps
the heaviest variant per kind (the test's sample). ``--update`` recompiles the selected kinds into the
existing JSON; ``--reuse --explain-spills`` adds, for every spilling record, the ptxas figures without
the ``--regAllocOptLevel=2`` Triton passes (``ptxas.default_regalloc``).

For each variant:

* ``ptxas``: registers, spill stores/loads (bytes), stack frame, barriers, from ptxas ``-v``, and its
  performance warnings (``warnings``; ``serialised_wgmma``: C7515, which ``predict`` charges). The PTX is
  assembled a second time through Triton's own ``make_cubin`` (same flags) with its log kept; the
  resulting cubin is compared with the compiled one (``ptxas.identical_cubin``).
* ``shared``: the dynamic shared memory Triton launches the kernel with (``metadata.shared``, bytes).
* ``loops``: the SASS (``nvdisasm -c`` on the cubin) is split into loops. A loop is a *backward
  branch*: a ``BRA`` whose target label lies at or before the branch; the body is every instruction
  from the target to the branch (several back edges to one header make one loop, ending at the last of
  them). An unconditional self-branch (``.L: BRA .L`` after the last ``EXIT``, the end-of-code trap) is
  not a loop. Loops nested in another get ``depth`` > 0; ``innermost`` loops contain no other loop.
  Counts are static (instructions in the body, each executed once per iteration when no forward branch
  inside skips it), per warp.
* instruction classes (see ``classify``): tensor-core MMA (HMMA/HGMMA; MACs from the shape in the
  opcode), ``imad`` (IMAD/IMUL/IDP: the FMA-heavy pipe), ``alu`` (IADD3, LOP3, SHF, LEA, ISETP, SEL,
  PRMT, F2FP ...: the ALU pipe), ``fp32`` (FFMA/FMUL/FADD/HFMA2), ``xu`` (MUFU, I2F, F2I), loads,
  stores, uniform-datapath, control/sync, other. ``philox_products``: IMAD* whose immediate is a Philox
  multiplier (0xD2511F53, 0xCD9E8D57, printed as -0x2daee0ad / -0x326172a9); a Philox4x32-10 call is
  20 32x32-bit multiplies, each needing its high and low half (40 products; IMAD.WIDE gives both).

``predict`` turns the loop counts of the fp16/bf16 first-choice variants into a per-kernel bound at
decode (M = 16) and prefill (M = 4096), K = N = 4096, r = 256 and 1024, from per-SM issue rates (see
``RATES``) and HBM bandwidth. ``--notes FILE`` rewrites the generated block of FILE (between
``<!-- static-report:begin -->`` and ``<!-- static-report:end -->``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
RESULTS = HERE  # sm90.json, sm80.json
NOTES = HERE / "NOTES.md"
BEGIN, END = "<!-- static-report:begin -->", "<!-- static-report:end -->"

# ---------------------------------------------------------------------------------------------
# ptxas log
# ---------------------------------------------------------------------------------------------

_PTXAS_PATTERNS = {
    "stack_frame": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "registers": r"Used (\d+) registers",
    "barriers": r"used (\d+) barriers",
    "smem_static": r"(\d+) bytes smem",
}


def parse_ptxas_log(text: str) -> dict:
    """Registers, spill stores/loads, stack frame, barriers and static shared memory from ``ptxas -v``.

    Raises ``ValueError`` when the log has no register count (not a ``-v`` log of one entry function).
    """
    out = {}
    for key, pattern in _PTXAS_PATTERNS.items():
        m = re.search(pattern, text)
        out[key] = int(m.group(1)) if m else 0
    if not re.search(_PTXAS_PATTERNS["registers"], text):
        raise ValueError(f"no 'Used N registers' line in the ptxas log:\n{text[:2000]}")
    return out


# ---------------------------------------------------------------------------------------------
# SASS parsing
# ---------------------------------------------------------------------------------------------

_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+"          # /*address*/
                    r"(?:(@!?U?P(?:T|\d+))\s+)?"                # optional guard predicate
                    r"([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)"      # opcode with modifiers
                    r"\s*(.*?)\s*;")                             # operands
_LABEL = re.compile(r"^\s*([.$\w]+):\s*$")
_TARGET = re.compile(r"`\(([^)]+)\)")

PHILOX_MULTIPLIERS = ("0xd2511f53", "-0x2daee0ad", "0xcd9e8d57", "-0x326172a9")


class Instr:
    """One SASS instruction: byte address, guard predicate (or ''), opcode with modifiers, operand text."""

    __slots__ = ("addr", "pred", "opcode", "operands")

    def __init__(self, addr: int, pred: str, opcode: str, operands: str):
        self.addr, self.pred, self.opcode, self.operands = addr, pred, opcode, operands

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    def __repr__(self):
        return f"/*{self.addr:04x}*/ {self.pred + ' ' if self.pred else ''}{self.opcode} {self.operands}"


def parse_sass(text: str) -> Tuple[List[Instr], Dict[str, int]]:
    """``(instructions, labels)`` of ``nvdisasm`` output; ``labels`` maps a label to the address it marks.

    Only code lines (``/*addr*/ [@pred] OPCODE operands ;``) and labels are read; directives are skipped.
    A label marks the address of the next instruction.
    """
    instrs: List[Instr] = []
    labels: Dict[str, int] = {}
    pending: List[str] = []
    for line in text.splitlines():
        m = _INSTR.match(line)
        if m:
            ins = Instr(int(m.group(1), 16), m.group(2) or "", m.group(3), m.group(4))
            for name in pending:
                labels[name] = ins.addr
            pending = []
            instrs.append(ins)
            continue
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
    if pending and instrs:  # labels after the last instruction (end-of-code markers)
        for name in pending:
            labels[name] = instrs[-1].addr + 16
    return instrs, labels


def find_loops(instrs: List[Instr], labels: Dict[str, int]) -> List[dict]:
    """Loops of a function from its backward branches (see the module docstring).

    Returns dicts ``{"start", "end", "depth", "innermost", "back_edges"}`` (byte addresses, ``end``
    inclusive: the last back edge), ordered by ``start``.
    """
    heads: Dict[int, List[int]] = {}
    for ins in instrs:
        if ins.base in ("BRA", "BRX", "JMP"):
            m = _TARGET.search(ins.operands)
            if m and m.group(1) in labels:
                target = labels[m.group(1)]
                trap = target == ins.addr and not ins.pred  # unconditional self-branch: the end-of-code trap
                if target <= ins.addr and not trap:
                    heads.setdefault(target, []).append(ins.addr)
    loops = [{"start": s, "end": max(ends), "back_edges": len(ends)} for s, ends in sorted(heads.items())]
    for lp in loops:
        inside = [o for o in loops if o is not lp and lp["start"] <= o["start"] and o["end"] <= lp["end"]]
        outside = [o for o in loops if o is not lp and o["start"] <= lp["start"] and lp["end"] <= o["end"]]
        lp["innermost"] = not inside
        lp["depth"] = len(outside)
    return loops


_ALU = {"IADD3", "IADD", "IADD32I", "LOP3", "LOP", "LOP32I", "SHF", "SHL", "SHR", "LEA", "ISETP", "ICMP", "SEL",
        "IABS", "IMNMX", "VIMNMX", "VIMNMX3", "VIADD", "VIADDMNMX", "PRMT", "SGXT", "BMSK", "BREV", "FLO", "POPC",
        "P2R", "R2P", "PLOP3", "MOV", "MOV32I", "FSEL", "FSETP", "FSET", "FMNMX", "FMNMX3", "F2FP", "HSETP2",
        "HSET2", "HMNMX2", "VABSDIFF4", "IDE", "CSET", "CSETP"}
_IMAD = {"IMAD", "IMAD32I", "IMUL", "IMUL32I", "IDP", "IMADSP", "XMAD"}
_FP32 = {"FFMA", "FFMA32I", "FMUL", "FMUL32I", "FADD", "FADD32I", "FFMA2", "FMUL2", "FADD2", "HFMA2", "HADD2",
         "HMUL2", "FSWZADD"}
_XU = {"MUFU", "I2F", "F2I", "F2F", "I2FP", "F2IP", "FRND", "I2I", "I2IP", "FCHK"}
_TENSOR = {"HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "DMMA", "BMMA", "UTCHMMA", "UTCQMMA", "UTCIMMA"}
_LOAD = {"LD", "LDG", "LDS", "LDSM", "LDGSTS", "LDL", "LDC", "LDTM", "UTMALDG", "UBLKCP", "TLD", "TEX", "SULD",
         "LDGDEPBAR_NO"}
_STORE = {"ST", "STG", "STS", "STSM", "STL", "STAS", "STTM", "UTMASTG", "RED", "REDG", "REDUX", "ATOM", "ATOMG",
          "ATOMS", "UTMAREDG", "SUST"}
_CONTROL = {"BRA", "BRX", "JMP", "CALL", "RET", "EXIT", "BAR", "BSSY", "BSYNC", "WARPSYNC", "NOP", "YIELD",
            "DEPBAR", "LDGDEPBAR", "ARRIVES", "SYNCS", "WARPGROUP", "MEMBAR", "FENCE", "ERRBAR", "CCTL", "ELECT",
            "VOTE", "VOTEU", "S2R", "S2UR", "CS2R", "CS2UR", "SHFL", "R2UR", "BMOV", "BPT", "BREAK", "CGAERRBAR",
            "MATCH", "NANOSLEEP", "ACQBULK", "PREEXIT", "USETMAXREG", "LEPC", "UCGABAR_ARV", "UCGABAR_WAIT"}

CLASSES = ("tensor", "imad", "alu", "fp32", "xu", "load", "store", "uniform", "control", "other")


def classify(ins: Instr) -> str:
    """The class of an instruction (one of ``CLASSES``): which pipe it issues to, roughly.

    ``imad``: the FMA-heavy pipe's integer work (IMAD in all forms, including the ``IMAD.MOV``/``IMAD.SHL``
    the compiler uses as moves and shifts). ``alu``: integer add/logic/shift/compare/select and FP32
    compare/select/pack, the ALU pipe. ``uniform``: uniform-datapath ``U*`` instructions (one per warp).
    """
    b = ins.base
    if b in _TENSOR:
        return "tensor"
    if b in _IMAD:
        return "imad"
    if b in _ALU:
        return "alu"
    if b in _FP32:
        return "fp32"
    if b in _XU:
        return "xu"
    if b in _LOAD:
        return "load"
    if b in _STORE:
        return "store"
    if b in _CONTROL:
        return "control"
    if b.startswith("U"):
        return "uniform"
    return "other"


def mma_shape(ins: Instr) -> Optional[Tuple[int, int, int, str]]:
    """``(m, n, k, kind)`` of a tensor-core instruction, ``kind`` in {"f16", "tf32", "int8", "fp8", "f64"}.

    HMMA shapes are written ``16816`` (m16 n8 k16) / ``1688``; HGMMA shapes ``64x128x16`` (per warpgroup).
    Returns None for a non-MMA instruction or an unreadable shape.
    """
    parts = ins.opcode.split(".")
    if parts[0] not in _TENSOR or len(parts) < 2:
        return None
    mods = set(parts[2:])
    kind = "tf32" if "TF32" in mods else ("fp8" if mods & {"E4M3", "E5M2"} else
                                          ("int8" if parts[0] in ("IMMA", "IGMMA") else
                                           ("f64" if parts[0] == "DMMA" else "f16")))
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", parts[1])
    if m:
        return int(m.group(1)), int(m.group(2)), int(m.group(3)), kind
    m = re.fullmatch(r"(16|8)(8|16)(\d+)", parts[1])
    if m:
        return int(m.group(1)), int(m.group(2)), int(m.group(3)), kind
    return None


def is_philox_multiply(ins: Instr) -> int:
    """Products of a Philox round this instruction computes: 2 for IMAD.WIDE (high and low half), 1 for
    IMAD.HI or a plain IMAD with a Philox multiplier, else 0."""
    if ins.base != "IMAD" or not any(c in ins.operands.lower() for c in PHILOX_MULTIPLIERS):
        return 0
    return 2 if ".WIDE" in ins.opcode else 1


OPCODES_KEPT = 24  # the most frequent opcodes kept per loop in the JSON


def mix(instrs: Iterable[Instr]) -> dict:
    """Instruction mix of a range (per warp): class counts, opcode histogram, MMA and Philox figures.

    ``mma_macs_per_warp``: multiply-adds one warp's MMA instructions contribute (an HGMMA, issued by the
    4 warps of a warpgroup, counts a quarter of its ``m·n·k`` per warp). ``mma_kinds``: MACs by kind.
    """
    classes = Counter({c: 0 for c in CLASSES})
    opcodes: Counter = Counter()
    macs: Counter = Counter()
    philox = total = 0
    for ins in instrs:
        total += 1
        classes[classify(ins)] += 1
        opcodes[ins.opcode] += 1
        philox += is_philox_multiply(ins)
        shape = mma_shape(ins)
        if shape:
            m, n, k, kind = shape
            macs[kind] += m * n * k // (4 if ins.base.endswith("GMMA") else 1)
    return {"instructions": total, "classes": dict(classes), "philox_products": philox,
            "philox_calls_per_warp": round(philox / 40, 2), "mma_macs_per_warp": sum(macs.values()),
            "mma_kinds": dict(macs), "opcodes": dict(opcodes.most_common(OPCODES_KEPT))}


def analyse_sass(text: str) -> dict:
    """Whole-function mix and per-loop mixes (see ``find_loops``) of one kernel's ``nvdisasm`` output."""
    instrs, labels = parse_sass(text)
    if not instrs:
        raise ValueError("no SASS instructions found in the disassembly")
    loops = find_loops(instrs, labels)
    out = []
    for lp in loops:
        body = [i for i in instrs if lp["start"] <= i.addr <= lp["end"]]
        out.append(dict(lp, start=f"{lp['start']:#06x}", end=f"{lp['end']:#06x}", **mix(body)))
    return {"function": mix(instrs), "loops": out}


# ---------------------------------------------------------------------------------------------
# issue-rate model
# ---------------------------------------------------------------------------------------------

# Per SM per clock. Warp instructions for the pipes; multiply-adds for the tensor cores (dense).
#   sm_90 (H100/H200): 4 SMSPs, each dispatching 1 warp instruction/clk; ALU and FMA-heavy pipes are 16
#   lanes wide per SMSP (a warp instruction every 2 clk each), FP32 also runs on FMA-lite (together 32
#   lanes); IMAD only on FMA-heavy. Tensor cores: 989.4 dense FP16 TFLOP/s over 132 SMs at 1.83 GHz =
#   4096 FLOP = 2048 FP16 MACs/clk/SM, TF32 half of that. XU (MUFU, conversions): 16 lanes/clk/SM.
#   sm_80 (A100): same dispatch and ALU; one 16-lane FMA pipe per SMSP shared by FP32 and IMAD;
#   312 dense FP16 TFLOP/s over 108 SMs at 1.41 GHz = 1024 MACs/clk/SM.
RATES = {
    90: {"issue": 4.0, "alu": 2.0, "imad": 2.0, "fma_all": 4.0, "xu": 0.5,
         "tensor": {"f16": 2048.0, "tf32": 1024.0, "int8": 4096.0, "fp8": 4096.0, "f64": 64.0},
         "sms": 132, "clock_ghz": 1.83, "hbm_tb_s": 4.8, "name": "H200 (H100 SXM: same SM, 3.35 TB/s)"},
    80: {"issue": 4.0, "alu": 2.0, "imad": 2.0, "fma_all": 2.0, "xu": 0.5,
         "tensor": {"f16": 1024.0, "tf32": 512.0, "int8": 2048.0, "fp8": 2048.0, "f64": 64.0},
         "sms": 108, "clock_ghz": 1.41, "hbm_tb_s": 2.0, "name": "A100-80GB SXM"},
}


def loop_time_cycles(cyc: dict, serialised_wgmma: bool = False) -> float:
    """Cycles of one loop iteration: its slowest pipe, or, when ptxas serialised the loop's wgmma (each
    waits for the previous one to finish, so nothing else overlaps the tensor pipe), the tensor time plus
    the slowest other pipe."""
    if serialised_wgmma and cyc["tensor"] > 0:
        return cyc["tensor"] + max(cyc[k] for k in ("issue", "alu", "fma", "xu"))
    return cyc[cyc["bound"]]


def loop_cycles(loop_mix: dict, num_warps: int, arch: int) -> dict:
    """Clock cycles one SM needs per loop iteration of one program (``num_warps`` warps), per pipe.

    ``issue``: all instructions at 1/clk per SMSP; ``alu``; ``fma``: IMAD on FMA-heavy, FP32 on both FMA
    pipes; ``xu``; ``tensor``: MACs at the dense tensor rate. ``bound``: the largest. Memory and latency
    are not modelled (a throughput lower bound).
    """
    r = RATES[arch]
    c = loop_mix["classes"]
    w = num_warps
    cyc = {
        "issue": loop_mix["instructions"] * w / r["issue"],
        "alu": c["alu"] * w / r["alu"],
        "fma": max(c["imad"] * w / r["imad"], (c["imad"] + c["fp32"]) * w / r["fma_all"]),
        "xu": c["xu"] * w / r["xu"],
        "tensor": sum(macs * w / r["tensor"][kind] for kind, macs in loop_mix["mma_kinds"].items()),
    }
    cyc = {k: round(v, 1) for k, v in cyc.items()}
    cyc["bound"] = max(("tensor", "alu", "fma", "xu", "issue"), key=lambda k: cyc[k])
    return cyc


# ---------------------------------------------------------------------------------------------
# variants and compilation
# ---------------------------------------------------------------------------------------------

_NAME = re.compile(r"^(\w+)\[([\w-]+)\]/([\w-]+)/([\w-]+)/")


def _aot():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the static report compiles for the GPU: unset TRITON_INTERPRET (under the "
                           "interpreter triton.jit builds interpreter functions)")
    from vera_kernels.ops import aot

    return aot


def describe(variant) -> dict:
    """``op``, ``kind``, ``dtype_mode``, ``layout``, ``config_index`` (-1 when no config matches),
    ``constexprs`` (the ints/bools), ``num_warps``, ``num_stages`` of an ``aot.Variant``."""
    aot = _aot()
    m = _NAME.match(variant.name)
    if not m:
        raise ValueError(f"unexpected variant name {variant.name!r}")
    op, kind, mode, layout = m.groups()
    index = -1
    for i, cfg in enumerate(aot.SPECS[op].configs[kind]):
        if (all(variant.constexprs.get(k) == v for k, v in cfg.kwargs.items())
                and cfg.num_warps == variant.num_warps and cfg.num_stages == variant.num_stages):
            index = i
            break
    consts = {k: v for k, v in variant.constexprs.items() if isinstance(v, (bool, int)) and not isinstance(v, str)}
    return {"op": op, "kind": kind, "dtype_mode": mode, "layout": layout, "config_index": index,
            "constexprs": consts, "num_warps": variant.num_warps, "num_stages": variant.num_stages}


SELECTIONS = ("first", "lean", "all", "covering", "smoke")


def select(configs: str = "first", match: str = "") -> list:
    """The variants to report: ``configs="first"`` (first autotune config of each kind, every host block
    size / flag set / dtype mode / layout), ``"all"`` (every config too), ``"covering"`` (the AOT test's
    covering set), ``"lean"`` (``"first"`` less the compiles that differ from a kept one only as bf16 from
    fp16, the transposed-W layout from the contiguous one, or a cached 16-bit copy of loaded A/B from a
    stored float32 one: a quarter of the compile time) or ``"smoke"`` (one heavy first-choice variant per
    kind and dtype, see ``_smoke``); only names containing ``match``.

    Every selection drops exact duplicates: a variant that generates A/B (``GENERATE_AB``) compiles the
    same with either A/B source (its A/B pointer is ``None``), so only its ``stored-fp32`` twin is kept.
    """
    aot = _aot()
    if configs not in SELECTIONS:
        raise ValueError(f"configs must be one of {SELECTIONS}, not {configs!r}")
    vs = aot.variants(full=configs != "covering")
    vs = [v for v in vs if not ("/cached-input/" in v.name and v.constexprs.get("GENERATE_AB"))]
    if configs in ("first", "lean", "smoke"):
        vs = [v for v in vs if describe(v)["config_index"] == 0]
    if configs == "lean":
        vs = [v for v in vs if "/bf16/" not in v.name and "/transposed-W/" not in v.name
              and "/cached-input/" not in v.name]
    if configs == "smoke":
        vs = _smoke(vs)
    return [v for v in vs if match in v.name]


def _smoke(first: list) -> list:
    """Per kernel kind and dtype mode without TF32: the first-choice variant with every flag on (per-row
    ids, dropout, bias, generated A/B ...) and the largest host BLOCK_M, contiguous layout (the most
    registers of its kind, as a rule); for kernels with an ``ALIGNED`` flag, once aligned and once not
    (a shard offset that is not a multiple of 4: one Philox call per element)."""
    best: Dict[tuple, tuple] = {}
    for v in first:
        d = describe(v)
        if d["layout"] != "contiguous" or d["dtype_mode"] == "fp32-tf32":
            continue
        flags = sum(1 for k, x in d["constexprs"].items()
                    if x is True and k.isupper() and k not in ("SPLIT", "ALIGNED"))
        score = (flags, d["constexprs"].get("BLOCK_M", 0), d["constexprs"].get("BLOCK_R", 0))
        key = (d["op"], d["kind"], d["dtype_mode"], d["constexprs"].get("ALIGNED"))
        if key not in best or score > best[key][0]:
            best[key] = (score, v)
    return [v for _, v in best.values()]


def hinted_source(variant):
    """The variant's ``ASTSource`` with the divisibility hints Triton's launcher adds at run time when
    every pointer is 16-byte aligned and every specialised integer (sizes, strides) is a multiple of 16,
    as at K = N = 4096, r = 256: ``tt.divisibility = 16`` on each pointer and i32 argument the kernel
    does not exclude with ``do_not_specialize``. Without them (``aot.compile_variant``) the compile is the
    one Triton runs for odd shapes or unaligned views."""
    src = variant.source()
    fn = variant.kernel
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        ty = src.signature.get(name)
        if ty is None or ty == "constexpr":
            continue
        param = fn.params[i]
        if ty.startswith("*") and not param.do_not_specialize_on_alignment:
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif ty == "i32" and not param.do_not_specialize:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton_source(fn, src.signature, src.constants, attrs)


def triton_source(fn, signature, constants, attrs):
    """An ``ASTSource`` from its parts (``constants`` keyed by argument-index tuples)."""
    import triton

    return triton.compiler.ASTSource(fn, signature, constants, attrs)


def compile_hinted(variant, arch: int):
    """``aot.compile_variant`` with ``hinted_source``: the run-time compile for aligned, 16-multiple shapes."""
    import triton
    from triton.backends.compiler import GPUTarget

    return triton.compile(hinted_source(variant), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=variant.num_warps, num_stages=variant.num_stages))


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this Triton wheel does not ship {name}")
    return str(path)


def ptxas_info(ptx: str, variant, arch: int) -> Tuple[dict, bytes]:
    """Assemble ``ptx`` again through Triton's ``make_cubin`` with its ptxas log kept: ``(info, cubin)``."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    backend = CUDABackend(GPUTarget("cuda", arch, 32))
    opt = backend.parse_options(dict(num_warps=variant.num_warps, num_stages=variant.num_stages))
    from vera_kernels.ops.rehearsal import ptxas_findings

    buf = io.StringIO()
    with knobs.nvidia.scope():
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(buf):
            cubin = backend.make_cubin(ptx, {}, opt, arch)
    info = parse_ptxas_log(buf.getvalue())
    found = ptxas_findings(buf.getvalue())
    info["warnings"] = found["warnings"]  # performance warnings (e.g. C7515, serialised wgmma)
    info["serialised_wgmma"] = bool(found["serialised_wgmma"])
    return info, cubin


def disassemble(cubin: bytes) -> str:
    """``nvdisasm -c`` of a cubin (code sections only)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("nvdisasm"), "-c", f.name], check=True, capture_output=True,
                              text=True).stdout


def ptxas_default_regalloc(ptx: str, arch: int) -> dict:
    """ptxas ``-v`` figures of ``ptx`` assembled without the ``--regAllocOptLevel=2`` Triton 3.9 adds to
    every ptxas call (its workaround for a ptxas 13.x bug): tells spills forced by register pressure from
    spills of that allocator setting (which also occur at 80-128 registers)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        arch_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        proc = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", f"--gpu-name={arch_name}", str(src), "-o",
                               str(src) + ".o"], capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr[-2000:]}
    info = parse_ptxas_log(proc.stderr + proc.stdout)
    return {k: info[k] for k in ("registers", "spill_stores", "spill_loads")}


def analyse_variant(variant, arch: int, hints: bool = True) -> dict:
    """Compile one variant for ``sm_<arch>`` (with ``hinted_source`` unless ``hints`` is False) and return
    its record (see the module docstring)."""
    aot = _aot()
    t0 = time.time()
    compiled = compile_hinted(variant, arch) if hints else aot.compile_variant(variant, arch)
    cubin = compiled.asm["cubin"]
    info, cubin2 = ptxas_info(compiled.asm["ptx"], variant, arch)
    info["identical_cubin"] = cubin2 == cubin
    if info["spill_stores"] or info["spill_loads"]:
        info["default_regalloc"] = ptxas_default_regalloc(compiled.asm["ptx"], arch)
    sass = analyse_sass(disassemble(cubin))
    for lp in sass["loops"]:
        lp["cycles_per_iteration"] = loop_cycles(lp, variant.num_warps, arch)
    rec = {"variant": variant.name, "arch": arch, "hints": hints, **describe(variant), "ptxas": info,
           "shared": compiled.metadata.shared, "shared_limit": aot.SHARED_LIMIT[arch],
           "function": sass["function"], "loops": sass["loops"], "seconds": round(time.time() - t0, 2)}
    rec["function"].pop("opcodes")
    return rec


_WORK: list = []


def _work(item):
    i, arch, hints = item
    v = _WORK[i]
    try:
        return analyse_variant(v, arch, hints)
    except Exception as e:  # keep going: one failure is one record
        return {"variant": v.name, "arch": arch, "error": f"{type(e).__name__}: {e}"[:4000]}


def run(variants: list, arch: int, jobs: int = 1, progress=None, hints: bool = True) -> List[dict]:
    """Records of ``variants`` for ``sm_<arch>`` (``jobs`` processes; failures become ``{"error"}`` records)."""
    global _WORK
    _WORK = list(variants)
    items = [(i, arch, hints) for i in range(len(_WORK))]
    out = []
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for rec in pool.imap(_work, items):
                out.append(rec)
                if progress:
                    progress(rec, len(out), len(items))
    else:
        for item in items:
            out.append(_work(item))
            if progress:
                progress(out[-1], len(out), len(items))
    return out


# ---------------------------------------------------------------------------------------------
# predictions
# ---------------------------------------------------------------------------------------------

SHAPES = [(16, 256), (16, 1024), (4096, 256), (4096, 1024)]  # (M, r) at K = N = 4096
K_SHAPE = N_SHAPE = 4096


def _cdiv(a, b):
    return -(-a // b)


# per op: the flags of the predicted call (seeded projection, no dropout, no bias, both rank_grads outputs)
_PREDICTED_FLAGS = {
    "shrink": dict(GENERATE_AB=True, DROPOUT=False),
    "fused_forward": dict(HAS_BIAS=False, GENERATE_AB=True),
    "rank_grads": dict(GENERATE_AB=True, NEED_G=True, NEED_GB=True),
    "grad_input": dict(GENERATE_AB=True, DROPOUT=False),
}


def prediction_cases(M: int, R: int, dtype_mode: str, sms: int) -> Dict[str, dict]:
    """Per op: what its launcher picks (``KernelSpec.launch``: the kind, host block sizes, the split of a
    reduction) for ``M`` rows at rank ``R``, K = N = 4096 on a GPU with ``sms`` SMs, and the flags of the
    predicted call (``_PREDICTED_FLAGS``, contiguous weight)."""
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_mode]
    out = {}
    for op, flags in _PREDICTED_FLAGS.items():
        launch = _aot().SPECS[op].launch(M, K_SHAPE, N_SHAPE, R, dtype, sms)
        out[op] = dict(kind=launch.kind, match=dict(launch.host, **flags), splits=launch.splits, span=launch.span)
    return out


def _source_loops(op: str, c: dict, case: dict, M: int, R: int) -> Tuple[int, List[Tuple[str, int]]]:
    """``(programs, [(loop name, iterations per program)])`` in source order for an op's kernel with
    constexprs ``c`` at ``M`` rows, rank ``R`` and K = N = 4096 (the reduction split of shrink/rank_grads
    from ``case``, see ``prediction_cases``)."""
    K, N = K_SHAPE, N_SHAPE
    if op in ("shrink", "rank_grads"):
        block, name = (c["BLOCK_K"], "K loop (A generated)") if op == "shrink" else (
            c["BLOCK_N"], "N loop (B generated)")
        programs = _cdiv(M, c["BLOCK_M"]) * _cdiv(R, c["BLOCK_R"])
        return programs * case["splits"], [(name, _cdiv(case["span"], block))]
    if op == "fused_forward":
        programs = _cdiv(M, c["BLOCK_M"]) * _cdiv(N, c["BLOCK_N"])
        main = ("K loop (base GEMM)", _cdiv(K, c["BLOCK_K"]))
        gen = "rank loop (B generated)"
    else:
        programs = _cdiv(M, c["BLOCK_M"]) * _cdiv(K, c["BLOCK_K"])
        main = ("N loop (base GEMM)", _cdiv(N, c["BLOCK_N"]))
        gen = "rank loop (A generated)"
    # the base GEMM runs first and the rank product continues it, except with per-row ids (fused_forward)
    # or dropout (grad_input), where the rank product runs first (see the kernels)
    if c.get("HAS_IDS" if op == "fused_forward" else "DROPOUT"):
        return programs, [(gen, _cdiv(R, c["BLOCK_R"])), main]
    return programs, [main, (gen, _cdiv(R, c["BLOCK_R"]))]


def _hbm_bytes(op: str, M: int, R: int, elt: int) -> float:
    """Compulsory HBM traffic of one call (each operand read once, each output written once)."""
    K, N = K_SHAPE, N_SHAPE
    return {"shrink": M * K * elt + M * R * 4,
            "fused_forward": N * K * elt + M * K * elt + M * N * elt + M * R * 4,
            "rank_grads": M * N * elt + M * R * 8,
            "grad_input": N * K * elt + M * N * elt + M * K * elt + M * R * 4}[op]


def _occupancy(rec: dict) -> int:
    """Programs of this variant one SM can hold (registers, shared memory, 64 warps)."""
    regs = max(rec["ptxas"]["registers"], 1)
    threads = 32 * rec["num_warps"]
    by_regs = 65536 // (regs * threads)
    by_smem = rec["shared_limit"] // rec["shared"] if rec["shared"] else 32
    return max(1, min(by_regs, by_smem, 64 // rec["num_warps"]))


def predict(records: List[dict], arch: int) -> List[dict]:
    """Per (op, dtype, M, r): time of each loop at its slowest pipe, HBM time, and what bounds the call.

    Each loop's time (all its iterations, on the busiest SM: ``ceil(programs / SMs)`` programs sharing its
    pipes) is attributed to ``tensor`` when the tensor pipe is its slowest, else to ``generation`` when
    the loop generates A/B (Philox multiplies in it), else to ``other`` (address/mask/row-max work).
    ``bound`` is HBM when compulsory traffic takes longer than the loops, else the largest attribution.
    Prologue/epilogue code outside loops, latency and launch overhead are not counted: lower bounds.
    """
    rates = RATES[arch]
    ok = [r for r in records if "error" not in r and r["config_index"] == 0 and r["layout"] == "contiguous"]
    out = []
    for mode in [m for m in ("fp16", "bf16") if any(r["dtype_mode"] == m for r in ok)]:
        for M, R in SHAPES:
            for op, case in prediction_cases(M, R, mode, rates["sms"]).items():
                cands = [r for r in ok if r["op"] == op and r["kind"] == case["kind"] and r["dtype_mode"] == mode
                         and all(r["constexprs"].get(k) == v for k, v in case["match"].items())]
                row = {"op": op, "dtype": mode, "M": M, "K": K_SHAPE, "N": N_SHAPE, "r": R, "kind": case["kind"]}
                if not cands:
                    out.append(dict(row, error="variant not in the report"))
                    continue
                rec = cands[0]
                programs, src = _source_loops(op, rec["constexprs"], case, M, R)
                loops = [lp for lp in rec["loops"] if lp["innermost"]]
                row.update(variant=rec["variant"], registers=rec["ptxas"]["registers"],
                           spills=rec["ptxas"]["spill_stores"] + rec["ptxas"]["spill_loads"], programs=programs)
                if len(loops) != len(src):
                    out.append(dict(row, error=f"{len(loops)} innermost SASS loops, source has {len(src)}"))
                    continue
                per_sm = _cdiv(programs, rates["sms"])
                to_us = per_sm / (rates["clock_ghz"] * 1e3)  # cycles of one program -> µs on the busiest SM
                share = {"tensor": 0.0, "generation": 0.0, "other": 0.0}
                tensor_pipe = 0.0
                loop_rows = []
                serialised = bool(rec["ptxas"].get("serialised_wgmma"))
                for (name, trips), lp in zip(src, loops):
                    cyc = lp["cycles_per_iteration"]
                    generates = lp["philox_products"] > 0
                    t = trips * loop_time_cycles(cyc, serialised) * to_us
                    tensor_pipe += trips * cyc["tensor"] * to_us
                    share["tensor" if cyc["bound"] == "tensor" else "generation" if generates else "other"] += t
                    row_l = {"loop": name, "iterations": trips, "generates": generates,
                             "cycles_per_iteration": cyc, "us": round(t, 2)}
                    if generates:
                        # Philox products per 4 values of the tile the source generates each iteration:
                        # ~32-40 when each value is generated once, twice that when the compiler duplicates it
                        cols = rec["constexprs"]["BLOCK_N" if op in ("fused_forward", "rank_grads") else "BLOCK_K"]
                        calls = rec["constexprs"]["BLOCK_R"] * cols / 4
                        row_l["products_per_call"] = round(lp["philox_products"] * 32 * rec["num_warps"] / calls, 1)
                    loop_rows.append(row_l)
                compute = sum(share.values())
                mem = _hbm_bytes(op, M, R, 2) / (rates["hbm_tb_s"] * 1e6)
                bound = "HBM" if mem >= compute else max(share, key=share.get)
                out.append(dict(row, occupancy=_occupancy(rec), programs_per_sm=per_sm, loops=loop_rows,
                                serialised_wgmma=serialised, ptxas_warnings=rec["ptxas"].get("warnings", []),
                                us={k: round(v, 2) for k, v in share.items()}, tensor_pipe_us=round(tensor_pipe, 2),
                                compute_us=round(compute, 2), hbm_us=round(mem, 2),
                                predicted_us=round(max(mem, compute), 2), bound=bound))
    return out


# ---------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    """The generated block of NOTES.md for one report (resources, loop mixes, predictions)."""
    arch = report["arch"]
    recs = [r for r in report["variants"] if "error" not in r]
    errs = [r for r in report["variants"] if "error" in r]
    lines = [f"### sm_{arch}: {len(recs)} variants analysed, {len(errs)} failed "
             f"(Triton {report['triton']}, configs: {report['configs']})", ""]
    for u in report.get("updates", []):
        lines += [f"Recompiled by `--update` (configs: {u['configs']}, match: `{u['match']}`): "
                  f"{', '.join(u['kinds'])}, {u['variants']} variants.", ""]
    lines += ["Resources per kernel kind and dtype, over every host block size, flag set and layout "
              "(first-choice config unless noted):", "",
              "| kernel[kind] | dtype | config | warps | variants | registers | spill st/ld (B) | shared (KiB) |",
              "|---|---|---|---|---|---|---|---|"]
    groups: Dict[tuple, list] = {}
    for r in recs:
        groups.setdefault((r["op"], r["kind"], r["dtype_mode"], r["config_index"]), []).append(r)
    for (op, kind, mode, ci), rs in sorted(groups.items()):
        regs = sorted(r["ptxas"]["registers"] for r in rs)
        st = max(r["ptxas"]["spill_stores"] for r in rs)
        ld = max(r["ptxas"]["spill_loads"] for r in rs)
        sh = sorted(r["shared"] for r in rs)
        lines.append(f"| {op}[{kind}] | {mode} | {ci} | {rs[0]['num_warps']} | {len(rs)} | "
                     f"{regs[0]}–{regs[-1]} | {st}/{ld}{' **SPILLS**' if st or ld else ''} | "
                     f"{sh[0] / 1024:.0f}–{sh[-1] / 1024:.0f} |")
    warned = [r for r in recs if r["ptxas"].get("warnings")]
    lines += ["", f"Variants with ptxas performance warnings: {len(warned)} of {len(recs)}"
              + (" (serialised wgmma is charged in the predictions: tensor time plus the slowest other pipe):"
                 if warned else "."), ""]
    for r in warned:
        lines.append(f"- `{r['variant']}`{' (first choice)' if r['config_index'] == 0 else ''}: "
                     + "; ".join(w.split(": ", 1)[-1][:160] for w in r["ptxas"]["warnings"]))
    spills = [r for r in recs if r["config_index"] == 0 and (r["ptxas"]["spill_stores"] or r["ptxas"]["spill_loads"])]
    lines += ["", f"First-choice variants that spill: {len(spills)} of "
              f"{sum(r['config_index'] == 0 for r in recs)}" + (":" if spills else "."), ""]
    for r in spills:
        d = r["ptxas"].get("default_regalloc", {})
        note = (f"; without `--regAllocOptLevel=2`: {d['registers']} registers, {d['spill_stores']}/"
                f"{d['spill_loads']} B" if "registers" in d else "")
        lines.append(f"- `{r['variant']}`: {r['ptxas']['registers']} registers, {r['ptxas']['spill_stores']} B "
                     f"stores / {r['ptxas']['spill_loads']} B loads{note}")
    preds = report.get("predictions", [])
    shown = {}
    for p in preds:
        if "variant" in p and "error" not in p:
            shown[p["variant"]] = p
    if shown:
        lines += ["", "Innermost loops of the variants the launchers pick at the prediction shapes (fp16 and "
                  "bf16, seeded projection, no dropout/bias): per iteration, per warp, static counts; "
                  "cycles per iteration of one program on one SM by pipe (`T` tensor, `A` ALU, `F` FMA "
                  "pipe incl. IMAD, `I` issue). Philox products per call: multiplies in the loop per 4 values "
                  "of the tile the source generates (~32–40 once, ~64+ when the compiler generates twice).", "",
                  "| variant | regs | loop | instrs | MMA (MACs/warp) | IMAD | ALU | FP32 | ld/st "
                  "| Philox products per call | T / A / F / I cycles | bound |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        by_name = {r["variant"]: r for r in recs}
        for name, p in shown.items():
            rec = by_name[name]
            short = f"{rec['op']}[{rec['kind']}] {rec['dtype_mode']} " + " ".join(
                f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in rec["constexprs"].items()
                if k.startswith("BLOCK_"))
            for lp, lrow in zip([lp for lp in rec["loops"] if lp["innermost"]], p["loops"]):
                c, cyc = lp["classes"], lp["cycles_per_iteration"]
                lines.append(f"| {short} | {rec['ptxas']['registers']} | {lrow['loop']} | {lp['instructions']} | "
                             f"{lp['mma_macs_per_warp']} | {c['imad']} | {c['alu']} | {c['fp32']} | "
                             f"{c['load']}/{c['store']} | {lrow.get('products_per_call', '—')} | "
                             f"{cyc['tensor']:.0f} / {cyc['alu']:.0f} / {cyc['fma']:.0f} / {cyc['issue']:.0f} | "
                             f"{cyc['bound']} |")
                short = "〃"
        lines += ["", f"Predicted time per call on {RATES[arch]['name']}, K = N = 4096 (µs, throughput lower "
                  f"bounds at {RATES[arch]['clock_ghz']} GHz). Each loop's time is charged to `tensor` when the "
                  "tensor pipe is its slowest pipe, else to `gen` when it generates A/B, else to `other`; "
                  "`T-pipe` is the tensor pipe's own busy time; `HBM` is compulsory traffic.", "",
                  "| kernel | dtype | M | r | programs (per SM) | tensor | gen | other | T-pipe | HBM | bound |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in preds:
            if "error" in p:
                lines.append(f"| {p['op']} | {p['dtype']} | {p['M']} | {p['r']} | — | — | — | — | — | — | "
                             f"n/a: {p['error']} |")
                continue
            u = p["us"]
            lines.append(f"| {p['op']} | {p['dtype']} | {p['M']} | {p['r']} | "
                         f"{p['programs']} ({p['programs_per_sm']}) | "
                         f"{u['tensor']} | {u['generation']} | {u['other']} | {p['tensor_pipe_us']} | {p['hbm_us']} | "
                         f"**{p['bound']}** |")
    if errs:
        lines += ["", "Failures:", ""] + [f"- `{e['variant']}`: {e['error'][:300]}" for e in errs]
    return "\n".join(lines) + "\n"


def update_notes(path: Path, blocks: List[str]) -> None:
    """Replace the text between the BEGIN/END markers of ``path`` by ``blocks`` (markers must exist)."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no {BEGIN} ... {END} block to regenerate")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + BEGIN + "\n" + "\n".join(blocks) + END + tail)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def build_report(arch: int, configs: str = "first", match: str = "", jobs: int = 1, quiet: bool = False,
                 hints: bool = True) -> dict:
    """Compile and analyse the selected variants for one architecture; the JSON document."""
    import triton

    vs = select(configs, match)
    t0 = time.time()

    def progress(rec, done, total):
        if not quiet:
            tag = "ERROR " + rec["error"][:200] if "error" in rec else (
                f"regs {rec['ptxas']['registers']} spill {rec['ptxas']['spill_stores']}/"
                f"{rec['ptxas']['spill_loads']} loops {len(rec['loops'])}")
            print(f"[{done}/{total} {time.time() - t0:.0f}s] sm_{arch} {rec['variant']}: {tag}", file=sys.stderr)

    recs = run(vs, arch, jobs, progress, hints)
    report = {"arch": arch, "triton": triton.__version__, "configs": configs, "match": match, "hints": hints,
              "seconds": round(time.time() - t0, 1), "rates": RATES[arch],
              "method": "see benchmarks/static/report.py docstring and benchmarks/static/NOTES.md",
              "variants": recs}
    report["predictions"] = predict(recs, arch)
    return report


def explain_spills(report: dict, hints: bool = True) -> None:
    """Add ``ptxas.default_regalloc`` (see ``ptxas_default_regalloc``) to every spilling record of
    ``report`` that lacks it, recompiling its variant (a Triton cache hit when the kernels are unchanged)."""
    by_name = {v.name: v for v in _aot().variants(full=True)}
    for rec in report["variants"]:
        p = rec.get("ptxas", {})
        if "error" in rec or "default_regalloc" in p or not (p.get("spill_stores") or p.get("spill_loads")):
            continue
        v = by_name.get(rec["variant"])
        if v is None:
            p["default_regalloc"] = {"error": "variant no longer enumerated"}
            continue
        compiled = compile_hinted(v, report["arch"]) if hints else _aot().compile_variant(v, report["arch"])
        p["default_regalloc"] = ptxas_default_regalloc(compiled.asm["ptx"], report["arch"])


def merge_reports(old: dict, new: dict) -> dict:
    """``old`` with every record of the (op, kind) pairs that ``new`` covers replaced by ``new``'s records;
    the predictions are redone and ``updates`` lists what was recompiled (selection, match, seconds)."""
    kinds = {(r["op"], r["kind"]) for r in new["variants"]}
    kept = [r for r in old["variants"] if (r["op"], r["kind"]) not in kinds]
    out = dict(old, variants=kept + new["variants"])
    out["updates"] = old.get("updates", []) + [
        {"configs": new["configs"], "match": new["match"], "seconds": new["seconds"],
         "kinds": sorted(f"{op}[{kind}]" for op, kind in kinds), "variants": len(new["variants"])}]
    out["seconds"] = round(old["seconds"] + new["seconds"], 1)
    out["predictions"] = predict(out["variants"], out["arch"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(RATES))
    parser.add_argument("--out", help="JSON path (one arch); default benchmarks/static/sm<arch>.json")
    parser.add_argument("--configs", default="first", choices=SELECTIONS)
    parser.add_argument("--match", default="", help="only variants whose name contains this text")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--notes", help="regenerate the generated block of this markdown file")
    parser.add_argument("--regenerate", action="store_true",
                        help="sm_90 and sm_80, default JSON paths, and the tables of benchmarks/static/NOTES.md")
    parser.add_argument("--no-hints", action="store_true",
                        help="compile exactly as the AOT test does (no alignment/divisibility hints)")
    parser.add_argument("--reuse", action="store_true",
                        help="no compiling: reread the JSON and redo the predictions and the notes")
    parser.add_argument("--update", action="store_true",
                        help="compile the selected variants and replace, in the existing JSON, every record of "
                             "the kernel kinds they belong to (after a config change of some kinds)")
    parser.add_argument("--explain-spills", action="store_true",
                        help="with --reuse: recompile the spilling records of the JSON and add their ptxas "
                             "figures without --regAllocOptLevel=2 (ptxas.default_regalloc)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    if args.regenerate:
        args.arch, args.notes = [90, 80], str(NOTES)
    if args.out and len(args.arch) != 1:
        parser.error("--out takes one --arch")
    blocks, failed, spilled = [], 0, []
    for arch in args.arch:
        out = Path(args.out) if args.out else RESULTS / f"sm{arch}.json"
        if args.reuse:
            report = json.loads(out.read_text())
            report["rates"] = RATES[arch]
            for rec in report["variants"]:
                for lp in rec.get("loops", []):
                    lp["opcodes"] = dict(Counter(lp["opcodes"]).most_common(OPCODES_KEPT))
            if args.explain_spills:
                explain_spills(report, not args.no_hints)
            report["predictions"] = predict(report["variants"], arch)
        else:
            report = build_report(arch, args.configs, args.match, args.jobs, args.quiet, not args.no_hints)
            if args.update:
                report = merge_reports(json.loads(out.read_text()), report)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        blocks.append(markdown(report))
        failed += sum("error" in r for r in report["variants"])
        spilled += [r["variant"] for r in report["variants"] if "error" not in r and r["config_index"] == 0
                    and (r["ptxas"]["spill_stores"] or r["ptxas"]["spill_loads"])]
        print(json.dumps({"arch": arch, "out": str(out), "variants": len(report["variants"]),
                          "failed": sum("error" in r for r in report["variants"]),
                          "seconds": report["seconds"]}))
    if args.notes:
        update_notes(Path(args.notes), blocks)
    for name in spilled:
        print(f"first-choice variant spills: {name}", file=sys.stderr)
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
