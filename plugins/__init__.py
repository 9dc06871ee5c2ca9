"""Plugin discovery and the hook contract (see :mod:`anyaccel.plugins.hookspecs`)."""
from .hookspecs import PluginContext, hookimpl, hookspec
from .manager import (ENTRY_POINT_GROUP, PluginInfo, Quarantined, Registry, discover, get_registry,
                      reset_registry)

__all__ = ["PluginContext", "hookimpl", "hookspec", "ENTRY_POINT_GROUP", "PluginInfo", "Quarantined", "Registry",
           "discover", "get_registry", "reset_registry"]
