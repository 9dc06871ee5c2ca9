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
from anyaccel.conformance.coverage import CoverageRow
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


_NOT_LOADED = {"unavailable_backends": [{"name": "zeta", "reason": "no zeta chip found", "package": "zeta-pkg"}],
               "quarantined": [{"name": "broken", "error": "ImportError: no module named broken_kernels",
                                "package": "broken-pkg", "version": "0.1"}]}


@pytest.fixture
def full() -> Report:
    """Every outcome, a name rich would read as markup, plugins not loaded, and a coverage table with a gap."""
    install = "reference dependency missing: transformers cannot be imported; install it with: " \
              "pip install 'anyaccel[reference]'"
    cases = [
        CaseResult("acme", "op", "[bold]x=[1, 2] N=3", "float32", "pass", 0.0, 1e-5, op="gemm", kernel="acme.gemm",
                   features=("no bias",)),
        CaseResult("acme", "op", "odd [1, 64]", "float32", "fail", 0.5, 1e-5, reason="bad [red]row[/red]", op="gemm"),
        CaseResult("acme", "op", "fb", "bfloat16", "pass", 0.0, 1e-2, reason="fallback: acme.gemm: dtype bfloat16 "
                   "not in supported dtypes", op="gemm", fallback=True, kernel="native.gemm"),
        CaseResult("acme", "op", "fb2", "bfloat16", "pass", 0.0, 1e-2, reason="fallback: acme.gemm: dtype bfloat16 "
                   "not in supported dtypes", op="gemm", fallback=True, kernel="native.gemm"),
        CaseResult("acme", "collective", "all_gather", "float32", "unsupported", reason="declares no transport",
                   op="all_gather"),
        CaseResult("acme", "model", "llama (every check)", "float32", "not run", reason=install, op="model"),
        CaseResult("acme", "model", "gpt2 (every check)", "float32", "not run", reason=install, op="model"),
        CaseResult("acme", "coverage", "gemm bias", "float32", "error", reason="declared by acme.gemm but no case "
                   "reached the backend's own kernel", op="gemm", features=("bias",)),
    ]
    env = {**environment(()), "not_loaded": _NOT_LOADED}
    rows = [CoverageRow("acme", "gemm", "bias", "float32", 0, 0, 0, ("acme.gemm",)),
            CoverageRow("acme", "gemm", "no bias", "float32", 1, 0, 0, ("acme.gemm",))]
    return Report(environment=env, cases=cases, coverage=rows)


def _terminal(report: Report) -> str:
    from rich.console import Console

    buf = io.StringIO()
    rp.render_terminal(report, Console(file=buf, width=250, color_system=None))
    return buf.getvalue()


def test_summary_line_counts_every_outcome_and_the_plugins_not_loaded(full):
    line = rp.summary_line(full)
    assert line == ("8 cases: 3 pass, 1 fail, 1 error (1 coverage), 1 unsupported, 2 not run, 2 via fallback; "
                    "not loaded: 1 unavailable backend(s), 1 quarantined plugin(s)")
    assert full.summary["not run"] == 2 and full.summary["quarantined_plugins"] == 1


def test_not_run_alone_fails_the_exit_code_unless_allowed(full):
    only = Report(environment=full.environment, cases=[c for c in full.cases if c.status in ("pass", "not run")
                                                       and not c.fallback])
    assert only.exit_code == 1
    only.allow_unsupported = True
    assert only.exit_code == 0 and "(not-run cases allowed)" in rp.summary_line(only)


def test_terminal_prints_names_verbatim_and_groups_the_reasons(full):
    out = _terminal(full)
    assert "odd [1, 64]" in out and "bad [red]row[/red]" in out  # not eaten as markup
    assert "2 case(s) not run, by reason:" in out
    assert out.count("pip install 'anyaccel[reference]'") == 1  # two cases, one grouped line
    assert "2 x acme model (float32): reference dependency missing" in out
    assert "1 case(s) unsupported, by reason:" in out and "declares no transport" in out
    assert "2 case(s) via fallback, by reason:" in out and "dtype bfloat16 not in supported dtypes" in out
    assert "backend not available here: zeta: no zeta chip found" in out
    assert "plugin quarantined: broken (broken-pkg 0.1): ImportError: no module named broken_kernels" in out
    assert "coverage: cases that reached" in out and "no bias" in out
    assert rp.summary_line(full) in out


def test_terminal_escapes_a_bold_markup_name():
    rep = Report(environment=environment(()), cases=[
        CaseResult("acme", "op", "[bold]x=[1, 2]", "float32", "error", reason="[bold] kept", op="[bold]gemm")])
    out = _terminal(rep)
    assert "[[bold]x=[1, 2]]" in out and "[bold] kept" in out and "[bold]gemm" in out


def test_every_report_has_not_run_coverage_and_plugins_not_loaded(full, tmp_path):
    data = rp.to_json(full)
    assert set(data) == {"environment", "summary", "cases", "coverage"}
    assert data["environment"]["not_loaded"] == _NOT_LOADED
    assert data["summary"]["not run"] == 2 and data["summary"]["unavailable_backends"] == 1
    assert data["coverage"][0] == {"backend": "acme", "op": "gemm", "feature": "bias", "dtype": "float32",
                                   "reached": 0, "fallback": 0, "other": 0, "declared_by": ["acme.gemm"],
                                   "fallback_reason": ""}
    assert data["cases"][0]["features"] == ["no bias"]
    md = rp.to_markdown(full)
    for needle in ("## Not run", "## Coverage", "| acme | gemm | bias | **0** |", "| acme | gemm | no bias | 1 |",
                   "### Plugins not loaded", "| zeta | zeta-pkg | unavailable | no zeta chip found |",
                   "| broken | broken-pkg | quarantined |", "2 not run", "gemm (coverage)"):
        assert needle in md, needle
    root = ET.fromstring(rp.to_junit(full))
    assert root.get("tests") == "10" and root.get("skipped") == "5"  # 8 cases + 2 plugins; 1 + 2 + 2 skipped
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    plugins = suites["anyaccel.conformance.plugins"]
    assert {tc.get("name") for tc in plugins.iter("testcase")} == {"zeta", "broken"}
    acme = {tc.get("name"): tc for tc in suites["anyaccel.conformance.acme"].iter("testcase")}
    assert acme["llama (every check)"].find("skipped").get("message").startswith("not run: reference dependency")
    assert acme["gemm bias"].find("error") is not None


def test_json_has_exactly_the_schema(rep, tmp_path):
    path = tmp_path / "r.json"
    rp.write_json(rep, str(path))
    data = json.loads(path.read_text())  # strict JSON: no Infinity
    assert set(data) == {"environment", "summary", "cases", "coverage"}
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
    assert "6 cases: 2 pass, 2 fail, 1 error, 1 unsupported, 0 not run, 1 via fallback" in out
    assert "[decode M=1]" not in out and "[paged <&>]" in out  # names verbatim, brackets included


def test_cell_styles():
    ok = {"pass": 3, "fail": 0, "unsupported": 0, "error": 0, "not run": 0, "fallback": 0}
    assert rp.cell_text(ok) == ("3/3 pass", "green")
    assert rp.cell_text({**ok, "not run": 2}) == ("3/5 pass (2 not run)", "magenta")
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
