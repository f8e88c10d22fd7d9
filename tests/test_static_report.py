"""Static GPU report (``benchmarks/static/report.py``): the SASS/ptxas parsers on captured text, and a
compile of the heaviest first-choice variant per kernel kind and dtype (every flag on: per-row adapter
ids, dropout, bias, generated A/B; aligned and unaligned shard offsets) for sm_90 that fails on any spill.

The compile runs ``python -m benchmarks.static --configs smoke`` in a subprocess with
``TRITON_INTERPRET`` unset (tests/conftest.py sets it for the interpreter tests).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.static import report as sr

ROOT = Path(__file__).resolve().parent.parent

# nvdisasm -c output of a fused-forward cubin for sm_90a, trimmed: a Philox/HMMA loop, then (edited in
# by hand, for nesting) a loop holding an inner HGMMA loop, the final EXIT and the end-of-code trap.
SASS = """\
\t.target\tsm_90a

//--------------------- .text._fused_forward_kernel --------------------------
\t.section\t.text._fused_forward_kernel,"ax",@progbits
\t.align\t128
        .global         _fused_forward_kernel
        .type           _fused_forward_kernel,@function
        .size           _fused_forward_kernel,(.L_x_5 - _fused_forward_kernel)
_fused_forward_kernel:
.text._fused_forward_kernel:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R5, SR_CTAID.X ;
        /*0020*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   IMAD.WIDE.U32 R12, R12, -0x2daee0ad, RZ ;
        /*0040*/                   LOP3.LUT R13, R13, UR10, RZ, 0x3c, !PT ;
        /*0050*/                   IMAD.HI.U32 R16, R19, -0x326172a9, RZ ;
        /*0060*/                   IMAD R23, R15, -0x326172a9, RZ ;
        /*0070*/                   LDS R147, [R62+UR5] ;
        /*0080*/                   HMMA.16816.F32 R76, R60, R68, R76 ;
        /*0090*/                   UIADD3 UR4, UR4, 0x1, URZ ;
        /*00a0*/                   ISETP.GT.AND P5, PT, R98, 0x2, PT ;
        /*00b0*/              @!P5 BRA `(.L_x_1) ;
.L_x_0:
        /*00c0*/                   LDGSTS.E [R222], desc[UR20][R182.64], P4 ;
.L_x_2:
        /*00d0*/                   WARPGROUP.ARRIVE ;
.L_x_3:
        /*00e0*/                   HGMMA.64x256x16.F32 R24, gdesc[UR8], R24 ;
        /*00f0*/                   FFMA R0, R1, R2, R0 ;
        /*0100*/               @P1 BRA `(.L_x_3) ;
        /*0110*/               @P1 STG.E.U16 desc[UR8][R8.64], R13 ;
        /*0120*/              @!P2 BRA `(.L_x_2) ;
        /*0130*/                   EXIT ;
.L_x_4:
        /*0140*/                   BRA `(.L_x_4);
.L_x_5:
"""

PTXAS_LOG = """\
ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function '_fused_forward_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _fused_forward_kernel
    8 bytes stack frame, 1520 bytes spill stores, 1200 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers
ptxas-blackwell info    : Compile time = 233.220 ms
"""


def test_parse_sass_reads_instructions_predicates_and_labels():
    instrs, labels = sr.parse_sass(SASS)
    assert len(instrs) == 21
    assert labels[".L_x_1"] == 0x30 and labels[".L_x_0"] == 0xC0 and labels[".L_x_4"] == 0x140
    assert labels[".L_x_5"] == 0x150  # a label after the last instruction
    bra = instrs[2]
    assert (bra.addr, bra.pred, bra.opcode, bra.base) == (0x20, "@!P0", "BRA", "BRA")
    assert instrs[12].opcode == "LDGSTS.E" and instrs[14].opcode == "HGMMA.64x256x16.F32"


def test_find_loops_back_edges_nesting_and_trap():
    instrs, labels = sr.parse_sass(SASS)
    loops = sr.find_loops(instrs, labels)
    spans = [(lp["start"], lp["end"], lp["depth"], lp["innermost"]) for lp in loops]
    # the forward branch at 0x20 and the unconditional self-branch at 0x140 are not loops
    assert spans == [(0x30, 0xB0, 0, True), (0xD0, 0x120, 0, False), (0xE0, 0x100, 1, True)]


def test_loop_mix_counts_mma_philox_and_classes():
    out = sr.analyse_sass(SASS)
    first, outer, inner = out["loops"]
    assert first["instructions"] == 9
    assert first["classes"]["tensor"] == 1 and first["mma_macs_per_warp"] == 16 * 8 * 16
    assert first["classes"]["imad"] == 3 and first["classes"]["alu"] == 2
    assert first["classes"]["load"] == 1 and first["classes"]["uniform"] == 1 and first["classes"]["control"] == 1
    assert first["philox_products"] == 4  # IMAD.WIDE: hi and lo; IMAD.HI; IMAD
    assert inner["mma_macs_per_warp"] == 64 * 256 * 16 // 4  # an HGMMA is issued by the 4 warps of a warpgroup
    assert inner["classes"]["fp32"] == 1 and inner["philox_products"] == 0
    assert outer["classes"]["store"] == 1 and outer["instructions"] == 6
    assert out["function"]["instructions"] == 21


def test_mma_shapes_and_classes():
    def ins(text):
        instrs, _ = sr.parse_sass(f"        /*0000*/                   {text} ;\n")
        return instrs[0]

    assert sr.mma_shape(ins("HMMA.16816.F32.BF16 R4, R8, R12, R4")) == (16, 8, 16, "f16")
    assert sr.mma_shape(ins("HMMA.1688.F32.TF32 R4, R8, R12, R4")) == (16, 8, 8, "tf32")
    assert sr.mma_shape(ins("HGMMA.64x128x8.F32.TF32 R24, gdesc[UR8], R24, gsb0")) == (64, 128, 8, "tf32")
    assert sr.mma_shape(ins("FFMA R0, R1, R2, R0")) is None
    assert sr.classify(ins("IMAD.MOV.U32 R1, RZ, RZ, R2")) == "imad"
    assert sr.classify(ins("SHF.R.U32.HI R3, RZ, 0x9, R4")) == "alu"
    assert sr.classify(ins("F2FP.F16.F32.PACK_AB R5, R6, R7")) == "alu"
    assert sr.classify(ins("LDSM.16.M88.4 R8, [R9]")) == "load"
    assert sr.classify(ins("UISETP.GT.AND UP0, UPT, UR4, 0x2, UPT")) == "uniform"
    assert sr.is_philox_multiply(ins("IMAD.WIDE.U32 R12, R13, 0xd2511f53, RZ")) == 2
    assert sr.is_philox_multiply(ins("LOP3.LUT R13, R13, 0xcd9e8d57, R92, 0x96, !PT")) == 0


def test_parse_ptxas_log():
    info = sr.parse_ptxas_log(PTXAS_LOG)
    assert info == {"stack_frame": 8, "spill_stores": 1520, "spill_loads": 1200, "registers": 255,
                    "barriers": 1, "smem_static": 0}
    with pytest.raises(ValueError, match="registers"):
        sr.parse_ptxas_log("ptxas info : 0 bytes gmem\n")


def test_loop_cycles_picks_the_slowest_pipe():
    loop = sr.analyse_sass(SASS)["loops"][0]
    cyc = sr.loop_cycles(loop, num_warps=4, arch=90)
    assert cyc["issue"] == 9 * 4 / 4 and cyc["alu"] == 2 * 4 / 2 and cyc["fma"] == 3 * 4 / 2
    assert cyc["tensor"] == 2048 * 4 / 2048
    assert cyc["bound"] == "issue"


def test_merge_reports_replaces_whole_kinds():
    def rec(op, kind, name):
        return {"variant": name, "op": op, "kind": kind, "dtype_mode": "fp32-ieee", "layout": "contiguous",
                "config_index": 0}

    old = {"arch": 90, "seconds": 10.0, "variants": [rec("shrink", "shrink", "s-old"), rec("shrink", "shrink-fp32", "f-old"),
                                                     rec("grad_input", "prefill", "g-old")]}
    new = {"arch": 90, "seconds": 2.0, "configs": "lean", "match": "shrink[shrink-fp32]",
           "variants": [rec("shrink", "shrink-fp32", "f-new-1"), rec("shrink", "shrink-fp32", "f-new-2")]}
    out = sr.merge_reports(old, new)
    assert [r["variant"] for r in out["variants"]] == ["s-old", "g-old", "f-new-1", "f-new-2"]
    assert out["updates"][0]["kinds"] == ["shrink[shrink-fp32]"] and out["updates"][0]["variants"] == 2
    assert out["seconds"] == 12.0 and out["predictions"] == []
    assert len(old["variants"]) == 3  # the old report is not modified


def _aot_reason():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"this Triton has no NVIDIA AOT compile path: {e}"
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm").exists():
        return "this Triton wheel ships no nvdisasm"
    return None


@pytest.mark.skipif(_aot_reason() is not None, reason=str(_aot_reason()))
def test_first_choice_variants_do_not_spill_on_sm90(tmp_path):
    out = tmp_path / "static.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "benchmarks.static", "--arch", "90",
                           "--configs", "smoke", "--out", str(out), "--jobs", str(min(4, os.cpu_count() or 1)),
                           "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert out.exists(), f"static_report wrote nothing (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())
    recs = report["variants"]
    errors = [r for r in recs if "error" in r]
    assert not errors, "\n".join(f"{r['variant']}: {r['error'][:1500]}" for r in errors)
    kinds = {(r["op"], r["kind"]) for r in recs}
    assert len(kinds) >= 12, f"expected every kernel kind, got {sorted(kinds)}"
    for op in ("fused_forward", "rank_grads", "grad_input"):
        assert any(r["op"] == op and r["constexprs"].get("HAS_IDS") for r in recs), f"{op}: no per-row ids variant"
    for op in ("shrink", "grad_input"):
        assert {r["constexprs"].get("ALIGNED") for r in recs if r["op"] == op} == {True, False}, \
            f"{op}: the sample must hold aligned and unaligned shard offsets"
    spills = [f"{r['variant']}: {r['ptxas']['spill_stores']} B spill stores, {r['ptxas']['spill_loads']} B "
              f"spill loads, {r['ptxas']['registers']} registers" for r in recs
              if r["config_index"] == 0 and (r["ptxas"]["spill_stores"] or r["ptxas"]["spill_loads"])]
    assert not spills, "first-choice configs spill:\n" + "\n".join(spills)
    assert all(r["hints"] for r in recs), "the report must compile with the run-time divisibility hints"
    for r in recs:
        assert r["ptxas"]["identical_cubin"], f"{r['variant']}: the ptxas rerun gave another cubin"
        assert r["shared"] <= r["shared_limit"], r["variant"]
        assert r["loops"], f"{r['variant']}: no loop found in its SASS"
        if r["constexprs"].get("GENERATE_AB"):
            assert any(lp["philox_products"] for lp in r["loops"]), f"{r['variant']}: no Philox multiply in a loop"
        if r["dtype_mode"] in ("fp16", "bf16"):
            assert any(lp["mma_macs_per_warp"] for lp in r["loops"]), f"{r['variant']}: no MMA in a loop"
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_serialised_wgmma_is_charged_in_the_loop_time():
    cyc = {"issue": 40.0, "alu": 30.0, "fma": 20.0, "xu": 1.0, "tensor": 64.0, "bound": "tensor"}
    assert sr.loop_time_cycles(cyc) == 64.0  # pipes overlap: the slowest one
    assert sr.loop_time_cycles(cyc, serialised_wgmma=True) == 64.0 + 40.0  # nothing overlaps the tensor pipe
    no_mma = dict(cyc, tensor=0.0, bound="issue")
    assert sr.loop_time_cycles(no_mma, serialised_wgmma=True) == 40.0


def test_ptxas_warnings_are_recorded():
    from vera_kernels.ops.rehearsal import ptxas_findings

    f = ptxas_findings(PTXAS_LOG + "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async "
                       "instructions are serialized due to the presence of Extern calls in the function 'k'\n")
    assert f["serialised_wgmma"] and any("C7515" in w for w in f["warnings"])
