"""fastnorm-anyaccel: a kernel provider adding a wide-row RMSNorm to anyaccel's ``cpu`` backend."""
__version__ = "0.1.0"
