"""The plugin API versioning policy: older minors load, newer minors load with a warning, other majors are
quarantined, and deprecated hooks / context attributes warn one release ahead of their removal."""
from __future__ import annotations

import types
import warnings

import pytest

from anyaccel.core import BackendDef
from anyaccel.core.version import API_VERSION, API_VERSION_MINOR, API_VERSION_STRING
from anyaccel.plugins import discover, hookimpl, hookspecs
from anyaccel.plugins.hookspecs import Deprecation, PluginContext, PluginDeprecationWarning


def _plugin(modname, api, backend, *, kernels_hook=None):
    mod = types.ModuleType(modname)
    mod.ANYACCEL_API_VERSION = api
    mod.anyaccel_backends = hookimpl(lambda ctx: [BackendDef(backend, "v", "cpu")])
    if kernels_hook is not None:
        mod.anyaccel_kernels = hookimpl(kernels_hook)
    return mod


def test_core_declares_a_minor_above_zero():
    assert API_VERSION == 1 and API_VERSION_MINOR >= 1
    assert API_VERSION_STRING == f"{API_VERSION}.{API_VERSION_MINOR}"


@pytest.mark.parametrize("api", [1, "1", "1.0", (1, 0)])
def test_plugin_built_for_an_older_minor_keeps_loading_without_warnings(api):
    reg = discover([("old", _plugin("old_mod", api, "old"))], entry_points=False)
    assert reg.get("old").available and not reg.quarantined
    assert reg.warnings == []
    assert reg.plugins[0].api_version == api


def test_plugin_built_for_a_newer_minor_loads_with_a_recorded_warning():
    newer = f"{API_VERSION}.{API_VERSION_MINOR + 3}"
    reg = discover([("new", _plugin("new_mod", newer, "new"))], entry_points=False)
    assert "new" in reg.backends and not reg.quarantined
    assert len(reg.warnings) == 1
    assert f"API {newer}" in reg.warnings[0] and API_VERSION_STRING in reg.warnings[0]
    assert "upgrade anyaccel" in reg.warnings[0]


@pytest.mark.parametrize("api", [API_VERSION + 1, f"{API_VERSION + 1}.0", 0, "0.9"])
def test_plugin_built_for_an_unknown_major_is_quarantined_and_the_rest_load(api):
    good = _plugin("good_mod", 1, "good")
    alien = _plugin("alien_mod", api, "alien")
    reg = discover([("good", good), ("alien", alien)], entry_points=False)
    assert set(reg.backends) == {"good"}
    [q] = reg.quarantined
    assert q.name == "alien"
    assert f"built for plugin API version {api}" in q.error and API_VERSION_STRING in q.error
    assert f"built for API {API_VERSION}.x" in q.error  # says what to install


def test_context_tells_plugins_the_minor_and_their_own_name():
    seen = {}

    def kernels(ctx):
        seen.update(major=ctx.api_version, minor=ctx.api_minor, plugin=ctx.plugin, backends=tuple(ctx.backends))
        return []

    discover([("p", _plugin("p_mod", "1.1", "pb", kernels_hook=kernels))], entry_points=False)
    assert seen == {"major": API_VERSION, "minor": API_VERSION_MINOR, "plugin": "p", "backends": ("pb",)}


def test_unknown_context_attribute_is_an_attribute_error_naming_the_api():
    with pytest.raises(AttributeError, match=f"no attribute 'device_count'.*API {API_VERSION_STRING}"):
        PluginContext().device_count


def test_deprecated_context_attribute_warns_names_the_plugin_and_still_works(monkeypatch):
    monkeypatch.setitem(hookspecs.DEPRECATED_CONTEXT, "backend_names",
                        Deprecation("backend_names", since="1.1", removed_in="2.0", instead="backends"))
    got = {}

    def kernels(ctx):
        got["names"] = tuple(ctx.backend_names)
        return []

    with pytest.warns(PluginDeprecationWarning, match="plugin 'legacy' uses context attribute 'backend_names'"):
        reg = discover([("legacy", _plugin("legacy_mod", "1.0", "lb", kernels_hook=kernels))], entry_points=False)
    assert got["names"] == ("lb",)  # the replacement's value
    assert "lb" in reg.backends and not reg.quarantined
    [w] = reg.warnings
    assert "removed in API 2.0" in w and "use 'backends' instead" in w


def test_deprecated_hook_warns_at_registration_and_the_plugin_still_loads(monkeypatch):
    monkeypatch.setitem(hookspecs.DEPRECATED_HOOKS, "anyaccel_kernels",
                        Deprecation("anyaccel_kernels", since="1.1", removed_in="2.0", instead="anyaccel_kernels_v2"))
    plain = _plugin("plain_mod", 1, "plain")  # implements only anyaccel_backends: no warning
    legacy = _plugin("legacy_mod", 1, "legacy", kernels_hook=lambda ctx: [])
    with pytest.warns(PluginDeprecationWarning) as record:
        reg = discover([("plain", plain), ("legacy", legacy)], entry_points=False)
    msgs = [str(r.message) for r in record if issubclass(r.category, PluginDeprecationWarning)]
    assert msgs == ["plugin 'legacy' uses hook 'anyaccel_kernels', deprecated since plugin API 1.1 and removed in "
                    "API 2.0; use 'anyaccel_kernels_v2' instead"]
    assert set(reg.backends) == {"plain", "legacy"} and reg.warnings == msgs


def test_nothing_is_deprecated_in_this_release_and_builtins_load_silently():
    assert hookspecs.DEPRECATED_HOOKS == {} and hookspecs.DEPRECATED_CONTEXT == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginDeprecationWarning)
        reg = discover()
    assert not any("deprecated" in w for w in reg.warnings)
