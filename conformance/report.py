"""Conformance reports: a terminal matrix (rich), JSON, JUnit XML and Markdown, all from one :class:`Report`.

* JSON is exactly ``{"environment": {...}, "summary": {...}, "cases": [CaseResult.to_json(), ...]}``; the
  selections made during the run are inside ``environment["selections"]``.
* JUnit XML has one ``<testsuite>`` per backend and one ``<testcase>`` per case (``classname`` =
  ``anyaccel.<backend>.<op>.<dtype>``): ``<failure>`` for ``fail``, ``<error>`` for ``error``, ``<skipped>`` for
  ``unsupported``. CI systems render it as they render any test run.
* Markdown is for publishing a result: the environment, the matrix, every case with its max_abs_err beside its
  tolerance, the fallbacks and the unsupported cases with their reasons.
"""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

from .cases import STATUSES, CaseResult

__all__ = ["to_json", "write_json", "to_junit", "write_junit", "to_markdown", "write_markdown", "matrix",
           "render_terminal", "cell_text", "strict_gaps"]


# ------------------------------------------------------------------------------------------------ matrix


def _row_key(c: CaseResult) -> str:
    return c.op or c.name


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
    extra = [f"{cell[s]} {s}" for s in ("fail", "error", "unsupported") if cell[s]]
    if cell["fallback"]:
        extra.append(f"{cell['fallback']} fallback")
    if extra:
        text += " (" + ", ".join(extra) + ")"
    if cell["fail"] or cell["error"]:
        style = "bold red"
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


def render_terminal(report: Any, console: Any = None, *, show_problems: int = 50) -> None:
    """Print the matrix, then every failure and error with its reason, then a one-line summary."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    rows, cols, cells = matrix(report)
    table = Table(title="anyaccel conformance", show_lines=False)
    table.add_column("op", style="bold")
    for b, dt in cols:
        table.add_column(f"{b}\n{dt}", justify="center")
    for r in rows:
        rendered = []
        for col in cols:
            text, style = cell_text(cells.get((r, col)))
            rendered.append(f"[{style}]{text}[/{style}]")
        table.add_row(r, *rendered)
    console.print(table)
    problems = [c for c in report.cases if c.status in ("fail", "error")]
    if problems:
        console.print(f"[bold red]{len(problems)} case(s) failed or errored:[/bold red]")
        for c in problems[:show_problems]:
            err = f" max_abs_err={_fmt(c.max_abs_err)} tol={_fmt(c.tolerance)}" if c.max_abs_err is not None else ""
            console.print(f"  [red]{c.status.upper()}[/red] {c.backend} {c.op} {c.dtype} [{c.name}]{err}",
                          highlight=False)
            console.print(f"      {c.reason}", highlight=False, markup=False)
        if len(problems) > show_problems:
            console.print(f"  ... and {len(problems) - show_problems} more (see the JSON report)")
    gaps = strict_gaps(report)
    for backend, ops in gaps.items():
        what = ", ".join(f"{op} ({', '.join(dts)})" for op, dts in ops.items())
        console.print(f"[bold red]strict mode:[/bold red] backend '{backend}' has no kernel supporting: {what}",
                      highlight=False)
    s = report.summary
    style = "green" if report.exit_code == 0 else "bold red"
    console.print(f"[{style}]{s['total']} cases: {s['pass']} pass, {s['fail']} fail, {s['error']} error, "
                  f"{s['unsupported']} unsupported, {s['fallback']} via fallback[/{style}]")


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
    return {"environment": env, "summary": report.summary, "cases": [_finite(c.to_json()) for c in report.cases]}


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
                  "skipped": sum(c.status == "unsupported" for c in cases)}
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
            elif c.fallback or c.max_abs_err is not None:
                out = ET.SubElement(tc, "system-out")
                out.text = _detail(c)
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
    out += [f"**{verdict}**: {s['total']} cases, {s['pass']} pass, {s['fail']} fail, {s['error']} error, "
            f"{s['unsupported']} unsupported, {s['fallback']} via fallback.", ""]
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
    rows, cols, cells = matrix(report)
    out += ["## Matrix", "", "| op | " + " | ".join(f"{b} {dt}" for b, dt in cols) + " |",
            "|---|" + "---|" * len(cols)]
    for r in rows:
        out.append(f"| {_md(r)} | " + " | ".join(_md(cell_text(cells.get((r, col)))[0]) for col in cols) + " |")
    out.append("")
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
    uns = [c for c in report.cases if c.status == "unsupported"]
    out += ["## Unsupported", ""]
    if uns:
        out += ["| backend | op | dtype | case | reason |", "|---|---|---|---|---|"]
        out += [f"| {_md(c.backend)} | {_md(c.op)} | {_md(c.dtype)} | {_md(c.name)} | {_md(c.reason)} |" for c in uns]
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
