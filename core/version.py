"""The plugin API version of this core. See docs/architecture.md, "API versioning"."""

#: Integer major of the plugin API. A plugin declares ``ANYACCEL_API_VERSION``; a different major is refused.
API_VERSION = 1

__all__ = ["API_VERSION"]
