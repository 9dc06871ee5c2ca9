"""The plugin API version of this core. See docs/writing-a-backend.md, "API versioning".

A plugin declares the version it was built for as ``ANYACCEL_API_VERSION`` (``1`` or ``"1.1"``):

* same major, any older minor: loads (minors only add: new context attributes, new optional hooks);
* same major, a newer minor: loads, with a recorded warning (what it relies on may be missing here);
* another major: quarantined with both versions named;
* a removal (a hook or a context attribute) is announced by a deprecation warning for at least one release
  before the major that removes it.
"""

#: Integer major of the plugin API. A plugin built for another major is refused (quarantined).
API_VERSION = 1
#: Minor of the plugin API: bumped by each release that adds to the contract without breaking it.
#: 1.0: hooks ``anyaccel_backends`` / ``anyaccel_kernels``; ``PluginContext(api_version, backends, env)``.
#: 1.1: ``PluginContext.api_minor``; deprecation warnings for hooks and context attributes.
API_VERSION_MINOR = 1
#: ``"MAJOR.MINOR"``, as reports and error messages print it.
API_VERSION_STRING = f"{API_VERSION}.{API_VERSION_MINOR}"

__all__ = ["API_VERSION", "API_VERSION_MINOR", "API_VERSION_STRING"]
