"""The GPU tile configurations run in CI: ``ANYACCEL_INTERPRETER_TUNING=sm80|sm90|gfx942`` makes the
triton-interpreter backend launch the shared kernels with the cuda (sm80, sm90) or rocm (gfx942) tuning, keeping
the interpreter's declared limits and its bfloat16-capable dot upcast.

The fast tests pin the switch itself; the slow ones run the op suite through the ``anyaccel conformance`` command
in a fresh process, once with the interpreter's own tuning and once per forced GPU tuning, and read the JSON
report to prove which tuning ran (a switch that silently fell back to the default tuning would otherwise pass).

GPU tiles are small, so the interpreter runs many more programs than with its own big tiles: with the default
10 drawn examples sm80 costs 70 s of CPU against 52 s for the interpreter's own tuning. The forced runs
therefore draw 3 examples per family and dtype (every fixed case still runs, in all three dtypes). Measured CPU
time (user, 2-core machine, four families, all dtypes): default 52 s (269 cases), sm80 50 s, sm90 46 s,
gfx942 43 s (185 cases each): about 3 minutes together. The heaviest cases under the GPU tiles are the fixed
benchmark-row GEMM (x=[16, 4096], N=4096) and long-context attention with soft-cap.

Not reached by these cases: the GPU tunings' split-KV path (it starts at 4096-8192 positions of context, far
beyond what the interpreter runs in CI) and the sm90 GEMM config for M > 256.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from anyaccel.backends.triton_interpreter import plugin

OP_FAMILIES = ("gemm", "grouped_gemm", "attention", "fused")
#: drawn examples per family and dtype for each forced tuning (the default run uses the suite's default, 10)
FORCED_EXAMPLES = {"sm80": 3, "sm90": 3, "gfx942": 3}


def _gpu(name):
    from anyaccel.backends.cuda.tuning import tuning_for as cuda
    from anyaccel.backends.rocm.tuning import tuning_for as rocm

    return {"sm80": cuda((8, 0)), "sm90": cuda((9, 0)), "gfx942": rocm("gfx942")}[name]


def test_accepted_values_are_the_three_gpu_tunings():
    assert set(plugin.GPU_TUNINGS) == {"sm80", "sm90", "gfx942"} == set(FORCED_EXAMPLES)


@pytest.mark.parametrize("name", sorted(plugin.GPU_TUNINGS))
def test_forced_tuning_is_the_gpu_tiling_with_the_interpreter_limits(monkeypatch, name):
    monkeypatch.setenv(plugin.TUNING_ENV, name)
    forced, gpu, own = plugin.tuning(), _gpu(name), plugin.interpreter_tuning()
    # what the GPU compiles: tiles, GEMM configs, split-KV policy, per-program rows, launch options
    assert forced.attention == gpu.attention and forced.gemm == gpu.gemm
    assert forced.launch_options == gpu.launch_options
    assert (forced.rows_per_program, forced.kv_write_tokens_per_program, forced.rotary_rows_per_program,
            forced.max_tile_elements, forced.elementwise_block) == (
        gpu.rows_per_program, gpu.kv_write_tokens_per_program, gpu.rotary_rows_per_program, gpu.max_tile_elements,
        gpu.elementwise_block)
    # what stays the interpreter's: the claims, and bf16-capable dots
    assert forced.limits == own.limits and forced.dot_upcast
    assert forced.attention != own.attention or forced.gemm != own.gemm     # it is not the default in disguise
    assert forced.name == f"interpreter-{gpu.name}"


@pytest.mark.parametrize("value", ["", "  "])
def test_unset_or_empty_means_the_interpreter_tuning(monkeypatch, value):
    monkeypatch.setenv(plugin.TUNING_ENV, value)
    assert plugin.tuning() == plugin.interpreter_tuning()


@pytest.mark.parametrize("value", ["sm70", "cuda", "gfx90a", "SM 90"])
def test_an_unknown_value_is_refused_naming_the_accepted_ones(monkeypatch, value):
    monkeypatch.setenv(plugin.TUNING_ENV, value)
    with pytest.raises(ValueError) as e:
        plugin.tuning()
    msg = str(e.value)
    assert plugin.TUNING_ENV in msg and repr(value) in msg
    assert all(v in msg for v in ("sm80", "sm90", "gfx942"))


def test_the_switch_is_read_when_the_kernels_are_built(monkeypatch):
    """Discovery builds the kernels: their descriptions name the tuning they launch with."""
    monkeypatch.setenv(plugin.TUNING_ENV, "gfx942")
    kernels = plugin.anyaccel_kernels(ctx=None)
    assert kernels and all(k.description.endswith("tuning interpreter-amd-gfx942)") for k in kernels)
    monkeypatch.delenv(plugin.TUNING_ENV)
    assert all(k.description.endswith("tuning interpreter)") for k in plugin.anyaccel_kernels(ctx=None))


def _run_suite(tmp_path, tuning, examples=None):
    report = tmp_path / f"report-{tuning or 'default'}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANYACCEL_")}
    env.update(HF_HUB_OFFLINE="1", ANYACCEL_PLUGINS="triton-interpreter")
    if tuning:
        env[plugin.TUNING_ENV] = tuning
    cmd = [sys.executable, "-m", "anyaccel", "conformance", "--backend", "triton-interpreter", "--quiet",
           "--json", str(report)]
    for fam in OP_FAMILIES:
        cmd += ["--family", fam]
    if examples is not None:
        cmd += ["--examples", str(examples)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    data = json.loads(report.read_text())
    summary = data["summary"]
    assert summary["fail"] == 0 and summary["error"] == 0, summary
    bad = [f"{c['name']} {c['dtype']}: {c['status']} {c['reason']}" for c in data["cases"]
           if c["status"] not in ("pass", "unsupported")]
    assert not bad, "\n".join(bad)
    # every op family reached the interpreted kernels themselves, in every dtype (not only the core's fallback)
    reached = {(c["op"], c["dtype"]) for c in data["cases"] if c["status"] == "pass" and not c["fallback"]}
    ops = {c["op"] for c in data["cases"]}
    missing = {(op, dt) for op in ops for dt in ("float32", "float16", "bfloat16")} - reached
    assert not missing, f"no case reached the kernel for {sorted(missing)}"
    return data


@pytest.mark.slow
def test_default_interpreter_op_suite(tmp_path):
    data = _run_suite(tmp_path, None)
    assert data["environment"]["backends"]["triton-interpreter"]["properties"]["tuning"] == "interpreter"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FORCED_EXAMPLES))
def test_op_suite_with_a_gpu_tuning_forced(tmp_path, name):
    data = _run_suite(tmp_path, name, FORCED_EXAMPLES[name])
    props = data["environment"]["backends"]["triton-interpreter"]["properties"]
    assert props["tuning"] == f"interpreter-{_gpu(name).name}", props
    assert props["launch_options"] == dict(_gpu(name).launch_options)
