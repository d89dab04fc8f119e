"""The OpenAI-compatible HTTP server: translates HTTP to engine calls and nothing more."""
from __future__ import annotations

import contextlib
import hmac
import json
import logging
import signal
import time
import uuid
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from paraserve.config import ServerConfig
from paraserve.engine.async_engine import AsyncLLM
from paraserve.server.errors import APIError, error_response
from paraserve.server.metrics import Metrics
from paraserve.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                       TokenizeRequest)
from paraserve.server.serving import Serving

logger = logging.getLogger("paraserve")


def build_app(engine: AsyncLLM, config: ServerConfig) -> FastAPI:
    sched = engine.engine.config.scheduler
    metrics = Metrics(engine, engine.model_name)
    serving = Serving(engine, metrics, engine.model_name, sched.max_num_seqs + config.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="paraserve", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if config.api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                return error_response(APIError(401, "invalid or missing API key (Authorization: Bearer ...)"))
        return await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return error_response(APIError(400, "the request body is not valid JSON"))
        msg = err.get("msg", "invalid request")
        if len(exc.errors()) > 1 and loc:  # a union field: no branch matched
            msg = f"invalid value ({msg.lower()}, or another accepted type)"
        return error_response(APIError(400, f"{loc[0] if loc else 'body'}: {msg}", loc[0] if loc else None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("internal error")
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @app.get("/health")
    async def health():
        if engine.dead is not None:
            return error_response(APIError(503, "the engine has stopped"))
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": engine.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "paraserve", "max_model_len": engine.max_model_len}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if not req.stream:
            return JSONResponse(await serving.completion(req))
        base_id = f"cmpl-{uuid.uuid4().hex}"
        jobs = serving.completion_jobs(req, base_id)
        return _sse_response(serving.completion_stream(req, jobs, base_id))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest):
        if not req.stream:
            return JSONResponse(await serving.chat(req))
        base_id = f"chatcmpl-{uuid.uuid4().hex}"
        job = serving.chat_job(req, base_id)
        return _sse_response(serving.chat_stream(req, job, base_id))

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        tok = engine.tokenizer
        if req.messages is not None:
            ids = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages],
                                          add_generation_prompt=req.add_generation_prompt,
                                          tokenize=True, return_dict=False)
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        elif req.prompt is not None:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise APIError(400, "give either prompt or messages", "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        vocab = engine.engine.hf_config.vocab_size
        if any(t < 0 or t >= vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": engine.tokenizer.decode(req.tokens)}

    return app


def _sse_response(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def run_server(engine: AsyncLLM, config: ServerConfig) -> int:
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process dies
            # by the signal; a shutdown that was asked for and completed is a clean exit (0)
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    import socket

    app = build_app(engine, config)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))  # port 0: an ephemeral port, printed below
    except OSError as e:
        raise ValueError(f"cannot listen on {config.host}:{config.port}: {e.strerror}") from None
    sock.listen(2048)
    port = sock.getsockname()[1]
    url = f"http://{config.host}:{port}"
    cap = engine.engine.capacity_tokens
    auth = f' -H "Authorization: Bearer {config.api_key}"' if config.api_key else ""
    body = json.dumps({"model": engine.model_name, "messages": [{"role": "user", "content": "Hello!"}]})
    print(f"paraserve serving {engine.model_name} at {url}  (KV cache: {cap} tokens, "
          f"context {engine.max_model_len})\n"
          f"  try: curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'",
          flush=True)
    server = _Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                           timeout_graceful_shutdown=config.graceful_timeout))
    server.run(sockets=[sock])
    return 0
