"""Many adapters in one batch (docs/DESIGN.md §5): every backend against per-row single-adapter calls.

A batched call with ``adapter_ids`` must equal, row by row, a single-adapter call with that row's
vectors (the base layer alone for id -1), and its bank gradients must equal the sum of those calls'
gradients, landing only in the bank rows the batch used.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vera_kernels as vk
from vera_kernels.backends import get_backend
from vera_kernels.banks import bank_sum, sorted_bank_sum
from conftest import backend_skip_reason, native_op_samples
from parity import assert_parity

DTYPES = [torch.float32, torch.bfloat16]


def _need_support(backend):
    if not get_backend(backend).supports_adapter_ids:
        pytest.skip(f"backend {backend!r} does not support per-row adapter ids yet (supports_adapter_ids is False)")


def _bank_problem(lead, K, N, r, n, dtype, device, gen_seed):
    g = torch.Generator().manual_seed(gen_seed)
    proj = vk.Projection(int(torch.randint(0, 2**62, (1,), generator=g)), r, K + 3, N + 5)
    x = torch.randn(*lead, K, generator=g).to(dtype).to(device)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).to(device)
    b = torch.randn(N, generator=g).to(dtype).to(device)
    ld = (torch.rand(n, r, generator=g) + 0.5).to(device)
    lb = torch.randn(n, N, generator=g).to(device)
    gy = torch.randn(*lead, N, generator=g).to(device)
    return x, W, b, ld, lb, proj, gy


def _batched(fn, x, W, b, ld, lb, proj, ids, gy, **kw):
    x, ld, lb = (t.detach().clone().requires_grad_() for t in (x, ld, lb))
    y = fn(x, W, b, ld, lb, proj, adapter_ids=ids, **kw)
    y.backward(gy.to(y.dtype))
    return y.detach(), x.grad, ld.grad, lb.grad


def _per_row(fn, x, W, b, ld, lb, proj, ids, gy, **kw):
    """One single-adapter call per row; bank gradients accumulated in float64."""
    K, N = x.shape[-1], W.shape[0]
    x2d, gy2d = x.reshape(-1, K), gy.reshape(-1, N)
    rows = ids.reshape(x.shape[0], *([1] * (x.dim() - 2))).expand(x.shape[:-1]) if ids.dim() == 1 and x.dim() > 2 \
        else ids
    rows = rows.reshape(-1)
    ys, gxs = [], []
    gld = torch.zeros(ld.shape, dtype=torch.float64, device=ld.device)
    glb = torch.zeros(lb.shape, dtype=torch.float64, device=lb.device)
    for m in range(x2d.shape[0]):
        xm = x2d[m : m + 1].detach().clone().requires_grad_()
        a = int(rows[m])
        if a < 0:
            y = F.linear(xm, W, b)
        else:
            d, bb = ld[a].detach().clone().requires_grad_(), lb[a].detach().clone().requires_grad_()
            y = fn(xm, W, b, d, bb, proj, **kw)
        y.backward(gy2d[m : m + 1].to(y.dtype))
        ys.append(y.detach())
        gxs.append(xm.grad)
        if a >= 0:
            gld[a] += d.grad.double()
            glb[a] += bb.grad.double()
    return torch.cat(ys).reshape(*x.shape[:-1], N), torch.cat(gxs).reshape(x.shape), gld, glb


def _ref(x, W, b, ld, lb, proj, adapter_ids=None):
    return vk.reference.vera_linear(x, W, b, ld, lb, proj, adapter_ids=adapter_ids)


def _check_against_rows(backend, dtype, device, lead, ids, n, gen_seed):
    _need_support(backend)
    K, N, r = 40, 36, 12
    x, W, b, ld, lb, proj, gy = _bank_problem(lead, K, N, r, n, dtype, device, gen_seed)
    ids = ids.to(device)

    def fn(*a, **kw):
        return vk.vera_linear(*a, backend=backend, **kw)

    out = _batched(fn, x, W, b, ld, lb, proj, ids, gy)
    same = _batched(vk.reference.vera_linear, x, W, b, ld, lb, proj, ids, gy)
    d64 = lambda t: t.double()  # noqa: E731
    ref64 = _per_row(_ref, d64(x), d64(W), d64(b), d64(ld), d64(lb), proj, ids, gy.double())
    for what, o, s_, r64 in zip(("y", "grad_x", "grad_lambda_d", "grad_lambda_b"), out, same, ref64):
        assert_parity(o, s_, r64, dtype, what=f"{backend} {dtype} {what}")
    # bank rows no row used get exactly zero gradient
    used = torch.zeros(n, dtype=torch.bool, device=ids.device)
    used[ids[ids >= 0]] = True
    assert (out[2][~used] == 0).all() and (out[3][~used] == 0).all()
    # the backend's own single-adapter calls, row by row, agree with its batched call
    if dtype == torch.float32:
        rows = _per_row(fn, x, W, b, ld, lb, proj, ids, gy)
        for what, o, s_ in zip(("y", "grad_x", "grad_lambda_d", "grad_lambda_b"), out, rows):
            torch.testing.assert_close(o.double(), s_.double(), rtol=1e-4, atol=1e-4, msg=f"{backend} {what}")
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_token_ids_match_per_row_single_adapter_calls(backend, dtype, device):
    n = 7
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(-1, n - 1, (3, 5), generator=g)  # bank row n - 1 stays unused
    ids[0, 0], ids[2, 4] = -1, 0
    _check_against_rows(backend, dtype, device, (3, 5), ids, n, gen_seed=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_sequence_ids_match_per_row_single_adapter_calls(backend, dtype, device):
    _check_against_rows(backend, dtype, device, (4, 3), torch.tensor([2, -1, 2, 0]), 3, gen_seed=2)


def test_flat_rows_many_distinct_adapters(backend, device):
    n, M = 64, 70
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(3))[: M % n].tolist() + list(range(n))
    _check_against_rows(backend, torch.float32, device, (M,), torch.tensor(ids[:M]), n, gen_seed=3)


def test_all_rows_base_only(backend, device):
    out = _check_against_rows(backend, torch.float32, device, (2, 3), torch.full((2, 3), -1), 4, gen_seed=4)
    assert (out[2] == 0).all() and (out[3] == 0).all()


def test_bank_gradients_are_deterministic(backend, device):
    _need_support(backend)
    x, W, b, ld, lb, proj, gy = _bank_problem((96,), 32, 48, 16, 5, torch.float32, device, 5)
    ids = torch.randint(-1, 5, (96,), generator=torch.Generator().manual_seed(5)).to(device)

    def fn(*a, **kw):
        return vk.vera_linear(*a, backend=backend, **kw)

    first = _batched(fn, x, W, b, ld, lb, proj, ids, gy)
    second = _batched(fn, x, W, b, ld, lb, proj, ids, gy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_native_and_torch_backends_declare_support():
    for name in ("torch", "cpu", "cuda"):
        try:
            b = get_backend(name)
        except vk.BackendUnavailableError:
            continue
        assert b.supports_adapter_ids, name


# --- the deterministic bank reduction ------------------------------------------------------------

@pytest.mark.parametrize("reduce", [bank_sum, sorted_bank_sum], ids=["bank_sum", "sorted_bank_sum"])
def test_bank_sum_matches_a_float64_loop(reduce):
    g = torch.Generator().manual_seed(6)
    rows = torch.randn(50, 9, generator=g)
    ids = torch.randint(-1, 6, (50,), generator=g)
    ids[ids == 4] = 5  # bank row 4 unused
    want = torch.zeros(7, 9, dtype=torch.float64)
    for m in range(50):
        if ids[m] >= 0:
            want[ids[m]] += rows[m].double()
    got = reduce(rows, ids, 7)
    assert got.shape == (7, 9) and got.dtype == rows.dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert (got[4] == 0).all() and (got[6] == 0).all()
    assert (reduce(rows, torch.full((50,), -1), 7) == 0).all()
    assert reduce(rows[:0], ids[:0], 7).shape == (7, 9)


def test_bank_grouping_reads_nothing_back_to_the_host():
    """The many-adapters backward's grouping (the Triton row blocks, the sorted bank sum used off the CPU)
    has sizes fixed by the shapes and no host read, so a CUDA graph can capture it: it runs on the meta
    device, where a data-dependent size (torch.bincount, torch.unique_consecutive) or a host read
    (segment_reduce's checks of its lengths) raises."""
    rank_grads = pytest.importorskip("vera_kernels.ops.rank_grads")
    ids = torch.tensor([2, 0, -1, 2, 1, 2, 2], device="meta")
    order, start, length, adapter, first, end = rank_grads.adapter_row_blocks(ids, 4, 2)
    assert order.shape == (7,) and start.shape == length.shape == adapter.shape == (8,)  # cdiv(7, 2) + 4
    assert first.shape == end.shape == (4,)
    assert sorted_bank_sum(torch.empty(7, 3, device="meta"), ids, 4).shape == (4, 3)


# --- bad ids ----------------------------------------------------------------------------------------

def _bad_call(ids, ld_shape=None, lb_shape=None):
    x, W, b, ld, lb, proj, _ = _bank_problem((2, 3), 8, 6, 4, 3, torch.float32, "cpu", 7)
    if ld_shape is not None:
        ld = torch.rand(ld_shape)
    if lb_shape is not None:
        lb = torch.rand(lb_shape)
    return vk.vera_linear(x, W, b, ld, lb, proj, adapter_ids=ids, backend="torch")


@pytest.mark.parametrize("ids, err, match", [
    (torch.tensor([[0, 1, 3], [0, 0, 0]]), ValueError, r"in \[-1, 3\).*\[0, 3\]"),
    (torch.tensor([[0, 1, -2], [0, 0, 0]]), ValueError, r"in \[-1, 3\)"),
    (torch.tensor([0, 1, 2]), ValueError, r"shape \(2, 3\).*\(2,\)"),
    (torch.tensor([[0, 1], [0, 0]]), ValueError, "adapter_ids must have shape"),
    (torch.zeros(2, 3), TypeError, "integer tensor"),
    (torch.zeros(2, 3, dtype=torch.bool), TypeError, "integer tensor"),
    ([0, 1], TypeError, "torch.Tensor"),
])
def test_bad_ids_raise_clearly(ids, err, match):
    with pytest.raises(err, match=match):
        _bad_call(ids)


def test_bank_shapes_checked():
    ids = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="bank"):
        _bad_call(ids, ld_shape=(4,))
    with pytest.raises(ValueError, match=r"bank \[3, 6\]"):
        _bad_call(ids, lb_shape=(2, 6))


# --- VeRALinear(num_adapters=n) and vk.adapter_ids -------------------------------------------------

def _model(n=5, dtype=torch.float32):
    torch.manual_seed(0)
    proj = vk.Projection(9, 8, 24, 24)
    m = nn.Sequential(
        vk.VeRALinear(16, 24, projection=proj, num_adapters=n, dtype=dtype), nn.Tanh(),
        vk.VeRALinear(24, 12, projection=proj, num_adapters=n, dtype=dtype),
    )
    with torch.no_grad():
        for layer in (m[0], m[2]):
            layer.lambda_b.normal_()
            layer.lambda_d.uniform_(0.5, 1.5)
    return m


def _single(model, a):
    """The same model with adapter ``a`` as one single-adapter layer per bank."""
    singles = []
    for layer in (model[0], model[2]):
        s = vk.VeRALinear(layer.in_features, layer.out_features, projection=layer.projection, dtype=layer.weight.dtype)
        s.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("lambda")}, strict=False)
        with torch.no_grad():
            if a >= 0:
                s.lambda_d.copy_(layer.lambda_d[a])
                s.lambda_b.copy_(layer.lambda_b[a])
            else:  # base only
                s.lambda_b.zero_()
        singles.append(s)
    return nn.Sequential(singles[0], nn.Tanh(), singles[1])


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sequence", "per_token"])
def test_adapter_ids_context_matches_single_adapter_models(per_token):
    model = _model()
    x = torch.randn(4, 3, 16)
    ids = torch.tensor([[4, 0, -1], [2, 2, 2], [-1, -1, 1], [0, 3, 4]]) if per_token else torch.tensor([3, -1, 0, 3])
    with vk.adapter_ids(model, ids):
        y = model(x)
    full = ids if per_token else ids[:, None].expand(4, 3)
    for i in range(4):
        for t in range(3):
            want = _single(model, int(full[i, t]))(x[i, t])
            torch.testing.assert_close(y[i, t], want, rtol=1e-5, atol=1e-5)


def test_layer_without_ids_raises_and_context_restores():
    model = _model()
    x = torch.randn(2, 3, 16)
    with pytest.raises(RuntimeError, match="adapter_ids"):
        model(x)
    with vk.adapter_ids(model, torch.tensor([0, 1])):
        y01 = model(x)
        with vk.adapter_ids(model, torch.tensor([1, 0])):  # nested: inner ids win
            y10 = model(x)
        torch.testing.assert_close(model(x), y01)  # outer ids back
        assert not torch.allclose(y01, y10)
    with pytest.raises(RuntimeError, match="adapter_ids"):
        model(x)
    with pytest.raises(ZeroDivisionError):
        with vk.adapter_ids(model, torch.tensor([0, 1])):
            1 / 0
    assert model[0]._adapter_ids is None and model[2]._adapter_ids is None


def test_adapter_ids_context_rejects_bad_ids_before_changing_anything():
    model = _model(n=5)
    with pytest.raises(ValueError, match=r"in \[-1, 5\)"):
        with vk.adapter_ids(model, torch.tensor([0, 5])):
            pass
    with pytest.raises(TypeError, match="integer"):
        with vk.adapter_ids(model, torch.tensor([0.0, 1.0])):
            pass
    with pytest.raises(ValueError, match=r"\[batch\]"):
        with vk.adapter_ids(model, torch.zeros(2, 3, 4, dtype=torch.int64)):
            pass
    with pytest.raises(ValueError, match="num_adapters > 1"):
        with vk.adapter_ids(nn.Linear(2, 2), torch.tensor([0])):
            pass
    assert model[0]._adapter_ids is None
    with vk.adapter_ids(model, torch.tensor([0, 1])):  # ids whose shape fits neither [batch] nor [batch, seq]
        with pytest.raises(ValueError, match="adapter_ids must have shape"):
            model(torch.randn(3, 4, 16))


def test_adapter_ids_context_checks_and_flattens_once_and_keeps_its_own_copy(monkeypatch):
    """The block's ids are checked once for the model and flattened once per input shape, not in every
    layer's call; they are a copy: changing the caller's tensor inside the block changes nothing."""
    import vera_kernels.core as core

    model = _model()
    x1, x2 = torch.randn(4, 3, 16), torch.randn(4, 1, 16)
    ids = torch.tensor([3, -1, 0, 3])
    with vk.adapter_ids(model, ids.clone()):
        want1, want2 = model(x1), model(x2)
    real, reads = core.checked_adapter_ids, []

    def counting(adapter_ids, x, n):
        if isinstance(adapter_ids, torch.Tensor):
            reads.append(tuple(x.shape[:-1]))
        return real(adapter_ids, x, n)

    monkeypatch.setattr(core, "checked_adapter_ids", counting)
    with vk.adapter_ids(model, ids):
        ids.fill_(1)  # the caller's tensor, changed inside the block
        for _ in range(2):
            torch.testing.assert_close(model(x1), want1, rtol=0, atol=0)
            torch.testing.assert_close(model(x2), want2, rtol=0, atol=0)
    assert reads == [(4, 3), (4, 1)]  # two bank layers, two calls each: one flattening per shape


def test_bank_layer_trains_only_used_adapters_and_state_dict_round_trips():
    model = _model(n=6)
    x = torch.randn(3, 2, 16)
    with vk.adapter_ids(model, torch.tensor([1, 4, -1])):
        model(x).square().sum().backward()
    for layer in (model[0], model[2]):
        assert layer.lambda_d.shape == (6, 8) and layer.lambda_b.shape == (6, layer.out_features)
        touched = (layer.lambda_b.grad != 0).any(1) | (layer.lambda_d.grad != 0).any(1)
        assert touched.tolist() == [False, True, False, False, True, False]
    again = _model(n=6)
    with torch.no_grad():
        for layer in (again[0], again[2]):
            layer.lambda_b.zero_()
    again.load_state_dict(model.state_dict())
    ids = torch.tensor([5, 1, 0])
    with vk.adapter_ids(model, ids), vk.adapter_ids(again, ids):
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="cannot be merged"):
        model[0].merge()
    assert not model[0].merged
    assert "num_adapters=6" in repr(model[0])


def test_num_adapters_validated_and_single_layer_refuses_ids():
    with pytest.raises(ValueError, match="num_adapters"):
        vk.VeRALinear(4, 4, rank=2, num_adapters=0)
    single = vk.VeRALinear(4, 4, rank=2)
    with pytest.raises(ValueError, match="num_adapters > 1"):
        single(torch.randn(2, 4), adapter_ids=torch.tensor([0, 0]))
    bank = vk.VeRALinear.from_linear(nn.Linear(4, 4), rank=2, num_adapters=3)
    assert bank.lambda_d.shape == (3, 2)
    y = bank(torch.randn(2, 4), adapter_ids=torch.tensor([2, -1]))
    assert y.shape == (2, 4)


# --- dropout, stored projections, and the native CPU ops' tiling --------------------------------------

def _against_reference(backend, dtype, device, lead, K, N, r, n, ids, stored=False, dropout_p=0.0, gen_seed=8):
    x, W, b, ld, lb, proj, gy = _bank_problem(lead, K, N, r, n, dtype, device, gen_seed)
    if stored:
        proj = vk.Projection.from_tensors(*proj.materialize())
    ids = ids.to(device)
    kw = dict(dropout_p=dropout_p, training=dropout_p > 0)

    def fn(*a, **k):
        torch.manual_seed(123)  # the same dropout seed for every call
        return vk.vera_linear(*a, backend=backend, **k, **kw)

    def ref(*a, **k):
        torch.manual_seed(123)
        return vk.reference.vera_linear(*a, **k, **kw)

    out = _batched(fn, x, W, b, ld, lb, proj, ids, gy)
    same = _batched(ref, x, W, b, ld, lb, proj, ids, gy)
    d64 = lambda t: t.double()  # noqa: E731
    ref64 = _batched(ref, d64(x), d64(W), d64(b), d64(ld), d64(lb), proj, ids, gy.double())
    for what, o, s_, r64 in zip(("y", "grad_x", "grad_lambda_d", "grad_lambda_b"), out, same, ref64):
        assert_parity(o, s_, r64, dtype, what=f"{backend} {dtype} {what}")


@pytest.mark.parametrize("stored", [False, True], ids=["seeded", "stored"])
def test_dropout_and_projection_kinds(backend, device, stored):
    _need_support(backend)
    ids = torch.randint(-1, 4, (5, 6), generator=torch.Generator().manual_seed(9))
    _against_reference(backend, torch.float32, device, (5, 6), 24, 20, 8, 4, ids, stored=stored, dropout_p=0.25)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stored", [False, True], ids=["seeded", "stored"])
def test_native_cpu_several_tiles_and_chunks(monkeypatch, dtype, stored):
    """Tiny scratch sizes force several column tiles and row chunks in the native CPU bank paths."""
    why = backend_skip_reason("cpu", torch.device("cpu"))
    if why is not None:
        pytest.skip(why)
    monkeypatch.setenv("VERA_KERNELS_CPU_TILE_FLOATS", str(8 * 64))  # r = 8: 64 columns per tile
    monkeypatch.setenv("VERA_KERNELS_CPU_CHUNK_FLOATS", str(64 * 24))  # 24 rows per chunk
    ids = torch.randint(-1, 9, (130,), generator=torch.Generator().manual_seed(10))
    _against_reference("cpu", dtype, "cpu", (130,), 200, 150, 8, 9, ids, stored=stored, dropout_p=0.2)


# --- the native ops' bank variants: schema, fake kernels (opcheck), errors ------------------------------

def _bank_op_samples():
    from vera_kernels.backends import _native

    if _native.availability("cpu") is not None:
        pytest.skip(f"native extension unavailable: {_native.availability('cpu')}")
    return native_op_samples(adapters=4)


@pytest.mark.parametrize("i", range(12))
def test_bank_ops_opcheck(i):
    op, args = _bank_op_samples()[i]
    torch.library.opcheck(op, args)


def test_bank_op_errors_are_clear():
    _bank_op_samples()  # skips without the extension
    ops = torch.ops.vera_kernels
    x, W, s = torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 2)
    ld, lb = torch.randn(3, 2), torch.randn(3, 5)
    with pytest.raises(RuntimeError, match=r"adapter_ids must be in \[-1, 3\), got 3 at row 1"):
        ops.fused_forward(x, W, None, s, ld, lb, None, 1, 2, 0.5, 0, torch.tensor([0, 3, 1]))
    with pytest.raises(RuntimeError, match="adapter_ids must be int64"):
        ops.fused_forward(x, W, None, s, ld, lb, None, 1, 2, 0.5, 0, torch.tensor([0, 1, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"adapter_ids must be \[3\]"):
        ops.fused_forward(x, W, None, s, ld, lb, None, 1, 2, 0.5, 0, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match=r"lambda_b must be a contiguous bank \[n, 5\]"):
        ops.fused_forward(x, W, None, s, ld, lb[:, :4], None, 1, 2, 0.5, 0, torch.tensor([0, 1, 1]))
    with pytest.raises(RuntimeError, match="banks differ in size"):
        ops.rank_grads(torch.randn(3, 5), s, ld, lb[:2], None, 1, 2, 0.5, True, 0, torch.tensor([0, 1, 1]))


def test_demo_serves_users_in_one_batch(capsys):
    from vera_kernels import demo

    demo.serve_users(users=6, features=32, rank=8, layers=2)
    out = capsys.readouterr().out
    assert "bank of 6 adapters" in out and "bytes per user" in out
    err = float(out.split("max |difference| ")[1].split()[0])
    assert err < 1e-4  # the batched call and the loop compute the same model


def test_bank_calls_share_the_memoised_plan_and_check_the_ids_every_call(monkeypatch):
    """A call with adapter ids validates its metadata and picks its backend once per signature, like a
    single-adapter call; the ids' values are still checked on every call."""
    from vera_kernels import functional

    x, W, b, ld, lb, proj, _ = _bank_problem((5,), 12, 10, 4, 3, torch.float32, "cpu", 0)
    chosen = []
    real = functional.select

    def spy(problem, requested=None):
        chosen.append(problem.adapter_ids is not None)
        return real(problem, requested)

    monkeypatch.setattr(functional, "select", spy)
    functional._PLAN_CACHE.clear()
    ids = torch.tensor([0, 2, -1, 1, 2])
    y1 = vk.vera_linear(x, W, b, ld, lb, proj, adapter_ids=ids)
    y2 = vk.vera_linear(x, W, b, ld, lb, proj, adapter_ids=ids.flip(0))
    assert chosen == [True]  # the second call came from the plan
    torch.testing.assert_close(y2, vk.reference.vera_linear(x, W, b, ld, lb, proj, adapter_ids=ids.flip(0)))
    assert not torch.allclose(y1, y2)
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, 3\)"):
        vk.vera_linear(x, W, b, ld, lb, proj, adapter_ids=torch.tensor([0, 3, 0, 0, 0]))
    with pytest.raises(ValueError, match="adapter_ids must have shape"):
        vk.vera_linear(x, W, b, ld, lb, proj, adapter_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs adapter_ids"):  # bank-shaped vectors without ids: refused
        vk.vera_linear(x, W, b, ld, lb, proj)
