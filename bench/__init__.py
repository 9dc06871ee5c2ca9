"""Benchmarks: ratios against the obvious baseline measured in the same run on the same machine (never timed tests).

``anyaccel bench ops`` -> :mod:`anyaccel.bench.ops`.
"""
