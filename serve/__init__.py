"""Serving: the Python API (:class:`LLM`), the async engine loop, and the OpenAI-compatible HTTP server.

Sits at the top with the command line: ``cli`` -> ``serve`` -> ``models`` -> ``core``. Nothing below imports it,
and it never imports a backend: backends come from the plugin registry. The HTTP pieces (FastAPI, uvicorn,
prometheus-client) are the optional extra ``anyaccel[serve]`` and are imported only by :mod:`.app`.
"""
from .llm import LLM, CompletionOutput, RequestMetrics, RequestOutput, SamplingParams, StreamDelta, choose_backend

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics", "StreamDelta",
           "choose_backend"]
