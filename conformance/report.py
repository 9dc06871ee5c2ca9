"""Conformance reports: a terminal matrix (rich), JSON, JUnit XML and Markdown, all from one :class:`Report`.

Every report shows every outcome count (pass, fail, error, unsupported, not run, and the pass/fail that ran
through the core's fallback), the coverage table (:mod:`anyaccel.conformance.coverage`) and the plugins that did
not make it into the run (backends unavailable here, quarantined plugins), each with its reason.

* JSON is exactly ``{"environment": {...}, "summary": {...}, "cases": [CaseResult.to_json(), ...],
  "coverage": [CoverageRow.to_json(), ...]}``; the selections made during the run are inside
  ``environment["selections"]``, the plugins not loaded inside ``environment["not_loaded"]``.
* JUnit XML has one ``<testsuite>`` per backend and one ``<testcase>`` per case (``classname`` =
  ``anyaccel.<backend>.<op>.<dtype>``): ``<failure>`` for ``fail``, ``<error>`` for ``error``, ``<skipped>`` for
  ``unsupported`` and ``not run`` (its message starts with "not run"); the plugins not loaded are skipped test
  cases of a ``anyaccel.conformance.plugins`` suite. CI systems render it as they render any test run.
* Markdown is for publishing a result: the environment, the plugins not loaded, the matrix, the coverage table,
  every case with its max_abs_err beside its tolerance, the fallbacks, the unsupported and the not-run cases with
  their reasons.
* The terminal prints every name and reason verbatim (escaped for rich's markup): the matrix, each failure and
  error, a short grouped list of the reasons for the not-run, unsupported and fallback cases, the coverage table,
  the plugins not loaded, and the summary line (:func:`summary_line`).
"""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

from .cases import STATUSES, CaseResult

__all__ = ["to_json", "write_json", "to_junit", "write_junit", "to_markdown", "write_markdown", "matrix",
           "render_terminal", "cell_text", "strict_gaps", "summary_line", "grouped_reasons", "coverage_matrix"]


# ------------------------------------------------------------------------------------------------ matrix


def _row_key(c: CaseResult) -> str:
    if c.kind == "coverage":
        return f"{c.op} (coverage)"
    return c.op or c.name


def summary_line(report: Any) -> str:
    """The one-line summary: every outcome count, then the plugins that did not make it into the run."""
    s = report.summary
    cov_err = s.get("coverage_unreached", 0)
    err = f"{s['error']} error" + (f" ({cov_err} coverage)" if cov_err else "")
    line = (f"{s['total']} cases: {s['pass']} pass, {s['fail']} fail, {err}, {s['unsupported']} unsupported, "
            f"{s.get('not run', 0)} not run, {s['fallback']} via fallback")
    line += (f"; not loaded: {s.get('unavailable_backends', 0)} unavailable backend(s), "
             f"{s.get('quarantined_plugins', 0)} quarantined plugin(s)")
    if s.get("not run", 0) and getattr(report, "allow_unsupported", False):
        line += " (not-run cases allowed)"
    return line


def _why(c: CaseResult) -> str:
    if c.reason:
        return c.reason
    if c.fallback and c.kernel:
        native = [k for k in c.kernel.split(",") if k.startswith("native.")]
        return f"ran on the core's fallback: {', '.join(native) or c.kernel}"
    return "(no reason given)"


def grouped_reasons(report: Any, which: str) -> List[Tuple[str, str, List[str], int, str]]:
    """``[(backend, op, dtypes, count, reason)]`` of the ``which`` cases (``"not run"``, ``"unsupported"`` or
    ``"fallback"``) grouped by backend, op and reason, largest group first."""
    groups: "OrderedDict[Tuple[str, str, str], List[CaseResult]]" = OrderedDict()
    for c in report.cases:
        hit = bool(c.fallback) if which == "fallback" else c.status == which
        if hit:
            groups.setdefault((c.backend, c.op or c.kind, _why(c)), []).append(c)
    out = [(b, op, list(dict.fromkeys(c.dtype for c in cs)), len(cs), why) for (b, op, why), cs in groups.items()]
    return sorted(out, key=lambda g: -g[3])


_Row = Tuple[str, str, str]


def coverage_matrix(report: Any) -> Tuple[List[str], List[_Row], Dict[Tuple[_Row, str], Any]]:
    """``(dtypes, rows, cells)`` of the coverage table: rows ``(backend, op, feature)``, each cell the
    :class:`~anyaccel.conformance.coverage.CoverageRow` of that dtype (absent: not declared for it)."""
    dts: "OrderedDict[str, None]" = OrderedDict()
    rows: "OrderedDict[Tuple[str, str, str], None]" = OrderedDict()
    cells: Dict[Tuple[Tuple[str, str, str], str], Any] = {}
    for r in getattr(report, "coverage", ()) or ():
        key = (r.backend, r.op, r.feature)
        rows.setdefault(key)
        dts.setdefault(r.dtype)
        cells[(key, r.dtype)] = r
    return list(dts), list(rows), cells


def matrix(report: Any) -> Tuple[List[str], List[Tuple[str, str]], Dict[Tuple[str, Tuple[str, str]], Dict[str, int]]]:
    """``(rows, columns, cells)``: rows are ops (or families), columns ``(backend, dtype)``, each cell the
    status counts plus ``"fallback"``."""
    rows: "OrderedDict[str, None]" = OrderedDict()
    cols: "OrderedDict[Tuple[str, str], None]" = OrderedDict()
    cells: Dict[Tuple[str, Tuple[str, str]], Dict[str, int]] = {}
    for c in report.cases:
        r, col = _row_key(c), (c.backend, c.dtype)
        rows.setdefault(r)
        cols.setdefault(col)
        cell = cells.setdefault((r, col), {**{s: 0 for s in STATUSES}, "fallback": 0})
        cell[c.status] = cell.get(c.status, 0) + 1
        cell["fallback"] += bool(c.fallback)
    return list(rows), list(cols), cells


def cell_text(cell: Optional[Dict[str, int]]) -> Tuple[str, str]:
    """``("12/12 pass", style)`` for a cell; style is a rich colour name."""
    if not cell:
        return "-", "dim"
    total = sum(cell[s] for s in STATUSES)
    text = f"{cell['pass']}/{total} pass"
    extra = [f"{cell[s]} {s}" for s in ("fail", "error", "unsupported", "not run") if cell.get(s)]
    if cell["fallback"]:
        extra.append(f"{cell['fallback']} fallback")
    if extra:
        text += " (" + ", ".join(extra) + ")"
    if cell["fail"] or cell["error"]:
        style = "bold red"
    elif cell.get("not run"):
        style = "magenta"
    elif cell["unsupported"] or cell["fallback"]:
        style = "yellow"
    else:
        style = "green"
    return text, style


def strict_gaps(report: Any) -> Dict[str, Dict[str, List[str]]]:
    """``{backend: {op: [dtypes]}}`` of the cases strict mode turned into errors (no kernel supports them)."""
    gaps: Dict[str, Dict[str, List[str]]] = {}
    for c in report.cases:
        if c.status == "error" and c.reason.startswith("strict mode:"):
            dts = gaps.setdefault(c.backend, {}).setdefault(c.op or c.name, [])
            if c.dtype not in dts:
                dts.append(c.dtype)
    return gaps


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3g}"


def render_terminal(report: Any, console: Any = None, *, show_problems: int = 50, show_groups: int = 8) -> None:
    """Print the matrix, every failure and error with its reason, the grouped reasons of the not-run, unsupported
    and fallback cases, the coverage table, the plugins not loaded, then the summary line. Every name and reason is
    printed verbatim (escaped: a case named ``[1, 64]`` or ``[bold]`` is text, not markup)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    rows, cols, cells = matrix(report)
    table = Table(title="anyaccel conformance", show_lines=False)
    table.add_column("op", style="bold")
    for b, dt in cols:
        table.add_column(escape(f"{b}\n{dt}"), justify="center")
    for r in rows:
        rendered = []
        for col in cols:
            text, style = cell_text(cells.get((r, col)))
            rendered.append(f"[{style}]{escape(text)}[/{style}]")
        table.add_row(escape(r), *rendered)
    console.print(table)
    problems = [c for c in report.cases if c.status in ("fail", "error")]
    if problems:
        console.print(f"[bold red]{len(problems)} case(s) failed or errored:[/bold red]")
        for c in problems[:show_problems]:
            err = f" max_abs_err={_fmt(c.max_abs_err)} tol={_fmt(c.tolerance)}" if c.max_abs_err is not None else ""
            console.print(f"  [red]{c.status.upper()}[/red] {escape(f'{c.backend} {c.op} {c.dtype} [{c.name}]{err}')}",
                          highlight=False, soft_wrap=True)
            console.print(f"      {escape(c.reason)}", highlight=False, soft_wrap=True)
        if len(problems) > show_problems:
            console.print(f"  ... and {len(problems) - show_problems} more (see the JSON report)")
    gaps = strict_gaps(report)
    for backend, ops in gaps.items():
        what = ", ".join(f"{op} ({', '.join(dts)})" for op, dts in ops.items())
        text = escape(f"backend '{backend}' has no kernel supporting: {what}")
        console.print(f"[bold red]strict mode:[/bold red] {text}", highlight=False, soft_wrap=True)
    for which, style in (("not run", "magenta"), ("unsupported", "yellow"), ("fallback", "yellow")):
        groups = grouped_reasons(report, which)
        if not groups:
            continue
        n = sum(g[3] for g in groups)
        title = "via fallback" if which == "fallback" else which
        console.print(f"[{style}]{n} case(s) {title}, by reason:[/{style}]", highlight=False, soft_wrap=True)
        for b, op, dts, count, why in groups[:show_groups]:
            console.print("  " + escape(f"{count} x {b} {op} ({', '.join(dts)}): {why}"), highlight=False,
                          soft_wrap=True)
        if len(groups) > show_groups:
            console.print(f"  ... and {len(groups) - show_groups} more reason(s) (see the JSON or Markdown report)")
    _render_coverage(report, console)
    nl = report.environment.get("not_loaded", {})
    for x in nl.get("unavailable_backends", ()):
        console.print("[yellow]backend not available here:[/yellow] " + escape(f"{x['name']}: {x['reason']}"),
                      highlight=False, soft_wrap=True)
    for x in nl.get("quarantined", ()):
        pkg = f" ({x['package']} {x['version']})".replace(" )", ")") if x.get("package") else ""
        console.print("[bold red]plugin quarantined:[/bold red] " + escape(f"{x['name']}{pkg}: {x['error']}"),
                      highlight=False, soft_wrap=True)
    style = "green" if report.exit_code == 0 else "bold red"
    console.print(f"[{style}]{escape(summary_line(report))}[/{style}]", highlight=False, soft_wrap=True)


def _render_coverage(report: Any, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    dts, rows, cells = coverage_matrix(report)
    if not rows:
        return
    t = Table(title="coverage: cases that reached the backend's own kernel, per declared feature")
    for col in ("backend", "op", "feature", *dts):
        t.add_column(escape(col), justify="left" if col in ("backend", "op", "feature") else "right")
    for key in rows:
        rendered = []
        for dt in dts:
            r = cells.get((key, dt))
            if r is None:
                rendered.append("[dim]-[/dim]")
            elif r.reached == 0:
                rendered.append("[bold red]0[/bold red]")
            else:
                rendered.append(str(r.reached))
        t.add_row(*(escape(k) for k in key), *rendered)
    console.print(t)


# ------------------------------------------------------------------------------------------------ JSON


def _finite(rec: Dict[str, Any]) -> Dict[str, Any]:
    # strict JSON has no Infinity/NaN: a non-finite error (NaN left in the output) becomes null; the reason says why
    for key in ("max_abs_err", "tolerance"):
        v = rec.get(key)
        if isinstance(v, float) and not math.isfinite(v):
            rec[key] = None
    return rec


def to_json(report: Any) -> Dict[str, Any]:
    env = dict(report.environment)
    env["selections"] = list(report.selections)
    return {"environment": env, "summary": report.summary, "cases": [_finite(c.to_json()) for c in report.cases],
            "coverage": [r.to_json() for r in getattr(report, "coverage", ()) or ()]}


def _json_default(o: Any) -> Any:
    return str(o)


def write_json(report: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_json(report), f, indent=2, default=_json_default, allow_nan=False)
        f.write("\n")


# ------------------------------------------------------------------------------------------------ JUnit


def _detail(c: CaseResult) -> str:
    lines = [f"backend={c.backend} op={c.op} dtype={c.dtype} kernel={c.kernel or '-'} fallback={c.fallback}",
             f"max_abs_err={_fmt(c.max_abs_err)} tolerance={_fmt(c.tolerance)}"]
    if c.reason:
        lines.append(c.reason)
    return "\n".join(lines)


def to_junit(report: Any) -> str:
    root = ET.Element("testsuites", name="anyaccel conformance")
    by_backend: "OrderedDict[str, List[CaseResult]]" = OrderedDict()
    for c in report.cases:
        by_backend.setdefault(c.backend, []).append(c)
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for backend, cases in by_backend.items():
        counts = {"tests": len(cases), "failures": sum(c.status == "fail" for c in cases),
                  "errors": sum(c.status == "error" for c in cases),
                  "skipped": sum(c.status in ("unsupported", "not run") for c in cases)}
        for k in totals:
            totals[k] += counts[k]
        suite = ET.SubElement(root, "testsuite", name=f"anyaccel.conformance.{backend}",
                              time=f"{sum(c.seconds for c in cases):.3f}", **{k: str(v) for k, v in counts.items()})
        props = ET.SubElement(suite, "properties")
        env = report.environment
        for key in ("anyaccel", "python", "torch", "platform", "seed", "strict"):
            if key in env:
                ET.SubElement(props, "property", name=key, value=str(env[key]))
        b = env.get("backends", {}).get(backend, {})
        for key in ("package", "version", "vendor", "api_version"):
            if key in b:
                ET.SubElement(props, "property", name=f"backend.{key}", value=str(b[key]))
        for key, v in b.get("device", {}).items():
            ET.SubElement(props, "property", name=f"device.{key}", value=str(v))
        for pkg, ver in b.get("kernel_providers", {}).items():
            ET.SubElement(props, "property", name=f"kernel_provider.{pkg}", value=str(ver))
        if b.get("missing_ops"):
            ET.SubElement(props, "property", name="backend.missing_ops", value=",".join(b["missing_ops"]))
        for c in cases:
            tc = ET.SubElement(suite, "testcase", classname=f"anyaccel.{backend}.{c.op or c.kind}.{c.dtype}",
                               name=c.name, time=f"{c.seconds:.4f}")
            first = c.reason.splitlines()[0][:300] if c.reason else c.status
            if c.status == "fail":
                el = ET.SubElement(tc, "failure", message=first, type="ToleranceExceeded")
                el.text = _detail(c)
            elif c.status == "error":
                el = ET.SubElement(tc, "error", message=first, type="ConformanceError")
                el.text = _detail(c)
            elif c.status == "unsupported":
                ET.SubElement(tc, "skipped", message=first)
            elif c.status == "not run":
                ET.SubElement(tc, "skipped", message=f"not run: {first}", type="NotRun")
            elif c.fallback or c.max_abs_err is not None:
                out = ET.SubElement(tc, "system-out")
                out.text = _detail(c)
    nl = report.environment.get("not_loaded", {})
    missing = [("unavailable", x["name"], x.get("package", ""), f"backend not available here: {x['reason']}")
               for x in nl.get("unavailable_backends", ())]
    missing += [("quarantined", x["name"], x.get("package", ""), f"plugin quarantined: {x['error']}")
                for x in nl.get("quarantined", ())]
    if missing:
        suite = ET.SubElement(root, "testsuite", name="anyaccel.conformance.plugins", tests=str(len(missing)),
                              failures="0", errors="0", skipped=str(len(missing)), time="0.000")
        for kind, name, pkg, why in missing:
            tc = ET.SubElement(suite, "testcase", classname=f"anyaccel.plugins.{kind}", name=name, time="0")
            ET.SubElement(tc, "skipped", message=why[:300]).text = f"package={pkg or '-'}\n{why}"
        totals["tests"] += len(missing)
        totals["skipped"] += len(missing)
    for k, v in totals.items():
        root.set(k, str(v))
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(report: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_junit(report))


# ------------------------------------------------------------------------------------------------ Markdown


def _md(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def to_markdown(report: Any) -> str:
    env = report.environment
    s = report.summary
    out: List[str] = ["# anyaccel conformance report", ""]
    verdict = "PASS" if report.exit_code == 0 else "FAIL"
    out += [f"**{verdict}**: {_md(summary_line(report))}.", ""]
    out += ["## Environment", "", "| key | value |", "|---|---|"]
    for key in ("anyaccel", "api_version", "python", "torch", "hypothesis", "platform", "machine", "cpu_count",
                "torch_threads", "seed", "examples", "strict", "dtypes", "families", "seconds", "note"):
        if key in env:
            out.append(f"| {key} | {_md(env[key])} |")
    out.append("")
    backends = env.get("backends", {})
    if backends:
        out += ["### Backends", "", "| backend | vendor | package | version | API | device | properties |",
                "|---|---|---|---|---|---|---|"]
        for name, b in backends.items():
            props = ", ".join(f"{k}={v}" for k, v in b.get("properties", {}).items())
            device = ", ".join(f"{k}={v}" for k, v in b.get("device", {"type": b.get("device_type", "")}).items())
            out.append(f"| {_md(name)} | {_md(b.get('vendor', ''))} | {_md(b.get('package', ''))} | "
                       f"{_md(b.get('version', ''))} | {_md(b.get('api_version', ''))} | {_md(device)} | "
                       f"{_md(props)} |")
        out.append("")
    plugins = env.get("plugins", {})
    if plugins:
        out += ["### Plugin packages", "", "| package | version | supplies |", "|---|---|---|"]
        for pkg, ver in plugins.items():
            roles = [f"backend {n}" for n, b in backends.items() if b.get("package") == pkg]
            roles += [f"kernels for {n}" for n, b in backends.items() if pkg in b.get("kernel_providers", {})]
            out.append(f"| {_md(pkg)} | {_md(ver)} | {_md(', '.join(roles))} |")
        out.append("")
    nl = env.get("not_loaded", {})
    out += ["### Plugins not loaded", ""]
    if nl.get("unavailable_backends") or nl.get("quarantined"):
        out += ["| plugin | package | state | reason |", "|---|---|---|---|"]
        out += [f"| {_md(x['name'])} | {_md(x.get('package', ''))} | unavailable | {_md(x['reason'])} |"
                for x in nl.get("unavailable_backends", ())]
        out += [f"| {_md(x['name'])} | {_md(x.get('package', ''))} | quarantined | {_md(x['error'])} |"
                for x in nl.get("quarantined", ())]
    else:
        out.append("None: every discovered backend is available and no plugin is quarantined.")
    out.append("")
    rows, cols, cells = matrix(report)
    out += ["## Matrix", "", "| op | " + " | ".join(f"{b} {dt}" for b, dt in cols) + " |",
            "|---|" + "---|" * len(cols)]
    for r in rows:
        out.append(f"| {_md(r)} | " + " | ".join(_md(cell_text(cells.get((r, col)))[0]) for col in cols) + " |")
    out.append("")
    out += _coverage_md(report)
    out += _declarations(backends)
    out += ["## Cases", "", "Each case's measured `max_abs_err` beside the tolerance at the worst element "
            "(`err/tol` <= 1 passes).", "",
            "| backend | op | dtype | case | status | max_abs_err | tolerance | err/tol | kernel | reason |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for c in report.cases:
        kernel = c.kernel + (" (fallback)" if c.fallback else "")
        out.append(f"| {_md(c.backend)} | {_md(c.op)} | {_md(c.dtype)} | {_md(c.name)} | {c.status} | "
                   f"{_fmt(c.max_abs_err)} | {_fmt(c.tolerance)} | {_ratio(c)} | {_md(kernel)} | {_md(c.reason)} |")
    out.append("")
    fb = [c for c in report.cases if c.fallback]
    out += ["## Fallbacks", ""]
    if fb:
        out += ["Cases that ran on the core's native implementation because no kernel of the backend supports "
                "them:", "", "| backend | op | dtype | case | status | reason |", "|---|---|---|---|---|---|"]
        out += [f"| {_md(c.backend)} | {_md(c.op)} | {_md(c.dtype)} | {_md(c.name)} | {c.status} | {_md(c.reason)} |"
                for c in fb]
    else:
        out.append("None.")
    out.append("")
    for title, status in (("Unsupported", "unsupported"), ("Not run", "not run")):
        uns = [c for c in report.cases if c.status == status]
        out += [f"## {title}", ""]
        if uns:
            out += ["| backend | op | dtype | case | reason |", "|---|---|---|---|---|"]
            out += [f"| {_md(c.backend)} | {_md(c.op)} | {_md(c.dtype)} | {_md(c.name)} | {_md(c.reason)} |"
                    for c in uns]
        else:
            out.append("None.")
        out.append("")
    if report.selections:
        out += ["## Selections", "", "| backend | op | chosen | provider | fallback | cases |",
                "|---|---|---|---|---|---|"]
        out += [f"| {_md(x['backend'])} | {_md(x['op'])} | {_md(x['chosen'])} | {_md(x['provider'])} | "
                f"{x['fallback']} | {x['cases']} |" for x in report.selections]
        out.append("")
    return "\n".join(out)


def _coverage_md(report: Any) -> List[str]:
    dts, rows, cells = coverage_matrix(report)
    if not rows:
        return []
    out = ["## Coverage", "", "Cases that reached the backend's own kernel (not the core's fallback), per declared "
           "feature and dtype; `-`: the feature is not declared for that dtype; **0**: declared but never reached "
           "(an error of the run).", "", "| backend | op | feature | " + " | ".join(dts) + " |",
           "|---|---|---|" + "---|" * len(dts)]
    for key in rows:
        vals = []
        for dt in dts:
            r = cells.get((key, dt))
            vals.append("-" if r is None else ("**0**" if r.reached == 0 else str(r.reached)))
        out.append("| " + " | ".join(_md(k) for k in key) + " | " + " | ".join(vals) + " |")
    out.append("")
    return out


def _ratio(c: CaseResult) -> str:
    if c.max_abs_err is None or not c.tolerance:
        return "-"
    return _fmt(c.max_abs_err / c.tolerance)


def _declarations(backends: Dict[str, Any]) -> List[str]:
    """What each backend declares: per op, its kernels with provider, priority and capability; and the ops it has
    no kernel for (served by the core's recorded fallback, errors under ``--strict``)."""
    out: List[str] = []
    if not any("kernels" in b for b in backends.values()):
        return out
    out += ["## Declared capabilities", ""]
    for name, b in backends.items():
        out += [f"### {_md(name)}", "", "| op | kernel | provider | priority | declares |", "|---|---|---|---|---|"]
        for op, ks in b.get("kernels", {}).items():
            for k in ks:
                cap = k.get("capability")
                cap = ", ".join(f"{x}={v}" for x, v in cap.items()) if isinstance(cap, dict) else str(cap)
                out.append(f"| {_md(op)} | {_md(k['name'])} | {_md(k['provider'])} | {k['priority']} | {_md(cap)} |")
        out.append("")
        missing = b.get("missing_ops", [])
        if missing:
            out += [f"No kernel (every call falls back to the core's native implementation; an error with "
                    f"`--strict`): {', '.join(f'`{_md(m)}`' for m in missing)}.", ""]
        else:
            out += ["Every op of the core has at least one kernel.", ""]
    return out


def write_markdown(report: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_markdown(report))
