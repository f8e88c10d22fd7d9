"""The torch.library ops of vera_kernels._C: schemas and fake kernels (opcheck), torch.compile, loading."""

import os
import subprocess
import sys

import pytest
import torch

import vera_kernels as vk
from vera_kernels.backends import _native
from conftest import native_op_samples

pytestmark = pytest.mark.skipif(
    _native.availability("cpu") is not None, reason=f"native extension unavailable: {_native.availability('cpu')}"
)
ops = torch.ops.vera_kernels


@pytest.mark.parametrize("i", range(18))
def test_opcheck(i):
    op, args = native_op_samples()[i]
    torch.library.opcheck(op, args)


def _fake_calls(M=3, K=6, N=5, r=4, n=2):
    """name -> (good args, bad args) of each op, built inside the caller's FakeTensorMode."""
    e = torch.empty
    x, W, s, ld, lb, gy, g = e(M, K), e(N, K), e(M, r), e(r), e(N), e(M, N), e(M, r)
    ids, bank_d, bank_b = e(M, dtype=torch.int64), e(n, r), e(n, N)
    drop = (0, 0, 0, 1.0)
    return {
        "shrink": ((x, e(r, K), r, 0, 0, 0.5, *drop, 0), (x, e(r, K - 1), r, 0, 0, 0.5, *drop, 0)),
        "fused_forward": ((x, W, None, s, ld, lb, None, 1, 2, 0.5, 0, None),
                          (x, e(N, K + 1), None, s, ld, lb, None, 1, 2, 0.5, 0, None)),
        "fused_forward-bias": ((x, W, e(N), s, ld, lb, None, 1, 2, 0.5, 0, None),
                               (x, W, e(N + 1), s, ld, lb, None, 1, 2, 0.5, 0, None)),
        "fused_forward-s": ((x, W, None, s, ld, lb, None, 1, 2, 0.5, 0, None),
                            (x, W, None, e(M + 1, r), ld, lb, None, 1, 2, 0.5, 0, None)),
        "fused_forward-bank": ((x, W, None, s, bank_d, bank_b, None, 1, 2, 0.5, 0, ids),
                               (x, W, None, s, bank_d, e(n + 1, N), None, 1, 2, 0.5, 0, ids)),
        "rank_grads": ((gy, s, ld, lb, None, 1, 2, 0.5, True, 0, None),
                       (gy, s, ld, e(N + 1), None, 1, 2, 0.5, True, 0, None)),
        "grad_input": ((gy, W, g, ld, None, 1, 2, 0.5, *drop, 0, None),
                       (gy, e(N + 1, K), g, ld, None, 1, 2, 0.5, *drop, 0, None)),
    }


@pytest.mark.parametrize("name", ["shrink", "fused_forward", "fused_forward-bias", "fused_forward-s",
                                  "fused_forward-bank", "rank_grads", "grad_input"])
def test_fake_kernels_check_shapes(name):
    """Under FakeTensor (torch.compile's tracing) the ops refuse inconsistent shapes, as the kernels do,
    instead of handing a wrong shape on."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        good, bad = _fake_calls()[name]
        op = getattr(ops, name.split("-")[0])
        op(*good)
        with pytest.raises(RuntimeError, match="vera_kernels: "):
            op(*bad)


def test_op_errors_are_clear():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="must be float32"):
        ops.fused_forward(x, torch.randn(5, 4), None, torch.randn(3, 2).double(), torch.randn(2), torch.randn(5),
                       None, 1, 2, 0.5)
    with pytest.raises(RuntimeError, match="does not cover"):
        ops.shrink(x, torch.randn(2, 3), 2, 0, 0, 0.0, 0, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="threshold"):
        ops.shrink(x, None, 2, 1, 2, 0.5, 1, 1, 2**25, 1.0)


def _model(proj):
    torch.manual_seed(0)
    layers = [vk.VeRALinear(24, 20, projection=proj), torch.nn.GELU(),
              vk.VeRALinear(20, 24, bias=False, projection=proj)]
    for layer in layers[::2]:
        torch.nn.init.normal_(layer.lambda_b)
    return torch.nn.Sequential(*layers)


@pytest.fixture
def cpu_backend_forced(monkeypatch):
    """Run VeRALinear on the "cpu" backend whatever the default priority is."""
    monkeypatch.setenv("VERA_KERNELS_BACKEND", "cpu")


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_torch_compile_fullgraph(stored, train, cpu_backend_forced):
    """torch.compile(fullgraph=True) over VeRALinear layers: one graph, the native ops inside, same results."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    proj = vk.Projection(seed=2**63 + 9, rank=6, max_in_features=24, max_out_features=24)
    if stored:
        proj = vk.Projection.from_tensors(torch.randn(6, 24), torch.randn(24, 6))
    model = _model(proj).train(train)
    x = torch.randn(2, 5, 24, requires_grad=True)
    y_ref = model(x)
    y_ref.sum().backward()
    grads_ref = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    x.grad = None
    model.zero_grad()

    targets = []

    def capture(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))
    y = compiled(x)
    y.sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    torch.testing.assert_close(y, y_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)
    for op in ("shrink", "fused_forward", "rank_grads", "grad_input"):
        assert f"vera_kernels.{op}.default" in targets, (op, sorted(set(targets)))


def test_torch_compile_inductor(cpu_backend_forced):
    """The same model through inductor (the default backend), forward and backward."""
    proj = vk.Projection(seed=5, rank=4, max_in_features=24, max_out_features=24)
    model = _model(proj)
    x = torch.randn(3, 24, requires_grad=True)
    y_ref = model(x)
    torch._dynamo.reset()
    y = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    assert model[0].lambda_d.grad is not None and not torch.isnan(x.grad).any()


def test_torch_compile_first_call_in_a_fresh_process():
    """The very first call happens while dynamo traces: backend import and extension load run eagerly."""
    code = (
        "import torch, vera_kernels as vk\n"
        "p = vk.Projection(2**63 + 1, 4, 16, 16)\n"
        "m = torch.nn.Sequential(vk.VeRALinear(16, 16, projection=p), vk.VeRALinear(16, 8, projection=p))\n"
        "x = torch.randn(3, 16, requires_grad=True)\n"
        "y = torch.compile(m, fullgraph=True, backend='aot_eager')(x)\n"
        "y.sum().backward()\n"
        "torch.testing.assert_close(y, m(x))\n"
        "assert vk.backends()['cpu'] is None\n"
        "print('ok')\n"
    )
    r = _python(code, VERA_KERNELS_BACKEND="cpu")
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr[-3000:]


def _python(code, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)


def test_disabled_native_falls_back_to_torch():
    """VERA_KERNELS_NO_NATIVE=1: backends() says why, calls run on "torch", nothing loaded at import."""
    code = (
        "import sys, warnings, torch, vera_kernels as vk\n"
        "assert 'vera_kernels._C' not in sys.modules\n"
        "why = vk.backends()\n"
        "assert 'VERA_KERNELS_NO_NATIVE' in why['cpu'], why\n"
        "p = vk.Projection(1, 2, 4, 4)\n"
        "y = vk.vera_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.ones(2), torch.ones(3), p)\n"
        "print('ok', y.shape)\n"
    )
    r = _python(code, VERA_KERNELS_NO_NATIVE="1")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_missing_extension_reported_once_at_first_use():
    """A missing/broken vera_kernels._C: no error at import, one warning at first use, the reason in backends()."""
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['vera_kernels._C'] = None  # makes the import fail like a missing build\n"
        "import vera_kernels as vk\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    p = vk.Projection(1, 2, 4, 4)\n"
        "    for _ in range(3):\n"
        "        vk.vera_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.ones(2), torch.ones(3), p)\n"
        "    why = vk.backends()['cpu']\n"
        "msgs = [str(x.message) for x in w if 'vera_kernels._C' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'vera_kernels._C' in why, why\n"
        "print('ok', why)\n"
    )
    r = _python(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
