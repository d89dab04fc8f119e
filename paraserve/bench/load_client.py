"""Concurrent streaming clients over the OpenAI HTTP API (httpx + SSE parsing).

A closed loop: each of `concurrency` clients sends its next request as soon as its previous one
has finished, so at most `concurrency` requests are in flight, as with that many users.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import httpx

from paraserve.bench.report import stats
from paraserve.bench.workload import BenchRequest


@dataclass
class RequestResult:
    prompt_len: int
    ttft_s: Optional[float] = None
    e2e_s: Optional[float] = None
    output_tokens: int = 0
    last_token_s: Optional[float] = None
    error: Optional[str] = None

    @property
    def tpot_s(self) -> Optional[float]:
        """Time per output token after the first (vLLM's definition)."""
        if self.ttft_s is None or self.last_token_s is None or self.output_tokens < 2:
            return None
        return (self.last_token_s - self.ttft_s) / (self.output_tokens - 1)


def completion_body(model: str, r: BenchRequest) -> dict:
    return {"model": model, "prompt": list(r.prompt_ids), "max_tokens": r.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def _one(client: httpx.AsyncClient, model: str, r: BenchRequest) -> RequestResult:
    res = RequestResult(r.prompt_len)
    chunks = 0
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=completion_body(model, r)) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"].get("message", obj["error"]))
                    return res
                if obj.get("choices"):
                    now = time.perf_counter() - t0
                    res.ttft_s = now if res.ttft_s is None else res.ttft_s
                    res.last_token_s = now
                    chunks += 1
                if obj.get("usage"):
                    res.output_tokens = int(obj["usage"]["completion_tokens"])
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e_s = time.perf_counter() - t0
    # the usage chunk counts tokens exactly (one chunk may carry several); chunks are the fallback
    res.output_tokens = res.output_tokens or chunks
    return res


async def _run(url: str, model: str, workload: Sequence[BenchRequest], concurrency: int,
               desc: str, api_key: Optional[str]) -> tuple[list[RequestResult], float]:
    from tqdm import tqdm

    queue: asyncio.Queue[tuple[int, BenchRequest]] = asyncio.Queue()
    for item in enumerate(workload):
        queue.put_nowait(item)
    results: list[Optional[RequestResult]] = [None] * len(workload)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    bar = tqdm(total=len(workload), desc=desc, unit="req", dynamic_ncols=True)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i, r = queue.get_nowait()
            results[i] = await _one(client, model, r)
            bar.update(1)

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None), limits=limits,
                                 headers=auth_headers(api_key)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    bar.close()
    return [r for r in results if r is not None], elapsed


def run_load(url: str, model: str, workload: Sequence[BenchRequest], concurrency: int,
             desc: str = "paraserve", api_key: Optional[str] = None) -> tuple[list[RequestResult], float]:
    """All requests through `concurrency` clients; returns per-request results and wall seconds."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    return asyncio.run(_run(url, model, workload, concurrency, desc, api_key))


def summarize(results: Sequence[RequestResult], elapsed: float) -> dict:
    ok = [r for r in results if r.error is None]
    if not ok:
        raise RuntimeError("every request failed; first error: " + (results[0].error or "?"))
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [t for t in (r.tpot_s for r in ok) if t is not None]
    return {"requests": len(ok), "errors": len(results) - len(ok),
            "first_error": next((r.error for r in results if r.error), None), "elapsed_s": elapsed,
            "output_tokens": out_tokens, "requests_per_s": len(ok) / elapsed,
            "output_tokens_per_s": out_tokens / elapsed,
            "ttft_s": stats([r.ttft_s for r in ok if r.ttft_s is not None]),
            "tpot_s": stats(tpot) if tpot else None,
            "e2e_s": stats([r.e2e_s for r in ok if r.e2e_s is not None])}


def auth_headers(api_key: Optional[str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def served_model(url: str, api_key: Optional[str] = None) -> tuple[str, Optional[int]]:
    """The served model's name (requests must name it) and its context length."""
    r = httpx.get(url + "/v1/models", timeout=10, headers=auth_headers(api_key))
    r.raise_for_status()
    model = r.json()["data"][0]
    return model["id"], model.get("max_model_len")
