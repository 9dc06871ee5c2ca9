"""The conformance suite as pytest items: ``pytest --pyargs anyaccel.conformance --anyaccel-backend NAME``
(with ``-p anyaccel.conformance.pytest_plugin`` for the options; see that module)."""
from anyaccel.conformance.pytest_plugin import allow_unsupported, check, generate


def pytest_generate_tests(metafunc):
    generate(metafunc)


def test_case(anyaccel_case, request):
    check(anyaccel_case, allow_unsupported=allow_unsupported(request.config))
