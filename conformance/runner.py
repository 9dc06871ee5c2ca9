"""The conformance runner: every (backend, op family, dtype, case) against the float64 reference.

For each backend, family and dtype the runner takes the family's fixed cases plus ``examples`` cases drawn by
hypothesis (seeded and derandomized: the same arguments give the same cases), and for each case:

1. asks the backend's kernels for the op whether any claims support
   (``capability.not_supported_reasons(spec)`` empty);
2. **claimed**: builds the op with ``strict=True``, runs it on NaN-poisoned outputs and compares with the
   reference (:mod:`anyaccel.conformance.tolerances`) -> ``pass`` / ``fail``; an exception is an ``error``;
3. **not claimed**: checks the claim the other way -- a strict build must raise the project's
   :class:`~anyaccel.core.errors.UnsupportedError` (if it does not, the claim and the behaviour disagree:
   ``error``). Then, unless ``strict``, the case runs through the recorded fallback (the core's native
   implementation) and is compared like any other (``fallback=True``, the reasons in ``reason``); in strict mode
   the case is an ``error`` listing the reasons. When not even the fallback can serve it, it is ``unsupported``.

A spec the core itself rejects (``InvalidArgumentError`` at build) is an ``error`` of the case. A family module
that is missing or broken becomes an ``error`` record for that family, never a crash.

The plan has one unit per record wherever it can know the records in advance, so the progress bar and the pytest
plugin count every case: one unit per op case; one per (backend, model, dtype) for models; one per collective
case (the collectives of a backend run once, in worker processes, by
:func:`anyaccel.conformance.collectives.run_collectives`; the first unit runs them and each unit hands out its own
record); and one ``coverage`` unit per backend after its op cases (:mod:`anyaccel.conformance.coverage`: a declared
feature no case took to the backend's own kernel is an ``error``).

Model cases that cannot run here (transformers or a checkpoint package missing) are ``not run`` with the line
that installs what is missing. Under ``strict`` the models are built with strict selection
(``ANYACCEL_STRICT=1`` for the model units, restored after): a model whose ops fall back is an ``error``.

The process exit code rule lives in :attr:`Report.exit_code`: non-zero on any ``fail`` or ``error``, and on any
``not run`` unless the run allows it (``allow_unsupported``).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
import pkgutil
import platform
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from ..core.backend import Backend
from ..core.errors import InvalidArgumentError, UnsupportedError
from ..core.validation import dtype_name
from . import coverage as cov
from .cases import STATUSES, CaseResult, OpCase
from .tolerances import compare, describe_table, tolerance

__all__ = [
    "OP_FAMILIES", "COLLECTIVES", "MODELS", "DEFAULT_DTYPES", "DEFAULT_EXAMPLES", "Report", "PlannedCase", "families",
    "draw_cases", "plan", "run_case", "run", "environment", "DTYPE_ALIASES", "dtype_from_name", "COVERAGE",
    "REFERENCE_INSTALL", "not_loaded", "model_names",
]

#: The op families the suite knows; each is a module ``anyaccel.conformance.ops.<family>``.
OP_FAMILIES = ("gemm", "attention", "fused")
#: The collectives family (``anyaccel.conformance.collectives``), run over a process group.
COLLECTIVES = "collectives"
#: Whole models against Hugging Face transformers (``anyaccel.conformance.models.run_models``).
MODELS = "models"
#: The per-backend unit that turns declared-but-unreached features into errors (not a family of its own).
COVERAGE = "coverage"
#: The line that installs every reference dependency of the model cases.
REFERENCE_INSTALL = "pip install 'anyaccel[reference]'"
DEFAULT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_EXAMPLES = 10
_WORLD_SIZE = 2

Progress = Callable[[int, int, str], None]

#: Dtype spellings accepted on command lines: torch's names plus common aliases.
DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def dtype_from_name(text: str) -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``; raises ValueError naming the accepted spellings."""
    key = text.strip().lower().removeprefix("torch.")
    if key not in DTYPE_ALIASES:
        aliases = ", ".join(k for k in DTYPE_ALIASES if k not in ("float32", "float16", "bfloat16"))
        raise ValueError(f"unknown dtype '{text}'; expected one of float32, float16, bfloat16 (aliases: {aliases})")
    return getattr(torch, DTYPE_ALIASES[key])


def families() -> List[str]:
    """Every family name the runner can run: the known ones, any extra module in ``conformance/ops``, then
    ``collectives`` and ``models``."""
    names = list(OP_FAMILIES)
    from . import ops as ops_pkg

    for info in pkgutil.iter_modules(ops_pkg.__path__):
        if not info.name.startswith("_") and info.name not in names:
            names.append(info.name)
    return names + [COLLECTIVES, MODELS]


# ---------------------------------------------------------------------------------------------------- report


@dataclass
class Report:
    """The result of a run: where it ran, every case's record, which implementations were selected, the coverage
    of declared features, and the plugins that did not make it into the run (``environment["not_loaded"]``)."""

    environment: Dict[str, Any]
    cases: List[CaseResult] = field(default_factory=list)
    selections: List[Dict[str, Any]] = field(default_factory=list)
    coverage: List[cov.CoverageRow] = field(default_factory=list)
    allow_unsupported: bool = False

    @property
    def summary(self) -> Dict[str, Any]:
        counts = {s: 0 for s in STATUSES}
        by_backend: Dict[str, Dict[str, int]] = {}
        fallbacks = 0
        for c in self.cases:
            counts[c.status] = counts.get(c.status, 0) + 1
            b = by_backend.setdefault(c.backend, {s: 0 for s in STATUSES})
            b[c.status] = b.get(c.status, 0) + 1
            fallbacks += bool(c.fallback)
        nl = self.environment.get("not_loaded", {})
        return {"total": len(self.cases), **counts, "fallback": fallbacks, "by_backend": by_backend,
                "coverage_unreached": sum(c.kind == cov.COVERAGE_KIND and c.status == "error" for c in self.cases),
                "unavailable_backends": len(nl.get("unavailable_backends", ())),
                "quarantined_plugins": len(nl.get("quarantined", ())),
                "exit_code": self.exit_code}

    @property
    def exit_code(self) -> int:
        """1 when a case failed or errored, or when a case could not run (``not run``) and the run does not allow
        it; else 0."""
        if any(c.status in ("fail", "error") for c in self.cases):
            return 1
        if not self.allow_unsupported and any(c.status == "not run" for c in self.cases):
            return 1
        return 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def problems(self) -> List[CaseResult]:
        return [c for c in self.cases if c.status in ("fail", "error")]

    def to_json(self) -> Dict[str, Any]:
        from .report import to_json

        return to_json(self)


def not_loaded(registry: Any = None) -> Dict[str, List[Dict[str, str]]]:
    """The plugins that are not part of a run: backends registered but unavailable here (with why) and plugins
    quarantined at discovery (with their error). Read from the plugin registry's public surface."""
    if registry is None:
        try:
            from ..plugins import get_registry

            registry = get_registry()
        except Exception as e:  # discovery itself broke: that is the one thing to report
            return {"unavailable_backends": [], "quarantined": [
                {"name": "(plugin discovery)", "error": _one_line(e), "package": "", "version": ""}]}
    unavailable = [{"name": b.name, "reason": str(b.reason or ""), "package": str(b.package or "")}
                   for b in getattr(registry, "backends", {}).values() if not b.available]
    quarantined = [{"name": str(q.name), "error": str(q.error), "package": str(getattr(q, "package", "") or ""),
                    "version": str(getattr(q, "version", "") or "")} for q in getattr(registry, "quarantined", ())]
    return {"unavailable_backends": unavailable, "quarantined": quarantined}


def environment(backends: Sequence[Backend] = ()) -> Dict[str, Any]:
    """Versions and machine facts a published result needs, plus each backend's provenance and properties."""
    from .. import __version__
    from ..core.version import API_VERSION_STRING

    env: Dict[str, Any] = {
        "anyaccel": __version__,
        "api_version": API_VERSION_STRING,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import hypothesis

        env["hypothesis"] = hypothesis.__version__
    except ImportError:
        env["hypothesis"] = None
    env["backends"] = {b.name: backend_info(b) for b in backends}
    plugins: Dict[str, str] = {}
    for info in env["backends"].values():
        plugins.setdefault(info["package"], info["version"])
        plugins.update({p: v for p, v in info["kernel_providers"].items() if p not in plugins})
    env["plugins"] = plugins
    return env


def _dist_version(package: str) -> str:
    try:
        import importlib.metadata as md

        return md.version(package)
    except Exception:  # a module name or a backend built in a test: not an installed distribution
        return ""


def device_facts(device_type: str) -> Dict[str, Any]:
    """What torch says about the current device of ``device_type`` (name, properties), through the generic device
    module; empty when torch has nothing to say (a host device, a device module without these functions)."""
    facts: Dict[str, Any] = {}
    try:
        mod = torch.get_device_module(device_type)
    except Exception:
        return facts
    for key, fn in (("device_count", "device_count"), ("device_name", "get_device_name"),
                    ("capability", "get_device_capability"), ("device_properties", "get_device_properties")):
        f = getattr(mod, fn, None)
        if f is None:
            continue
        try:
            facts[key] = _jsonable(f())
        except Exception:  # a device module that cannot answer here
            continue
    return facts


def backend_info(b: Backend) -> Dict[str, Any]:
    """A backend's provenance, device, declared kernels and capabilities, and the ops it has no kernel for."""
    from ..core import OPS

    d = b.definition
    kernels: Dict[str, List[Dict[str, Any]]] = {}
    providers: Dict[str, str] = {}
    for op in b.ops:
        kernels[op] = []
        for k in sorted(b.kernels_for(op), key=lambda k: -k.priority):
            try:
                cap = _jsonable(k.capability.describe())
            except Exception as e:  # a capability that cannot describe itself is still reported
                cap = f"describe() raised {_one_line(e)}"
            kernels[op].append({"name": k.name, "provider": k.provider, "priority": k.priority, "capability": cap,
                                "description": k.description})
            if k.provider and k.provider != b.package and k.provider not in providers:
                providers[k.provider] = _dist_version(k.provider)
    device = {"type": d.device_type, **(device_facts(d.device_type) if b.available else {})}
    return {
        "name": b.name, "vendor": d.vendor, "package": b.package, "version": b.version or _dist_version(b.package),
        "api_version": _jsonable(b.api_version), "available": b.available, "reason": b.reason,
        "device_type": d.device_type, "device": device, "kv_cache_layout": d.kv_cache_layout,
        "distributed_backend": d.distributed_backend, "block_sizes": list(d.block_sizes),
        "properties": {k: _jsonable(v) for k, v in dict(b.properties).items()},
        "ops": {op: [k.name for k in b.kernels_for(op)] for op in b.ops},
        "kernels": kernels,
        "kernel_providers": providers,
        "missing_ops": sorted(set(OPS) - set(b.ops)),
    }


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


# ---------------------------------------------------------------------------------------------------- cases


def draw_cases(strategy: Any, n: int, seed: int) -> List[Any]:
    """Draw ``n`` examples from a hypothesis strategy, reproducibly (same strategy and seed -> same examples).

    A ``@given`` function records each drawn example instead of testing it; generation only (no shrinking, no
    example database). Duplicates are kept out by the caller (by case name).
    """
    if n <= 0:
        return []
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    drawn: List[Any] = []

    @hseed(seed)
    @settings(max_examples=n, derandomize=True, database=None, deadline=None, print_blob=False,
              suppress_health_check=list(HealthCheck), phases=(Phase.generate,))
    @given(strategy)
    def record(example: Any) -> None:
        drawn.append(example)

    record()
    return drawn


def _one_line(e: BaseException) -> str:
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    return f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""


def _case_seed(seed: int, family: str, name: str) -> int:
    return zlib.crc32(f"{seed}|{family}|{name}".encode()) & 0x7FFFFFFF


class _Shared:
    """What the units of one plan share: each backend's collectives records (run once, handed out per case), the
    tiny models' references (built once per model), and each backend's op records and coverage rows."""

    def __init__(self) -> None:
        self.collectives: Dict[str, Dict[Tuple[str, str], CaseResult]] = {}
        self.collectives_failed: Dict[str, List[CaseResult]] = {}
        self.collective_keys: Dict[str, List[Tuple[str, str]]] = {}
        self.references: Dict[str, Any] = {}
        self.op_records: Dict[str, List[CaseResult]] = {}
        self.op_units: Dict[str, int] = {}
        self.op_names: Dict[str, List[str]] = {}
        self.coverage: Dict[str, List[cov.CoverageRow]] = {}


@dataclass
class PlannedCase:
    """One unit of work: an op case, a family that could not produce cases, one (model, dtype), one collective
    case, or a backend's coverage check.

    ``run()`` returns the records it produced (one for an op case or a collective case; the checks of a model in
    one dtype). The pytest plugin turns each unit into a test item.
    """

    backend: Backend
    family: str
    dtype: Optional[torch.dtype]
    name: str
    case: Optional[OpCase] = None
    seed: int = 0
    strict: bool = False
    error: str = ""
    dtypes: Tuple[torch.dtype, ...] = ()
    timeout: float = 120.0
    #: processes and torch.distributed backend of the collectives (``None``: the backend's declared one)
    world_size: int = _WORLD_SIZE
    dist_backend: Optional[str] = None
    models: Optional[Tuple[str, ...]] = None
    model: str = ""
    key: Optional[Tuple[str, str]] = None
    shared: Optional[_Shared] = field(default=None, repr=False)
    #: why ``run()`` returned no record (the coverage unit of a partial run); the pytest plugin skips with it
    note: str = ""

    @property
    def id(self) -> str:
        dt = dtype_name(self.dtype) if self.dtype is not None else "all"
        if self.key is not None:
            dt = self.key[1]
        return f"{self.backend.name}-{self.family}-{dt}-{self.name}"

    def run(self) -> List[CaseResult]:
        dt = dtype_name(self.dtype) if self.dtype is not None else "all"
        if self.error:
            kind = {COLLECTIVES: "collective", MODELS: "model"}.get(self.family, "op")
            return [CaseResult(self.backend.name, kind, self.name, dt, "error", reason=self.error, op=self.family)]
        if self.case is not None:
            res = run_case(self.backend, self.case, strict=self.strict, seed=self.seed)
            if self.shared is not None:
                self.shared.op_records.setdefault(self.backend.name, []).append(res)
            return [res]
        if self.family == MODELS:
            if self.model:
                return _run_model_unit(self)
            return _run_models(self.backend, self.dtypes, self.models)
        if self.family == COLLECTIVES:
            if self.key is not None:
                return _run_collective_unit(self)
            return _run_collectives(self.backend, self.dtypes, self.timeout, self.world_size, self.dist_backend)
        if self.family == COVERAGE:
            return _run_coverage_unit(self)
        raise ValueError(f"planned unit {self.id!r} has nothing to run")


def _family_module(family: str) -> Any:
    return importlib.import_module(f"{__package__}.ops.{family}")


def _plan_family(backend: Backend, family: str, dtype: torch.dtype, examples: int, seed: int,
                 strict: bool) -> List[PlannedCase]:
    dt = dtype_name(dtype)

    def err(what: str, e: BaseException) -> List[PlannedCase]:
        return [PlannedCase(backend, family, dtype, f"{family} ({what})", strict=strict,
                            error=f"{what}: {_one_line(e)}{_where(e)}")]

    try:
        mod = _family_module(family)
    except ModuleNotFoundError as e:
        if e.name and (e.name.endswith(f"ops.{family}")):
            return [PlannedCase(backend, family, dtype, f"{family} (family module)", strict=strict,
                                error=f"the conformance module of family '{family}' is missing "
                                      f"(anyaccel.conformance.ops.{family})")]
        return err("import of the family module", e)
    except Exception as e:
        return err("import of the family module", e)
    try:
        cases = list(mod.fixed_cases(backend, dtype))
    except Exception as e:
        return err("fixed_cases()", e)
    drawn: List[OpCase] = []
    broken: List[PlannedCase] = []
    if examples > 0:
        try:
            strategy = mod.case_strategy(backend, dtype)
            drawn = draw_cases(strategy, examples, seed)
        except ImportError as e:
            if getattr(e, "name", "") == "hypothesis":
                broken = []  # no hypothesis installed: fixed cases only (recorded in the environment)
            else:
                broken = err("case_strategy()", e)
        except Exception as e:
            broken = err("case_strategy()", e)
    out: List[PlannedCase] = []
    seen = set()
    for c in [*cases, *drawn]:
        if not isinstance(c, OpCase):
            out.extend(err("a case", TypeError(f"expected OpCase, got {type(c).__name__}")))
            continue
        label = f"{c.op_name}: {c.name}" if c.op_name != family else c.name
        if label in seen:
            continue
        seen.add(label)
        out.append(PlannedCase(backend, family, dtype, c.name, case=c, seed=_case_seed(seed, family, c.name),
                               strict=strict))
    return out + broken


def plan(backends: Sequence[Backend], dtypes: Sequence[torch.dtype] = DEFAULT_DTYPES,
         families: Optional[Sequence[str]] = None, *, examples: int = DEFAULT_EXAMPLES, seed: int = 0,
         strict: bool = False, timeout: float = 120.0, models: Optional[Sequence[str]] = None,
         check_coverage: bool = False, world_size: int = _WORLD_SIZE,
         dist_backend: Optional[str] = None) -> List[PlannedCase]:
    """Every unit of work of a run, in order: per backend, each family's units (op cases per dtype; collective
    cases; (model, dtype) pairs), then, with ``check_coverage``, the backend's coverage unit when an op family
    ran."""
    fams = list(families) if families else families_default()
    shared = _Shared()
    out: List[PlannedCase] = []
    for b in backends:
        mine: List[PlannedCase] = []
        for fam in fams:
            if fam == COLLECTIVES:
                mine.extend(_plan_collectives(b, tuple(dtypes), strict, timeout, shared, world_size, dist_backend))
            elif fam == MODELS:
                mine.extend(_plan_models(b, tuple(dtypes), strict, models, shared))
            else:
                for dt in dtypes:
                    for u in _plan_family(b, fam, dt, examples, seed, strict):
                        u.shared = shared
                        mine.append(u)
        op_units = [u for u in mine if u.case is not None]
        shared.op_units[b.name] = len(op_units)
        shared.op_names[b.name] = list(dict.fromkeys(u.case.op_name for u in op_units))  # type: ignore[union-attr]
        out.extend(mine)
        if op_units and check_coverage:
            out.append(PlannedCase(b, COVERAGE, None, "declared features reached", dtypes=tuple(dtypes),
                                   strict=strict, shared=shared))
    return out


def _plan_collectives(b: Backend, dtypes: Tuple[torch.dtype, ...], strict: bool, timeout: float,
                      shared: _Shared, world_size: int = _WORLD_SIZE,
                      dist_backend: Optional[str] = None) -> List[PlannedCase]:
    """One unit per (collective case, dtype), in the order :func:`run_collectives` reports them."""
    try:
        mod = importlib.import_module(f"{__package__}.collectives")
        cases = list(mod.collective_cases(world_size))
    except Exception as e:  # the whole family as one unit: its record says why
        return [PlannedCase(b, COLLECTIVES, None, COLLECTIVES, dtypes=dtypes, strict=strict, timeout=timeout,
                            world_size=world_size, dist_backend=dist_backend, error=f"import of anyaccel.conformance.collectives failed: {_one_line(e)}")]
    units = []
    for dt in dtypes:
        for c in cases:
            if getattr(c, "dtype_free", False) and dt != dtypes[0]:
                continue
            key = (c.name, "-" if getattr(c, "dtype_free", False) else dtype_name(dt))
            units.append(PlannedCase(b, COLLECTIVES, None, c.name, dtypes=dtypes, strict=strict, timeout=timeout,
                                     world_size=world_size, dist_backend=dist_backend,
                                     key=key, shared=shared))
    shared.collective_keys[b.name] = [u.key for u in units if u.key is not None]
    return units


def _plan_models(b: Backend, dtypes: Tuple[torch.dtype, ...], strict: bool, models: Optional[Sequence[str]],
                 shared: _Shared) -> List[PlannedCase]:
    """One unit per (model, dtype): the built-in tiny families, then the real checkpoints."""
    try:
        names = model_names()
    except Exception as e:
        return [PlannedCase(b, MODELS, None, MODELS, dtypes=dtypes, strict=strict,
                            error=f"import of the model conformance modules failed: {_one_line(e)}")]
    wanted = [m for m in names if models is None or m in models]
    return [PlannedCase(b, MODELS, dt, m, dtypes=(dt,), strict=strict, model=m, shared=shared)
            for m in wanted for dt in dtypes]


def families_default() -> List[str]:
    return families()


def run_case(backend: Backend, case: OpCase, *, strict: bool = False, seed: int = 0) -> CaseResult:
    """Run one op case on ``backend`` and judge it (see the module docstring for the rules)."""
    t0 = time.perf_counter()
    res = CaseResult(backend.name, "op", case.name, dtype_name(case.dtype), "error", op=case.op_name)
    try:
        res.features = cov.case_features(case)  # refined from the inputs once they are made
    except Exception as e:  # a spec the feature rules cannot read is the case's error, not the run's
        res.reason = f"coverage: the case's features are unreadable: {_one_line(e)}"
        return res
    try:
        _judge(backend, case, strict, seed, res)
    except Exception as e:  # the runner never dies on a case
        res.status, res.reason = "error", f"runner: {_one_line(e)}{_where(e)}"
    res.seconds = time.perf_counter() - t0
    return res


def _judge(backend: Backend, case: OpCase, strict: bool, seed: int, res: CaseResult) -> None:
    op_cls, spec = case.op, case.spec
    kernels = backend.kernels_for(op_cls.name)
    verdicts: List[Tuple[str, List[str]]] = []
    for k in kernels:
        try:
            verdicts.append((k.name, list(k.capability.not_supported_reasons(spec))))
        except Exception as e:
            res.status, res.reason = "error", f"{k.name}: not_supported_reasons raised {_one_line(e)}"
            return
    claimed = [name for name, reasons in verdicts if not reasons]
    if claimed:
        try:
            op = op_cls.build(spec, backend, strict=True)
        except InvalidArgumentError as e:
            res.status, res.reason = "error", f"the core rejects this case's spec: {e}"
            return
        except UnsupportedError as e:
            res.status, res.reason = "error", (f"{', '.join(claimed)} claim support, but a strict build "
                                               f"raised: {_one_line(e)}")
            return
        except Exception as e:
            res.status, res.reason = "error", f"build raised {_one_line(e)}{_where(e)}"
            return
        _execute(case, op, backend, seed, res, note="")
        return

    reasons = [f"{name}: {'; '.join(r)}" for name, r in verdicts] or [
        f"backend '{backend.name}' has no kernel for {op_cls.name}"]
    why = " | ".join(reasons)
    # the claim, checked the other way: a strict build must refuse
    try:
        op_strict = op_cls.build(spec, backend, strict=True)
    except InvalidArgumentError as e:
        res.status, res.reason = "error", f"the core rejects this case's spec: {e}"
        return
    except UnsupportedError:
        pass
    except Exception as e:
        res.status, res.reason = "error", (f"declared unsupported ({why}), but a strict build raised "
                                           f"{_one_line(e)} instead of UnsupportedError")
        return
    else:
        chosen = op_strict.selection.chosen if op_strict.selection is not None else "?"
        res.kernel = chosen
        res.status, res.reason = "error", (f"declared unsupported ({why}), but a strict build did not raise "
                                           f"UnsupportedError (it selected {chosen}): the claim and the "
                                           f"behaviour disagree")
        return
    if strict:
        res.status, res.reason = "error", f"strict mode: no kernel of the backend supports this case: {why}"
        return
    try:
        op = op_cls.build(spec, backend, strict=False)
    except UnsupportedError as e:
        res.status, res.reason = "unsupported", f"{why}; no fallback either: {_one_line(e)}"
        return
    except Exception as e:
        res.status, res.reason = "error", f"fallback build raised {_one_line(e)}{_where(e)}"
        return
    _execute(case, op, backend, seed, res, note=f"fallback: {why}")


def _execute(case: OpCase, op: Any, backend: Backend, seed: int, res: CaseResult, note: str) -> None:
    sel = getattr(op, "selection", None)
    if sel is not None:
        res.kernel = sel.chosen
        res.fallback = bool(sel.fallback)
        res.selection = sel.to_json()  # type: ignore[attr-defined]  # carried to the report, not to the JSON
    try:
        inputs = case.make(backend.device, seed)
    except Exception as e:
        res.status, res.reason = "error", f"the case's make() raised {_one_line(e)}{_where(e)}"
        return
    res.features = cov.case_features(case, inputs)
    try:
        outs = case.call(op, inputs)
    except Exception as e:
        res.status, res.reason = "error", f"{res.kernel or 'the op'} raised {_one_line(e)}{_where(e)}"
        return
    try:
        refs = case.reference(inputs)
    except Exception as e:
        res.status, res.reason = "error", f"the reference raised {_one_line(e)}{_where(e)}"
        return
    out_dtype = outs[0].dtype if len(outs) else case.dtype
    atol, rtol = tolerance(case.tolerance_class, out_dtype, case.reduction)
    cmp = compare(outs, refs, atol, rtol)
    res.max_abs_err = cmp.max_abs_err if math.isfinite(cmp.max_abs_err) else float("inf")
    res.tolerance = cmp.tolerance
    res.status = "pass" if cmp.passed else "fail"
    res.reason = "; ".join(x for x in (note, cmp.reason) if x)


def _run_collectives(backend: Backend, dtypes: Sequence[torch.dtype], timeout: float,
                     world_size: int = _WORLD_SIZE, dist_backend: Optional[str] = None) -> List[CaseResult]:
    if not backend.definition.distributed_backend and not dist_backend:
        return [CaseResult(backend.name, "collective", "collectives", "all", "unsupported",
                           reason="the backend declares no distributed_backend", op="collectives")]
    try:
        mod = importlib.import_module(f"{__package__}.collectives")
        run_collectives = mod.run_collectives
    except Exception as e:
        return [CaseResult(backend.name, "collective", "collectives (family module)", "all", "error",
                           reason=f"import of anyaccel.conformance.collectives failed: {_one_line(e)}",
                           op="collectives")]
    t0 = time.perf_counter()
    try:
        extra = {"dist_backend": dist_backend} if dist_backend else {}
        results = list(run_collectives(backend, tuple(dtypes), world_size=world_size, timeout=timeout, **extra))
    except Exception as e:
        return [CaseResult(backend.name, "collective", "collectives", "all", "error",
                           reason=f"run_collectives raised {_one_line(e)}{_where(e)}", op="collectives",
                           seconds=time.perf_counter() - t0)]
    bad = [r for r in results if not isinstance(r, CaseResult)]
    if bad:
        return [CaseResult(backend.name, "collective", "collectives", "all", "error",
                           reason=f"run_collectives returned {type(bad[0]).__name__}, expected CaseResult",
                           op="collectives")]
    if not results:
        return [CaseResult(backend.name, "collective", "collectives", "all", "error",
                           reason="run_collectives returned no result", op="collectives")]
    return results


def model_names() -> List[str]:
    """Every model the ``models`` family knows: the built-in tiny families, then the real checkpoints."""
    from . import models as tiny, real_models

    return list(tiny.TINY_CONFIGS) + list(real_models.REAL_MODEL_NAMES)


def _run_models(backend: Backend, dtypes: Sequence[torch.dtype],
                models: Optional[Sequence[str]] = None) -> List[CaseResult]:
    """The built-in tiny families (``conformance.models``) and the real checkpoints (``conformance.real_models``),
    optionally filtered by name; each source is guarded on its own."""
    results: List[CaseResult] = []
    for module, fn_name in (("models", "run_models"), ("real_models", "run_real_models")):
        def err(reason: str) -> List[CaseResult]:
            return [CaseResult(backend.name, "model", module, "all", "error", reason=reason, op="models")]
        try:
            mod = importlib.import_module(f"{__package__}.{module}")
            fn = getattr(mod, fn_name)
            known = list(mod.TINY_CONFIGS if module == "models" else mod.REAL_MODEL_NAMES)
        except Exception as e:
            results += err(f"import of anyaccel.conformance.{module} failed: {_one_line(e)}")
            continue
        wanted = [m for m in known if models is None or m in models]
        if not wanted:
            continue
        try:
            got = list(fn(backend, tuple(dtypes), models=wanted))
        except Exception as e:
            results += err(f"{fn_name} raised {_one_line(e)}{_where(e)}")
            continue
        if not got or not all(isinstance(r, CaseResult) for r in got):
            results += err(f"{fn_name} returned no CaseResult records")
            continue
        results += got
    return results


def _run_collective_unit(u: PlannedCase) -> List[CaseResult]:
    """This unit's record of its backend's collectives, running them (once per backend) if no unit did yet."""
    sh, name = u.shared, u.backend.name
    assert sh is not None and u.key is not None
    extra: List[CaseResult] = []
    if name not in sh.collectives:
        recs = _run_collectives(u.backend, u.dtypes, u.timeout, u.world_size, u.dist_backend)
        table: Dict[Tuple[str, str], CaseResult] = {}
        rest: List[CaseResult] = []
        for r in recs:
            if (r.name, r.dtype) in table:
                rest.append(r)
            else:
                table[(r.name, r.dtype)] = r
        sh.collectives[name] = table
        sh.collectives_failed[name] = [r for r in table.values() if r.dtype == "all"]
        planned = set(sh.collective_keys.get(name, ()))
        # records the plan did not expect are handed out with the first unit, never dropped
        extra = rest + [r for k, r in table.items() if k[1] != "all" and k not in planned]
    rec = sh.collectives[name].get(u.key)
    if rec is None:
        whole = sh.collectives_failed.get(name, [])
        if whole:  # the family failed (or is unsupported) as a whole: every case says so
            rec = dataclasses.replace(whole[0], name=u.key[0], dtype=u.key[1])
        else:
            rec = CaseResult(name, "collective", u.key[0], u.key[1], "error", op="collectives",
                             reason="run_collectives returned no record for this case")
    return [rec, *extra]


def _reference_missing(modules: Sequence[str]) -> str:
    """One line naming the reference packages that cannot be imported and how to install them ("" when none)."""
    missing = []
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            missing.append(m)
    if not missing:
        return ""
    return (f"reference dependency missing: {', '.join(missing)} cannot be imported (model cases compare against "
            f"it); install it with: {REFERENCE_INSTALL}")


class _StrictEnv:
    """Sets ``ANYACCEL_STRICT`` for a model build (what ``core.dispatch.strict_default`` reads), restores it after."""

    def __init__(self, strict: bool) -> None:
        self.value = "1" if strict else "0"
        self.saved: Optional[str] = None

    def __enter__(self) -> None:
        self.saved = os.environ.get("ANYACCEL_STRICT")
        os.environ["ANYACCEL_STRICT"] = self.value

    def __exit__(self, *exc: Any) -> None:
        if self.saved is None:
            os.environ.pop("ANYACCEL_STRICT", None)
        else:
            os.environ["ANYACCEL_STRICT"] = self.saved


def _strict_models(recs: List[CaseResult], strict: bool) -> List[CaseResult]:
    """Under strict, a model that could not be built without a fallback, or ran ops on one, is an ``error``."""
    if not strict:
        return recs
    for r in recs:
        if r.status == "unsupported" and "StrictModeError" in r.reason:
            r.status, r.reason = "error", f"strict mode: the model needs the core's fallback: {r.reason}"
        elif r.fallback and r.status in ("pass", "fail"):
            native = [k for k in r.kernel.split(",") if k.startswith("native.")]
            r.status, r.reason = "error", (f"strict mode: the model ran ops on the core's fallback "
                                           f"({', '.join(native) or r.kernel}); {r.reason}".rstrip("; "))
    return recs


def _run_model_unit(u: PlannedCase) -> List[CaseResult]:
    """The records of one (backend, model, dtype): ``not run`` when a reference dependency or the checkpoint is
    missing; the model's checks otherwise (strict selection under ``strict``)."""
    from . import models as tiny, real_models
    from ..models import real

    b, m = u.backend, u.model
    assert u.dtype is not None
    dn = dtype_name(u.dtype)

    def one(status: str, reason: str) -> List[CaseResult]:
        return [CaseResult(b.name, "model", f"{m} (every check)", dn, status, reason=reason, op="model")]

    try:
        if m in tiny.TINY_CONFIGS:
            why = _reference_missing(("transformers",))
            if why:
                return one("not run", why)
            sh = u.shared
            hf = sh.references.get(m) if sh is not None else None
            if hf is None:
                try:
                    hf = tiny.make_reference(tiny.TINY_CONFIGS[m], seed=0)
                except ImportError as e:
                    return one("not run", f"the reference cannot be built: {_one_line(e)}; install it with: "
                                          f"{REFERENCE_INSTALL}")
                except Exception as e:
                    return one("error", f"transformers cannot build the reference of {m}: {_one_line(e)}"
                                        f"{_where(e)}")
                if sh is not None:
                    sh.references[m] = hf
            model = None
            if u.strict:  # build with strict selection: a fallback is refused before any check runs
                from ..models import build_model

                try:
                    model = build_model(hf, b, u.dtype, strict=True)
                except UnsupportedError as e:
                    return one("error", f"strict mode: the model needs the core's fallback: {_one_line(e)}")
                except Exception:  # any other build failure is reported by the checks' own build record
                    model = None
            with _StrictEnv(u.strict):
                if model is None:
                    recs = list(tiny.run_model_checks(b, m, u.dtype, hf=hf))
                else:
                    recs = list(tiny.run_model_checks(b, m, u.dtype, hf=hf, model=model))
        else:
            ck = real.locate(m)
            if isinstance(ck, real.Missing):
                return one("not run", f"checkpoint missing: {ck.reason}")
            why = _reference_missing(("transformers", "gguf", "accelerate") if ck.kind == "gguf"
                                     else ("transformers",))
            if why:
                return one("not run", why)
            with _StrictEnv(u.strict):
                recs = list(real_models.run_real_models(b, (u.dtype,), models=[m]))
    except Exception as e:  # the runner never dies on a unit
        return one("error", f"model checks raised {_one_line(e)}{_where(e)}")
    if not recs or not all(isinstance(r, CaseResult) for r in recs):
        return one("error", "the model checks returned no CaseResult records")
    return _strict_models(recs, u.strict)


def _run_coverage_unit(u: PlannedCase) -> List[CaseResult]:
    """The backend's coverage rows (kept for the report) and an ``error`` per declared feature no case reached;
    nothing (with ``note`` saying why) when not every op case of the backend ran (a filtered pytest run)."""
    sh, b = u.shared, u.backend
    assert sh is not None
    recs = sh.op_records.get(b.name, [])
    expected = sh.op_units.get(b.name, 0)
    if len(recs) < expected:
        u.note = (f"coverage of backend '{b.name}' needs all its {expected} op cases; only {len(recs)} ran "
                  f"(a filtered run)")
        return []
    rows = cov.coverage_table(b, recs, u.dtypes, ops=sh.op_names.get(b.name))
    sh.coverage[b.name] = rows
    return cov.coverage_errors(rows)


# ---------------------------------------------------------------------------------------------------- run


def _resolve(backends: Iterable[Union[Backend, str]]) -> List[Backend]:
    out = []
    reg = None
    for b in backends:
        if isinstance(b, str):
            if reg is None:
                from ..plugins import get_registry

                reg = get_registry()
            b = reg.get(b)
        if not b.available:
            raise UnsupportedError(f"backend '{b.name}' is not available here: {b.reason}")
        out.append(b)
    return out


def _selection_table(results: Sequence[CaseResult]) -> List[Dict[str, Any]]:
    table: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
    for r in results:
        sel = getattr(r, "selection", None)
        if not sel:
            continue
        key = (sel["backend"], sel["op"], sel["chosen"])
        row = table.get(key)
        if row is None:
            table[key] = row = {"backend": sel["backend"], "op": sel["op"], "chosen": sel["chosen"],
                                "provider": sel["provider"], "fallback": sel["fallback"], "cases": 0,
                                "example_spec": sel["spec"], "rejected": [
                                    {"name": c["name"], "reasons": list(c["reasons"])}
                                    for c in sel["candidates"] if not c["chosen"] and c["reasons"]]}
        row["cases"] += 1
    return list(table.values())


def run(backends: Iterable[Union[Backend, str]], dtypes: Sequence[torch.dtype] = DEFAULT_DTYPES,
        families: Optional[Sequence[str]] = None, strict: bool = False, examples: int = DEFAULT_EXAMPLES,
        seed: int = 0, progress: Optional[Progress] = None, timeout: float = 120.0,
        models: Optional[Sequence[str]] = None, allow_unsupported: bool = False,
        check_coverage: bool = False, world_size: int = _WORLD_SIZE, dist_backend: Optional[str] = None) -> Report:
    """Run the suite and return the :class:`Report`.

    :param backends: :class:`Backend` objects or names (looked up in the plugin registry); each must be available.
    :param dtypes: the dtypes to test.
    :param families: family names (see :func:`families`); ``None`` means all.
    :param strict: a case no kernel supports is an ``error`` instead of running through the fallback.
    :param examples: hypothesis-drawn cases per (backend, family, dtype), on top of the fixed ones.
    :param seed: seeds the drawing and the inputs; the same seed gives the same run.
    :param progress: ``progress(done, total, label)``, called once with ``done=0`` and after each unit.
    :param timeout: seconds allowed to the collectives of one backend.
    :param models: model names for the ``models`` family (see :func:`model_names`); ``None`` means all.
    :param allow_unsupported: a case that could not run here (``not run``: a reference dependency or a checkpoint
        missing) does not make the exit code non-zero.
    :param world_size: processes the collectives run on (default 2).
    :param dist_backend: the torch.distributed backend the collectives run over, instead of the one each backend
        declares (a vendor testing its registered backend).
    :param check_coverage: a declared feature no case took to the backend's own kernel is an ``error`` record of
        kind ``"coverage"`` (``anyaccel conformance`` and the pytest plugin turn this on). The coverage table is in
        the report either way.
    """
    bs = _resolve(backends)
    dts = tuple(dtypes)
    t0 = time.perf_counter()
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 2:
        raise InvalidArgumentError("conformance", "world_size", "an int >= 2", repr(world_size))
    work = plan(bs, dts, families, examples=examples, seed=seed, strict=strict, timeout=timeout, models=models,
                check_coverage=check_coverage, world_size=world_size, dist_backend=dist_backend)
    env = environment(bs)
    env.update({"world_size": world_size, "dist_backend": dist_backend, "seed": seed, "examples": examples, "strict": strict, "dtypes": [dtype_name(d) for d in dts],
                "families": list(families) if families else families_default(),
                "allow_unsupported": allow_unsupported, "check_coverage": check_coverage, "not_loaded": not_loaded(),
                "tolerances": describe_table()})
    if env.get("hypothesis") is None and examples > 0:
        env["note"] = "hypothesis is not installed: only the fixed cases ran"
    results: List[CaseResult] = []
    total = len(work)
    if progress is not None:
        progress(0, total, "")
    for i, item in enumerate(work):
        results.extend(item.run())
        if progress is not None:
            progress(i + 1, total, item.id)
    env["seconds"] = round(time.perf_counter() - t0, 3)
    shared = next((u.shared for u in work if u.shared is not None), None)
    rows: List[cov.CoverageRow] = []
    for b in bs:
        if shared is not None and b.name in shared.coverage:
            rows += shared.coverage[b.name]
        elif shared is not None and shared.op_names.get(b.name):
            rows += cov.coverage_table(b, shared.op_records.get(b.name, []), dts, ops=shared.op_names[b.name])
    return Report(environment=env, cases=results, selections=_selection_table(results), coverage=rows,
                  allow_unsupported=allow_unsupported)
