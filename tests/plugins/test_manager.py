"""Plugin discovery: entry points, quarantine, allowlist, autoload switch, provenance, kernel providers."""
from __future__ import annotations

import sys
import textwrap
import types

import pytest
import torch

from anyaccel.core import Backend, BackendDef, Gemm, GemmCapability, GemmSpec, KernelImpl
from anyaccel.core.errors import UnsupportedError
from anyaccel.plugins import discover, hookimpl
from anyaccel.plugins.manager import parse_api_version


def _plugin(name, *, api=1, backends=None, kernels=None, raise_in=None, bad_return=False):
    mod = types.ModuleType(name)
    if api is not None:
        mod.ANYACCEL_API_VERSION = api

    def anyaccel_backends(ctx):
        if raise_in == "backends":
            raise RuntimeError("boom in backends")
        if bad_return:
            return "not a list"
        return list(backends or [])

    def anyaccel_kernels(ctx):
        if raise_in == "kernels":
            raise RuntimeError("boom in kernels")
        return list(kernels or [])

    mod.anyaccel_backends = hookimpl(anyaccel_backends)
    mod.anyaccel_kernels = hookimpl(anyaccel_kernels)
    return mod


def _gemm_kernel(backend, name, priority=0, **cap):
    def build(spec):
        return lambda x, w, b, out: torch.mm(x, w.t(), out=out)

    return KernelImpl(op="gemm", backend=backend, name=name, build=build, priority=priority,
                      capability=GemmCapability(**cap))


def test_builtin_backends_come_through_entry_points():
    reg = discover()
    assert {"cpu", "cuda", "rocm"} <= set(reg.backends)
    cpu = reg.get("cpu")
    assert cpu.available and cpu.reason == ""
    assert cpu.package == "anyaccel" and cpu.version
    assert "gemm" in cpu.ops
    own = [k for k in cpu.kernels if k.name.startswith("cpu.")]
    assert own and all(k.provider == "anyaccel" for k in own)
    # kernels from installed kernel providers (e.g. examples/fastnorm-anyaccel) carry their own distribution
    assert all(k.provider != "anyaccel" for k in cpu.kernels if not k.name.startswith("cpu."))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given on a machine without a GPU")
def test_gpu_backends_say_why_unavailable():
    reg = discover()
    for name in ("cuda", "rocm"):
        b = reg.get(name)
        assert not b.available
        assert "torch" in b.reason and len(b.reason) > 20


def test_plugin_whose_import_raises_is_quarantined_and_the_rest_load(tmp_path, monkeypatch):
    # A real distribution on sys.path with an entry point whose module raises at import.
    pkg = tmp_path / "broken_anyaccel"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('vendor SDK libacme.so not found')\n")
    dist = tmp_path / "broken_anyaccel-0.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-anyaccel\nVersion: 0.3\n")
    (dist / "entry_points.txt").write_text("[anyaccel.plugins]\nbroken = broken_anyaccel\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = discover()
    q = {x.name: x for x in reg.quarantined}
    assert "broken" in q
    assert "libacme.so not found" in q["broken"].error
    assert q["broken"].package == "broken-anyaccel" and q["broken"].version == "0.3"
    assert reg.get("cpu").available


def test_hook_that_raises_quarantines_only_that_plugin():
    good = _plugin("good_plugin", backends=[BackendDef("good", "v", "cpu")], kernels=[_gemm_kernel("good", "good.gemm")])
    bad = _plugin("bad_plugin", backends=[BackendDef("bad", "v", "cpu")], raise_in="kernels")
    reg = discover([("good", good), ("bad", bad)], entry_points=False)
    assert set(reg.backends) == {"good"}
    assert [q.name for q in reg.quarantined] == ["bad"]
    assert "anyaccel_kernels" in reg.quarantined[0].error and "boom in kernels" in reg.quarantined[0].error


def test_bad_return_value_is_quarantined_with_the_hook_named():
    reg = discover([("bad", _plugin("bad_plugin", bad_return=True))], entry_points=False)
    assert "anyaccel_backends" in reg.quarantined[0].error and "expected a list" in reg.quarantined[0].error


@pytest.mark.parametrize("api,needle", [(None, "declares no ANYACCEL_API_VERSION"), (2, "built for plugin API version 2"),
                                        ("x.y", "malformed")])
def test_api_version_is_checked(api, needle):
    reg = discover([("p", _plugin("p_mod", api=api, backends=[BackendDef("p", "v", "cpu")]))], entry_points=False)
    assert "p" not in reg.backends
    assert needle in reg.quarantined[0].error


def test_older_minor_of_the_same_major_loads():
    assert parse_api_version("1.0") == (1, 0)
    reg = discover([("p", _plugin("p_mod", api="1.0", backends=[BackendDef("p", "v", "cpu")]))], entry_points=False)
    assert "p" in reg.backends and not reg.quarantined


def test_duplicate_backend_name_quarantines_the_later_plugin():
    a = _plugin("a_mod", backends=[BackendDef("same", "v", "cpu")])
    b = _plugin("b_mod", backends=[BackendDef("same", "w", "cpu")])
    reg = discover([("a", a), ("b", b)], entry_points=False)
    assert reg.get("same").vendor == "v"
    assert "already declared" in reg.quarantined[0].error


def test_unknown_hook_is_rejected():
    mod = _plugin("odd_mod", backends=[BackendDef("odd", "v", "cpu")])
    mod.anyaccel_frobnicate = hookimpl(lambda ctx: None)
    reg = discover([("odd", mod)], entry_points=False)
    assert "odd" not in reg.backends
    assert "anyaccel_frobnicate" in reg.quarantined[0].error


def test_detect_that_raises_marks_backend_unavailable_with_reason():
    def detect():
        raise OSError("driver version mismatch")

    reg = discover([("p", _plugin("p_mod", backends=[BackendDef("p", "v", "cpu", detect=detect)]))], entry_points=False)
    b = reg.get("p")
    assert not b.available and "driver version mismatch" in b.reason


def test_kernel_provider_adds_kernels_to_another_plugins_backend_with_provenance():
    backend_plugin = _plugin("acme_mod", backends=[BackendDef("acme", "Acme", "cpu")],
                             kernels=[_gemm_kernel("acme", "acme.gemm", priority=1)])
    provider = _plugin("fastgemm_mod", kernels=[_gemm_kernel("acme", "fastgemm.gemm", priority=5),
                                                _gemm_kernel("nobody", "fastgemm.orphan")])
    reg = discover([("acme", backend_plugin), ("fastgemm", provider)], entry_points=False)
    acme = reg.get("acme")
    assert {k.name: k.provider for k in acme.kernels} == {"acme.gemm": "acme_mod", "fastgemm.gemm": "fastgemm_mod"}
    assert any("fastgemm.orphan" in w for w in reg.warnings)
    op = Gemm.build(GemmSpec(torch.float32), acme)
    assert op.selection.chosen == "fastgemm.gemm" and op.selection.provider == "fastgemm_mod"
    assert [c.name for c in op.selection.candidates if not c.chosen] == ["acme.gemm"]


def test_allowlist_and_autoload_switch(monkeypatch):
    monkeypatch.setenv("ANYACCEL_PLUGINS", "cpu")
    assert set(discover().backends) == {"cpu"}
    monkeypatch.delenv("ANYACCEL_PLUGINS")
    monkeypatch.setenv("ANYACCEL_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert discover().backends == {}
    monkeypatch.setenv("ANYACCEL_PLUGINS", "rocm")
    assert set(discover().backends) == {"rocm"}


def test_unknown_backend_error_lists_the_known_ones():
    reg = discover()
    with pytest.raises(UnsupportedError, match="no backend named 'acme'.*cpu"):
        reg.get("acme")
