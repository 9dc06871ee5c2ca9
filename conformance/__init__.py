"""The conformance suite: does a backend compute what the float64 reference computes?

- :mod:`.cases` -- what a case is (``OpCase``) and what a result is (``CaseResult``);
- :mod:`.ops` -- one module of cases per op family (fixed shapes + a hypothesis strategy);
- :mod:`.tolerances` -- the one table of bounds and the comparison rule;
- :mod:`.runner` -- runs every (backend, family, dtype, case), checking support claims both ways;
- :mod:`.report` -- terminal matrix, JSON, JUnit XML, Markdown;
- :mod:`.pytest_plugin` -- the same suite as pytest items (``pytest --pyargs anyaccel.conformance``).

From the command line: ``anyaccel conformance --backend NAME``.
"""
