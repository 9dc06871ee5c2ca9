"""docs/writing-a-backend.md cannot rot: every fenced block in it is written or run, in order, in one scratch
folder, the way a new vendor follows the guide.

* a block labelled ``file=PATH`` is written to PATH;
* an unlabelled block without a language is the folder layout: every file it lists must be written by a
  ``file=`` block;
* ``bash`` blocks run with ``bash -e`` (``pip`` installs into a scratch target that is put on PYTHONPATH, offline:
  the environment sets PIP_TARGET, PIP_NO_INDEX, PIP_NO_DEPS and PIP_NO_BUILD_ISOLATION, so the guide's plain
  ``pip install ./acme-mini`` is what runs, non-editable);
* ``python`` blocks without a file label run as scripts.

A language the harness does not know fails the test, so a new block cannot be added without being run.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "writing-a-backend.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)


@dataclasses.dataclass
class Block:
    lang: str
    file: str
    text: str
    line: int


def blocks() -> list:
    doc = DOC.read_text()
    out = []
    for m in FENCE.finditer(doc):
        words = m.group(1).split()
        lang = words[0] if words else ""
        file = next((w[len("file="):] for w in words[1:] if w.startswith("file=")), "")
        out.append(Block(lang, file, m.group(2), doc[:m.start()].count("\n") + 1))
    return out


def _env(scratch: pathlib.Path) -> dict:
    site = scratch / "site"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANYACCEL_", "PIP_", "PYTEST_"))}
    env.update({
        "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(site),
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "200",
        # the guide says `pip install ./acme-mini`; here it installs, non-editable, into the scratch folder only
        "PIP_TARGET": str(site), "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1", "PIP_NO_BUILD_ISOLATION": "0",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_WARN_SCRIPT_LOCATION": "1",
    })
    return env


def test_the_guide_has_the_sections_a_vendor_needs():
    text = DOC.read_text()
    for needle in ('[project.entry-points."anyaccel.plugins"]', "ANYACCEL_API_VERSION", "@hookimpl",
                   "capability=", "distributed_backend", "pytest --pyargs anyaccel.conformance --anyaccel-backend",
                   "--strict", "--markdown report.md", "--junit", "Kernel providers", "## 10. API versioning",
                   "discover(extra="):
        assert needle in text, needle
    langs = {b.lang for b in blocks()}
    assert langs <= {"", "toml", "python", "bash"}, langs


def test_hook_reference_covers_every_hook_and_context_attribute():
    from anyaccel.plugins import hookspecs

    text = DOC.read_text()
    for hook in hookspecs.HOOKS:
        assert f"### `{hook}(ctx)" in text, f"hook {hook} is not in the guide's hook reference"
        assert getattr(hookspecs, hook).__doc__, f"hook {hook} has no docstring"
    for f in dataclasses.fields(hookspecs.PluginContext):
        assert f"`ctx.{f.name}`" in text, f"context attribute {f.name} is not in the guide"
    from anyaccel.core.version import API_VERSION_STRING

    assert f"speaks API {API_VERSION_STRING}" in text


@pytest.mark.slow  # ~30 s: about ten subprocesses, each importing torch
def test_following_the_guide_from_an_empty_folder_gives_a_passing_report(tmp_path):
    scratch = tmp_path / "vendor"
    scratch.mkdir()
    env = _env(scratch)
    outputs = []
    layouts = []
    ran = 0
    for i, b in enumerate(blocks()):
        where = f"{DOC.name}:{b.line}"
        if b.file:
            path = scratch / b.file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(b.text)
        elif b.lang == "":
            # the folder layout: checked at the end against what the file blocks wrote
            layouts.append((where, [ln.strip() for ln in b.text.splitlines() if ln.strip()]))
        elif b.lang == "bash":
            r = subprocess.run(["bash", "-e", "-c", b.text], cwd=scratch, env=env, capture_output=True, text=True,
                               timeout=600)
            assert r.returncode == 0, f"{where}: bash block failed ({r.returncode}):\n{b.text}\n{r.stdout}\n{r.stderr}"
            outputs.append((b.text, r.stdout + r.stderr))
        elif b.lang == "python":
            script = scratch / f"_block_{i}.py"
            script.write_text(b.text)
            r = subprocess.run([sys.executable, str(script)], cwd=scratch, env=env, capture_output=True, text=True,
                               timeout=300)
            assert r.returncode == 0, f"{where}: python block failed:\n{r.stdout}\n{r.stderr}"
            outputs.append((b.text, r.stdout + r.stderr))
        else:
            pytest.fail(f"{where}: a ```{b.lang} block the harness does not know how to run")
        ran += 1
    assert ran == len(blocks())
    for where, names in layouts:
        assert names, f"{where}: an empty block"
        for name in names:
            if not name.endswith("/"):
                assert list(scratch.rglob(name)), f"{where}: the layout lists {name}, but no block writes it"

    def out_of(command: str) -> str:
        return next(o for t, o in outputs if command in t)

    # what a new vendor should have seen at each step
    assert (scratch / "site" / "acme_mini").is_dir() and list((scratch / "site").glob("acme_mini-0.1.0.dist-info"))
    assert not (scratch / "site" / "acme_mini" / "__editable__").exists()
    backends = " ".join(out_of("anyaccel backends").split())
    assert "mini" in backends and "acme-mini 0.1.0" in backends and "mini.gemm.einsum [acme-mini]" in backends
    explain = out_of("anyaccel explain gemm --backend mini --dtype fp16")
    assert "chosen: mini.gemm.einsum [from acme-mini]" in explain
    assert "native.gemm" in explain and "dtype float16 not in supported dtypes {bfloat16, float32}" in explain
    assert "20 pass, 0 fail" in out_of("--family collectives")  # 18 cases and 2 fault cases
    assert re.search(r"\d+ passed", out_of("pytest --pyargs")) and " failed" not in out_of("pytest --pyargs")
    strict = " ".join(out_of("--strict").split())
    assert "strict run failed (exit 1)" in strict
    assert "strict mode: backend 'mini' has no kernel supporting:" in strict and "rms_norm (float32)" in strict
    gap_line = next(ln for ln in out_of("--strict").splitlines() if "has no kernel supporting:" in ln)
    assert "silu_and_mul" not in gap_line    # the backend has that kernel (the coverage table below lists it)
    assert "chosen: widegemm.gemm [from widegemm]" in out_of("WideGemmCapability")
    assert "['old']" in out_of("def plugin(api, name)")
    report = (scratch / "report.md").read_text()
    assert "**PASS**" in report and "| mini | Acme | acme-mini | 0.1.0 |" in report
    for section in ("## Environment", "## Matrix", "## Declared capabilities", "## Cases", "## Fallbacks",
                    "## Unsupported", "mini.gemm.einsum", "native.rms_norm (fallback)"):
        assert section in report, section
    import xml.etree.ElementTree as ET

    root = ET.parse(scratch / "report.xml").getroot()
    assert int(root.get("tests")) > 50 and root.get("failures") == "0" and root.get("errors") == "0"
