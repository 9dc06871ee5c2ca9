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
every other plugin still loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import pluggy

from ..core.backend import BackendDef
from ..core.dispatch import KernelImpl
from ..core.version import API_VERSION

PROJECT = "anyaccel"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["hookspec", "hookimpl", "PluginContext", "anyaccel_backends", "anyaccel_kernels"]


@dataclass(frozen=True)
class PluginContext:
    """What the core tells a plugin. It only ever gains attributes (see "API versioning" in the docs).

    :param api_version: the core's plugin API major (:data:`anyaccel.core.API_VERSION`).
    :param backends: names of the backends declared so far (available to ``anyaccel_kernels``, so a kernel
        provider can tell whether the backend it extends is present).
    :param env: the ``ANYACCEL_*`` environment variables in effect.

    .. versionadded:: 0.1
    """

    api_version: int = API_VERSION
    backends: Sequence[str] = ()
    env: Dict[str, str] = field(default_factory=dict)


@hookspec
def anyaccel_backends(ctx: PluginContext) -> List[BackendDef]:
    """Declare the backends this plugin provides.

    :param ctx: the :class:`PluginContext`.
    :return: a list of :class:`anyaccel.core.BackendDef` (possibly empty). Names must be unique across all
        plugins; a duplicate name quarantines the later plugin.

    Result rule: every plugin's list is collected (no short-circuit). ``detect`` is not called here; the
    manager calls it afterwards, guarded, and records the reason a backend is unavailable.

    .. versionadded:: 0.1
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

    .. versionadded:: 0.1
    """
