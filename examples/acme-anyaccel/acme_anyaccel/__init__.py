"""acme-anyaccel: the example vendor backend ``example`` for anyaccel (see ``acme_anyaccel.plugin``)."""
__version__ = "0.2.0"
