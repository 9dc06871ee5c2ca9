"""Reports: JSON schema, JUnit XML that parses, Markdown with every field, the terminal matrix."""
from __future__ import annotations

import io
import json
import math
import xml.etree.ElementTree as ET

import pytest
import torch

from anyaccel.conformance import report as rp
from anyaccel.conformance.cases import CaseResult
from anyaccel.conformance.runner import Report, environment
from anyaccel.conformance.tolerances import TABLE, compare, tolerance


@pytest.fixture
def rep() -> Report:
    cases = [
        CaseResult("acme", "op", "decode M=1", "float32", "pass", 1e-7, 1e-5, op="gemm", kernel="acme.gemm"),
        CaseResult("acme", "op", "odd K", "float32", "fail", 0.5, 1e-5, reason="3/10 elements outside", op="gemm",
                   kernel="acme.gemm"),
        CaseResult("acme", "op", "bf16 case", "bfloat16", "pass", 1e-3, 8e-3, reason="fallback: acme.gemm: dtype",
                   op="gemm", fallback=True, kernel="native.gemm"),
        CaseResult("acme", "op", "paged <&>", "float16", "error", reason="kernel raised RuntimeError: boom",
                   op="attention"),
        CaseResult("acme", "collective", "all_reduce", "float32", "unsupported", reason="no distributed backend",
                   op="collectives"),
        CaseResult("acme", "op", "nan", "float32", "fail", math.inf, 1e-5, reason="NaN", op="rms_norm"),
    ]
    return Report(environment=environment(()), cases=cases,
                  selections=[{"backend": "acme", "op": "gemm", "chosen": "native.gemm", "provider": "anyaccel.core",
                               "fallback": True, "cases": 1, "example_spec": "gemm(...)", "rejected": []}])


def test_json_has_exactly_the_schema(rep, tmp_path):
    path = tmp_path / "r.json"
    rp.write_json(rep, str(path))
    data = json.loads(path.read_text())  # strict JSON: no Infinity
    assert set(data) == {"environment", "summary", "cases"}
    assert data["summary"]["total"] == 6 and data["summary"]["fail"] == 2 and data["summary"]["error"] == 1
    assert data["summary"]["exit_code"] == 1
    keys = {"backend", "kind", "name", "dtype", "status", "max_abs_err", "tolerance", "reason"}
    assert all(keys <= set(c) for c in data["cases"])
    assert data["cases"][-1]["max_abs_err"] is None  # inf is not JSON
    assert data["environment"]["torch"] == torch.__version__
    assert data["environment"]["selections"][0]["chosen"] == "native.gemm"


def test_junit_parses_and_maps_statuses(rep):
    root = ET.fromstring(rp.to_junit(rep))
    assert root.tag == "testsuites" and root.get("tests") == "6"
    suite = root.find("testsuite")
    assert suite.get("failures") == "2" and suite.get("errors") == "1" and suite.get("skipped") == "1"
    by_name = {tc.get("name"): tc for tc in suite.iter("testcase")}
    assert by_name["odd K"].find("failure") is not None
    assert by_name["paged <&>"].find("error").get("message").startswith("kernel raised")
    assert by_name["all_reduce"].find("skipped") is not None
    assert by_name["decode M=1"].find("failure") is None and by_name["decode M=1"].find("error") is None
    assert by_name["odd K"].get("classname") == "anyaccel.acme.gemm.float32"


def test_markdown_has_environment_matrix_errors_fallbacks_unsupported(rep):
    md = rp.to_markdown(rep)
    for needle in ("## Environment", "## Matrix", "## Cases", "## Fallbacks", "## Unsupported", "**FAIL**",
                   torch.__version__, "| acme | gemm | float32 | odd K | fail | 0.5 | 1e-05 |",
                   "no distributed backend", "native.gemm (fallback)", "1/2 pass (1 fail)", "1/1 pass (1 fallback)"):
        assert needle in md, needle


def test_terminal_matrix_cells_and_problem_list(rep):
    from rich.console import Console

    buf = io.StringIO()
    rp.render_terminal(rep, Console(file=buf, width=200, color_system=None))
    out = buf.getvalue()
    assert "1/2 pass (1 fail)" in out and "1/1 pass (1 fallback)" in out
    assert "0/1 pass (1 error)" in out
    assert "boom" in out and "3/10 elements outside" in out
    assert "6 cases: 2 pass, 2 fail, 1 error, 1 unsupported" in out


def test_cell_styles():
    ok = {"pass": 3, "fail": 0, "unsupported": 0, "error": 0, "fallback": 0}
    assert rp.cell_text(ok) == ("3/3 pass", "green")
    assert rp.cell_text({**ok, "fallback": 1})[1] == "yellow"
    assert rp.cell_text({**ok, "error": 1})[1] == "bold red"


# ------------------------------------------------------------------------------------------------ tolerances


def test_compare_rule_and_worst_element():
    ref = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    out = torch.tensor([1.0, 2.001, -3.0])
    good = compare([out], [ref], atol=1e-3, rtol=1e-3)
    assert good.passed and good.max_abs_err == pytest.approx(0.001, rel=1e-3)
    assert good.tolerance == pytest.approx(1e-3 + 2e-3)  # the bound at the element of max_abs_err
    bad = compare([out], [ref], atol=1e-4, rtol=1e-4)
    assert not bad.passed and "worst at [1]" in bad.reason and bad.bad == 1


def test_compare_nan_anywhere_fails():
    ref = torch.zeros(4, dtype=torch.float64)
    out = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    c = compare([out], [ref], atol=1.0, rtol=1.0)
    assert not c.passed and "NaN" in c.reason and math.isinf(c.max_abs_err)


def test_tolerances_follow_the_error_model_and_cover_every_class():
    from anyaccel.conformance.tolerances import UNIT_ROUNDOFF, allowance, with_allowance

    for cls in ("gemm", "attention", "norm", "rotary", "activation", "exact", "copy", "collective_sum",
                "collective_copy"):
        assert set(TABLE[cls]) >= {torch.float32, torch.float16, torch.bfloat16}
    assert "model" not in TABLE  # the model suite owns its bounds
    # the relative bound is the final rounding of the dtype, whatever the reduction length
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert tolerance("gemm", dt, 64)[1] == tolerance("gemm", dt, 4096)[1] == UNIT_ROUNDOFF[dt]
    # the per-element allowance is fp32 accumulation on the magnitude summed, the same in every dtype
    mag = torch.tensor([1.0, 100.0], dtype=torch.float64)
    a16, a32 = allowance("gemm", torch.float16, acc_mag=mag), allowance("gemm", torch.float32, acc_mag=mag)
    assert torch.equal(a16, a32) and a16[1] == pytest.approx(100 * a16[0])
    ref = with_allowance(torch.zeros(2, dtype=torch.float64), torch.tensor([0.0, 1e-3], dtype=torch.float64))
    out = torch.tensor([0.0, 9e-4])
    assert compare([out], [ref], 0.0, 0.0).passed
    assert not compare([out], [torch.zeros(2, dtype=torch.float64)], 0.0, 0.0).passed
    assert tolerance("collective_sum", torch.float16, 8)[0] == pytest.approx(2 * tolerance("collective_sum", torch.float16, 2)[0])
    assert tolerance("copy", torch.bfloat16, 10**6) == (0.0, 0.0)
    assert tolerance("gemm", torch.int32, 64) == (0.0, 0.0)
    with pytest.raises(KeyError, match="known"):
        tolerance("nope", torch.float32, 1)
