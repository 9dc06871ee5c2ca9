"""docs/op-reference.md answers a vendor's questions and cannot drift from the code.

* the committed file is exactly what ``docs/gen_reference.py`` renders now (regenerate after changing the core);
* every op id, spec field, capability field (with a meaning), attention feature, metadata field and conformance
  family appears, so a renderer that skipped something would fail here even if regenerated;
* the hand-written kernel contracts are what the core really passes: every op is called through a recording
  kernel, and the recorded arguments are checked against the documented arity, optional (``| None``) positions,
  written outputs and return rule;
* the capability class named for each op is the one the built-in backends' kernels declare.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import re
import sys

import pytest
import torch

import anyaccel.core as core
from anyaccel.conformance import runner
from anyaccel.core import attention as attn
from anyaccel.core import fused, gemm
from anyaccel.core import scaled_gemm as sg
from anyaccel.core import weight_only as wo

ROOT = pathlib.Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "op-reference.md"
CONTRACTS = ROOT / "docs" / "op-contracts.md"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # its dataclasses look their module up while being defined
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    return mod


@pytest.fixture(scope="module")
def reference():
    return REFERENCE.read_text()


def _section(text: str, heading: str) -> str:
    """The text under the Markdown heading that is ``heading`` (optionally followed by a parenthesis), up to the
    next heading of the same or a higher level."""
    m = re.search(rf"^(#+) {re.escape(heading)}(?: \(.*\))?\s*$", text, re.M)
    assert m, f"no heading {heading!r} in the reference"
    level = len(m.group(1))
    rest = text[m.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[:end.start()] if end else rest


def _rows(section: str) -> dict:
    """``{first cell without backticks: [other cells]}`` of the Markdown table rows in ``section``."""
    out = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            out[cells[0].strip("`")] = cells[1:]
    return out


def test_committed_reference_is_what_the_code_renders(gen, reference):
    assert reference == gen.render(), "docs/op-reference.md is stale: run `python docs/gen_reference.py`"


def test_check_mode_reports_a_stale_file(gen, tmp_path, monkeypatch, capsys):
    stale = tmp_path / "op-reference.md"
    stale.write_text(gen.render().replace("`gemm`", "`gem`", 1))
    monkeypatch.setattr(gen, "OUTPUT", stale)
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    assert gen.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    stale.write_text(gen.render())
    assert gen.main(["--check"]) == 0


def test_every_op_id_is_listed_with_its_contract_in_both_docs(reference):
    ids = _rows(_section(reference, "Op ids"))
    assert set(ids) == set(core.OPS)
    for op_id in core.OPS:
        body = _section(reference, f"`{op_id}`")
        assert "- kernel: `kernel(" in body and "- returns:" in body and "- writes:" in body, op_id


def test_the_prose_contracts_have_a_row_per_op_with_the_kernel_arity(gen):
    """docs/op-contracts.md is hand-written: each op id has a table row whose kernel takes the documented args."""
    rows = _rows(CONTRACTS.read_text())
    assert set(core.OPS) <= set(rows), f"op ids without a row in op-contracts.md: {sorted(set(core.OPS) - set(rows))}"
    for op_id in core.OPS:
        kernel = re.search(r"kernel\(([^)]*)\)", rows[op_id][-1])
        assert kernel, f"op-contracts.md row {op_id!r} has no kernel(...) in its last cell"
        assert len(kernel.group(1).split(", ")) == len(gen.KERNELS[op_id].args), (op_id, kernel.group(0))


def _capability_classes():
    return [getattr(core, n) for n in core.__all__
            if isinstance(getattr(core, n), type) and issubclass(getattr(core, n), core.OpCapability)]


@pytest.mark.parametrize("cls", _capability_classes(), ids=lambda c: c.__name__)
def test_every_capability_field_has_type_default_and_meaning(reference, cls):
    rows = _rows(_section(reference, f"`{cls.__name__}`"))
    for f in dataclasses.fields(cls):
        assert f.name in rows, f"{cls.__name__}.{f.name} is missing from the reference"
        typ, default, meaning = rows[f.name]
        assert typ and default and meaning, f"{cls.__name__}.{f.name}: empty cell in {rows[f.name]}"


def test_none_defaults_say_what_none_means(reference):
    """The question vendors asked: GemmCapability.out_dtypes=None means the input dtype only."""
    rows = _rows(_section(reference, "`GemmCapability`"))
    assert rows["out_dtypes"][1] == "`None`" and "input dtype only" in rows["out_dtypes"][2]


@pytest.mark.parametrize("spec", sorted({c.spec_type for c in core.OPS.values()}, key=lambda s: s.__name__),
                         ids=lambda s: s.__name__)
def test_every_spec_field_is_documented(reference, spec):
    rows = _rows(_section(reference, f"`{spec.__name__}`"))
    for f in dataclasses.fields(spec):
        assert f.name in rows and rows[f.name][2], f"{spec.__name__}.{f.name}"


def test_attention_features_and_the_fields_that_imply_them(gen, reference):
    rows = _rows(_section(reference, "Attention features"))
    assert set(rows) == set(attn.ATTENTION_FEATURES)
    for feat, (field, value, _) in gen.FEATURE_RULES.items():
        assert f"`{field}" in rows[feat][0], (feat, rows[feat])
        spec = dataclasses.replace(attn.AttentionSpec(4, 4, 64), **{field: value})
        assert feat in spec.features


def test_a_wrong_feature_rule_is_refused(gen, monkeypatch):
    monkeypatch.setitem(gen.FEATURE_RULES, "soft_cap", ("scale", 0.5, "wrong"))
    with pytest.raises(SystemExit, match="soft_cap"):
        gen.render()


def test_metadata_fields_and_host_copies(reference):
    section = _section(reference, "Attention batch metadata (`AttentionMetadata`)")
    rows = _rows(section)
    for f in dataclasses.fields(attn.AttentionMetadata):
        assert f.name in rows and rows[f.name][2], f.name
    for host in ("query_starts_host", "query_lens_host", "seq_lens_host"):
        assert rows[host][1] == "host"
    assert rows["seq_lens"][1] == "device tensor"


def test_conformance_families_and_collectives(reference):
    assert set(_rows(_section(reference, "Conformance families"))) == set(runner.families())
    methods = _rows(_section(reference, "Collectives"))
    for name in ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send", "recv", "all_to_all", "barrier"):
        assert name in methods, name


def test_the_capability_named_for_each_op_is_what_builtin_kernels_declare(gen):
    from anyaccel.plugins import discover

    registry = discover()
    checked = 0
    for backend in registry.backends.values():
        for k in backend.kernels:
            if k.op in gen.CAPABILITY_OF and k.provider.startswith("anyaccel"):
                assert isinstance(k.capability, getattr(core, gen.CAPABILITY_OF[k.op])), (k.name, k.capability)
                checked += 1
    assert checked >= len(core.OPS)


# -- the kernel contracts, against real calls --------------------------------------------------------------------

F32 = torch.float32


def _meta(slots=True):
    return attn.AttentionMetadata.build(torch.tensor([0, 2], dtype=torch.int32), torch.tensor([3], dtype=torch.int32),
                                        torch.tensor([[0]], dtype=torch.int32), 4,
                                        slot_mapping=torch.tensor([1, 2], dtype=torch.int32) if slots else None)


def _calls(op_id):
    """(spec, positional call args) variants of each op: with and without its optional inputs."""
    r = torch.randn
    aspec = attn.AttentionSpec(num_heads=2, num_kv_heads=1, head_size=8, dtype=F32, block_size=4)
    cache = lambda: torch.zeros(1, 4, 1, 8)  # noqa: E731
    rot = fused.RotarySpec(head_size=8, rotary_dim=8, num_heads=2, num_kv_heads=1, dtype=F32, max_position=16)
    return {
        "gemm": [(gemm.GemmSpec(F32, has_bias=True), (r(3, 8), r(5, 8), r(5))),
                 (gemm.GemmSpec(F32), (r(2, 3, 8), r(5, 8)))],
        "grouped_gemm": [(gemm.GroupedGemmSpec(F32, num_experts=2, mode="segments"),
                          (r(3, 8), r(2, 5, 8), torch.tensor([1, 2], dtype=torch.int32))),
                         (gemm.GroupedGemmSpec(F32, num_experts=2, mode="ids"),
                          (r(3, 8), r(2, 5, 8), torch.tensor([1, 0, 1], dtype=torch.int32)))],
        "attention": [(aspec, (r(2, 2, 8), cache(), cache(), _meta()))],
        "reshape_and_cache": [(aspec, (r(2, 1, 8), r(2, 1, 8), cache(), cache(), _meta()))],
        "rms_norm": [(fused.RMSNormSpec(8, F32), (r(3, 8), r(8))),
                     (fused.RMSNormSpec(8, F32, fused_residual=True), (r(3, 8), r(8), r(3, 8)))],
        "layer_norm": [(fused.LayerNormSpec(8, F32), (r(3, 8), r(8), r(8))),
                       (fused.LayerNormSpec(8, F32, has_bias=False), (r(3, 8), r(8)))],
        "rotary_embedding": [(rot, (torch.tensor([0, 5]), r(2, 2, 8), r(2, 1, 8), r(16, 8)))],
        "silu_and_mul": [(fused.GatedActivationSpec(F32), (r(3, 8),))],
        "gelu_and_mul": [(fused.GatedActivationSpec(F32, approximate="tanh"), (r(2, 3, 8),))],
        "scaled_gemm": [(sg.ScaledGemmSpec(F32, has_bias=True),
                         (torch.ones(3, 8, dtype=torch.int8), torch.ones(3, 1), torch.ones(5, 8, dtype=torch.int8),
                          torch.ones(5, 1), r(5))),
                        (sg.ScaledGemmSpec(F32, act_symmetric=False, act_granularity="tensor"),
                         (torch.ones(2, 3, 8, dtype=torch.int8), torch.ones(1), torch.ones(5, 8, dtype=torch.int8),
                          torch.ones(5, 1), None, torch.zeros(1, dtype=torch.int32)))],
        "quantize_activation": [(sg.QuantizeSpec(F32), (r(3, 8),)),
                                (sg.QuantizeSpec(F32, symmetric=False), (r(2, 3, 8),))],
        "weight_only_gemm": [
            (wo.WeightOnlyGemmSpec(F32, "int4", 64, 16, 32, has_bias=True), (r(3, 64), _prepared(), r(16))),
            (wo.WeightOnlyGemmSpec(F32, "int4", 64, 16, 32), (r(2, 3, 64), _prepared()))],
    }[op_id]


def _prepared():
    qw = wo.quantize_rtn(torch.randn(16, 64), "int4", 32)
    return wo.PreparedWeight(qw, wo.CANONICAL_LAYOUT, qw)


def _storage(t):
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None


@pytest.mark.parametrize("op_id", list(core.OPS))
def test_documented_kernel_contract_is_what_the_core_passes(gen, op_id):
    contract = gen.KERNELS[op_id]
    optional = {i for i, a in enumerate(contract.args) if a.endswith("| None")}
    outputs = [contract.args.index(o) if o in contract.args else
               next(i for i, a in enumerate(contract.args) if a.startswith(o + " ")) for o in contract.outputs]
    returns_used = "returns the kernel's return value" in contract.returns
    cap = getattr(core, gen.CAPABILITY_OF[op_id])()
    sentinel = object()
    for spec, args in _calls(op_id):
        seen = []

        def build(spec):
            def kernel(*a, **kw):
                assert not kw, f"{op_id}: the core passed keyword arguments {sorted(kw)}"
                seen.append(a)
                return sentinel
            return kernel

        backend = core.Backend.local(core.BackendDef(name="rec", vendor="test", device_type="cpu"),
                                     [core.KernelImpl(op=op_id, backend="rec", name=f"rec.{op_id}", build=build,
                                                      capability=cap, priority=1)])
        op = core.OPS[op_id].build(spec, backend, strict=True)
        result = op(*args)
        assert len(seen) == 1, f"{op_id}: kernel called {len(seen)} times"
        got = seen[0]
        assert len(got) == len(contract.args), f"{op_id}: documented {contract.signature()}, core passed {len(got)}"
        for i, a in enumerate(got):
            if a is None:
                assert i in optional, f"{op_id}: argument {contract.args[i]} was None but is not marked '| None'"
        # the documented outputs are the buffers the caller gets back (or, for the KV write, the caches passed in)
        if returns_used:
            assert result is sentinel, f"{op_id}: the core did not return the kernel's return value"
        else:
            assert result is not sentinel, f"{op_id}: documented as ignored, but the core returned it"
            results = [result] if isinstance(result, torch.Tensor) else list(result or ())
            if op_id == "reshape_and_cache":
                results = [args[2], args[3]]
            written = [_storage(got[i]) for i in outputs if got[i] is not None]
            assert written and set(written) <= {_storage(t) for t in results}, (
                f"{op_id}: documented outputs {contract.outputs} are not what the op hands back")


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_into_the_reference_point_at_existing_headings(reference):
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", reference, re.M)}
    links = [(doc.name, a) for doc in (ROOT / "docs").glob("*.md")
             for a in re.findall(r"op-reference\.md#([\w-]+)", doc.read_text())]
    assert links, "no doc links into op-reference.md any more"
    broken = [link for link in links if link[1] not in anchors]
    assert not broken, f"links to missing headings of op-reference.md: {broken}"


def test_the_backend_guide_names_every_conformance_family():
    guide = (ROOT / "docs" / "writing-a-backend.md").read_text()
    missing = [f for f in runner.families() if f"`{f}`" not in guide]
    assert not missing, f"docs/writing-a-backend.md does not name the families {missing}"
