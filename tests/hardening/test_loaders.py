"""Loader attacks: truncated, mistyped and garbage config.json, safetensors and GGUF files written to tmp dirs.

Every bad input must end in a project error (``ConfigError`` / ``WeightLoadError``, or ``UnsupportedError`` for a
well-formed but unsupported architecture) whose message names the file, never a raw JSONDecodeError,
SafetensorError, ValueError or a traceback; absurd sizes are refused before anything is allocated; and
``anyaccel generate --model DIR`` turns each into one line on stderr and exit status 2.

The memory budget is pinned (``ANYACCEL_MEMORY_BUDGET_BYTES``) so a mutated config can never make a test allocate
much, whatever the machine has.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anyaccel.core.backend import Backend, BackendDef
from anyaccel.core.errors import AnyaccelError, UnsupportedError
from anyaccel.models import WeightLoadError, build_model
from anyaccel.models.config import ConfigError

gguf = pytest.importorskip("gguf", reason="the 'gguf' package is not installed")

BUDGET = 256 << 20  # 256 MiB: far above the tiny model, far below anything a mutation could ask for

CFG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32, hidden_size=16,
           intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
           rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings")
ALLOWED = (ConfigError, WeightLoadError, UnsupportedError)
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _budget(monkeypatch):
    monkeypatch.setenv("ANYACCEL_MEMORY_BUDGET_BYTES", str(BUDGET))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def backend():
    return Backend.local(BackendDef(name="loader-test", vendor="test", device_type="cpu"), [])


def _state_dict(cfg=CFG):
    g = torch.Generator().manual_seed(0)
    h, d, inter = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    sd = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,),
          "lm_head.weight": (cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)})
    return {n: torch.randn(*s, generator=g) * 0.1 for n, s in sd.items()}


def _write_dir(path, config=None, sd=None, config_text=None):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config_text if config_text is not None else json.dumps(config or CFG))
    save_file(sd if sd is not None else _state_dict(), str(path / "model.safetensors"))
    return path


_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight", "self_attn.q_proj.weight": "attn_q.weight",
               "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
               "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
               "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
               "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight"}


def _write_gguf(path, cfg=CFG, tensors=None):
    """A llama GGUF with ``cfg``'s metadata and ``tensors`` (GGUF name -> tensor; default: ``cfg``'s weights)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    if tensors is None:
        tensors = {}
        for name, t in _state_dict(cfg).items():
            if name in _GGUF_NAMES:
                tensors[_GGUF_NAMES[name]] = t
            else:
                i, rest = name.removeprefix("model.layers.").split(".", 1)
                tensors[f"blk.{i}.{_GGUF_NAMES[rest]}"] = t
    for g, t in tensors.items():
        w.add_tensor(g, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    d = _write_dir(root / "hf")
    g = _write_gguf(root / "tiny.gguf")
    return {"dir": d, "safetensors": (d / "model.safetensors").read_bytes(), "config": (d / "config.json").read_text(),
            "gguf": g.read_bytes()}


def _fresh(tmp_path, good):
    d = tmp_path / uuid.uuid4().hex[:10]
    shutil.copytree(good["dir"], d)
    return d


def _expect_project_error(fn, *needles):
    """Run ``fn``; it may succeed (a harmless mutation) or raise a project error naming every needle."""
    try:
        fn()
    except ALLOWED as e:
        for n in needles:
            assert str(n) in str(e), (str(n), str(e))
        return e
    except AnyaccelError as e:  # pragma: no cover - the assertion names it
        raise AssertionError(f"unexpected project error type {type(e).__name__}: {e}") from e
    return None


def test_good_fixtures_load(good, backend):
    from anyaccel.models.gguf import build_gguf_model

    assert build_model(str(good["dir"]), backend).loaded
    assert build_gguf_model(str(good["dir"].parent / "tiny.gguf"), backend)[0].loaded


# ---------------------------------------------------------------------------------------------- config.json

_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                     max_leaves=8)


@SETTINGS
@given(blob=st.binary(max_size=200))
def test_config_garbage_bytes(tmp_path, good, backend, blob):
    d = _fresh(tmp_path, good)
    (d / "config.json").write_bytes(blob)
    e = _expect_project_error(lambda: build_model(str(d), backend), d / "config.json")
    assert e is not None  # random bytes never make a Llama config


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=len(json.dumps(CFG)) - 1))
def test_config_truncated(tmp_path, good, backend, cut):
    d = _fresh(tmp_path, good)
    (d / "config.json").write_text(good["config"][:cut])
    e = _expect_project_error(lambda: build_model(str(d), backend), d / "config.json")
    assert isinstance(e, ConfigError)


@SETTINGS
@given(value=_JSON.filter(lambda v: not isinstance(v, dict)))
def test_config_that_is_not_an_object(tmp_path, good, backend, value):
    d = _fresh(tmp_path, good)
    (d / "config.json").write_text(json.dumps(value))
    e = _expect_project_error(lambda: build_model(str(d), backend), d / "config.json", "expected a JSON object")
    assert isinstance(e, ConfigError)


_BAD_VALUES = (st.text(max_size=6) | st.booleans() | st.lists(st.integers(), max_size=2)
               | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
               | st.integers(max_value=0) | st.floats().filter(lambda f: not (math.isfinite(f) and f.is_integer()))
               | st.sampled_from([10**9, 1e9, 10**12, 2**70, 1e300]))


@SETTINGS
@given(field=st.sampled_from(INT_FIELDS), value=_BAD_VALUES)
def test_config_mistyped_or_absurd_size(tmp_path, good, backend, field, value):
    d = _fresh(tmp_path, good)
    (d / "config.json").write_text(json.dumps(dict(CFG, **{field: value})))
    t0 = time.perf_counter()
    e = _expect_project_error(lambda: build_model(str(d), backend), d)
    assert time.perf_counter() - t0 < 5  # refused from the config, before any large allocation
    if e is not None and isinstance(value, (str, list, dict, bool)) and value not in ("", [], {}):
        assert field in str(e) or "head_dim" in str(e), str(e)


@pytest.mark.parametrize("changes,needle", [
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"hidden_size": "abc"}, "hidden_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"eos_token_id": "</s>"}, "eos_token_id"),
    ({"architectures": "LlamaForCausalLM"}, "architectures"),
    ({"hidden_size": 10**9}, "memory budget"),
    ({"head_dim": 10**9}, "memory budget"),
    ({"max_position_embeddings": 10**12}, "memory budget"),
    ({"num_hidden_layers": 10**9}, "memory budget"),
])
def test_named_config_defects(tmp_path, good, backend, monkeypatch, changes, needle):
    monkeypatch.delenv("ANYACCEL_MEMORY_BUDGET_BYTES")  # the real budget: absurd is absurd on any machine
    d = _fresh(tmp_path, good)
    (d / "config.json").write_text(json.dumps(dict(CFG, **changes)))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        build_model(str(d), backend)
    assert time.perf_counter() - t0 < 5
    assert str(d / "config.json") in str(e.value) and needle in str(e.value)


# ---------------------------------------------------------------------------------------------- safetensors


@SETTINGS
@given(data=st.data())
def test_safetensors_truncated(tmp_path, good, backend, data):
    blob = good["safetensors"]
    cut = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    d = _fresh(tmp_path, good)
    (d / "model.safetensors").write_bytes(blob[:cut])
    e = _expect_project_error(lambda: build_model(str(d), backend), d / "model.safetensors")
    assert isinstance(e, WeightLoadError)


@SETTINGS
@given(data=st.data())
def test_safetensors_corrupted_header_or_garbage(tmp_path, good, backend, data):
    blob = bytearray(good["safetensors"])
    header_end = 8 + int.from_bytes(blob[:8], "little")
    junk = data.draw(st.booleans())
    if junk:
        blob = bytearray(data.draw(st.binary(max_size=300)))
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            blob[data.draw(st.integers(0, header_end - 1))] = data.draw(st.integers(0, 255))
    d = _fresh(tmp_path, good)
    (d / "model.safetensors").write_bytes(bytes(blob))
    e = _expect_project_error(lambda: build_model(str(d), backend), d)
    assert e is not None or not junk


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8, torch.int8])
def test_integer_or_bool_weight_is_rejected_naming_tensor_and_dtype(tmp_path, backend, dtype):
    sd = _state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    sd[name] = (sd[name] * 100).to(dtype)
    d = _write_dir(tmp_path / "m", sd=sd)
    with pytest.raises(WeightLoadError) as e:
        build_model(str(d), backend)
    assert "layers.0.mlp.up_proj.weight" in str(e.value) and str(dtype).removeprefix("torch.") in str(e.value)
    assert str(d) in str(e.value)


@pytest.mark.parametrize("index,needle", [
    ({"weight_map": {"lm_head.weight": "pytorch_model-00001.bin"}}, "pickle"),
    ({"weight_map": {"lm_head.weight": "../elsewhere/model.safetensors"}}, "inside"),
    ({"weight_map": {"lm_head.weight": 3}}, "weight_map"),
    ({"weight_map": ["model.safetensors"]}, "weight_map"),
    (["not", "an", "object"], "weight_map"),
    ("{truncated", "not valid JSON"),
])
def test_bad_shard_index(tmp_path, good, backend, index, needle):
    d = _fresh(tmp_path, good)
    text = index if isinstance(index, str) else json.dumps(index)
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(WeightLoadError) as e:
        build_model(str(d), backend)
    assert "model.safetensors.index.json" in str(e.value) and needle in str(e.value)


# ---------------------------------------------------------------------------------------------- GGUF


def _gguf(tmp_path, blob):
    p = tmp_path / f"{uuid.uuid4().hex[:10]}.gguf"
    p.write_bytes(blob)
    return p


def _load_gguf(path, backend):
    from anyaccel.models.gguf import build_gguf_model

    return build_gguf_model(str(path), backend)


@SETTINGS
@given(data=st.data())
def test_gguf_truncated(tmp_path, good, backend, data):
    blob = good["gguf"]
    p = _gguf(tmp_path, blob[:data.draw(st.integers(min_value=0, max_value=len(blob) - 1))])
    e = _expect_project_error(lambda: _load_gguf(p, backend), p)
    assert e is not None


@SETTINGS
@given(data=st.data())
def test_gguf_junk_and_flipped_bytes(tmp_path, good, backend, data):
    blob = bytearray(good["gguf"])
    junk = data.draw(st.booleans())
    if junk:
        blob = bytearray(data.draw(st.binary(max_size=400)))
    else:  # the metadata region: magic, version, counts, keys and values
        for _ in range(data.draw(st.integers(1, 4))):
            blob[data.draw(st.integers(0, 600))] = data.draw(st.integers(0, 255))
    p = _gguf(tmp_path, bytes(blob))
    e = _expect_project_error(lambda: _load_gguf(p, backend), p)
    assert e is not None or not junk


@pytest.mark.parametrize("field,value", [("num_attention_heads", 0), ("hidden_size", 10**9),
                                         ("max_position_embeddings", 2**32 - 1),
                                         ("num_hidden_layers", 10**9)])
def test_gguf_absurd_metadata(tmp_path, backend, field, value):
    cfg = dict(CFG, **{field: value})
    # tensors are written for the tiny config (the absurd value only reaches the metadata)
    path = _write_gguf(tmp_path / "absurd.gguf", cfg, tensors={"token_embd.weight": torch.zeros(32, 16)})
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        _load_gguf(path, backend)
    assert time.perf_counter() - t0 < 5 and str(path) in str(e.value)


# ---------------------------------------------------------------------------------------------- the CLI and the runner


@pytest.mark.parametrize("case", ["list config", "not json", "heads 0", "hidden abc", "truncated safetensors",
                                  "bin index", "junk gguf", "absurd hidden", "max-new-tokens 1e12"])
def test_generate_prints_one_line_and_exits_2(tmp_path, good, capsys, case):
    from anyaccel.cli import main

    d = _fresh(tmp_path, good)
    model, extra = str(d), []
    if case == "list config":
        (d / "config.json").write_text("[1, 2]")
    elif case == "not json":
        (d / "config.json").write_text("{'single': 'quotes'}")
    elif case == "heads 0":
        (d / "config.json").write_text(json.dumps(dict(CFG, num_attention_heads=0)))
    elif case == "hidden abc":
        (d / "config.json").write_text(json.dumps(dict(CFG, hidden_size="abc")))
    elif case == "truncated safetensors":
        (d / "model.safetensors").write_bytes(good["safetensors"][:100])
    elif case == "bin index":
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model.bin"}}))
    elif case == "junk gguf":
        model = str(_gguf(tmp_path, b"GGUF" + os.urandom(64)))
    elif case == "absurd hidden":
        (d / "config.json").write_text(json.dumps(dict(CFG, hidden_size=10**9)))
    else:
        extra = ["--max-new-tokens", "1e12"]
    rc = main(["generate", "--model", model, "--prompt-ids", "1 2 3", "--backend", "cpu", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anyaccel: error: ") and "Traceback" not in err, err
    assert (model in lines[0]) if case != "max-new-tokens 1e12" else "maximum length of 64" in lines[0]


def test_runner_checks_the_kv_pool_against_the_budget_before_allocating(good, backend):
    from anyaccel.models.runner import Engine

    model = build_model(str(good["dir"]), backend)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="KV cache of 1000000000000 blocks"):
        Engine(model, num_blocks=10**12)
    assert time.perf_counter() - t0 < 2
    assert Engine(model, num_blocks=4).num_blocks == 4
