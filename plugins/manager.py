"""Plugin discovery: entry points -> guarded hook calls -> a registry of backends, kernels and quarantined plugins.

Environment:
  ``ANYACCEL_PLUGINS=a,b``            load only these entry points (by entry-point name).
  ``ANYACCEL_DISABLE_PLUGIN_AUTOLOAD=1`` load no entry point unless ``ANYACCEL_PLUGINS`` names it.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import traceback
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import pluggy

from ..core.backend import KV_LAYOUTS, Backend, BackendDef
from ..core.dispatch import KernelImpl
from ..core.errors import PluginError, UnsupportedError
from ..core.version import API_VERSION, API_VERSION_MINOR, API_VERSION_STRING
from . import hookspecs
from .hookspecs import HOOKS, PROJECT, PluginContext, PluginDeprecationWarning

__all__ = ["ENTRY_POINT_GROUP", "Quarantined", "PluginInfo", "Registry", "discover", "get_registry",
           "reset_registry", "parse_api_version"]

ENTRY_POINT_GROUP = "anyaccel.plugins"
_HOOKS = HOOKS


@dataclass(frozen=True)
class Quarantined:
    """A plugin that was not loaded, and why."""

    name: str
    error: str
    package: str = ""
    version: str = ""


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: its entry-point name, the distribution that shipped it, and what it contributed."""

    name: str
    package: str
    version: str
    api_version: Any
    backends: Tuple[str, ...] = ()
    kernels: Tuple[str, ...] = ()


@dataclass
class Registry:
    """The result of discovery."""

    backends: Dict[str, Backend] = field(default_factory=dict)
    plugins: List[PluginInfo] = field(default_factory=list)
    quarantined: List[Quarantined] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    def get(self, name: str) -> Backend:
        try:
            return self.backends[name]
        except KeyError:
            known = ", ".join(sorted(self.backends)) or "none"
            q = [x for x in self.quarantined if x.name == name]
            extra = f"; plugin '{name}' is quarantined: {q[0].error}" if q else ""
            raise UnsupportedError(f"no backend named '{name}' (discovered: {known}){extra}") from None

    def available(self) -> List[Backend]:
        return [b for b in self.backends.values() if b.available]


def parse_api_version(value: Any) -> Tuple[int, int]:
    """``1`` -> (1, 0); ``"1.2"`` -> (1, 2); ``(1, 2)`` -> (1, 2). Raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"not a version: {value!r}")
    if isinstance(value, int):
        return value, 0
    if isinstance(value, str):
        parts = value.strip().split(".")
        if 1 <= len(parts) <= 2 and all(p.isdigit() for p in parts):
            return int(parts[0]), int(parts[1]) if len(parts) == 2 else 0
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value[0], value[1]
    raise ValueError(f"not a version: {value!r}")


def _env() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("ANYACCEL_")}


def _allowlist() -> Optional[List[str]]:
    raw = os.environ.get("ANYACCEL_PLUGINS")
    if raw is None or not raw.strip():
        return None
    return [x.strip() for x in raw.split(",") if x.strip()]


def _autoload() -> bool:
    return os.environ.get("ANYACCEL_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower() not in ("1", "true", "yes", "on")


def _error(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


class _Loader:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.reg = Registry()

    def add(self, name: str, plugin: Any, package: str, version: str) -> Optional[PluginInfo]:
        """Check and register one plugin object; quarantine it on any contract violation."""
        declared = getattr(plugin, "ANYACCEL_API_VERSION", None)
        if declared is None:
            self._quarantine(name, "declares no ANYACCEL_API_VERSION (set it to the API major the plugin "
                                   f"was built for; this anyaccel speaks {API_VERSION})", package, version)
            return None
        try:
            major, minor = parse_api_version(declared)
        except ValueError as e:
            self._quarantine(name, f"ANYACCEL_API_VERSION is malformed: {e}", package, version)
            return None
        if major != API_VERSION:
            self._quarantine(name, f"built for plugin API version {declared}, but this anyaccel speaks API "
                                   f"version {API_VERSION_STRING} (major {API_VERSION}); install a release of the "
                                   f"plugin built for API {API_VERSION}.x", package, version)
            return None
        if minor > API_VERSION_MINOR:
            self.reg.warnings.append(
                f"plugin '{name}' ({package} {version}".rstrip() + f") was built for plugin API {major}.{minor}, "
                f"newer than this anyaccel's {API_VERSION_STRING}: it loads, but what it uses from API "
                f"{major}.{minor} may be missing; upgrade anyaccel")
        try:
            self.pm.register(plugin, name=name)
        except Exception as e:  # pluggy rejects bad hookimpl signatures here
            self._quarantine(name, f"rejected by the plugin manager: {_error(e)}", package, version)
            return None
        unknown = [hc.name for hc in (self.pm.get_hookcallers(plugin) or []) if hc.name not in _HOOKS]
        if unknown:
            self.pm.unregister(plugin)
            self._quarantine(name, f"implements unknown hook(s) {', '.join(unknown)}; known hooks: "
                                   f"{', '.join(_HOOKS)}", package, version)
            return None
        for hc in self.pm.get_hookcallers(plugin) or []:
            dep = hookspecs.DEPRECATED_HOOKS.get(hc.name)
            if dep is not None:
                self._deprecated(dep.message("hook", name))
        return PluginInfo(name, package, version, declared)

    def _deprecated(self, message: str) -> None:
        """Warn about a plugin's use of something deprecated, once, and keep it for ``anyaccel backends``."""
        if message not in self.reg.warnings:
            self.reg.warnings.append(message)
            warnings.warn(message, PluginDeprecationWarning, stacklevel=4)

    def _quarantine(self, name: str, error: str, package: str = "", version: str = "") -> None:
        self.reg.quarantined.append(Quarantined(name, error, package, version))

    def _call(self, info: PluginInfo, hook: str, ctx: PluginContext, kind: type) -> List[Any]:
        plugin = self.pm.get_plugin(info.name)
        out: List[Any] = []
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            if impl.plugin is not plugin:
                continue
            ctx = replace(ctx, plugin=info.name)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", PluginDeprecationWarning)
                result = impl.function(ctx=ctx) if "ctx" in impl.argnames else impl.function()
            for w in caught:
                if issubclass(w.category, PluginDeprecationWarning):
                    self._deprecated(str(w.message))
                else:  # not ours: hand it back to the caller's filters unchanged
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
            if result is None:
                continue
            if not isinstance(result, (list, tuple)):
                raise PluginError(f"hook {hook} of plugin '{info.name}' returned {type(result).__name__}; "
                                  f"expected a list of {kind.__name__}")
            for item in result:
                if not isinstance(item, kind):
                    raise PluginError(f"hook {hook} of plugin '{info.name}' returned an item of type "
                                      f"{type(item).__name__}; expected {kind.__name__}")
            out.extend(result)
        return out

    def run(self, infos: List[PluginInfo]) -> Registry:
        env = _env()
        defs: Dict[str, Tuple[BackendDef, PluginInfo]] = {}
        alive: List[PluginInfo] = []
        for info in infos:
            try:
                got = self._call(info, "anyaccel_backends", PluginContext(env=env), BackendDef)
                for d in got:
                    if d.kv_cache_layout not in KV_LAYOUTS:
                        raise PluginError(f"backend '{d.name}' declares kv_cache_layout {d.kv_cache_layout!r}; "
                                          f"expected one of {KV_LAYOUTS}")
                    if d.name in defs:
                        raise PluginError(f"backend name '{d.name}' is already declared by plugin "
                                          f"'{defs[d.name][1].name}'")
                    if not d.name or not d.name.replace("-", "").replace("_", "").isalnum():
                        raise PluginError(f"backend name {d.name!r} must be a non-empty [A-Za-z0-9_-] word")
            except Exception as e:
                self._drop(info, f"hook anyaccel_backends raised {_error(e)}")
                continue
            for d in got:
                defs[d.name] = (d, info)
            alive.append(replace(info, backends=tuple(d.name for d in got)))
        kernels: Dict[str, List[KernelImpl]] = {}
        loaded: List[PluginInfo] = []
        for info in alive:
            try:
                got = self._call(info, "anyaccel_kernels", PluginContext(backends=tuple(defs), env=env), KernelImpl)
            except Exception as e:
                self._drop(info, f"hook anyaccel_kernels raised {_error(e)}")
                for name in info.backends:
                    defs.pop(name, None)
                continue
            for k in got:
                if k.backend not in defs:
                    self.reg.warnings.append(f"plugin '{info.name}': kernel {k.name} targets backend "
                                             f"'{k.backend}', which no loaded plugin declares; ignored")
                    continue
                kernels.setdefault(k.backend, []).append(replace(k, provider=k.provider or info.package))
            loaded.append(replace(info, kernels=tuple(k.name for k in got)))
        # kernels of a plugin quarantined after contributing are dropped with it
        dropped = {q.name for q in self.reg.quarantined}
        for name, (d, info) in defs.items():
            if info.name in dropped:
                continue
            try:
                reason = d.detect()
                props = d.describe() if d.describe is not None and not reason else {}
            except Exception as e:
                reason, props = f"detect() raised {_error(e)}", {}
            own = kernels.get(name, [])
            self.reg.backends[name] = Backend(d, package=info.package, version=info.version,
                                              api_version=info.api_version, available=not reason,
                                              reason=reason or "", kernels=tuple(own), properties=dict(props))
        self.reg.plugins = [p for p in loaded if p.name not in dropped]
        return self.reg

    def _drop(self, info: PluginInfo, error: str) -> None:
        plugin = self.pm.get_plugin(info.name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self._quarantine(info.name, error, info.package, info.version)


def discover(extra: Iterable[Tuple[str, Any]] = (), *, entry_points: bool = True) -> Registry:
    """Load plugins and build the registry.

    :param extra: ``(name, plugin_object)`` pairs registered as if they came from entry points (tests, notebooks).
    :param entry_points: load the ``anyaccel.plugins`` entry points (subject to the environment switches).
    """
    loader = _Loader()
    infos: List[PluginInfo] = []
    allow = _allowlist()
    if entry_points:
        autoload = _autoload()
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if allow is not None and ep.name not in allow:
                continue
            if allow is None and not autoload:
                continue
            dist = getattr(ep, "dist", None)
            package = dist.metadata["Name"] if dist is not None else ep.module
            version = dist.version if dist is not None else ""
            if any(i.name == ep.name for i in infos):
                loader._quarantine(ep.name, f"entry-point name '{ep.name}' is declared twice (also by "
                                            f"{next(i.package for i in infos if i.name == ep.name)})", package,
                                   version)
                continue
            try:
                plugin = ep.load()
            except BaseException as e:  # a plugin's import must never take the process down
                if isinstance(e, KeyboardInterrupt):
                    raise
                loader._quarantine(ep.name, f"import of {ep.value} failed: {_error(e)}", package, version)
                continue
            info = loader.add(ep.name, plugin, package, version)
            if info is not None:
                infos.append(info)
    for name, plugin in extra:
        info = loader.add(name, plugin, getattr(plugin, "__name__", name).split(".")[0], "")
        if info is not None:
            infos.append(info)
    return loader.run(infos)


_REGISTRY: Optional[Registry] = None


def get_registry() -> Registry:
    """The process-wide registry, discovered on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = discover()
    return _REGISTRY


def reset_registry() -> None:
    global _REGISTRY
    _REGISTRY = None
