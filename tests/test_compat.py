"""The private torch APIs named in ``vera_kernels/_compat.py`` still exist and answer as the package relies
on (a torch release that drops one fails here, by name); no other module of the package reaches into
private torch APIs."""

import os
import re

import torch

from vera_kernels import _compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIVATE = re.compile(r"torch\._C\._|os\.environ\._data|\(os\.environ, \"_data\"|super\(torch\.autograd\.Function")


def test_functorch_transforms_active():
    assert _compat.functorch_transforms_active() is False
    seen = []

    def f(t):
        seen.append(_compat.functorch_transforms_active())
        return t.sum()

    torch.func.grad(f)(torch.ones(3))
    torch.func.vmap(f)(torch.ones(2, 3))
    assert seen == [True, True]


def test_dispatch_has_kernel():
    assert _compat.dispatch_has_kernel("aten::mm", "CPU") is True
    lib = torch.library.Library("vera_kernels_compat_test", "FRAGMENT")
    lib.define("only_cpu(Tensor x) -> Tensor")
    lib.impl("only_cpu", lambda x: x.clone(), "CPU")
    assert _compat.dispatch_has_kernel("vera_kernels_compat_test::only_cpu", "CPU") is True
    assert _compat.dispatch_has_kernel("vera_kernels_compat_test::only_cpu", "CUDA") is False


def test_no_private_torch_api_outside_the_compat_module():
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "vera_kernels")):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or path.endswith(os.path.join("vera_kernels", "_compat.py")):
                continue
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if PRIVATE.search(line):
                        offenders.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
    assert not offenders, "private torch APIs outside vera_kernels/_compat.py:\n" + "\n".join(offenders)


def test_env_reader_sees_changes_at_once(monkeypatch):
    name = "VERA_KERNELS_COMPAT_TEST"
    monkeypatch.delenv(name, raising=False)
    read = _compat.env_reader(name)
    assert isinstance(getattr(os.environ, "_data", None), dict), "CPython's os.environ._data is gone: " \
        "env_reader falls back to os.environ.get (slower); update vera_kernels/_compat.py"
    assert read() is None
    monkeypatch.setenv(name, "cpu")
    assert read() == "cpu"
    os.environ[name] = "torch"
    assert read() == "torch"
    monkeypatch.delenv(name)
    assert read() is None
