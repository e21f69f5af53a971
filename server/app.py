"""The FastAPI application: routes, OpenAI-style errors, API-key check, metrics, and engine start-up.

The HTTP server answers from the first second: /health is 503 until the model is loaded and every step
bucket compiled, then 200. Every error, whatever its cause, leaves as OpenAI's
`{"error": {"message", "type", "param", "code"}}` with a 4xx status where the input is at fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import jaxserve
from jaxserve.async_engine import AsyncEngine, EngineOverloaded, RequestFailed
from jaxserve.engine import LLMEngine
from server import protocol as p
from server.chat import create_chat_completion, render_prompt
from server.completions import create_completion
from server.state import ServerConfig, ServerState, UnknownModel

log = logging.getLogger("jaxserve")

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "BadRequestError",
                413: "BadRequestError", 429: "RateLimitError", 503: "ServiceUnavailableError"}


def error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = p.ErrorResponse(error=p.ErrorInfo(message=message, type=_ERROR_TYPES.get(status, "InternalServerError"),
                                             param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _describe(e: dict) -> str:
    """One validation error: the field, what is wrong, and the value given (shortened)."""
    field = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
    message = f"{field}: {e.get('msg')}"
    if "input" in e and e.get("type") != "missing" and not isinstance(e["input"], (dict, list)):
        given = repr(e["input"])
        message += f" (got {given[:80] + '...' if len(given) > 80 else given})"
    return message


def _start_engine(state: ServerState, config: ServerConfig) -> None:
    """Loads the model and compiles every bucket (minutes on a big model): runs in a thread, not the event loop."""
    try:
        engine = LLMEngine(config.model, dtype=config.dtype, config=config.engine, cluster=config.cluster)
        state.attach(AsyncEngine(engine, config.max_waiting_requests), engine.model.name)
        log.info("serving %s on http://%s:%d/v1 (OpenAI-compatible); health at /health",
                 state.model_name, config.host, config.port)
    except Exception:
        log.exception("could not start the engine")
        state.failed = True


def build_app(config: ServerConfig, state: ServerState | None = None) -> FastAPI:
    """state: an already-started ServerState (tests, embedding); by default the engine starts with the app."""
    state = state or ServerState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is None:
            threading.Thread(target=_start_engine, args=(state, config), name="jaxserve-start", daemon=True).start()
        yield
        state.draining = True
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="jaxserve", version=jaxserve.__version__, lifespan=lifespan,
                  description="OpenAI-compatible LLM serving in JAX")
    app.state.server = state
    app.add_middleware(BodyLimit, limit=config.max_request_bytes)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(Gate, state=state, api_key=config.api_key)  # outermost: every response is counted

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if errors and errors[0].get("type") == "json_invalid":  # the location is a byte offset, not a field
            return error(400, f"the request body is not valid JSON: {errors[0].get('ctx', {}).get('error', '')}"
                         .rstrip(": "))
        loc = [str(x) for x in (errors[0].get("loc", ()) if errors else ()) if x != "body"]
        return error(400, "; ".join(_describe(e) for e in errors[:5]) or "invalid request", ".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        if isinstance(exc, RecursionError):  # only input can nest this deep (JSON parsing, schemas)
            return error(400, "the request is nested too deeply")
        log.exception("unhandled error on %s", request.url.path)
        return error(500, f"internal error: {type(exc).__name__}")


    async def respond(coro):
        """Maps engine and validation exceptions onto HTTP statuses."""
        try:
            result = await coro
        except ValueError as e:  # invalid input, an unknown option, a bad schema or template
            return error(400, str(e))
        except UnknownModel as e:
            return error(404, str(e), "model")
        except EngineOverloaded as e:
            return error(429, str(e), headers={"Retry-After": "1"})
        except RequestFailed as e:
            return error(500, str(e))
        if result is None:  # the client disconnected; nobody reads this
            return Response(status_code=499)
        if isinstance(result, p.BaseModel):
            return JSONResponse(result.model_dump())
        # A client that goes away cancels the streaming task; the cancellation closes the generators down to
        # AsyncEngine.generate, which aborts the request.
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions", response_model=p.ChatCompletion)
    async def chat_completions(req: p.ChatCompletionRequest, request: Request):
        return await respond(create_chat_completion(state, req, request))

    @app.post("/v1/completions", response_model=p.Completion)
    async def completions(req: p.CompletionRequest, request: Request):
        return await respond(create_completion(state, req, request))

    @app.get("/v1/models", response_model=p.ModelList)
    async def models():
        return p.ModelList(data=[p.ModelCard(id=state.model_name, root=config.model or state.model_name,
                                             max_model_len=state.max_model_len)])

    @app.post("/tokenize", response_model=p.TokenizeResponse)
    async def tokenize(req: p.TokenizeRequest):
        def run():  # template rendering and tokenization, on a worker thread
            state.check_model(req.model)
            tokenizer = state.tokenizer
            if req.messages is not None:
                chat = p.ChatCompletionRequest(messages=req.messages, add_generation_prompt=req.add_generation_prompt,
                                               continue_final_message=req.continue_final_message,
                                               chat_template=req.chat_template,
                                               chat_template_kwargs=req.chat_template_kwargs)
                _, ids = render_prompt(state, chat)
            else:
                ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
            return p.TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids,
                                      token_strs=tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs
                                      else None)

        return await respond(asyncio.to_thread(run))

    @app.post("/detokenize", response_model=p.DetokenizeResponse)
    async def detokenize(req: p.DetokenizeRequest):
        def run():
            state.check_model(req.model)
            vocab = state.engine.engine.model.cfg.vocab_size
            if any(not 0 <= t < vocab for t in req.tokens):
                raise ValueError(f"token ids must be in [0, {vocab})")
            return p.DetokenizeResponse(prompt=state.tokenizer.decode(req.tokens))

        return await respond(asyncio.to_thread(run))

    @app.get("/health", response_class=Response, responses={200: {"content": {}, "description": "ready"}})
    async def health():
        if state.ready:
            return Response(status_code=200)
        return error(503, "the engine failed to start" if state.failed else
                     "draining" if state.draining else "loading the model and compiling; not ready yet")

    @app.get("/version")
    async def version():
        return {"version": jaxserve.__version__}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


class Gate:
    """ASGI middleware: the API key and readiness checks of /v1 and the tokenizer routes, and the request counter.
    Pure ASGI, not @app.middleware("http"): Starlette's BaseHTTPMiddleware hands the route a receive channel
    that never reports the client's disconnect, so a non-streaming request whose client left ran to its end."""

    def __init__(self, app, state: ServerState, api_key: str | None):
        self.app = app
        self.state = state
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        refusal = self._refusal(path, dict(scope["headers"]).get(b"authorization", b""))
        if refusal is not None:
            _count(self.state, path, refusal.status_code)
            return await refusal(scope, receive, send)
        status = 500  # if the app fails before it starts a response

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            _count(self.state, path, status)

    def _refusal(self, path: str, given: bytes) -> Response | None:
        if not (path.startswith("/v1") or path in ("/tokenize", "/detokenize")):
            return None
        if self.api_key and not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):  # constant time
            return error(401, "Invalid or missing API key")
        if not self.state.ready:
            status = "draining" if self.state.draining else "loading"
            return error(503, f"the server is {status}; retry later", headers={"Retry-After": "5"})
        return None


class BodyLimit:
    """ASGI middleware: refuses bodies over `limit` bytes with 413, by Content-Length or while streaming in,
    so a huge upload is never held in memory."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            return await error(413, self._message())(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body is larger than the server's limit of {self.limit} bytes (--max-request-bytes)"


def _count(state: ServerState, path: str, status: int) -> None:
    state.metrics.requests.labels(endpoint=path if path in _KNOWN_PATHS else "other", status=str(status)).inc()


_KNOWN_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
                "/version", "/metrics"}
