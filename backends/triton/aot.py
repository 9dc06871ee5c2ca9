"""Compile, without a GPU, every GPU launch a call would make: a check that the shared kernels build for cuda and
rocm targets from a machine that has neither.

Inside :func:`compile_only`, a GPU (non-interpreted) :class:`~.runtime.Launchable` does not launch: it derives the
signature and constexprs from the launch's arguments (the way the JIT specialises them: an int equal to 1
becomes a constant) and runs ``triton.compile`` for the given target (``GPUTarget("cuda", 90, 32)``,
``GPUTarget("hip", "gfx942", 64)``...) through to the device binary (cubin / hsaco). The outputs are left
unwritten. Used by the tests and by ``scripts/gpu-check.sh``'s offline half.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Tuple

import torch

from . import runtime

__all__ = ["compile_only"]

_TORCH_TO_TRITON = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int32: "i32", torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv", torch.float8_e4m3fnuz: "fp8e4b8",
}


def _compile(fn: Any, target: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], log: List[Any]) -> None:
    import triton
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    jit = fn if isinstance(fn, JITFunction) else JITFunction(fn)
    names = jit.arg_names
    constexpr_names = {p.name for p in jit.params if p.is_constexpr}
    bound = dict(zip(names, args))
    options: Dict[str, Any] = {}
    for k, v in kwargs.items():
        if k in names:
            bound[k] = v
        else:
            options[k] = v
    signature: Dict[str, str] = {}
    constexprs: Dict[str, Any] = {}
    for name in names:
        v = bound[name]
        if name in constexpr_names:
            signature[name] = "constexpr"
            constexprs[name] = v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[v.dtype]
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            if v == 1:                        # the JIT specialises 1 to a constant
                signature[name] = "constexpr"
                constexprs[name] = 1
            else:
                signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            signature[name] = "fp32"
        elif v is None:
            signature[name] = "constexpr"
            constexprs[name] = None
        else:
            raise TypeError(f"{jit.__name__}: cannot type argument {name}={v!r}")
    if target.backend != "hip":
        options = {k: v for k, v in options.items() if k not in ("waves_per_eu", "matrix_instr_nonkdim", "kpack")}
    triton.compile(ASTSource(jit, signature, constexprs), target=target, options=options)
    log.append((jit.__name__, f"{target.backend}:{target.arch}", constexprs))


@contextlib.contextmanager
def compile_only(target: Any) -> Iterator[List[Any]]:
    """Within the block, GPU launches compile for ``target`` instead of running; yields the list of launches
    compiled, as (kernel name, "backend:arch", constexprs)."""
    log: List[Any] = []
    original = runtime.Launchable.__getitem__

    def getitem(self: runtime.Launchable, grid: Any):
        if self.interpret:
            return original(self, grid)
        return lambda *args, **kwargs: _compile(self.fn, target, args, kwargs, log)

    runtime.Launchable.__getitem__ = getitem  # type: ignore[method-assign]
    try:
        yield log
    finally:
        runtime.Launchable.__getitem__ = original  # type: ignore[method-assign]
