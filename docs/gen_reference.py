"""Generate docs/op-reference.md, the vendor's reference tables, from the code itself.

    python docs/gen_reference.py           # rewrite docs/op-reference.md
    python docs/gen_reference.py --check   # exit 1 (and say what differs) when the committed file is stale

Everything a vendor needs to answer without reading source is read here from the objects that define it: the op
ids (``core.OPS``), every spec and capability dataclass (field, type, default, and the meaning from the class
docstring's ``:param`` lines), the attention features and the spec fields that imply them (checked by building
specs), the batch metadata, the ``BackendDef`` and ``KernelImpl`` a plugin returns, the Communicator's methods and
the ``torch.distributed`` calls its transport must serve, and the conformance family names. Only the kernel call
contracts are written here by hand (:data:`KERNELS`), because a callable's arguments are not data in the core;
``tests/docs/test_op_reference.py`` calls every op through a recording kernel to prove each contract is what the
core really passes.

The committed output is compared with a fresh rendering by that test, so a change in the code that the reference
does not reflect fails CI until this script is run again.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import pathlib
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "op-reference.md"

__all__ = ["KernelContract", "KERNELS", "CAPABILITY_OF", "FEATURE_RULES", "render", "main", "docstring_params"]


@dataclass(frozen=True)
class KernelContract:
    """The call a backend's ``build(spec)`` result receives for one op.

    :param args: the positional arguments, in order, named with their shape suffix (legend in the output);
        ``"bias_N | None"`` marks an argument the core passes as ``None`` in some calls.
    :param outputs: the arguments the kernel writes (preallocated by the core, NaN-poisoned by the suite).
    :param returns: what the kernel must return, and whether the core uses it.
    :param notes: anything else a kernel may rely on or must honour.
    """

    args: Tuple[str, ...]
    outputs: Tuple[str, ...]
    returns: str
    notes: str = ""

    def signature(self) -> str:
        return f"kernel({', '.join(self.args)})"


_IGNORED = "ignored by the core, which returns the preallocated output itself (returning `{0}` is the convention)"

#: Kernel contracts by op id; tests/docs/test_op_reference.py checks them against real calls of every op.
KERNELS: Dict[str, KernelContract] = {
    "gemm": KernelContract(
        ("x_MK", "w_NK", "bias_N | None", "out_MN"), ("out_MN",), _IGNORED.format("out_MN"),
        "`x_MK` is 2-d (the core flattens leading dims); `out_MN` has `spec.out_dtype` (or `spec.dtype`). "
        "`y = x @ w.T + b`, accumulated in float32 for half inputs."),
    "grouped_gemm": KernelContract(
        ("x_MK", "w_ENK", "groups", "out_MN"), ("out_MN",), _IGNORED.format("out_MN"),
        "`groups` is `expert_ids_M` (mode `ids`: row m uses `w_ENK[expert_ids_M[m]]`) or `group_sizes_E` "
        "(mode `segments`: rows sorted by expert, sizes summing to M); values already checked by the core."),
    "attention": KernelContract(
        ("q_THD", "k_cache", "v_cache", "meta", "out_THD"), ("out_THD",),
        "**`out_THD`: the core returns the kernel's return value to the caller**",
        "`meta` is an `AttentionMetadata` (below); caches are in the spec's `kv_layout`; `out_THD` is "
        "contiguous."),
    "reshape_and_cache": KernelContract(
        ("key_THD", "value_THD", "k_cache", "v_cache", "slot_mapping_T"), ("k_cache", "v_cache"),
        "`None` (ignored)",
        "writes token t to slot `slot_mapping_T[t]` (`block = slot // P`, `offset = slot % P`); a negative slot "
        "is padding and must be skipped; slots are already checked against the cache size."),
    "rms_norm": KernelContract(
        ("x_NH", "weight_H", "residual_NH | None", "out_NH", "residual_out_NH | None"),
        ("out_NH", "residual_out_NH"), _IGNORED.format("out_NH"),
        "with `spec.fused_residual`: `residual_out = x + residual`, then `out = rms_norm(residual_out) * weight`;"
        " otherwise `residual` and `residual_out` are `None`. `out` may be `x` and `residual_out` may be "
        "`residual` (in place)."),
    "layer_norm": KernelContract(
        ("x_NH", "weight_H", "bias_H | None", "out_NH"), ("out_NH",), _IGNORED.format("out_NH"),
        "biased variance; `out` may be `x`."),
    "rotary_embedding": KernelContract(
        ("positions_T", "q_THqD", "k_THkvD", "cos_sin_cache_PR", "q_out_THqD", "k_out_THkvD"),
        ("q_out_THqD", "k_out_THkvD"), "`None` (ignored)",
        "`cos_sin_cache_PR` is float32, cos in the first R/2 columns and sin in the second; dims past R are "
        "copied through. `q_out` may be `q` and `k_out` may be `k`; `q` may be a strided view of a fused qkv."),
    "silu_and_mul": KernelContract(
        ("x_N2d", "out_Nd"), ("out_Nd",), _IGNORED.format("out_Nd"), "`out = silu(x[:, :d]) * x[:, d:]`."),
    "gelu_and_mul": KernelContract(
        ("x_N2d", "out_Nd"), ("out_Nd",), _IGNORED.format("out_Nd"),
        "`out = gelu(x[:, :d]) * x[:, d:]`, erf or tanh gelu per `spec.approximate`."),
    "scaled_gemm": KernelContract(
        ("xq_MK", "x_scale", "x_zero | None", "wq_NK", "w_scale", "prepared | None", "bias_N | None", "out_MN"),
        ("out_MN",), _IGNORED.format("out_MN"),
        "`y = ((xq - x_zero) * x_scale) @ (wq * w_scale).T + b`, scales float32 in the granularity's shape "
        "(`x_scale` [1], [M, 1] or [M, ceil(K/B)]; `w_scale` [1], [N, 1] or [ceil(N/B), ceil(K/B)]); `prepared` is "
        "what the kernel's optional `prepare(wq_NK, w_scale)` returned once at build (`ScaledGemm.prepare`)."),
    "quantize_activation": KernelContract(
        ("x_MK", "q_out_MK", "scale_out", "zero_out | None"), ("q_out_MK", "scale_out", "zero_out"),
        "`None` (ignored)",
        "writes the quantized values, the float32 scales ([1], [M, 1] or [M, ceil(K/B)]) and, for asymmetric "
        "int8, the int32 zero points, by the rule in `core/scaled_gemm.py`."),
    "weight_only_gemm": KernelContract(
        ("x_MK", "packed", "bias_N | None", "out_MN"), ("out_MN",), _IGNORED.format("out_MN"),
        "`packed` is what the kernel's own `prepare(weight)` returned when the weight was loaded (the canonical "
        "`QuantizedWeight` when the kernel has no `prepare`); `out = x @ dequantize(w).T + b`, float32 "
        "accumulation; the dequantized weight, its scale and offset may be rounded once to `spec.dtype`. "
        "Optional kernel attributes: `prepare(weight: QuantizedWeight) -> packed` (called once per weight by "
        "`WeightOnlyGemm.prepare`, never per call) and `layout: str` (the name of what it returns)."),
}

#: The capability class each op's kernels declare (checked against the built-in backends' kernels by the test).
CAPABILITY_OF: Dict[str, str] = {
    "gemm": "GemmCapability", "grouped_gemm": "GroupedGemmCapability", "attention": "AttentionCapability",
    "reshape_and_cache": "AttentionCapability", "rms_norm": "NormCapability", "layer_norm": "NormCapability",
    "rotary_embedding": "RotaryCapability", "silu_and_mul": "GatedActivationCapability",
    "gelu_and_mul": "GatedActivationCapability", "scaled_gemm": "ScaledGemmCapability",
    "quantize_activation": "QuantizeCapability", "weight_only_gemm": "WeightOnlyGemmCapability",
}

#: For each attention feature: the AttentionSpec change that implies it, as (field, value, text). The renderer
#: builds the spec and checks the feature really appears, so this table cannot drift from AttentionSpec.features.
FEATURE_RULES: Dict[str, Tuple[str, object, str]] = {
    "causal": ("causal", True, "`causal=True` (the default)"),
    "bidirectional": ("causal", False, "`causal=False` (encoders)"),
    "sliding_window": ("sliding_window", 8, "`sliding_window` is not `None`"),
    "soft_cap": ("soft_cap", 30.0, "`soft_cap` is not `None`"),
    "gqa": ("num_kv_heads", 1, "`num_kv_heads != num_heads` (GQA, or MQA with one kv head)"),
    "custom_scale": ("scale", 0.5, "`scale` is not `None` (the default is `1/sqrt(head_size)`)"),
}

#: Meanings of fields whose class docstring has no ``:param`` line (kept here, not invented per run).
EXTRA_MEANINGS: Dict[Tuple[str, str], str] = {
    ("OpCapability", "dtypes"): "input dtypes served (`spec.dtype` must be one of them)",
    ("AttentionMetadata", "num_seqs"): "S, host int",
    ("AttentionMetadata", "num_tokens"): "T (the sum of query lengths), host int",
    ("AttentionMetadata", "max_query_len"): "the longest query length in the batch, host int",
    ("AttentionMetadata", "max_seq_len"): "the longest context in the batch, host int",
    ("AttentionMetadata", "num_padding_slots"): "how many entries of `slot_mapping` are negative, host int",
    ("KernelImpl", "description"): "one line shown by `anyaccel backends` and in reports",
    ("BackendDef", "description"): "one line shown by `anyaccel backends` and in reports",
}


# ------------------------------------------------------------------------------------------------ helpers

def docstring_params(cls: type) -> Dict[str, str]:
    """``{name: meaning}`` from the ``:param a:`` / ``:param a, b:`` lines of ``cls``'s own docstring."""
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    out: Dict[str, str] = {}
    for chunk in re.split(r"(?::param\s+)", doc)[1:]:
        names, _, text = chunk.partition(":")
        text = re.split(r"\n\s*\n|\n\s*\.\. ", text)[0]            # up to a blank line or a directive
        text = " ".join(text.split()).rstrip(";").strip()
        for name in names.split(","):
            out[name.strip()] = text
    return out


def _meaning(cls: type, name: str) -> str:
    for klass in cls.__mro__:
        if name in docstring_params(klass):
            return _rst(docstring_params(klass)[name])
        if (klass.__name__, name) in EXTRA_MEANINGS:
            return EXTRA_MEANINGS[(klass.__name__, name)]
    return ""


def _fmt_value(v: object) -> str:
    import torch

    from anyaccel.core.validation import dtype_name

    if isinstance(v, torch.dtype):
        return dtype_name(v)
    if isinstance(v, (frozenset, set)):
        return "{" + ", ".join(sorted(_fmt_value(x) for x in v)) + "}" if v else "frozenset()"
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return f"{type(v).__name__}()" if v == type(v)() else repr(v)
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    if callable(v):
        return getattr(v, "__name__", repr(v))
    return repr(v)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{_fmt_value(f.default)}`"
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f"`{_fmt_value(f.default_factory())}`"  # type: ignore[misc]
    return "required" + (" (keyword-only)" if f.kw_only is True else "")


def _type(f: dataclasses.Field) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return t.replace("torch.dtype", "dtype").replace("torch.Tensor", "Tensor").replace("|", "\\|")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def dataclass_rows(cls: type) -> List[Tuple[str, str, str, str]]:
    """(field, type, default, meaning) of every dataclass field of ``cls``, in declaration order."""
    return [(f.name, _type(f), _default(f), _meaning(cls, f.name)) for f in dataclasses.fields(cls)
            if not f.name.startswith("_")]


def _table(cls: type, lines: List[str]) -> None:
    lines += ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, typ, default, meaning in dataclass_rows(cls):
        lines.append(f"| `{name}` | `{typ}` | {default} | {_cell(meaning)} |")


def _first_line(obj: object) -> str:
    return _cell(_rst(" ".join(inspect.cleandoc(obj.__doc__ or "").split("\n\n")[0].split())))


def _rst(text: str) -> str:
    """Docstring markup to Markdown: ``x`` -> `x`, :class:`~a.b.C` -> `C`."""
    text = re.sub(r":(?:class|data|func|meth|attr|mod):", "", text).replace("``", "`")
    return re.sub(r"`~(?:\w+\.)+(\w+)`", r"`\1`", text)


def _transport_calls() -> Dict[str, List[str]]:
    """``{Communicator._t_X: [torch.distributed functions it calls]}``, read from the methods' source."""
    from anyaccel.core.collectives import Communicator

    out = {}
    for name, fn in inspect.getmembers(Communicator, inspect.isfunction):
        if name.startswith("_t_"):
            src = inspect.getsource(fn)
            calls = re.findall(r"(?:dist\(\)|dist)\.(\w+)\(|getattr\(dist, \"(\w+)\"", src)
            names = [a or b for a, b in calls]
            names += re.findall(r"or dist\.(\w+)", src)
            out[name[3:]] = sorted({n for n in names if n not in ("get_global_rank",)})
    return out


# ------------------------------------------------------------------------------------------------ render

def render() -> str:
    """The whole of docs/op-reference.md, as a string."""
    import anyaccel.core as core
    from anyaccel.conformance import runner
    from anyaccel.core import attention, collectives, fused, gemm

    missing = sorted(set(core.OPS) - set(KERNELS)) + sorted(set(core.OPS) - set(CAPABILITY_OF))
    if missing:
        raise SystemExit(f"gen_reference: op(s) {missing} have no entry in KERNELS / CAPABILITY_OF; add them")
    stale = sorted((set(KERNELS) | set(CAPABILITY_OF)) - set(core.OPS))
    if stale:
        raise SystemExit(f"gen_reference: KERNELS / CAPABILITY_OF name op(s) {stale} that core.OPS lacks")

    L: List[str] = [
        "# Op reference (generated)",
        "",
        "<!-- Generated by `python docs/gen_reference.py` from the code; do not edit by hand. "
        "tests/docs/test_op_reference.py fails when this file and the code disagree. -->",
        "",
        "The tables a backend author needs, read from the code they describe. The prose contract of each op "
        "(what it computes, the attention semantics) is in [op-contracts.md](op-contracts.md); the steps from an "
        "empty folder to a report are in [writing-a-backend.md](writing-a-backend.md).",
        "",
        "Shape suffixes: M/N/K GEMM rows/out/in features, E experts, T tokens of a batch (packed), S sequences, "
        "Hq query heads, Hkv (or Hkv in `THkvD`) kv heads, D head size, N rows, H hidden size, P positions of the "
        "cos/sin cache, R rotary dim, d half the width of a gated activation's input. `THD` is `[T, H, D]`.",
        "",
        "## Op ids",
        "",
        "Every value `KernelImpl(op=...)` accepts (`anyaccel.core.OPS`). A kernel for any other name is never "
        "selected. `Op.build(spec, backend)` validates the spec, asks each kernel's capability, and builds the "
        "winner once.",
        "",
        "| op id | op class | spec | capability | core file |",
        "|---|---|---|---|---|",
    ]
    for op_id, cls in core.OPS.items():
        L.append(f"| `{op_id}` | `{cls.__name__}` | `{cls.spec_type.__name__}` | `{CAPABILITY_OF[op_id]}` | "
                 f"`core/{cls.__module__.rsplit('.', 1)[-1]}.py` |")

    L += ["", "## Kernel call contracts", "",
          "`KernelImpl.build(spec)` is called once, when a layer is built, and returns the kernel: a plain "
          "callable that the op calls with **positional** arguments, after the core has validated every one of "
          "them (shapes, dtypes, devices, values that need no device sync). Every output is preallocated by the "
          "core (the conformance suite fills outputs with NaN first, so an element left unwritten fails), and a "
          "kernel must write all of it. A kernel does not validate.", ""]
    for op_id, cls in core.OPS.items():
        k = KERNELS[op_id]
        L += [f"### `{op_id}`", "",
              f"- op call: `{op_id}{_call_signature(cls.__call__)}` - {_first_line(cls)}",
              f"- kernel: `{k.signature()}`",
              f"- writes: {', '.join(f'`{o}`' for o in k.outputs)}",
              f"- returns: {k.returns}"]
        if k.notes:
            L.append(f"- {k.notes}")
        L.append("")

    L += ["## Specs", "",
          "What `build(spec)` receives and what `capability.not_supported_reasons(spec)` judges: a frozen "
          "dataclass per op, known when a layer is built.", ""]
    seen = set()
    for cls in core.OPS.values():
        spec = cls.spec_type
        if spec in seen:
            continue
        seen.add(spec)
        users = ", ".join(f"`{o}`" for o, c in core.OPS.items() if c.spec_type is spec)
        L += [f"### `{spec.__name__}` ({users})", "", _first_line(spec), ""]
        _table(spec, L)
        L.append("")

    L += ["## Capabilities", "",
          "A kernel declares what it serves as one of these frozen dataclasses (subclass one to add a limit and "
          "extend `not_supported_reasons`). Every field has a default that claims the broadest support, so a "
          "capability states only its limits. `not_supported_reasons(spec)` returns one sentence per unmet "
          "requirement; an empty list means supported.", ""]
    caps = []
    for name in dict.fromkeys(["OpCapability", *CAPABILITY_OF.values()]):
        caps.append(getattr(core, name))
    for cap in caps:
        ops = [o for o, c in CAPABILITY_OF.items() if c == cap.__name__]
        used = f" (ops: {', '.join(f'`{o}`' for o in ops)})" if ops else " (the base of every capability)"
        L += [f"### `{cap.__name__}`{used}", ""]
        _table(cap, L)
        L.append("")

    L += ["## Attention features", "",
          "`AttentionSpec.features` names what a layer needs; `AttentionCapability.features` declares the subset "
          "a kernel serves (`anyaccel.core.ATTENTION_FEATURES`).", "",
          "| feature | the spec needs it when |", "|---|---|"]
    for feat in sorted(attention.ATTENTION_FEATURES):
        rule = FEATURE_RULES.get(feat)
        if rule is None:
            raise SystemExit(f"gen_reference: attention feature {feat!r} has no rule in FEATURE_RULES; add one")
        field, value, text = rule
        spec = dataclasses.replace(attention.AttentionSpec(num_heads=4, num_kv_heads=4, head_size=64),
                                   **{field: value})
        if feat not in spec.features:
            raise SystemExit(f"gen_reference: FEATURE_RULES says {field}={value!r} implies {feat!r}, but "
                             f"AttentionSpec.features gives {sorted(spec.features)}")
        L.append(f"| `{feat}` | {text} |")

    L += ["", "## Attention batch metadata (`AttentionMetadata`)", "",
          _first_line(attention.AttentionMetadata) + " Built once per batch by `AttentionMetadata.build("
          "query_start_loc, seq_lens, block_table, block_size, slot_mapping=None)`, which validates values too; "
          "a kernel reads the host fields instead of syncing with the device.", ""]
    L += ["| field | type | host or device | meaning |", "|---|---|---|---|"]
    for name, typ, _, meaning in dataclass_rows(attention.AttentionMetadata):
        where = "device tensor" if "Tensor" in typ else "host"
        L.append(f"| `{name}` | `{typ}` | {where} | {_cell(meaning)} |")
    host_copies = [f.name for f in dataclasses.fields(attention.AttentionMetadata) if f.name.endswith("_host")]
    L += ["", f"Host copies of the device index tensors: {', '.join(f'`{h}`' for h in host_copies)}. "
          "Properties: `device` (where the tensors live), `is_pure_decode` (every sequence has one new token).",
          "", "KV cache layouts (`anyaccel.core.KV_LAYOUTS`, declared by `BackendDef.kv_cache_layout`; each of "
          "`k_cache` and `v_cache` has this shape): " + "; ".join(
              f"`{lay}` = `[{_layout_dims(lay)}]`" for lay in core.KV_LAYOUTS) + ".", ""]

    L += ["## What a plugin returns", "", "### `BackendDef` (from `anyaccel_backends(ctx)`)", "",
          _first_line(core.BackendDef), ""]
    _table(core.BackendDef, L)
    L += ["", "### `KernelImpl` (from `anyaccel_kernels(ctx)`)", "", _first_line(core.KernelImpl), ""]
    _table(core.KernelImpl, L)

    L += ["", "## Collectives", "",
          "A backend provides collectives by naming a `torch.distributed` backend in "
          "`BackendDef.distributed_backend`; the core's `Communicator` wraps the process group, validates every "
          "call, and probes the transport once (results in `CollectiveCapability`). The methods every backend "
          "gets, with the same semantics:", "",
          "| method | signature |", "|---|---|"]
    comm = collectives.Communicator
    for name in ("init", "all_reduce", "all_gather", "reduce_scatter", "broadcast", "send", "recv", "all_to_all",
                 "barrier"):
        L.append(f"| `{name}` | `{name}{_call_signature(getattr(comm, name))}` |")
    L += ["", "The `torch.distributed` calls the transport must serve (a missing (collective, dtype) is routed "
          "through a wider dtype or the tensor's bytes, and recorded):", "",
          "| Communicator primitive | torch.distributed function(s) used |", "|---|---|"]
    for prim, calls in sorted(_transport_calls().items()):
        L.append(f"| `{prim}` | {' or '.join(f'`{c}`' for c in calls)} |")
    L += ["", f"Reductions (`REDUCE_OPS`): {', '.join(f'`{r}`' for r in collectives.REDUCE_OPS)}. "
          f"Dtypes (`COLLECTIVE_DTYPES`): {', '.join(_fmt_value(d) for d in collectives.COLLECTIVE_DTYPES)}. "
          f"Probed per floating dtype (`PROBE_KINDS`): {', '.join(f'`{p}`' for p in collectives.PROBE_KINDS)}.",
          "", "### `CollectiveCapability` (measured, not declared)", ""]
    _table(collectives.CollectiveCapability, L)

    L += ["", "## Conformance families", "",
          "The names `anyaccel conformance --family NAME` (and `pytest --pyargs anyaccel.conformance "
          "--anyaccel-family NAME`) accept (`anyaccel.conformance.runner.families()`):", "",
          "| family | what it runs |", "|---|---|"]
    for fam in runner.families():
        L.append(f"| `{fam}` | {_family_text(fam, runner)} |")
    L += ["", f"Dtype spellings accepted by `--dtype`: {', '.join(f'`{d}`' for d in runner.DTYPE_ALIASES)}. "
          f"Defaults: every family, dtypes {', '.join(_fmt_value(d) for d in runner.DEFAULT_DTYPES)}, "
          f"`--examples {runner.DEFAULT_EXAMPLES}` hypothesis-drawn cases per family and dtype.", ""]
    return "\n".join(L)


def _layout_dims(layout: str) -> str:
    """``"B, P, Hkv, D"``-style dims of a cache in ``layout``, read from ``kv_cache_shape`` with distinct sizes."""
    from anyaccel.core.attention import AttentionSpec, kv_cache_shape

    names = {1: "B", 2: "P", 3: "Hkv", 4: "D"}
    spec = AttentionSpec(num_heads=3, num_kv_heads=3, head_size=4, block_size=2, kv_layout=layout)
    return ", ".join(names[n] for n in kv_cache_shape(spec, 1))


def _call_signature(fn: object) -> str:
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name not in ("self", "cls")]
    parts = []
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        elif p.kind is p.KEYWORD_ONLY and "*" not in parts:
            parts += ["*", p.name + (f"={p.default!r}" if p.default is not p.empty else "")]
        else:
            parts.append(p.name + (f"={p.default!r}" if p.default is not p.empty else ""))
    ret = sig.return_annotation
    ret = "" if ret is sig.empty else f" -> {ret}"
    return f"({', '.join(parts)}){ret}".replace("torch.Tensor", "Tensor").replace("|", "\\|")


def _family_text(fam: str, runner) -> str:
    if fam == runner.COLLECTIVES:
        return "every Communicator collective over two processes (the backend's `distributed_backend`)"
    if fam == runner.MODELS:
        return "every registered model family (tiny configs) against Hugging Face transformers; `--model` narrows"
    try:
        mod = importlib.import_module(f"anyaccel.conformance.ops.{fam}")
    except Exception as e:  # a broken family module is reported by the runner too
        return f"(module does not import: {type(e).__name__})"
    return _first_line(mod)


def main(argv: Sequence[str] = ()) -> int:
    text = render()
    if "--check" in argv:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run `python docs/gen_reference.py`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
