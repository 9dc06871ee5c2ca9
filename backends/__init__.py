"""Built-in backends. Each is a plugin registered through the ``anyaccel.plugins`` entry-point group, exactly
like a vendor's package; nothing here is imported by the core."""
