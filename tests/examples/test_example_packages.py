"""The example vendor packages in examples/, installed non-editable (the Makefile's test setup does it): the
``example`` backend and the ``fastnorm`` kernel provider, seen through discovery, conformance and the CLI."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _installed(dist: str) -> bool:
    try:
        md.distribution(dist)
    except md.PackageNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not (_installed("acme-anyaccel") and _installed("fastnorm-anyaccel")),
    reason="the example packages are not installed; run `pip install ./examples/acme-anyaccel "
           "./examples/fastnorm-anyaccel` (the Makefile's test setup does)")


def _run(*args: str, timeout: float = 300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.pop("ANYACCEL_STRICT", None)
    return subprocess.run([sys.executable, "-m", "anyaccel", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def registry():
    from anyaccel.plugins import discover

    return discover()


def test_installed_non_editable_from_examples():
    for dist, mod in (("acme-anyaccel", "acme_anyaccel"), ("fastnorm-anyaccel", "fastnorm_anyaccel")):
        d = md.distribution(dist)
        direct = d.read_text("direct_url.json")
        if direct:  # pip records how it was installed; an editable install would say so
            assert not json.loads(direct).get("dir_info", {}).get("editable", False), f"{dist} is editable"
        imported = __import__(mod)
        assert "site-packages" in imported.__file__ or "dist-packages" in imported.__file__, imported.__file__


def test_example_backend_is_discovered_through_its_entry_point(registry):
    b = registry.get("example")
    assert b.available and b.vendor == "Acme Example"
    assert (b.package, b.version) == ("acme-anyaccel", md.version("acme-anyaccel"))
    assert sorted(b.ops) == ["gemm", "rms_norm"]
    assert {k.provider for k in b.kernels} == {"acme-anyaccel"}
    assert b.definition.distributed_backend == "gloo"
    info = next(p for p in registry.plugins if p.name == "example")
    assert info.backends == ("example",) and info.api_version == 1


def test_provider_is_a_plugin_but_not_a_backend(registry):
    info = next(p for p in registry.plugins if p.name == "fastnorm")
    assert info.package == "fastnorm-anyaccel" and info.backends == ()
    assert info.kernels == ("fastnorm.rms_norm.row_blocked",)
    assert not any(b.package == "fastnorm-anyaccel" for b in registry.backends.values())


def test_example_honest_capabilities_fall_back_with_reasons(registry):
    from anyaccel.core import Gemm, GemmSpec, LayerNorm, LayerNormSpec, RMSNorm, RMSNormSpec

    b = registry.get("example")
    op = Gemm.build(GemmSpec(torch.bfloat16, has_bias=True), b, strict=True)
    assert op.selection.chosen == "example.gemm.k_chunked"
    x, w, bias = torch.randn(5, 600, dtype=torch.bfloat16), torch.randn(7, 600, dtype=torch.bfloat16), torch.randn(7, dtype=torch.bfloat16)
    ref = x.double() @ w.double().T + bias.double()
    assert (op(x, w, bias).double() - ref).abs().max() < 0.25  # K = 600 spans three chunks
    fp16 = Gemm.build(GemmSpec(torch.float16), b, strict=False).selection
    assert fp16.fallback and "dtype float16 not in supported dtypes" in fp16.candidates[0].reasons[0]
    assert RMSNorm.build(RMSNormSpec(64, torch.float32), b).selection.chosen == "example.rms_norm.einsum"
    ln = LayerNorm.build(LayerNormSpec(64, torch.float32), b, strict=False).selection
    assert ln.fallback and ln.chosen == "native.layer_norm"


def test_conformance_on_example_passes_with_fallbacks_listed(tmp_path):
    j, m, x = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.xml"
    r = _run("conformance", "--backend", "example", "--family", "gemm", "--family", "fused", "--examples", "2",
             "--json", str(j), "--markdown", str(m), "--junit", str(x), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(j.read_text())
    s = data["summary"]
    assert s["fail"] == s["error"] == 0 and s["pass"] == s["total"] > 50
    kernels = {c["kernel"] for c in data["cases"]}
    assert {"example.gemm.k_chunked", "example.rms_norm.einsum", "native.layer_norm"} <= kernels
    fb = [c for c in data["cases"] if c["fallback"]]
    assert fb and all(c["reason"].startswith("fallback:") for c in fb)
    assert any(c["op"] == "gemm" and c["dtype"] == "float16" for c in fb)  # its declared gap, not hidden
    env = data["environment"]["backends"]["example"]
    assert env["package"] == "acme-anyaccel" and env["version"] == md.version("acme-anyaccel")
    assert "layer_norm" in env["missing_ops"] and "gemm" not in env["missing_ops"]
    text = m.read_text()
    assert "**PASS**" in text and "## Fallbacks" in text and "native.layer_norm (fallback)" in text
    assert "| acme-anyaccel | 0.2.0 | backend example |" in text and "## Declared capabilities" in text
    assert "ToleranceExceeded" not in x.read_text()


def test_strict_conformance_fails_and_names_the_missing_ops():
    r = _run("conformance", "--backend", "example", "--family", "fused", "--dtype", "fp32", "--dtype", "fp16",
             "--examples", "0", "--strict")
    assert r.returncode == 1, r.stdout + r.stderr
    out = " ".join(r.stdout.split())
    assert "strict mode: backend 'example' has no kernel supporting:" in out
    for missing in ("layer_norm (float32, float16)", "rotary_embedding", "silu_and_mul", "rms_norm (float16)"):
        assert missing in out, missing
    assert "backend 'example' has no kernel for layer_norm" in out


def test_provider_kernel_wins_on_cpu_for_its_shapes_only(registry):
    from anyaccel.core import RMSNorm, RMSNormSpec

    cpu = registry.get("cpu")
    wide = RMSNorm.build(RMSNormSpec(4096, torch.bfloat16, fused_residual=True), cpu, strict=True)
    assert wide.selection.chosen == "fastnorm.rms_norm.row_blocked"
    assert wide.selection.provider == "fastnorm-anyaccel"
    narrow = RMSNorm.build(RMSNormSpec(512, torch.bfloat16), cpu, strict=True).selection
    assert narrow.chosen == "cpu.rms_norm.torch"
    [rejected] = [c for c in narrow.candidates if c.provider == "fastnorm-anyaccel"]
    assert rejected.reasons == ("hidden_size 512 is below min_hidden_size 1024",)
    # and it computes the right thing, in place, over more rows than one block
    x, res, w = (torch.randn(600, 4096), torch.randn(600, 4096), torch.randn(4096))
    f32 = RMSNorm.build(RMSNormSpec(4096, torch.float32, fused_residual=True), cpu)
    from anyaccel.core import rms_norm_reference

    ref_out, ref_res = rms_norm_reference(x, w, 1e-6, res)
    out, res_out = f32(x.clone(), w, res.clone())
    assert torch.allclose(out.double(), ref_out, atol=1e-4) and torch.allclose(res_out.double(), ref_res, atol=1e-5)


def test_explain_and_backends_show_the_provider_overriding_cpu():
    r = _run("explain", "rms_norm", "--backend", "cpu", "--hidden-size", "4096", "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert "chosen: fastnorm.rms_norm.row_blocked [from fastnorm-anyaccel]" in r.stdout
    assert (f"kernel provider fastnorm-anyaccel {md.version('fastnorm-anyaccel')} overrides cpu.rms_norm.torch"
            in r.stdout)
    j = _run("explain", "rms_norm", "--backend", "cpu", "--hidden-size", "4096", "--json")
    data = json.loads(j.stdout)
    assert data["kernel_provider"] == "fastnorm-anyaccel" and data["overrides"] == ["cpu.rms_norm.torch", "cpu.rms_norm.tree"]  # tree: the batch-invariant one
    assert data["backend_package"] == "anyaccel"
    b = json.loads(_run("backends", "--json").stdout)
    cpu = next(x for x in b["backends"] if x["name"] == "cpu")
    [prov] = cpu["kernel_providers"]
    assert prov["package"] == "fastnorm-anyaccel" and prov["overrides"] == ["cpu.rms_norm.torch", "cpu.rms_norm.tree"]
    example = next(x for x in b["backends"] if x["name"] == "example")
    assert example["package"] == "acme-anyaccel" and example["kernel_providers"] == []
    table = _run("backends").stdout
    assert "kernel providers" in table and f"fastnorm-anyaccel {md.version('fastnorm-anyaccel')}" in table
    assert "acme-anyaccel" in table
