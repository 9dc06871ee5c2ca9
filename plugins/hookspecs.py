"""The plugin contract: every hook a backend or kernel-provider plugin may implement.

A plugin is any module or object registered under the entry-point group ``anyaccel.plugins``. It declares the
API major it was built for as a module attribute ``ANYACCEL_API_VERSION = 1`` and implements some of the hooks
below, marked with :data:`hookimpl`::

    # acme_anyaccel/plugin.py
    from anyaccel.plugins import hookimpl

    ANYACCEL_API_VERSION = 1

    @hookimpl
    def anyaccel_backends(ctx):
        return [BackendDef(name="acme", vendor="Acme", device_type="acme", ...)]

    @hookimpl
    def anyaccel_kernels(ctx):
        return [KernelImpl(op="gemm", backend="acme", name="acme.gemm", build=..., capability=...)]

Every hook takes a single :class:`PluginContext` argument named ``ctx``. New information reaches plugins as new
attributes of the context, never as new hook parameters, so a plugin written for an older minor keeps working.

Hooks are called once per plugin, each guarded on its own: a plugin whose hook raises or returns something
that is not what the hook promises is quarantined with the error, and its contributions are dropped as a whole;
every other plugin still loads. "Raises" includes ``sys.exit()`` and every ``BaseException`` but
``KeyboardInterrupt``; what a hook returns is checked field by field (a :class:`BackendDef` with an empty
``block_sizes``, a :class:`KernelImpl` without an ``OpCapability``, ``describe()`` returning a non-dict and
``detect()`` a non-string are quarantined with the field named). A backend name used by one of anyaccel's own
backends (``anyaccel backends`` lists them) is reserved: a third-party plugin declaring it is quarantined.

How long discovery may take: every ``anyaccel`` command discovers every installed plugin, so a plugin's import
plus all its hooks (``detect`` and ``describe`` included) should take well under a second, and may take at
most :data:`anyaccel.plugins.manager.DISCOVERY_WARN_SECONDS` (5 s; ``ANYACCEL_PLUGIN_SLOW_SECONDS`` overrides)
before a ``PluginSlowWarning`` naming the plugin and its seconds is issued (an import cannot be abandoned
safely, so the limit is reported, not enforced). Defer heavy work (SDK imports, compiling, device queries
beyond a presence check) to a kernel's ``build``, which runs once per selection.

Versioning (the policy is in docs/writing-a-backend.md, "API versioning"): a plugin built for an older minor of
the same major keeps loading; a hook or context attribute that a future major removes is first listed in
:data:`DEPRECATED_HOOKS` / :data:`DEPRECATED_CONTEXT` for at least one release, and a plugin that implements or
reads it gets a :class:`PluginDeprecationWarning` naming the plugin, the replacement and the removing version
(also recorded in the registry's warnings, which ``anyaccel backends`` prints).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import warnings
from typing import Any, Dict, List, Optional, Sequence

import pluggy

from ..core.backend import BackendDef
from ..core.dispatch import KernelImpl
from ..core.version import API_VERSION, API_VERSION_MINOR

PROJECT = "anyaccel"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["hookspec", "hookimpl", "PluginContext", "anyaccel_backends", "anyaccel_kernels", "Deprecation",
           "PluginDeprecationWarning", "DEPRECATED_HOOKS", "DEPRECATED_CONTEXT", "HOOKS"]

#: Every hook of the contract, in the order the manager calls them.
HOOKS = ("anyaccel_backends", "anyaccel_kernels")


class PluginDeprecationWarning(DeprecationWarning):
    """A plugin uses a hook or a context attribute that a later API major removes."""


@dataclass(frozen=True)
class Deprecation:
    """One announced removal.

    :param name: the hook or context attribute.
    :param since: the API version (``"M.m"``) that deprecated it.
    :param removed_in: the API version that removes it (the next major at the earliest).
    :param instead: what to use instead: a hook name, or for a context attribute the name of the attribute that
        replaces it (reading the old name then returns the new attribute's value).
    :param default: for a context attribute with no replacement, the value reading it returns until removal.
    """

    name: str
    since: str
    removed_in: str
    instead: Optional[str] = None
    default: Any = None

    def message(self, kind: str, plugin: str) -> str:
        use = f"; use {self.instead!r} instead" if self.instead else ""
        return (f"plugin '{plugin}' uses {kind} {self.name!r}, deprecated since plugin API {self.since} and "
                f"removed in API {self.removed_in}{use}")


#: Hooks announced for removal: hook name -> :class:`Deprecation`. Empty in API 1.1 (nothing is deprecated yet).
DEPRECATED_HOOKS: Dict[str, Deprecation] = {}
#: Context attributes announced for removal: attribute name -> :class:`Deprecation`. A renamed attribute stays
#: readable under its old name (with a warning) until the removing major. Empty in API 1.1.
DEPRECATED_CONTEXT: Dict[str, Deprecation] = {}


@dataclass(frozen=True)
class PluginContext:
    """What the core tells a plugin. It only ever gains attributes (see "API versioning" in the docs).

    :param api_version: the core's plugin API major (:data:`anyaccel.core.API_VERSION`).
    :param backends: names of the backends declared so far (available to ``anyaccel_kernels``, so a kernel
        provider can tell whether the backend it extends is present).
    :param env: the ``ANYACCEL_*`` environment variables in effect.
    :param api_minor: the core's plugin API minor (:data:`anyaccel.core.version.API_VERSION_MINOR`); a plugin
        that uses something added in a later minor can test ``(ctx.api_version, ctx.api_minor)``.
        *versionadded: API 1.1*
    :param plugin: the entry-point name of the plugin this context is handed to. *versionadded: API 1.1*

    Reading an attribute listed in :data:`DEPRECATED_CONTEXT` warns (:class:`PluginDeprecationWarning`) and
    returns its replacement's value; reading any other unknown attribute raises ``AttributeError``.

    .. versionadded:: API 1.0
    """

    api_version: int = API_VERSION
    backends: Sequence[str] = ()
    env: Dict[str, str] = field(default_factory=dict)
    api_minor: int = API_VERSION_MINOR
    plugin: str = ""

    def __getattr__(self, name: str) -> Any:  # only reached for names that are not attributes
        dep = DEPRECATED_CONTEXT.get(name)
        if dep is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (this anyaccel speaks plugin "
                                 f"API {API_VERSION}.{API_VERSION_MINOR})")
        warnings.warn(dep.message("context attribute", self.plugin or "?"), PluginDeprecationWarning, stacklevel=2)
        return getattr(self, dep.instead) if dep.instead else dep.default


@hookspec
def anyaccel_backends(ctx: PluginContext) -> List[BackendDef]:
    """Declare the backends this plugin provides.

    :param ctx: the :class:`PluginContext`.
    :return: a list of :class:`anyaccel.core.BackendDef` (possibly empty). Names must be unique across all
        plugins; a duplicate name quarantines the later plugin.

    Result rule: every plugin's list is collected (no short-circuit). ``detect`` is not called here; the
    manager calls it afterwards, guarded, and records the reason a backend is unavailable.

    .. versionadded:: API 1.0
    """


@hookspec
def anyaccel_kernels(ctx: PluginContext) -> List[KernelImpl]:
    """Contribute kernels: a backend's own, or (for a kernel provider) kernels for another plugin's backend.

    :param ctx: the :class:`PluginContext`; ``ctx.backends`` lists every declared backend name.
    :return: a list of :class:`anyaccel.core.KernelImpl`. Each names the ``op`` and the ``backend`` it serves,
        declares its ``capability`` and a ``priority``. A kernel for a backend nobody declared is ignored
        with a recorded warning.

    Result rule: every plugin's list is collected. Selection (once per built op) orders candidates by declared
    priority, never by registration order; two supported candidates with equal priority are a reported conflict.
    The plugin manager stamps each kernel's ``provider`` with the distribution that supplied it.

    .. versionadded:: API 1.0
    """
