"""VeRALinear under torch.distributed on 2 spawned gloo CPU ranks: DDP, FSDP2 and tensor parallelism.

One launch runs every scenario (process start-up dominates the time); each must reproduce the
single-process run: the first step's outputs and the vectors after 3 SGD steps. DDP's comm hook also
counts the bytes all-reduced per step, which must equal the computed ``Σ (r + N) · 4``.
"""

import sys

import pytest
import torch
import torch.distributed as dist

import dist_workers as dw
import vera_kernels as vk
from vera_kernels.backends import get_backend
from vera_kernels.core import interpreting
from vera_kernels.distributed import shard_range, vera_bytes_per_step

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

BACKENDS = ("torch", "cpu")
TOL = dict(rtol=1e-5, atol=1e-5)


def _usable(backend):
    try:
        get_backend(backend)
    except vk.BackendUnavailableError as e:
        return str(e)
    return None


def _triton_tp_skip_reason():
    why = _usable("triton")
    if why is not None:
        return why
    if not interpreting():  # on a GPU machine the backend refuses the ranks' CPU tensors
        return "the ranks hold CPU tensors, which the Triton backend runs only under its interpreter"
    if not get_backend("triton").supports_offsets:
        return ("the Triton backend does not support tensor-parallel shard offsets yet "
                "(get_backend('triton').supports_offsets is False)")
    return None


@pytest.fixture(scope="module")
def results():
    """Every rank's results of every scenario, from one launch of 2 gloo ranks."""
    jobs = [(mode, b, {}) for b in BACKENDS if _usable(b) is None for mode in ("ddp", "fsdp2", "tp", "tp_uneven", "tp_dora")]
    if _triton_tp_skip_reason() is None:
        jobs.append(("tp", "triton", {"forward_only": True}))
    return dw.run_ranks(jobs, timeout=150)


def _close(got, want, what):
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **TOL, msg=lambda m: f"{what}: {m}")


def _check_vectors(per_rank, ref, mode):
    for rank, res in enumerate(per_rank):
        assert set(res["vectors"]) == set(ref["vectors"])
        for name, want in ref["vectors"].items():
            _close(res["vectors"][name], want, f"{mode} rank {rank} {name} after {dw.STEPS} steps")


def _check_input_grad_dp(per_rank, ref, mode):
    """Data parallel: each rank's loss is the mean over its half of the batch, so its input gradient is
    WORLD times the single-process one on those rows."""
    got = [g / dw.WORLD for r in per_rank for g in r["input_grad"]]
    _close(got, ref["input_grad"], f"{mode} input gradient")


def _ranks(results, mode, backend):
    if _usable(backend) is not None:
        pytest.skip(_usable(backend))
    return [r[(mode, backend)] for r in results]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_data_parallel_matches_single_process(results, mode, backend):
    """DDP and FSDP2: the ranks' outputs together, their input gradients and the vectors match one process."""
    per_rank = _ranks(results, mode, backend)
    ref = dw.single_process(mode, backend)
    _close(sum((r["outputs"] for r in per_rank), []), ref["outputs"], f"{mode} outputs (rank 0 rows, then rank 1)")
    _check_input_grad_dp(per_rank, ref, mode)
    _check_vectors(per_rank, ref, mode)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_all_reduces_only_the_vectors(results, backend):
    """Bytes counted by a DDP comm hook per step = Σ (r + N) · 4 over the layers."""
    per_rank = _ranks(results, "ddp", backend)
    computed = vera_bytes_per_step([(dw.IN, dw.HIDDEN), (dw.HIDDEN, dw.OUT)], dw.RANK)
    assert computed == ((dw.RANK + dw.HIDDEN) + (dw.RANK + dw.OUT)) * 4
    for r in per_rank:
        assert r["calls"] >= dw.STEPS
        assert r["bytes_per_step"] == computed


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_parallel_matches_single_process(results, backend):
    """Column-then-row MLP (with adapter dropout): every rank gets the whole output and the same vectors."""
    per_rank = _ranks(results, "tp", backend)
    ref = dw.single_process("tp", backend)
    for rank, r in enumerate(per_rank):
        _close(r["outputs"], ref["outputs"], f"tp rank {rank} outputs")
        _close(r["input_grad"], ref["input_grad"], f"tp rank {rank} input gradient (through the column layer)")
    _check_vectors(per_rank, ref, "tp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_parallel_uneven_shards(results, backend):
    """A hidden size the mesh does not divide (shards of 9 and 8 features) still matches."""
    per_rank = _ranks(results, "tp_uneven", backend)
    ref = dw.single_process("tp", backend, hidden=dw.UNEVEN_HIDDEN)
    for rank, r in enumerate(per_rank):
        _close(r["outputs"], ref["outputs"], f"uneven tp rank {rank} outputs")
        _close(r["input_grad"], ref["input_grad"], f"uneven tp rank {rank} input gradient")
        assert tuple(r["offsets"]["fc2"]) == (shard_range(dw.UNEVEN_HIDDEN, dw.WORLD, rank)[0], 0)
    _check_vectors(per_rank, ref, "uneven tp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_parallel_dvora(results, backend):
    """DVoRA layers (dora=True) column- then row-parallel, uneven shards, adapter dropout: the row norms of the
    row-parallel layer are all-reduced over its shards of in_features; outputs, input gradient, vectors and
    magnitudes match one process."""
    per_rank = _ranks(results, "tp_dora", backend)
    ref = dw.single_process("tp", backend, hidden=dw.UNEVEN_HIDDEN, dora=True)
    assert any("magnitude" in name for name in ref["vectors"])
    for rank, r in enumerate(per_rank):
        _close(r["outputs"], ref["outputs"], f"DVoRA tp rank {rank} outputs")
        _close(r["input_grad"], ref["input_grad"], f"DVoRA tp rank {rank} input gradient")
        assert r["placements"]["fc1.magnitude"] == "S(0)" and r["placements"]["fc2.magnitude"] == "R"
    _check_vectors(per_rank, ref, "DVoRA tp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_parallel_layouts_and_offsets(results, backend):
    per_rank = _ranks(results, "tp", backend)
    want = {"fc1.weight": "S(0)", "fc1.bias": "S(0)", "fc1.lambda_b": "S(0)", "fc1.lambda_d": "R",
            "fc2.weight": "S(1)", "fc2.bias": "R", "fc2.lambda_b": "R", "fc2.lambda_d": "R"}
    for rank, r in enumerate(per_rank):
        assert r["placements"] == want
        assert tuple(r["offsets"]["fc1"]) == (0, shard_range(dw.HIDDEN, dw.WORLD, rank)[0])
        assert tuple(r["offsets"]["fc2"]) == (shard_range(dw.HIDDEN, dw.WORLD, rank)[0], 0)


def test_triton_scenario_only_under_the_interpreter(monkeypatch):
    """The ranks hold CPU tensors: on a GPU machine (no interpreter) the Triton backend refuses them, so the
    scenario is not launched there (else every test of this module would error in the shared fixture)."""
    from vera_kernels.backends.triton_backend import TritonBackend

    monkeypatch.setattr(TritonBackend, "unavailable_reason", lambda self: None)
    monkeypatch.setattr(sys.modules[__name__], "interpreting", lambda: False)
    assert "interpreter" in _triton_tp_skip_reason()


def test_tensor_parallel_forward_on_triton_interpreter(results):
    why = _triton_tp_skip_reason()
    if why is not None:
        pytest.skip(why)
    ref = dw.single_process("tp", "torch")
    for rank, r in enumerate(results):
        torch.testing.assert_close(torch.tensor(r[("tp", "triton")]["outputs"]), torch.tensor(ref["outputs"]),
                                   rtol=1e-4, atol=1e-4, msg=lambda m: f"triton tp rank {rank}: {m}")


def test_shard_range_follows_torch_chunk():
    for size in (1, 5, 16, 17):
        for world in (1, 2, 3, 4):
            chunks = torch.arange(size).chunk(world)
            for i in range(world):
                off, n = shard_range(size, world, i)
                want = (int(chunks[i][0]), len(chunks[i])) if i < len(chunks) else (size, 0)
                assert (off, n) == want, (size, world, i)
    with pytest.raises(ValueError, match="out of range"):
        shard_range(4, 2, 2)


def test_styles_refuse_other_modules_with_a_clear_error():
    mesh = _FakeMesh()
    with pytest.raises(NotImplementedError, match="shards VeRALinear modules, got Linear"):
        vk.ColwiseParallel()._apply(torch.nn.Linear(2, 2), mesh)
    layer = vk.VeRALinear(4, 4, rank=2)
    layer.merge()
    with pytest.raises(ValueError, match="unmerge"):
        vk.RowwiseParallel()._apply(layer, mesh)


class _FakeMesh:
    ndim = 1


def test_llama2_7b_traffic_table_reproduces_the_paper_counts():
    """VeRA r=1024 and LoRA r=64 on every linear layer of Llama-2-7B: the paper's 1.6M and 159.9M parameters."""
    from benchmarks.distributed_traffic import llama2_7b_layers, traffic_table

    rows = {(r["method"], r["rank"]): r for r in traffic_table(llama2_7b_layers())}
    assert rows[("VeRA", 1024)]["params"] == 32 * (4 * (1024 + 4096) + 2 * (1024 + 11008) + (1024 + 4096))
    assert rows[("LoRA", 64)]["params"] == 32 * 64 * (4 * 8192 + 3 * (4096 + 11008))
    assert round(rows[("VeRA", 1024)]["params"] / 1e6, 1) == 1.6
    assert round(rows[("LoRA", 64)]["params"] / 1e6, 1) == 159.9
    assert rows[("LoRA", 64)]["bytes_per_step"] == 4 * rows[("LoRA", 64)]["params"]
