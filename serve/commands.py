"""What ``anyaccel serve``, ``chat`` and ``embed`` do; ``cli.py`` wires them into its parser.

Each command builds one :class:`~anyaccel.serve.llm.LLM` from ``MODEL`` (a real checkpoint name such as
``smollm2``/``minilm``, an HF directory, a ``.gguf`` file, or a built-in tiny model's name, which has no tokenizer)
on ``--backend`` (default: :func:`~anyaccel.serve.llm.choose_backend`'s rule).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, TextIO

from ..models.cli_support import add_max_new_tokens_argument
from .llm import DEFAULT_PREFILL_WHILE_DECODING, LLM, SamplingParams

__all__ = ["add_model_arguments", "add_serve_arguments", "add_chat_arguments", "add_embed_arguments",
           "load_llm", "serve_main", "chat_main", "chat_loop", "embed_main"]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="smollm2, minilm, an HF-format directory, a .gguf file, or a built-in tiny model")
    p.add_argument("--backend", help="backend name (default: the first available accelerator, else the first "
                                     "available backend)")
    p.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    p.add_argument("--kv-cache-mib", dest="kv_cache_mib", type=int, default=256,
                   help="KV-cache memory in MiB (default 256)")
    p.add_argument("--max-num-seqs", dest="max_num_seqs", type=int, default=16,
                   help="sequences decoded together at most (default 16)")
    p.add_argument("--max-num-batched-tokens", dest="max_num_batched_tokens", type=int, default=512,
                   help="tokens per engine step at most; longer prompts are prefilled in chunks (default 512)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="turn prefix caching off (on by default: the KV of prompt prefixes already computed is reused)")
    p.add_argument("--max-prefill-tokens-while-decoding", dest="max_prefill_tokens_while_decoding", type=int,
                   default=DEFAULT_PREFILL_WHILE_DECODING,
                   help="prompt tokens per engine step while other requests decode; bounds the inter-token latency "
                        f"tail under load (default {DEFAULT_PREFILL_WHILE_DECODING}; 0: no cap)")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1, metavar="N",
                   help="shard the model over N processes started by torchrun (torchrun --nproc-per-node N -m "
                        "anyaccel serve MODEL --tp N); rank 0 serves HTTP, the other ranks follow its steps")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", dest="api_key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--embed-model", dest="embed_model", help="also serve this encoder on /v1/embeddings")
    p.add_argument("--served-name", dest="served_name", help="the model id clients send (default: MODEL)")
    p.add_argument("--max-queue", dest="max_queue", type=int, default=64,
                   help="requests allowed to wait; beyond, HTTP 429 (default 64)")
    p.add_argument("--shutdown-timeout", dest="shutdown_timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on shutdown before they are cancelled (default 30)")


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--system", help="a system prompt that opens the conversation")
    add_max_new_tokens_argument(p, 256, " per answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", dest="top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("texts", nargs="+", help="texts to embed")
    p.add_argument("--json", action="store_true", help='print {"model", "dim", "embeddings": [[...], ...]}')


def load_llm(args: argparse.Namespace, builtins: Optional[Mapping[str, Callable[[], Any]]] = None,
             model: Optional[str] = None, name: Optional[str] = None) -> LLM:
    from ..core.errors import InvalidArgumentError

    for key in ("kv_cache_mib", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, key) < 1:
            raise InvalidArgumentError("anyaccel", "--" + key.replace("_", "-"), "an integer >= 1", getattr(args, key))
    cap = getattr(args, "max_prefill_tokens_while_decoding", DEFAULT_PREFILL_WHILE_DECODING)
    if cap < 0:
        raise InvalidArgumentError("anyaccel", "--max-prefill-tokens-while-decoding", "an integer >= 0 (0: no cap)",
                                   cap)
    return LLM(model or args.model, backend=args.backend, dtype=args.dtype, builtins=builtins,
               kv_cache_bytes=args.kv_cache_mib * 1024 * 1024, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, name=name,
               tensor_parallel_size=getattr(args, "tp", 1) if model is None else 1,
               prefix_caching=getattr(args, "prefix_cache", True),
               max_prefill_tokens_while_decoding=cap or None)


def serve_main(args: argparse.Namespace, builtins: Optional[Mapping[str, Callable[[], Any]]] = None) -> int:
    from .app import build_app, serve_forever

    if getattr(args, "tp", 1) != 1 and args.embed_model:
        from ..core.errors import InvalidArgumentError

        raise InvalidArgumentError("anyaccel serve", "--embed-model", "no embedding model with --tp (encoders have "
                                   "no tensor-parallel plan)", args.embed_model)
    llm = load_llm(args, builtins, name=args.served_name)
    if llm.comm is not None:
        return _serve_tensor_parallel(llm, args)
    embed = load_llm(args, builtins, model=args.embed_model) if args.embed_model else None
    app = build_app(llm, embed_llm=embed, api_key=args.api_key, max_queue=args.max_queue,
                    shutdown_grace_s=args.shutdown_timeout)
    kind = "generation" if llm.is_causal else "embeddings"
    print(f"anyaccel: serving '{llm.name}' ({kind}) on backend '{llm.backend.name}' at "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    serve_forever(app, args.host, args.port, args.shutdown_timeout)
    return 0


def _serve_tensor_parallel(llm: LLM, args: argparse.Namespace) -> int:
    """Rank 0 serves HTTP through a :class:`~anyaccel.models.parallel.MirroredEngine`; the others follow it."""
    from ..models.parallel import MirroredEngine
    from .app import build_app, serve_forever

    mirror = MirroredEngine(llm.engine, llm.comm)
    llm.engine = mirror
    try:
        if llm.comm.rank != 0:
            mirror.follow()
            llm.comm.barrier()
            return 0
        app = build_app(llm, api_key=args.api_key, max_queue=args.max_queue, shutdown_grace_s=args.shutdown_timeout)
        print(f"anyaccel: serving '{llm.name}' (generation, tensor parallel over {llm.comm.world_size} ranks) on "
              f"backend '{llm.backend.name}' at http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        try:
            serve_forever(app, args.host, args.port, args.shutdown_timeout)
        finally:
            mirror.stop()
        llm.comm.barrier()  # the followers are out of their loop before the group goes
        return 0
    finally:
        llm.comm.destroy()


def chat_loop(llm: LLM, params: SamplingParams, system: Optional[str] = None,
              read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> List[Dict[str, str]]:
    """The interactive conversation: each line is a user turn, the answer streams as it is generated, and the
    whole history goes back through the chat template each turn. ``/reset`` clears the history (keeps the system
    prompt), ``/exit`` or end of input ends. Returns the history."""
    history: List[Dict[str, str]] = [{"role": "system", "content": system}] if system else []
    base = list(history)
    while True:
        try:
            line = read("> ")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(base)
            print("(history cleared)", file=out, flush=True)
            continue
        history.append({"role": "user", "content": text})
        answer, reason = [], None
        for d in llm.chat_stream(history, params):
            out.write(d.text)
            out.flush()
            answer.append(d.text)
            reason = d.finish_reason or reason
        out.write("\n")
        if reason == "length":
            print(f"(stopped at the {params.max_new_tokens}-token budget; raise --max-new-tokens)", file=out)
        out.flush()
        history.append({"role": "assistant", "content": "".join(answer)})
    return history


def chat_main(args: argparse.Namespace, builtins: Optional[Mapping[str, Callable[[], Any]]] = None) -> int:
    llm = load_llm(args, builtins)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    llm.apply_chat_template([{"role": "user", "content": "check"}])  # no tokenizer or template: fail before input
    if sys.stdin.isatty():
        print(f"chatting with '{llm.name}' on '{llm.backend.name}' (/reset clears the history, /exit or Ctrl-D "
              f"ends)", file=sys.stderr)
    chat_loop(llm, params, args.system, read=input if sys.stdin.isatty() else _read_line)
    return 0


def _read_line(prompt: str) -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


def embed_main(args: argparse.Namespace, builtins: Optional[Mapping[str, Callable[[], Any]]] = None) -> int:
    llm = load_llm(args, builtins)
    embs = llm.embed(list(args.texts))
    if args.json:
        print(json.dumps({"model": llm.name, "dim": int(embs.shape[1]), "embeddings": embs.tolist()}))
        return 0
    print(f"{len(args.texts)} embedding(s) of dimension {embs.shape[1]} (mean pooling, L2-normalised)")
    for t, e in zip(args.texts, embs):
        head = ", ".join(f"{x:+.4f}" for x in e[:4].tolist())
        print(f"  {t[:40]!r}: [{head}, ...]")
    if len(args.texts) > 1:
        sims = (embs @ embs.T).tolist()
        print("cosine similarity:")
        for i, row in enumerate(sims):
            print(f"  [{i}] " + " ".join(f"{x:6.3f}" for x in row))
    return 0
