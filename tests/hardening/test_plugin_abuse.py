"""Plugin abuse: impostor backend names (both entry-point sort orders), ``sys.exit`` and other BaseExceptions in
every hook, ``detect`` and ``describe``, wrong return types, failing kernel builds, slow plugins, unknown
allowlist names, and ``anyaccel backends`` / ``explain`` staying traceback-free through all of it.

Each case is a planted bug the discovery boundary must catch: the assertion is on who serves and on the
recorded reason, so a manager that let the bug through fails here.
"""
from __future__ import annotations

import sys
import textwrap
import time
import types
import uuid
import warnings

import pytest
import torch

from anyaccel.core import BackendDef, Gemm, GemmCapability, GemmSpec, KernelImpl
from anyaccel.core.dispatch import OpCapability
from anyaccel.plugins import discover, hookimpl, reset_registry
from anyaccel.plugins.manager import PluginSlowWarning


class _Halt(BaseException):
    """A BaseException that is neither SystemExit nor KeyboardInterrupt (a vendor SDK's own)."""


def _plugin(name, *, backends=(), kernels=(), backends_hook=None, kernels_hook=None):
    mod = types.ModuleType(name)
    mod.ANYACCEL_API_VERSION = 1
    mod.anyaccel_backends = hookimpl(backends_hook or (lambda ctx: list(backends)))
    mod.anyaccel_kernels = hookimpl(kernels_hook or (lambda ctx: list(kernels)))
    return mod


def _gemm_kernel(backend, name, priority=0, build=None, capability=None):
    def ok_build(spec):
        return lambda x, w, b, out: torch.mm(x, w.t(), out=out)

    return KernelImpl(op="gemm", backend=backend, name=name, build=build or ok_build, priority=priority,
                      capability=capability or GemmCapability())


def _distribution(tmp_path, monkeypatch, dist_name, entry_points):
    """A real distribution on sys.path: ``entry_points`` maps entry-point name -> plugin module source."""
    tag = uuid.uuid4().hex[:8]
    lines = []
    for i, (ep_name, source) in enumerate(entry_points.items()):
        mod = f"abuse_{tag}_{i}"
        (tmp_path / f"{mod}.py").write_text(textwrap.dedent(source))
        lines.append(f"{ep_name} = {mod}")
    info = tmp_path / f"{dist_name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[anyaccel.plugins]\n" + "\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))


_IMPOSTOR = """
    from anyaccel.core import BackendDef
    from anyaccel.plugins import hookimpl
    ANYACCEL_API_VERSION = 1

    @hookimpl
    def anyaccel_backends(ctx):
        return [BackendDef("{name}", "Impostor Inc", "cpu", description="not the real one")]
"""


# ---------------------------------------------------------------------------------------------- impostors


@pytest.mark.parametrize("ep_name", ["aaa-impostor", "zzz-impostor", "cpu"],
                         ids=["sorts-before-builtin", "sorts-after-builtin", "same-entry-point-name"])
@pytest.mark.parametrize("backend", ["cpu", "triton-interpreter"])
def test_impostor_of_a_builtin_backend_is_quarantined_in_every_sort_order(tmp_path, monkeypatch, ep_name, backend):
    _distribution(tmp_path, monkeypatch, "impostor-anyaccel", {ep_name: _IMPOSTOR.format(name=backend)})
    reg = discover()
    real = reg.get(backend)
    assert real.package == "anyaccel" and real.vendor != "Impostor Inc"
    q = [x for x in reg.quarantined if x.package == "impostor-anyaccel"]
    assert len(q) == 1 and q[0].name == ep_name
    assert (backend in q[0].error and "reserved" in q[0].error) or "declared twice" in q[0].error
    assert not any(x.package == "anyaccel" for x in reg.quarantined)


def test_builtin_names_stay_reserved_when_the_allowlist_leaves_the_builtin_out(tmp_path, monkeypatch):
    _distribution(tmp_path, monkeypatch, "impostor-anyaccel", {"aaa-impostor": _IMPOSTOR.format(name="cpu")})
    monkeypatch.setenv("ANYACCEL_PLUGINS", "aaa-impostor")
    reg = discover()
    assert "cpu" not in reg.backends
    assert "reserved" in reg.quarantined[0].error


@pytest.mark.parametrize("order", [("first", "second"), ("second", "first")])
def test_between_third_party_duplicates_the_later_is_quarantined(order):
    plugins = {n: _plugin(f"{n}_mod", backends=[BackendDef("acme", n, "cpu")]) for n in order}
    reg = discover([(n, plugins[n]) for n in order], entry_points=False)
    assert reg.get("acme").vendor == order[0]
    assert [q.name for q in reg.quarantined] == [order[1]]
    assert "already declared by plugin" in reg.quarantined[0].error


def test_third_party_via_extra_cannot_take_a_builtin_name():
    reg = discover([("sneaky", _plugin("sneaky_mod", backends=[BackendDef("cpu", "Sneaky", "cpu")]))])
    assert reg.get("cpu").package == "anyaccel"
    assert [q.name for q in reg.quarantined] == ["sneaky"] and "reserved" in reg.quarantined[0].error


# ---------------------------------------------------------------------------------------------- exits


def _exit_code():
    sys.exit(3)


def _exit_plain():
    sys.exit()


def _halt():
    raise _Halt("vendor runtime shut down")


_EXITS = {"sys.exit(3)": _exit_code, "sys.exit()": _exit_plain, "custom BaseException": _halt}


def _abusive(where, boom):
    """A plugin declaring backend 'abuser' whose ``where`` calls ``boom``."""
    detect = (lambda: boom()) if where == "detect" else (lambda: None)
    describe = (lambda: boom()) if where == "describe" else (lambda: {"ok": 1})
    d = BackendDef("abuser", "A", "cpu", detect=detect, describe=describe)

    def backends(ctx):
        if where == "anyaccel_backends":
            boom()
        return [d]

    def kernels(ctx):
        if where == "anyaccel_kernels":
            boom()
        return [_gemm_kernel("abuser", "abuser.gemm")]

    return _plugin("abuser_mod", backends_hook=backends, kernels_hook=kernels)


@pytest.mark.parametrize("where", ["anyaccel_backends", "anyaccel_kernels", "detect", "describe"])
@pytest.mark.parametrize("how", list(_EXITS))
def test_exit_or_base_exception_anywhere_quarantines_only_that_plugin(where, how):
    good = _plugin("good_mod", backends=[BackendDef("good", "G", "cpu")], kernels=[_gemm_kernel("good", "good.gemm")])
    reg = discover([("abuser", _abusive(where, _EXITS[how])), ("good", good)], entry_points=False)
    assert set(reg.backends) == {"good"} and [p.name for p in reg.plugins] == ["good"]
    (q,) = reg.quarantined
    assert q.name == "abuser"
    assert where.split("_")[-1] in q.error or where in q.error
    assert ("sys.exit" in q.error) if how.startswith("sys.exit") else ("_Halt" in q.error)


def test_keyboard_interrupt_from_a_plugin_still_reaches_the_user():
    def ctrl_c():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        discover([("p", _abusive("anyaccel_backends", ctrl_c))], entry_points=False)


def test_import_that_calls_sys_exit_is_quarantined(tmp_path, monkeypatch):
    _distribution(tmp_path, monkeypatch, "exiting-anyaccel", {"exiting": "import sys\nsys.exit(7)\n"})
    reg = discover()
    q = {x.name: x.error for x in reg.quarantined}
    assert "sys.exit(7)" in q["exiting"] and reg.get("cpu").available


# ---------------------------------------------------------------------------------------------- return types

_BAD_BACKEND_DEFS = {
    "block_sizes=()": (dict(block_sizes=()), "block_sizes"),
    "block_sizes=(0,)": (dict(block_sizes=(0,)), "block_sizes"),
    "block_sizes=(16.0,)": (dict(block_sizes=(16.0,)), "block_sizes"),
    "block_sizes=[16]": (dict(block_sizes=[16]), "block_sizes"),
    "block_sizes=(True,)": (dict(block_sizes=(True,)), "block_sizes"),
    "kv_cache_layout": (dict(kv_cache_layout="NCHW"), "kv_cache_layout"),
    "detect not callable": (dict(detect="yes"), "detect"),
    "describe not callable": (dict(describe={"a": 1}), "describe"),
    "vendor=None": (dict(vendor=None), "vendor"),
    "device_type=3": (dict(device_type=3), "device_type"),
    "device_type=''": (dict(device_type=""), "device_type"),
    "distributed_backend=5": (dict(distributed_backend=5), "distributed_backend"),
    "max_model_parameters=-1": (dict(max_model_parameters=-1), "max_model_parameters"),
    "name=None": (dict(name=None), "name"),
    "name with a space": (dict(name="my backend"), "name"),
}


@pytest.mark.parametrize("case", list(_BAD_BACKEND_DEFS))
def test_bad_backend_def_is_quarantined_naming_the_field(case):
    changes, field = _BAD_BACKEND_DEFS[case]
    kw = dict(name="bad", vendor="V", device_type="cpu")
    kw.update(changes)
    reg = discover([("bad", _plugin("bad_mod", backends=[BackendDef(**kw)]))], entry_points=False)
    assert reg.backends == {}
    assert f"field '{field}'" in reg.quarantined[0].error and "anyaccel_backends" in reg.quarantined[0].error


_BAD_KERNELS = {
    "capability=None": (dict(capability=None), "capability"),
    "capability is a dict": (dict(capability={"dtypes": "all"}), "capability"),
    "build=None": (dict(build=None), "build"),
    "priority='high'": (dict(priority="high"), "priority"),
    "priority=1.5": (dict(priority=1.5), "priority"),
    "op=''": (dict(op=""), "op"),
    "backend=None": (dict(backend=None), "backend"),
    "name=3": (dict(name=3), "name"),
    "provider=None": (dict(provider=None), "provider"),
}


@pytest.mark.parametrize("case", list(_BAD_KERNELS))
def test_bad_kernel_impl_is_quarantined_naming_the_field(case):
    changes, field = _BAD_KERNELS[case]
    kw = dict(op="gemm", backend="bad", name="bad.gemm", build=lambda spec: None, capability=OpCapability())
    kw.update(changes)
    reg = discover([("bad", _plugin("bad_mod", backends=[BackendDef("bad", "V", "cpu")],
                                    kernels=[KernelImpl(**kw)]))], entry_points=False)
    assert reg.backends == {}
    assert f"field '{field}'" in reg.quarantined[0].error and "anyaccel_kernels" in reg.quarantined[0].error


@pytest.mark.parametrize("value", ["fast", ["a"], 5, {1: "x"}], ids=["str", "list", "int", "int-keys"])
def test_describe_returning_a_non_dict_is_quarantined(value):
    d = BackendDef("odd", "V", "cpu", describe=lambda: value)
    reg = discover([("odd", _plugin("odd_mod", backends=[d]))], entry_points=False)
    assert reg.backends == {} and "describe() returned" in reg.quarantined[0].error


@pytest.mark.parametrize("value", [5, b"no", ["no"]], ids=["int", "bytes", "list"])
def test_detect_returning_a_non_string_is_quarantined(value):
    d = BackendDef("odd", "V", "cpu", detect=lambda: value)
    reg = discover([("odd", _plugin("odd_mod", backends=[d]))], entry_points=False)
    assert reg.backends == {} and "detect() returned" in reg.quarantined[0].error


def test_kernels_of_a_plugin_quarantined_late_are_dropped_with_it():
    provider = _plugin("prov_mod", kernels=[_gemm_kernel("late", "prov.gemm")])
    late = BackendDef("late", "V", "cpu", detect=_exit_code)
    reg = discover([("late", _plugin("late_mod", backends=[late])), ("prov", provider)], entry_points=False)
    assert "late" not in reg.backends
    assert any("prov.gemm" in w and "no loaded plugin declares" in w for w in reg.warnings)


# ---------------------------------------------------------------------------------------------- kernel build


def _failing_build(spec):
    raise RuntimeError("fastgemm: JIT compiler not found")


@pytest.mark.parametrize("failure", ["build raises", "build returns None", "capability check raises"])
def test_failing_provider_kernel_is_dropped_and_the_backends_own_kernel_serves(failure):
    class Exploding(GemmCapability):
        def not_supported_reasons(self, spec):
            raise ValueError("capability table corrupt")

    if failure == "build raises":
        k = _gemm_kernel("cpu", "fastgemm.gemm", priority=10**6, build=_failing_build)
    elif failure == "build returns None":
        k = _gemm_kernel("cpu", "fastgemm.gemm", priority=10**6, build=lambda spec: None)
    else:
        k = _gemm_kernel("cpu", "fastgemm.gemm", priority=10**6, capability=Exploding())
    reg = discover([("fastgemm", _plugin("fastgemm_mod", kernels=[k]))])
    cpu = reg.get("cpu")
    assert "fastgemm.gemm" in [x.name for x in cpu.kernels]
    op = Gemm.build(GemmSpec(torch.float32), cpu, strict=True)
    assert op.selection.chosen.startswith("cpu.") and not op.selection.fallback
    rejected = {c.name: c.reasons for c in op.selection.candidates if not c.chosen}
    needle = {"build raises": "JIT compiler not found", "build returns None": "not a callable",
              "capability check raises": "capability table corrupt"}[failure]
    assert any(needle in r for r in rejected["fastgemm.gemm"])
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    torch.testing.assert_close(op(x, w), x @ w.t())


# ---------------------------------------------------------------------------------------------- time, allowlist


def test_slow_plugin_warns_naming_the_plugin_and_the_seconds(monkeypatch):
    monkeypatch.setenv("ANYACCEL_PLUGIN_SLOW_SECONDS", "0.05")

    def slow(ctx):
        time.sleep(0.12)
        return [BackendDef("slow", "V", "cpu")]

    with pytest.warns(PluginSlowWarning, match=r"plugin 'sloth' took 0\.1\d s"):
        reg = discover([("sloth", _plugin("sloth_mod", backends_hook=slow)),
                        ("quick", _plugin("quick_mod", backends=[BackendDef("quick", "V", "cpu")]))],
                       entry_points=False)
    assert reg.timings["sloth"] >= 0.12 and reg.timings["quick"] < 0.05
    assert "slow" in reg.backends and any("sloth" in w for w in reg.warnings)


def test_builtin_discovery_is_well_under_the_threshold():
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginSlowWarning)
        reg = discover()
    assert reg.timings["cpu"] < 5.0


def test_allowlist_naming_an_unknown_plugin_warns_with_the_name(monkeypatch):
    monkeypatch.setenv("ANYACCEL_PLUGINS", "cpu,acmee")
    with pytest.warns(UserWarning, match="'acmee'"):
        reg = discover()
    assert set(reg.backends) == {"cpu"} and any("acmee" in w for w in reg.warnings)


# ---------------------------------------------------------------------------------------------- the CLI


_ZOO = {
    "aaa-cpu": _IMPOSTOR.format(name="cpu"),
    "exits-in-detect": """
        import sys
        from anyaccel.core import BackendDef
        from anyaccel.plugins import hookimpl
        ANYACCEL_API_VERSION = 1

        @hookimpl
        def anyaccel_backends(ctx):
            return [BackendDef("exiter", "X", "cpu", detect=lambda: sys.exit(1))]
    """,
    "bad-describe": """
        from anyaccel.core import BackendDef
        from anyaccel.plugins import hookimpl
        ANYACCEL_API_VERSION = 1

        @hookimpl
        def anyaccel_backends(ctx):
            return [BackendDef("describer", "X", "cpu", describe=lambda: "fast")]
    """,
    "bad-capability": """
        from anyaccel.core import BackendDef, KernelImpl
        from anyaccel.plugins import hookimpl
        ANYACCEL_API_VERSION = 1

        @hookimpl
        def anyaccel_kernels(ctx):
            return [KernelImpl("gemm", "cpu", "nocap.gemm", build=lambda s: None, capability=None)]
    """,
    "broken-build": """
        from anyaccel.core import GemmCapability, KernelImpl
        from anyaccel.plugins import hookimpl
        ANYACCEL_API_VERSION = 1

        def build(spec):
            raise RuntimeError("no JIT here")

        @hookimpl
        def anyaccel_kernels(ctx):
            return [KernelImpl("gemm", "cpu", "broken.gemm", build=build, capability=GemmCapability(),
                               priority=10**6)]
    """,
}


@pytest.mark.parametrize("argv", [["backends"], ["backends", "--json"], ["explain", "gemm", "--backend", "cpu"]])
def test_backends_and_explain_print_no_traceback_with_every_abuse_installed(tmp_path, monkeypatch, capsys, argv):
    from anyaccel.cli import main

    _distribution(tmp_path, monkeypatch, "zoo-anyaccel", _ZOO)
    reset_registry()
    try:
        rc = main(argv)
    finally:
        reset_registry()
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "Traceback" not in out.out + out.err
    if argv[0] == "backends":
        for name in ("aaa-cpu", "exits-in-detect", "bad-describe", "bad-capability"):
            assert name in out.out
    else:
        assert "chosen: cpu." in out.out and "no JIT here" in out.out
