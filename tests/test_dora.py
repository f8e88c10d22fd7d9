"""DVoRA (``magnitude=``, ``VeRALinear(dora=True)``, ``apply_vera(use_dora=True)``) against the oracle that
materialises ``W + dW`` (``vk.reference.vera_linear(..., magnitude=m)``), on every backend."""

import zlib

import pytest
import torch

import vera_kernels as vk
from vera_kernels import dora
from parity import assert_parity, make_inputs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (leading dims of x, K, N, r, max_in, max_out, bias)
SHAPES = [
    ((5,), 32, 24, 8, 32, 24, True),
    ((0,), 16, 8, 4, 16, 8, True),  # M = 0
    ((3,), 1, 17, 3, 4, 20, False),  # K = 1, N = 17, r = 3
    ((2, 3), 40, 17, 5, 64, 33, True),  # 3-D input, K != N, layer smaller than the projection
    ((67,), 24, 40, 12, 24, 40, False),  # more rows than one block, N > K
]
SHAPE_IDS = ["basic", "M0", "K1-N17-r3", "3d", "M67"]


def _materialised_norm(W, ld, lb, proj, in_offset=0, out_offset=0):
    N, K = W.shape
    A, B = proj.materialize(torch.float64)
    A_K, B_N = A[:, in_offset:in_offset + K], B[out_offset:out_offset + N]
    return (W.double() + (lb.double()[:, None] * B_N) @ (ld.double()[:, None] * A_K)).norm(dim=1)


@pytest.mark.parametrize("r", [1, 7, 256, 1024])
@pytest.mark.parametrize("K,N", [(40, 24), (24, 40), (1500, 7)])
def test_three_term_identity_float64(r, K, N):
    """||W_i + dW_i||^2 = ||W_i||^2 + 2 lb_i (B_i * ld).(W A_K^T)_i + lb_i^2 (B_i * ld)^T (A_K A_K^T) (B_i * ld)."""
    g = torch.Generator().manual_seed(r + K)
    proj = vk.Projection(int(torch.randint(0, 2**62, (1,), generator=g)), r, K + 2, N + 1)
    A, B = proj.materialize(torch.float64)
    A_K, B_N = A[:, :K], B[:N]
    W = torch.randn(N, K, generator=g, dtype=torch.float64) / K**0.5
    ld, lb = torch.randn(r, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    u = B_N * ld
    three = (W * W).sum(1) + 2 * lb * (u * (W @ A_K.t())).sum(1) + lb**2 * ((u @ (A_K @ A_K.t())) * u).sum(1)
    torch.testing.assert_close(three.sqrt(), _materialised_norm(W, ld, lb, proj), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("r", [1, 7, 256, 1024])
@pytest.mark.parametrize("K,N,in_off,out_off", [(40, 24, 0, 0), (24, 40, 0, 0), (33, 9, 5, 11)])
def test_norm_identity_float64(r, K, N, in_off, out_off):
    g = torch.Generator().manual_seed(r * 1000 + K)
    proj = vk.Projection(int(torch.randint(0, 2**62, (1,), generator=g)), r, K + in_off + 3, N + out_off + 2)
    W = torch.randn(N, K, generator=g, dtype=torch.float64) / K**0.5
    ld = torch.randn(r, generator=g, dtype=torch.float64)
    lb = torch.randn(N, generator=g, dtype=torch.float64) * 3
    got = dora.row_norm(W, ld, lb, proj, in_off, out_off)
    want = _materialised_norm(W, ld, lb, proj, in_off, out_off)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # banks: one norm row per adapter
    ldb, lbb = torch.randn(3, r, generator=g, dtype=torch.float64), torch.randn(3, N, generator=g, dtype=torch.float64)
    got = dora.row_norm(W, ldb, lbb, proj, in_off, out_off)
    want = torch.stack([_materialised_norm(W, ldb[i], lbb[i], proj, in_off, out_off) for i in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_norm_identity_float32_large_rank():
    K, N, r = 48, 20, 1024
    proj = vk.Projection(5, r, K, N)
    W = torch.randn(N, K) / K**0.5
    ld, lb = torch.randn(r) * 0.1, torch.randn(N)
    got = dora.row_norm(W, ld, lb, proj)
    want = _materialised_norm(W, ld, lb, proj)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=0)


def test_pieces_refresh_when_the_weight_changes():
    K, N, r = 16, 12, 4
    proj = vk.Projection(1, r, K, N)
    W = torch.randn(N, K)
    ld, lb = torch.randn(r), torch.randn(N)
    before = dora.row_norm(W, ld, lb, proj)
    with torch.no_grad():
        W.mul_(2.0)  # in place: same storage, new version
    after = dora.row_norm(W, ld, lb, proj)
    torch.testing.assert_close(after.double(), _materialised_norm(W, ld, lb, proj), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before, after)
    W2 = W.to(torch.float64)  # another tensor: its own entry
    torch.testing.assert_close(dora.row_norm(W2, ld, lb, proj), _materialised_norm(W2, ld, lb, proj))


def _run(fn, x, W, b, ld, lb, m, proj, gy, **kw):
    x, ld, lb, m = (t.detach().clone().requires_grad_() for t in (x, ld, lb, m))
    y = fn(x, W, b, ld, lb, proj, magnitude=m, **kw)
    y.backward(gy.to(y.dtype))
    return y.detach(), x.grad, ld.grad, lb.grad, m.grad


def _check(backend, dtype, x, W, b, ld, lb, m, proj, rng_seed=None, **kw):
    gy = torch.randn(*x.shape[:-1], W.shape[0]).to(dtype)
    res = []
    for cast, g in ((lambda t: t, gy), (lambda t: None if t is None else t.double(), gy.double())):
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        res.append(_run(vk.reference.vera_linear, cast(x), cast(W), cast(b), cast(ld), cast(lb), cast(m), proj, g,
                        **kw))
    same, ref64 = res
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    out = _run(vk.vera_linear, x, W, b, ld, lb, m, proj, gy, backend=backend, **kw)
    for i, what in enumerate(("y", "grad_x", "grad_lambda_d", "grad_lambda_b", "grad_magnitude")):
        assert out[i] is not None, f"{what}: no gradient"
        assert out[i].dtype == same[i].dtype, f"{what}: dtype {out[i].dtype} != {same[i].dtype}"
        assert_parity(out[i], same[i], ref64[i], dtype, what)
    return out


def _aligned(W, ld, lb, proj, in_offset=0, out_offset=0):
    """``lb`` with each entry's sign chosen so that <W_i, dW_i> >= 0, hence ||W_i + dW_i|| >= ||W_i||.

    Where dW cancels W, DoRA's scale m / ||W + dW|| grows without bound and amplifies every rounding of every
    implementation (the reference's too) past a fixed tolerance; the parity tests keep away from that, and
    the float64 identity tests above cover the cancelling case."""
    N, K = W.shape
    A, B = proj.materialize(torch.float64)
    A_K, B_N = A[:, in_offset:in_offset + K], B[out_offset:out_offset + N]
    lbs = lb if lb.dim() == 2 else lb[None]
    lds = ld if ld.dim() == 2 else ld[None]
    dirs = torch.stack([((B_N * l.double()) @ A_K * W.double()).sum(1) for l in lds])  # <W_i, dW_i> / lb_i
    out = lbs.abs() * torch.where(dirs >= 0, 1.0, -1.0).to(lb.dtype)
    return out if lb.dim() == 2 else out[0]


def _magnitude(W, lead=(), gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed + 7)
    return W.double().norm(dim=1).float() * (0.5 + torch.rand(*lead, W.shape[0], generator=g))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_parity_forward_backward(backend, shape, dtype):
    lead, K, N, r, max_in, max_out, bias = shape
    seed = zlib.crc32(repr((shape, str(dtype))).encode())  # reproducible: near-zero row norms are ill-conditioned
    x, W, b, ld, lb, proj = make_inputs(lead, K, N, r, dtype, "cpu", bias=bias, max_in=max_in, max_out=max_out,
                                        gen_seed=seed)
    _check(backend, dtype, x, W, b, ld, _aligned(W, ld, lb, proj), _magnitude(W, gen_seed=seed), proj)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_dropout_as_peft(backend, dtype):
    x, W, b, ld, lb, proj = make_inputs((2, 9), 24, 20, 6, dtype, "cpu", max_in=30, max_out=20, gen_seed=3)
    lb = _aligned(W, ld, lb, proj)
    out = _check(backend, dtype, x, W, b, ld, lb, _magnitude(W), proj, rng_seed=11, dropout_p=0.3, training=True)
    torch.manual_seed(11)  # eval mode: no dropout, a different output
    y_eval = vk.vera_linear(x, W, b, ld, lb, proj, 0.3, False, backend, magnitude=_magnitude(W))
    assert not torch.allclose(y_eval.float(), out[0].float())


def test_parity_non_contiguous_and_offsets(backend):
    dtype = torch.float32
    x, W, b, ld, lb, proj = make_inputs((7,), 20, 12, 5, dtype, "cpu", max_in=40, max_out=30, gen_seed=5)
    x_t, W_t = x.t().contiguous().t(), W.t().contiguous().t()
    _check(backend, dtype, x_t, W_t, b, ld, _aligned(W, ld, lb, proj), _magnitude(W), proj)
    try:
        _check(backend, dtype, x, W, b, ld, _aligned(W, ld, lb, proj, 9, 13), _magnitude(W), proj, in_offset=9,
               out_offset=13)
    except vk.BackendUnavailableError as e:
        pytest.skip(f"no shard offsets on {backend}: {e}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_many_adapters(backend, dtype):
    n, K, N, r = 3, 16, 10, 4
    x, W, b, _, _, proj = make_inputs((4, 3), K, N, r, dtype, "cpu", gen_seed=9)
    g = torch.Generator().manual_seed(2)
    ld, lb = torch.rand(n, r, generator=g) + 0.5, torch.randn(n, N, generator=g)
    lb = _aligned(W, ld, lb, proj)
    ids = torch.tensor([[0, 2, -1], [1, 1, 0], [-1, -1, 2], [2, 0, 0]])
    try:
        _check(backend, dtype, x, W, b, ld, lb, _magnitude(W, (n,)), proj, adapter_ids=ids)
    except vk.BackendUnavailableError as e:
        pytest.skip(f"no adapter ids on {backend}: {e}")


def test_gradients_only_for_x_vectors_and_magnitude():
    x, W, b, ld, lb, proj = make_inputs((4,), 8, 6, 3, torch.float32, "cpu")
    m = _magnitude(W).requires_grad_()
    ld.requires_grad_()
    y = vk.vera_linear(x, W, b, ld, lb, proj, magnitude=m)
    y.sum().backward()
    assert m.grad is not None and ld.grad is not None and lb.grad is None and W.grad is None and b.grad is None
    with pytest.raises(ValueError, match="frozen"):
        vk.vera_linear(x, W.requires_grad_(), b, ld, lb, proj, magnitude=m)


def test_double_backward_refused():
    x, W, b, ld, lb, proj = make_inputs((4,), 8, 6, 3, torch.float32, "cpu")
    m = _magnitude(W).requires_grad_()
    y = vk.vera_linear(x, W, b, ld, lb, proj, magnitude=m)
    (gm,) = torch.autograd.grad(y.square().sum(), m, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gm.sum().backward()


def test_fresh_magnitude_is_the_base_layer():
    """m = ||W||_row with lambda_b = 0: scale 1, the base layer's output."""
    x, W, b, ld, _, proj = make_inputs((5,), 16, 12, 4, torch.float32, "cpu")
    lb = torch.zeros(12)
    y = vk.vera_linear(x, W, b, ld, lb, proj, magnitude=dora.initial_magnitude(W))
    torch.testing.assert_close(y, torch.nn.functional.linear(x, W, b))


@pytest.mark.parametrize("bad,err,match", [
    (torch.ones(5), ValueError, "magnitude must have lambda_b's shape"),
    (torch.ones(6, dtype=torch.float16), TypeError, "float32"),
    ([1.0] * 6, TypeError, "torch.Tensor"),
])
def test_bad_magnitude(bad, err, match):
    x, W, b, ld, lb, proj = make_inputs((4,), 8, 6, 3, torch.float32, "cpu")
    with pytest.raises(err, match=match):
        vk.vera_linear(x, W, b, ld, lb, proj, magnitude=bad)
    with pytest.raises(err, match=match):
        vk.reference.vera_linear(x, W, b, ld, lb, proj, magnitude=bad)


# --- the layer, models and adapter files ---------------------------------------------------------------
def _trained_layer(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    layer = vk.VeRALinear(24, 12, rank=6, dora=True, dtype=dtype, **kw)
    with torch.no_grad():
        layer.lambda_b.copy_(torch.randn_like(layer.lambda_b) * 0.3)
        layer.magnitude.mul_(1 + 0.2 * torch.rand_like(layer.magnitude))
    return layer


def test_layer_init_forward_and_gradients():
    layer = vk.VeRALinear(24, 12, rank=6, dora=True)
    assert layer.magnitude.dtype == torch.float32 and layer.magnitude.requires_grad
    torch.testing.assert_close(layer.magnitude, layer.weight.double().norm(dim=1).float())
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))  # starts as base
    layer = _trained_layer()
    ref = vk.reference.vera_linear(x, layer.weight, layer.bias, layer.lambda_d, layer.lambda_b, layer.projection,
                                   magnitude=layer.magnitude)
    torch.testing.assert_close(layer(x), ref)
    layer(x).square().sum().backward()
    assert all(p.grad is not None for p in (layer.lambda_d, layer.lambda_b, layer.magnitude))
    assert layer.weight.grad is None
    assert "dora=True" in repr(layer)
    half = _trained_layer().half()
    assert half.magnitude.dtype == torch.float32 and half.weight.dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_merge_unmerge(dtype):
    layer = _trained_layer(dtype)
    x = torch.randn(4, 24).to(dtype)
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), y, **({} if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)))
        # as PEFT merges DoRA: the merged rows have norm m
        torch.testing.assert_close(layer.weight.double().norm(dim=1).float(), layer.magnitude,
                                   **({} if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)))
        layer.unmerge()
        tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(layer.weight, w0, **tol)
        torch.testing.assert_close(layer(x), y, **({} if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)))


def test_layer_norm_cache_follows_load_state_dict():
    """The cached norm pieces belong to the old weight values: a state load must refresh them."""
    a, b = _trained_layer(), _trained_layer()
    with torch.no_grad():
        b.weight.mul_(3.0)
        b.magnitude.mul_(0.5)
    x = torch.randn(5, 24)
    a(x)  # fills a's cache
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(a(x), b(x))
    ref = vk.reference.vera_linear(x, a.weight, a.bias, a.lambda_d, a.lambda_b, a.projection, magnitude=a.magnitude)
    torch.testing.assert_close(a(x), ref)


def test_layer_state_refuses_other_kind():
    plain = vk.VeRALinear(24, 12, rank=6)
    with pytest.raises(RuntimeError, match="magnitude"):
        plain.load_state_dict(_trained_layer().state_dict())
    with pytest.raises(RuntimeError, match="magnitude"):
        _trained_layer().load_state_dict(plain.state_dict())


def test_layer_bank_with_adapter_ids():
    layer = vk.VeRALinear(16, 10, rank=4, dora=True, num_adapters=3)
    assert layer.magnitude.shape == (3, 10)
    with torch.no_grad():
        layer.lambda_b.copy_(torch.randn(3, 10) * 0.3)
        layer.magnitude.mul_(1 + 0.2 * torch.rand(3, 10))
    x, ids = torch.randn(4, 2, 16), torch.tensor([0, 2, -1, 1])
    y = layer(x, adapter_ids=ids)
    ref = vk.reference.vera_linear(x, layer.weight, layer.bias, layer.lambda_d, layer.lambda_b, layer.projection,
                                   adapter_ids=ids, magnitude=layer.magnitude)
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert layer.magnitude.grad[[0, 1, 2]].abs().sum(1).gt(0).all()
    with pytest.raises(RuntimeError, match="cannot be merged"):
        layer.merge()


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   vocab_size=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_apply_vera_use_dora_save_load(tmp_path):
    pytest.importorskip("safetensors")
    model = vk.apply_vera(_tiny_llama(), rank=8, use_dora=True)
    layers = [m for m in model.modules() if isinstance(m, vk.VeRALinear)]
    assert layers and all(m.dora for m in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith(".magnitude") for n in trainable)
    with torch.no_grad():
        for m in layers:
            m.lambda_b.normal_(0, 0.1)
            m.magnitude.mul_(1.1)
    ids = torch.randint(0, 64, (2, 5))
    y = model(ids).logits
    vk.save_adapter(model, tmp_path / "a")
    cfg = (tmp_path / "a" / "adapter_config.json").read_text()
    assert '"use_dora": true' in cfg
    other = vk.load_adapter(_tiny_llama(), tmp_path / "a")
    assert all(m.dora for m in other.modules() if isinstance(m, vk.VeRALinear))
    torch.testing.assert_close(other(ids).logits, y)
    with pytest.raises(ValueError, match="PEFT has no DVoRA"):
        vk.save_peft_adapter(model, tmp_path / "p")
    plain = vk.apply_vera(_tiny_llama(), rank=8)
    with pytest.raises(vk.AdapterFileError, match="DVoRA"):
        vk.load_adapter(plain, tmp_path / "a")
    merged = vk.merge_and_unload(model)
    torch.testing.assert_close(merged(ids).logits, y, atol=1e-5, rtol=1e-4)


def test_saved_for_backward_is_x_and_two_vectors():
    """DVoRA keeps a reference to x and the [N] scale and norm; VeRA keeps s [M, r]; nothing [M, N]."""
    from benchmarks.dvora import saved_bytes

    M, K, N, r = 64, 48, 40, 8
    vera, dvora = (vk.VeRALinear(K, N, rank=r, dora=d) for d in (False, True))
    x = torch.randn(M, K, requires_grad=True)
    for layer, new, inp in ((vera, M * r * 4, 0), (dvora, 2 * N * 4, M * K * 4)):
        _, got_new, got_inp = saved_bytes(lambda: layer(x), exclude=list(layer.parameters()), inputs=[x])
        assert (got_new, got_inp) == (new, inp)


def test_adapter_state_dict_store_and_slots(tmp_path):
    model = vk.apply_vera(_tiny_llama(), rank=8, use_dora=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, vk.VeRALinear):
                m.magnitude.mul_(1.5)
    state = vk.get_adapter_state_dict(model)
    assert any(k.endswith(".magnitude") for k in state)
    other = vk.apply_vera(_tiny_llama(), rank=8, use_dora=True)
    vk.set_adapter_state_dict(other, state)
    ids = torch.randint(0, 64, (1, 4))
    torch.testing.assert_close(other(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="missing keys"):
        vk.set_adapter_state_dict(other, {k: v for k, v in state.items() if not k.endswith(".magnitude")})
    store = vk.AdapterStore(tmp_path / "store")
    with pytest.raises(ValueError, match="DVoRA"):
        store.put("alice", (model, None))
    bank = vk.apply_vera(_tiny_llama(), rank=8, use_dora=True, num_adapters=2)
    with pytest.raises(ValueError, match="DVoRA"):
        vk.SlotCache(bank, store)


def test_gpt2_conv1d_autocast_and_inference_mode():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 6))
    want = base(ids).logits
    model = vk.apply_vera(base, rank=8, use_dora=True)  # Conv1D: fan_in_fan_out layers
    layers = [m for m in model.modules() if isinstance(m, vk.VeRALinear)]
    assert layers and all(m.fan_in_fan_out and m.dora for m in layers)
    torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)  # a fresh adapter is the base
    with torch.no_grad():
        for m in layers:
            m.lambda_b.normal_(0, 0.1)
            m.magnitude.mul_(1.2)
    y = model(ids).logits
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = model(ids).logits
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y, atol=0.1, rtol=0.05)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids).logits.float().square().mean().backward()
    assert all(m.magnitude.grad is not None and m.magnitude.grad.dtype == torch.float32 for m in layers)
    for m in layers:
        m.merge()
    torch.testing.assert_close(model.eval()(ids).logits, y, atol=1e-5, rtol=1e-4)


def test_gradcheck_float64_x_and_magnitude():
    """The norm depends on the lambdas only (a constant for autograd by design), so x and m are exact."""
    x, W, b, ld, lb, proj = make_inputs((3,), 6, 5, 2, torch.float64, "cpu")
    m = _magnitude(W).double().requires_grad_()
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, m: vk.vera_linear(x, W, b, ld.double(), lb.double(), proj,
                                                                backend="torch", magnitude=m), (x, m))
