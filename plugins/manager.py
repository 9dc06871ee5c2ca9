"""Plugin discovery: entry points -> guarded hook calls -> a registry of backends, kernels and quarantined plugins.

Environment:
  ``ANYACCEL_PLUGINS=a,b``            load only these entry points (by entry-point name); a name that no installed
                                      entry point carries is warned about.
  ``ANYACCEL_DISABLE_PLUGIN_AUTOLOAD=1`` load no entry point unless ``ANYACCEL_PLUGINS`` names it.
  ``ANYACCEL_PLUGIN_SLOW_SECONDS=S``   the per-plugin discovery time past which a warning is issued
                                      (default :data:`DISCOVERY_WARN_SECONDS`).

What a plugin cannot do to the host (each is a quarantine with the reason, never a traceback):

- raise anything from its import, a hook, ``detect()`` or ``describe()``, ``SystemExit`` (``sys.exit()``) and
  every other ``BaseException`` included; only ``KeyboardInterrupt`` (the user's Ctrl-C) passes through. An
  ordinary ``Exception`` from ``detect()`` marks the backend unavailable with the error as the reason instead.
- return something that is not what the hook promises: every :class:`BackendDef` and :class:`KernelImpl` is
  checked field by field when it is discovered (types, a non-empty ``block_sizes`` of positive ints, a callable
  ``build``, an :class:`OpCapability` instance...), and so are the values ``detect()`` and ``describe()`` return.
- take a built-in backend's name. Built-in means declared by an entry point of the ``anyaccel`` distribution
  itself whose module lives in ``anyaccel.backends``; those names are reserved whatever the entry points' sort
  order, even when the built-in plugin is not loaded (allowlist). Between two third-party plugins declaring the
  same backend name, the one discovered later (entry points are walked in name order) is quarantined.

Discovery time is measured per plugin (import + hooks + ``detect``/``describe``) and recorded in
:attr:`Registry.timings`; past :data:`DISCOVERY_WARN_SECONDS` a warning names the plugin and the seconds. It
cannot be enforced by interruption (an import cannot be safely abandoned in-process), so it is reported.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import time
import traceback
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, TypeVar

import pluggy

from ..core.backend import KV_LAYOUTS, Backend, BackendDef
from ..core.dispatch import KernelImpl, OpCapability
from ..core.errors import PluginError, UnsupportedError
from ..core.version import API_VERSION, API_VERSION_MINOR, API_VERSION_STRING
from . import hookspecs
from .hookspecs import HOOKS, PROJECT, PluginContext, PluginDeprecationWarning

__all__ = ["ENTRY_POINT_GROUP", "BUILTIN_DISTRIBUTION", "DISCOVERY_WARN_SECONDS", "PluginSlowWarning",
           "Quarantined", "PluginInfo", "Registry", "discover", "get_registry", "reset_registry",
           "parse_api_version", "check_backend_def", "check_kernel_impl"]

ENTRY_POINT_GROUP = "anyaccel.plugins"
#: The distribution whose entry points are the built-in backends; their backend names are reserved.
BUILTIN_DISTRIBUTION = "anyaccel"
_BUILTIN_MODULE_PREFIX = "anyaccel.backends."
#: Seconds one plugin may take to be discovered (its import, its hooks, ``detect()`` and ``describe()``) before
#: a :class:`PluginSlowWarning` is issued. Five seconds leaves room for a vendor SDK import on a cold disk;
#: every ``anyaccel`` command pays discovery, so a plugin should defer heavy work to its kernels' ``build``.
DISCOVERY_WARN_SECONDS = 5.0
_HOOKS = HOOKS

T = TypeVar("T")


class PluginSlowWarning(UserWarning):
    """A plugin took longer than :data:`DISCOVERY_WARN_SECONDS` to be discovered."""


@dataclass(frozen=True)
class Quarantined:
    """A plugin that was not loaded, and why."""

    name: str
    error: str
    package: str = ""
    version: str = ""


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: its entry-point name, the distribution that shipped it, and what it contributed.

    ``builtin`` is true for the entry points of the ``anyaccel`` distribution itself (their backend names are
    reserved, see the module docstring).
    """

    name: str
    package: str
    version: str
    api_version: Any
    backends: Tuple[str, ...] = ()
    kernels: Tuple[str, ...] = ()
    builtin: bool = False


@dataclass
class Registry:
    """The result of discovery. ``timings`` maps each plugin's name to the seconds its discovery took."""

    backends: Dict[str, Backend] = field(default_factory=dict)
    plugins: List[PluginInfo] = field(default_factory=list)
    quarantined: List[Quarantined] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)

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


def _warn_seconds() -> float:
    raw = os.environ.get("ANYACCEL_PLUGIN_SLOW_SECONDS", "").strip()
    try:
        v = float(raw) if raw else DISCOVERY_WARN_SECONDS
    except ValueError:
        v = DISCOVERY_WARN_SECONDS
    return v if v > 0 else DISCOVERY_WARN_SECONDS


def _short(v: Any, n: int = 80) -> str:
    """``repr(v)`` cut to ``n`` characters; never raises (a plugin's object may have a hostile ``__repr__``)."""
    try:
        r = repr(v)
    except BaseException as e:  # noqa: BLE001 - a repr that raises is the plugin's bug, not ours
        if isinstance(e, KeyboardInterrupt):
            raise
        r = f"<{type(v).__name__} whose repr raised>"
    return r if len(r) <= n else r[: n - 3] + "..."


def _error(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
    try:
        msg = str(e)
    except BaseException as inner:  # noqa: BLE001
        if isinstance(inner, KeyboardInterrupt):
            raise
        msg = "<message unavailable: its __str__ raised>"
    if isinstance(e, SystemExit):
        msg = f"the plugin called sys.exit({msg})" if msg else "the plugin called sys.exit()"
    return f"{type(e).__name__}: {msg}{where}"


def _guarded(fn: Callable[[], T]) -> T:
    """Run plugin code; re-raise everything but ``KeyboardInterrupt`` as a :class:`PluginError` naming the error.

    ``SystemExit`` and other ``BaseException`` s (``GeneratorExit``, a vendor's own) must not leave discovery.
    """
    try:
        return fn()
    except KeyboardInterrupt:
        raise
    except PluginError:
        raise
    except BaseException as e:  # noqa: BLE001 - see the docstring
        raise PluginError(_error(e)) from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_backend_def(d: Any) -> None:
    """Raise :class:`PluginError` naming the field of a :class:`BackendDef` that no backend could honour."""
    if not isinstance(d, BackendDef):
        raise PluginError(f"expected a BackendDef, received {type(d).__name__}")
    where = f"BackendDef {_short(d.name, 40)}"
    if not isinstance(d.name, str) or not d.name or not d.name.replace("-", "").replace("_", "").isalnum():
        raise PluginError(f"{where}: field 'name': expected a non-empty [A-Za-z0-9_-] word, received "
                          f"{_short(d.name)}")
    for f in ("vendor", "device_type", "description"):
        if not isinstance(getattr(d, f), str):
            raise PluginError(f"{where}: field '{f}': expected a str, received {type(getattr(d, f)).__name__}")
    if not d.device_type:
        raise PluginError(f"{where}: field 'device_type': expected a torch device type such as 'cpu', received ''")
    if not callable(d.detect):
        raise PluginError(f"{where}: field 'detect': expected a callable () -> None or str, received "
                          f"{type(d.detect).__name__}")
    if d.describe is not None and not callable(d.describe):
        raise PluginError(f"{where}: field 'describe': expected None or a callable () -> dict, received "
                          f"{type(d.describe).__name__}")
    if d.kv_cache_layout not in KV_LAYOUTS:
        raise PluginError(f"{where}: field 'kv_cache_layout': expected one of {KV_LAYOUTS}, received "
                          f"{_short(d.kv_cache_layout)}")
    if d.distributed_backend is not None and (not isinstance(d.distributed_backend, str) or
                                              not d.distributed_backend):
        raise PluginError(f"{where}: field 'distributed_backend': expected None or a torch.distributed backend "
                          f"name, received {_short(d.distributed_backend)}")
    bs = d.block_sizes
    if not isinstance(bs, tuple) or not bs or not all(_is_int(b) and b > 0 for b in bs):
        raise PluginError(f"{where}: field 'block_sizes': expected a non-empty tuple of positive ints, received "
                          f"{_short(bs)}")
    mp = d.max_model_parameters
    if mp is not None and not (_is_int(mp) and mp > 0):
        raise PluginError(f"{where}: field 'max_model_parameters': expected None or a positive int, received "
                          f"{_short(mp)}")


def check_kernel_impl(k: Any) -> None:
    """Raise :class:`PluginError` naming the field of a :class:`KernelImpl` that selection could not use."""
    if not isinstance(k, KernelImpl):
        raise PluginError(f"expected a KernelImpl, received {type(k).__name__}")
    where = f"KernelImpl {_short(k.name, 60)}"
    for f in ("op", "backend", "name"):
        v = getattr(k, f)
        if not isinstance(v, str) or not v:
            raise PluginError(f"{where}: field '{f}': expected a non-empty str, received {_short(v)}")
    for f in ("provider", "description"):
        if not isinstance(getattr(k, f), str):
            raise PluginError(f"{where}: field '{f}': expected a str, received {type(getattr(k, f)).__name__}")
    if not callable(k.build):
        raise PluginError(f"{where}: field 'build': expected a callable build(spec) -> kernel, received "
                          f"{type(k.build).__name__}")
    if not isinstance(k.capability, OpCapability):
        raise PluginError(f"{where}: field 'capability': expected an OpCapability (or a subclass of it), received "
                          f"{type(k.capability).__name__}")
    if not _is_int(k.priority):
        raise PluginError(f"{where}: field 'priority': expected an int, received {_short(k.priority)}")


def _check_describe(props: Any) -> Dict[str, object]:
    if not isinstance(props, dict) or not all(isinstance(k, str) for k in props):
        raise PluginError(f"describe() returned {type(props).__name__} {_short(props)}; expected a dict with str "
                          f"keys")
    return dict(props)


class _Loader:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.reg = Registry()
        self.reserved: Set[str] = set()

    def clock(self, name: str, seconds: float) -> None:
        self.reg.timings[name] = self.reg.timings.get(name, 0.0) + seconds

    def add(self, name: str, plugin: Any, package: str, version: str, builtin: bool = False
            ) -> Optional[PluginInfo]:
        """Check and register one plugin object; quarantine it on any contract violation."""
        try:
            declared = _guarded(lambda: getattr(plugin, "ANYACCEL_API_VERSION", None))
        except PluginError as e:
            self._quarantine(name, f"reading ANYACCEL_API_VERSION raised {e}", package, version)
            return None
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
            _guarded(lambda: self.pm.register(plugin, name=name))
        except PluginError as e:  # pluggy rejects bad hookimpl signatures here
            self._quarantine(name, f"rejected by the plugin manager: {e}", package, version)
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
        return PluginInfo(name, package, version, declared, builtin=builtin)

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
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", PluginDeprecationWarning)
                try:
                    result = _guarded(lambda: impl.function(ctx=ctx) if "ctx" in impl.argnames
                                      else impl.function())
                except PluginError as e:
                    raise PluginError(f"hook {hook} raised {e}") from None
                finally:
                    self.clock(info.name, time.perf_counter() - t0)
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
                try:
                    (check_backend_def if kind is BackendDef else check_kernel_impl)(item)
                except PluginError as e:
                    raise PluginError(f"hook {hook} of plugin '{info.name}' returned an invalid "
                                      f"{kind.__name__}: {e}") from None
            out.extend(result)
        return out

    def _probe_backend(self, info: PluginInfo, d: BackendDef) -> Tuple[str, Dict[str, object]]:
        """``(reason unavailable or "", describe() facts)``; raises PluginError to quarantine the plugin."""
        t0 = time.perf_counter()
        try:
            try:
                reason = d.detect()
            except KeyboardInterrupt:
                raise
            except Exception as e:  # an ordinary error: the backend is unavailable, and says why
                return f"detect() raised {_error(e)}", {}
            except BaseException as e:  # noqa: BLE001 - SystemExit & co: the plugin misbehaves
                raise PluginError(f"backend '{d.name}': detect() raised {_error(e)}") from None
            if reason is not None and not isinstance(reason, str):
                raise PluginError(f"backend '{d.name}': detect() returned {type(reason).__name__} "
                                  f"{_short(reason)}; expected None (usable) or a str saying why not")
            if reason or d.describe is None:
                return reason or "", {}
            try:
                props = _guarded(d.describe)
            except PluginError as e:
                raise PluginError(f"backend '{d.name}': describe() raised {e}") from None
            try:
                return "", _check_describe(props)
            except PluginError as e:
                raise PluginError(f"backend '{d.name}': {e}") from None
        finally:
            self.clock(info.name, time.perf_counter() - t0)

    def run(self, infos: List[PluginInfo]) -> Registry:
        env = _env()
        # 1. every plugin's backends, each checked field by field
        declared: List[Tuple[PluginInfo, List[BackendDef]]] = []
        for info in infos:
            try:
                got = self._call(info, "anyaccel_backends", PluginContext(env=env), BackendDef)
                names = [d.name for d in got]
                dup = next((n for n in names if names.count(n) > 1), None)
                if dup is not None:
                    raise PluginError(f"backend name '{dup}' is declared twice by this plugin")
            except PluginError as e:
                self._drop(info, str(e))
                continue
            declared.append((info, got))
        # 2. names: built-ins first (reserved whatever the order), then third parties in discovery order
        defs: Dict[str, Tuple[BackendDef, PluginInfo]] = {}
        accepted: Set[str] = set()
        for info, got in sorted(declared, key=lambda x: not x[0].builtin):  # stable: keeps discovery order
            clash = None
            for d in got:
                if not info.builtin and (d.name in self.reserved or (d.name in defs and defs[d.name][1].builtin)):
                    clash = (f"backend name '{d.name}' is reserved for anyaccel's built-in backend; a third-party "
                             f"plugin cannot declare it (rename the backend)")
                elif d.name in defs:
                    clash = (f"backend name '{d.name}' is already declared by plugin '{defs[d.name][1].name}' "
                             f"({defs[d.name][1].package}); the later declaration is quarantined")
                if clash:
                    break
            if clash:
                self._drop(info, clash)
                continue
            for d in got:
                defs[d.name] = (d, info)
            accepted.add(info.name)
        alive = [replace(info, backends=tuple(d.name for d in got)) for info, got in declared
                 if info.name in accepted]
        # 3. detect() and describe(), guarded; a plugin that misbehaves there is quarantined as a whole
        probed: Dict[str, Tuple[str, Dict[str, object]]] = {}
        survivors: List[PluginInfo] = []
        for info in alive:
            try:
                mine = {name: self._probe_backend(info, defs[name][0]) for name in info.backends}
            except PluginError as e:
                self._drop(info, str(e))
                for name in info.backends:
                    defs.pop(name, None)
                continue
            probed.update(mine)
            survivors.append(info)
        # 4. kernels, each checked field by field
        kernels: Dict[str, List[KernelImpl]] = {}
        loaded: List[PluginInfo] = []
        for info in survivors:
            try:
                got = self._call(info, "anyaccel_kernels", PluginContext(backends=tuple(defs), env=env), KernelImpl)
            except PluginError as e:
                self._drop(info, str(e))
                for name in info.backends:
                    defs.pop(name, None)
                continue
            loaded.append(replace(info, kernels=tuple(k.name for k in got)))
            for k in got:
                kernels.setdefault(k.backend, []).append(replace(k, provider=k.provider or info.package))
        for backend, ks in kernels.items():
            if backend not in defs:
                for k in ks:
                    self.reg.warnings.append(f"kernel {k.name} (from {k.provider}) targets backend '{backend}', "
                                             f"which no loaded plugin declares; ignored")
        dropped = {q.name for q in self.reg.quarantined}
        for name, (d, info) in defs.items():
            reason, props = probed[name]
            self.reg.backends[name] = Backend(d, package=info.package, version=info.version,
                                              api_version=info.api_version, available=not reason,
                                              reason=reason, kernels=tuple(kernels.get(name, [])),
                                              properties=props)
        self.reg.plugins = [p for p in loaded if p.name not in dropped]
        self._warn_slow()
        return self.reg

    def _warn_slow(self) -> None:
        limit = _warn_seconds()
        for name, secs in self.reg.timings.items():
            if secs > limit:
                msg = (f"plugin '{name}' took {secs:.2f} s to discover (import and hooks), more than the "
                       f"{limit:g} s every anyaccel command can afford per plugin; it should defer heavy work "
                       f"(SDK imports, device queries) to its kernels' build()")
                self.reg.warnings.append(msg)
                warnings.warn(msg, PluginSlowWarning, stacklevel=4)

    def _drop(self, info: PluginInfo, error: str) -> None:
        plugin = self.pm.get_plugin(info.name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self._quarantine(info.name, error, info.package, info.version)


def _is_builtin(ep: Any, package: str) -> bool:
    """An entry point of the ``anyaccel`` distribution whose module is one of its own backends."""
    norm = package.replace("_", "-").lower()
    return norm == BUILTIN_DISTRIBUTION and str(ep.value).startswith(_BUILTIN_MODULE_PREFIX)


def _builtin_names() -> Set[str]:
    """The backend names reserved for built-ins: the entry-point names of the ``anyaccel`` distribution's own
    backends (each built-in declares the backend its entry point is named after)."""
    try:
        dist = md.distribution(BUILTIN_DISTRIBUTION)
    except md.PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
        return set()
    return {ep.name for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP
            and str(ep.value).startswith(_BUILTIN_MODULE_PREFIX)}


def discover(extra: Iterable[Tuple[str, Any]] = (), *, entry_points: bool = True) -> Registry:
    """Load plugins and build the registry.

    :param extra: ``(name, plugin_object)`` pairs registered as if they came from entry points (tests, notebooks);
        they are third-party plugins (they cannot take a built-in backend's name).
    :param entry_points: load the ``anyaccel.plugins`` entry points (subject to the environment switches).
    """
    loader = _Loader()
    loader.reserved = _builtin_names()
    infos: List[PluginInfo] = []
    allow = _allowlist()
    extra = list(extra)
    if entry_points:
        autoload = _autoload()
        eps = []
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            package = dist.metadata["Name"] if dist is not None else ep.module
            version = dist.version if dist is not None else ""
            eps.append((ep, package or "", version or "", _is_builtin(ep, package or "")))
        # by name; for one name, anyaccel's own entry point first (so an impostor's same-named entry point is the
        # duplicate, whatever order the environment lists distributions in)
        eps.sort(key=lambda x: (x[0].name, not x[3]))
        if allow is not None:
            known = {ep.name for ep, *_ in eps} | {n for n, _ in extra}
            for name in allow:
                if name not in known:
                    msg = (f"ANYACCEL_PLUGINS names '{name}', but no installed plugin has that entry-point name "
                           f"(installed: {', '.join(sorted({ep.name for ep, *_ in eps})) or 'none'})")
                    loader.reg.warnings.append(msg)
                    warnings.warn(msg, UserWarning, stacklevel=2)
        seen: Dict[str, str] = {}  # entry-point name -> the distribution that declared it first
        for ep, package, version, builtin in eps:
            if allow is not None and ep.name not in allow:
                continue
            if allow is None and not autoload:
                continue
            if ep.name in seen:
                loader._quarantine(ep.name, f"entry-point name '{ep.name}' is declared twice (also by "
                                            f"{seen[ep.name]}); the later declaration is quarantined",
                                   package, version)
                continue
            seen[ep.name] = package
            t0 = time.perf_counter()
            try:
                plugin = _guarded(ep.load)
            except PluginError as e:  # a plugin's import must never take the process down
                loader._quarantine(ep.name, f"import of {ep.value} failed: {e}", package, version)
                continue
            finally:
                loader.clock(ep.name, time.perf_counter() - t0)
            info = loader.add(ep.name, plugin, package, version, builtin=builtin)
            if info is not None:
                infos.append(info)
    for name, plugin in extra:
        taken = next((i.package for i in infos if i.name == name), None)
        if taken is not None:
            loader._quarantine(name, f"plugin name '{name}' is already taken by {taken}")
            continue
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
