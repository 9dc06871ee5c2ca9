"""TP conformance (conformance/tp.py): every family whose heads allow it, sharded over 2 gloo processes, against
itself on one process; the planted bugs of the plan fail; and the real launch through torchrun gives the TP=1
tokens. Each test is one spawn for all of its models (the machine has 2 cores)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="the tiny checkpoints are written from transformers models")

from anyaccel.conformance.tp import PLANTED_BUGS, run_tp, tp_configs  # noqa: E402
from anyaccel.plugins import get_registry  # noqa: E402

ALL = list(tp_configs())


def _lines(recs):
    return "\n".join(f"{r.name} {r.dtype}: {r.status} {r.max_abs_err} / {r.tolerance} {r.reason}" for r in recs)


@pytest.fixture(scope="module")
def cpu():
    return get_registry().get("cpu")


#: each planted bug, and the model it is planted in (one whose config exposes it)
BUG_MODELS = {"kv_head_zero": "llama", "bias_twice": "llama_bias", "no_embed_mask": "mistral",
              "head_unreduced": "qwen3"}


@pytest.fixture(scope="module")
def tp_run(cpu):
    """One spawn for everything: every model clean, and each planted bug in a copy of its model (``model!bug``,
    judged with the loosest bound of any model, so the bug has to stand out more, not less)."""
    configs = tp_configs()
    bugs = {}
    for bug, model in BUG_MODELS.items():
        configs[f"{model}!{bug}"] = configs[model]
        bugs[f"{model}!{bug}"] = bug
    return run_tp(cpu, list(configs), (torch.float32, torch.bfloat16), world_size=2, bugs=bugs, configs=configs)


@pytest.mark.slow
def test_every_family_with_divisible_heads_matches_tp1(tp_run):
    recs = [r for r in tp_run if "!" not in r.name]
    by = {(r.name, r.dtype): r for r in recs}
    unsupported = {r.name.split()[0] for r in recs if r.status == "unsupported"}
    assert unsupported == {"bert"}, _lines(recs)
    ran = [r for r in recs if r.status != "unsupported"]
    assert ran and all(r.status == "pass" for r in ran), _lines(recs)
    for name in set(ALL) - unsupported:
        assert by[(f"{name} tp2 greedy", "float32")].status == "pass"
        for dt in ("float32", "bfloat16"):
            r = by[(f"{name} tp2 logits", dt)]
            assert r.tolerance > 0 and r.max_abs_err <= r.tolerance
    # float32: sharding changes the summation order only; the comparison does look at the numbers
    assert any(by[(f"{n} tp2 logits", "float32")].max_abs_err > 0 for n in set(ALL) - unsupported)


@pytest.mark.slow
def test_planted_bugs_fail_in_every_dtype(tp_run):
    assert set(BUG_MODELS) == set(PLANTED_BUGS)
    for bug, model in BUG_MODELS.items():
        for dt in ("float32", "bfloat16"):
            logits = [r for r in tp_run if r.name == f"{model}!{bug} tp2 logits" and r.dtype == dt]
            assert logits and logits[0].status == "fail", f"{bug} survived in {dt}:\n" + _lines(tp_run)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun is not installed with torch here")
@pytest.mark.parametrize("model", ["qwen2_moe"])
def test_torchrun_generate_tp2_gives_the_tp1_tokens(tmp_path, capsys, model):
    """The launch a user runs: torchrun --nproc-per-node 2 -m anyaccel generate --tp 2, from a safetensors
    directory (each rank reading its slices), against the same command without tensor parallelism."""
    from anyaccel.conformance.models import TINY_CONFIGS, make_reference
    from anyaccel.conformance.tp import _save

    _save(make_reference(TINY_CONFIGS[model], seed=0), str(tmp_path / "m"))
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = ["-m", "anyaccel", "generate", "--model", str(tmp_path / "m"), "--backend", "cpu",
            "--prompt-ids", "5 9 33 70 101 7", "--max-new-tokens", "16", "--json"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    from anyaccel.cli import main

    assert main(args[2:]) == 0  # TP=1, in this process
    one = capsys.readouterr().out
    two = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", *args, "--tp", "2"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    outs = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(outs) == 1  # rank 0 prints, rank 1 does not
    assert outs[0]["output_ids"] == json.loads(one)["output_ids"]
