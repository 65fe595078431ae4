"""The front door: OpenAI-compatible HTTP and the same operations for Python handles.

Validation happens here, before any generation, so bad input costs no engine time and gets a 4xx
with a message saying what is wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any, TypeVar

import ray
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from redis.exceptions import RedisError
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatMessage,
)
from vllm.entrypoints.openai.engine.protocol import (
    DeltaMessage,
    PromptTokenUsageInfo,
    UsageInfo,
)
from vllm.v1.engine.exceptions import EngineDeadError

from deployments.access import (
    ADMIN_API_KEYS_ENV,
    API_KEYS_ENV,
    ApiKeys,
    check_exposure,
    env_keys,
)
from deployments.api_docs import render_api_docs
from deployments.api_models import (
    MAX_JSON_DEPTH,
    MAX_TOOLS,
    ChatRequest,
    ChatResponse,
    ChatStreamChunk,
    RequestTimings,
    ToolExecutionInfo,
    TraceRequest,
    TraceResponse,
    json_nesting_depth,
)
from deployments.errors import (
    AuthenticationError,
    BenchmarkEndpointsDisabledError,
    EngineUnavailableError,
    InternalServerError,
)
from deployments.metrics import EngineStatsBoard, render_prometheus
from deployments.router import conversation_key
from deployments.router_wait import await_placement
from lamps_core.trace import TraceScript
from lamps_vllm.chat_session import ChatOutcome, ChatPlan, TextDelta, ToolExecution
from lamps_vllm.errors import (
    BodyTooLargeError,
    RequestError,
    ServerBusyError,
    TooManyToolCallsError,
    UnknownApiTypeError,
    UnknownModelError,
    UnknownPolicyVariantError,
    UnsupportedParameterError,
    unknown_variant_message,
)
from lamps_vllm.trace_replay import check_fits
from tool_workers.simulated_api import SIMULATED_API_TYPES, SimulatedApi
from tool_workers.stats import StatsUnavailableError, ToolCallCounts, ToolStatsStore

try:
    from vllm.exceptions import VLLMClientError
except ImportError:  # vLLM 0.26 (the GPU machines) has the older name for a client's fault
    from vllm.exceptions import VLLMValidationError as VLLMClientError  # type: ignore[assignment]

logger = logging.getLogger(__name__)

# The schema and docs pages are routes of ours (below), behind the API key like every route.
app = FastAPI(
    title="LAMPS",
    description="Serving for tool-augmented LLMs",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)

HEALTH_TIMEOUT_S = 2.0
METRICS_ENGINE_TIMEOUT_S = 1.0
TRACE_ROUTE = "/v1/traces"
REPLAY_OFF = (
    "trace replay is off on this server: it is for benchmarks (set "
    "`enable_benchmark_endpoints: true` in the application's args to turn it on)"
)
ENGINE_LOST = (
    "the engine replica was lost while serving this request; it was not completed (Serve does "
    "not retry it elsewhere): retry it"
)


class IngressSettings(BaseModel):
    served_model_name: str
    max_model_len: int
    default_max_tokens: int = 256
    default_max_tool_calls: int = 4
    max_tool_calls_limit: int = 32
    policy_variants: list[str] = Field(
        default_factory=list, description="Labels a trace request may name as its `policy`."
    )
    max_body_bytes: int = Field(default=1 << 20, ge=1)
    max_in_flight_requests: int = Field(default=256, ge=1)
    max_routing_wait_s: float | None = Field(
        default=None, gt=0, description="Longest wait for an engine replica, then 429."
    )
    api_keys: ApiKeys = Field(
        default_factory=ApiKeys, description="Digests of the config's keys (the env adds more)."
    )
    # On here, as for the tool worker's registry: this model is built by `build_app`, which
    # passes the config's value (AppArgs, off by default), and by tests that put an ingress of
    # their own in front of the suite's engine to replay traces.
    enable_benchmark_endpoints: bool = Field(
        default=True,
        description="Trace replay (/v1/traces, `replay`) and the simulated_api tool; off: "
        "404, `BenchmarkEndpointsDisabledError`, and simulated_api is an unknown tool.",
    )


def _refuse_unsupported(request: ChatRequest) -> None:
    unsupported = {
        "n": request.n not in (None, 1),
        "use_beam_search": bool(request.use_beam_search),
        "logprobs": bool(request.logprobs),
        "response_format": request.response_format is not None
        and getattr(request.response_format, "type", "text") != "text",
        "continue_final_message": bool(request.continue_final_message),
    }
    named = [name for name, bad in unsupported.items() if bad]
    if named:
        raise UnsupportedParameterError(f"not supported by this server: {', '.join(named)}")


def _tool_choice(request: ChatRequest, tools: list[dict[str, Any]]) -> str:
    choice = request.tool_choice
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice in ("required", "auto") and not tools:
            raise RequestError(f"tool_choice={choice!r} needs at least one tool in `tools`")
        return choice
    name = choice.function.name
    if name not in {t["function"]["name"] for t in tools}:
        raise RequestError(f"tool_choice names {name!r}, which is not among the request's tools")
    return name


def _plain_message(message: Any) -> dict[str, Any]:
    """OpenAI message (typed dict or model) -> the plain dict the chat template renders."""
    msg = (
        dict(message)
        if not isinstance(message, BaseModel)
        else message.model_dump(exclude_none=True)
    )
    content = msg.get("content")
    if content is not None and not isinstance(content, str):
        # A list of parts, possibly still pydantic's lazy ValidatorIterator (not picklable).
        parts = [dict(p) for p in content]
        if any(p.get("type") != "text" for p in parts):
            raise UnsupportedParameterError("only text content parts are supported")
        msg["content"] = "".join(p.get("text", "") for p in parts)
    for call in msg.get("tool_calls") or []:
        function = call["function"]
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError:
                raise RequestError("a tool call's arguments are not valid JSON") from None
    return msg


def _execution_info(execution: ToolExecution) -> ToolExecutionInfo:
    result = execution.result
    return ToolExecutionInfo(
        id=execution.call_id,
        name=execution.name,
        arguments=execution.arguments,
        ok=result.ok,
        output=result.output,
        error=result.error,
        duration_s=result.duration_s,
        segment_index=execution.segment_index,
    )


def _timings(plan: ChatPlan, outcome: ChatOutcome) -> RequestTimings:
    return RequestTimings(
        ttft_s=outcome.first_token_time - plan.arrival_time if outcome.first_token_time else None,
        latency_s=time.time() - plan.arrival_time,
        tool_time_s=sum(e.result.duration_s for e in outcome.tool_executions),
        segments=outcome.segments,
    )


def _usage(outcome: ChatOutcome) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        total_tokens=outcome.prompt_tokens + outcome.completion_tokens,
        # What a conversation's next turn reuses of its context (OpenAI's field).
        prompt_tokens_details=PromptTokenUsageInfo(cached_tokens=outcome.cached_tokens),
    )


def _chat_response(plan: ChatPlan, model: str, outcome: ChatOutcome) -> ChatResponse:
    return ChatResponse(
        id=plan.request_id,
        model=model,
        choices=[
            ChatCompletionResponseChoice(
                index=0,
                message=ChatMessage(role="assistant", content=outcome.text),
                finish_reason=outcome.finish_reason,
            )
        ],
        usage=_usage(outcome),
        tool_executions=[_execution_info(e) for e in outcome.tool_executions],
        timings=_timings(plan, outcome),
    )


async def _stream_chunks(plan: ChatPlan, model: str, events: Any) -> AsyncIterator[ChatStreamChunk]:
    def chunk(delta: DeltaMessage, finish: str | None = None, **extra: Any) -> ChatStreamChunk:
        choice = ChatCompletionResponseStreamChoice(index=0, delta=delta, finish_reason=finish)
        return ChatStreamChunk(id=plan.request_id, model=model, choices=[choice], **extra)

    stream = aiter(events)
    # The first event is awaited before anything is sent: an error found when generation starts
    # (a prompt too long for the context) then surfaces on the first chunk, in time for a 4xx.
    event = await anext(stream)
    yield chunk(DeltaMessage(role="assistant", content=""))
    while True:
        if isinstance(event, TextDelta):
            yield chunk(DeltaMessage(content=event.text))
        elif isinstance(event, ToolExecution):
            yield chunk(DeltaMessage(), tool_execution=_execution_info(event))
        elif isinstance(event, ChatOutcome):
            yield chunk(
                DeltaMessage(),
                finish=event.finish_reason,
                usage=_usage(event),
                timings=_timings(plan, event),
            )
        try:
            event = await anext(stream)
        except StopAsyncIteration:
            return


async def _sse(
    first: ChatStreamChunk, rest: AsyncGenerator[ChatStreamChunk, None]
) -> AsyncIterator[str]:
    try:
        yield f"data: {first.model_dump_json(exclude_none=True)}\n\n"
        try:
            async for chunk in rest:
                yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
        except RequestError as exc:  # found mid-stream: the status is sent already
            yield f"data: {json.dumps(_error_body(exc))}\n\n"
        except Exception:
            logger.exception("chat stream failed")
            yield f"data: {json.dumps(_error_body(_INTERNAL))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        # A client gone mid-stream: end the generation now, and give back its admission slot.
        await rest.aclose()


async def _json_body(raw: Request, limit: int) -> Any:
    """The body, parsed; refused (413) as soon as it is known to be over `limit` bytes, before
    it is read in full, let alone parsed or tokenized."""
    declared = raw.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(_too_large(limit))
    body = bytearray()
    async for chunk in raw.stream():  # a chunked body has no length to check up front
        body += chunk
        if len(body) > limit:
            raise BodyTooLargeError(_too_large(limit))
    # Nesting is bounded before the parser sees the body: it recurses once per level.
    depth = json_nesting_depth(bytes(body))
    if depth > MAX_JSON_DEPTH:
        raise RequestError(_too_deep(depth))
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # a backstop: the scan is never below the depth the parser reaches
        raise RequestError(_too_deep(None)) from None


def _too_deep(depth: int | None) -> str:
    levels = f" {depth} levels" if depth is not None else ""
    return (
        f"the request body nests JSON arrays and objects{levels} deep; this server takes at "
        f"most {MAX_JSON_DEPTH}"
    )


def _too_large(limit: int) -> str:
    return f"the request body is over this server's limit of {limit} bytes"


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], data: M | dict[str, Any]) -> M:
    if isinstance(data, model):
        return data
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, not {type(data).__name__}")
    if issubclass(model, ChatRequest) and not isinstance(data.get("messages"), list):
        # vLLM's validators iterate `messages` before pydantic checks its type.
        raise RequestError("invalid request: messages: must be a list of message objects")
    if issubclass(model, ChatRequest) and not data["messages"]:
        raise RequestError("invalid request: messages: at least one message is needed")
    if issubclass(model, ChatRequest):
        # Counted before pydantic builds a model of every entry (thousands of copies of one
        # tool are a cheap body to send); `_requested_tools` checks parsed requests too.
        _check_tools_count(data.get("tools"))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestError(_validation_message(exc)) from None
    except VLLMClientError as exc:  # vLLM's protocol models raise their own from some validators
        raise RequestError(f"invalid request: {exc}") from None
    except (TypeError, AttributeError, KeyError) as exc:
        # vLLM's "before" validators assume shapes that pydantic checks only after them: a
        # field of the wrong type fails there like this. Still the client's input.
        raise RequestError(f"invalid request: a field has the wrong type ({exc})") from None


def _check_tools_count(tools: object) -> None:
    if isinstance(tools, list) and len(tools) > MAX_TOOLS:
        raise RequestError(
            f"invalid request: tools: {len(tools)} entries; this server takes at most {MAX_TOOLS}"
        )


def _validation_message(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        problems.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(problems)


def _error_body(exc: Exception) -> dict[str, Any]:
    status = getattr(exc, "status_code", 400)
    message = exc.message if isinstance(exc, RequestError) else str(exc)
    return {"error": {"message": message, "type": type(exc).__name__, "code": status}}


def _error(exc: Exception) -> JSONResponse:
    headers = None
    if isinstance(exc, ServerBusyError):
        headers = {"Retry-After": str(exc.retry_after_s)}
    elif isinstance(exc, AuthenticationError):
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(
        _error_body(exc), status_code=getattr(exc, "status_code", 400), headers=headers
    )


_INTERNAL = InternalServerError("internal server error (the details are in the server's log)")


def _internal_error() -> JSONResponse:
    """For a bug of ours: logged with its traceback, answered short (never a bare 500)."""
    logger.exception("request failed")
    return _error(_INTERNAL)


@contextlib.contextmanager
def _engine_errors() -> Iterator[None]:
    """A client's error found in the engine replica reaches us wrapped by Ray (its str() is
    Ray's header and traceback): pass the original on, typed and with its short message. The
    engine's own failures become a 503 (it is gone or dead) or a short 500 (a bug)."""
    try:
        yield
    except RayTaskError as exc:
        if isinstance(exc.cause, RequestError):
            raise exc.cause from None
        if isinstance(exc.cause, EngineDeadError):
            logger.warning("engine dead: %s", exc.cause)
            raise EngineUnavailableError(
                "the engine failed while serving this request; it was not completed: retry it"
            ) from None
        logger.error("engine replica raised: %s", exc)
        raise _INTERNAL from None
    except RayActorError as exc:  # the replica's process died or cannot be reached
        logger.warning("engine replica lost: %r", exc)
        raise EngineUnavailableError(ENGINE_LOST) from None
    except DeploymentUnavailableError:
        raise EngineUnavailableError("no engine replica is running; retry later") from None


def _engine_problem(exc: BaseException) -> str:
    """One line for /health: what is wrong with the engine, without Ray's traceback."""
    if isinstance(exc, TimeoutError):
        return f"the engine did not answer within {HEALTH_TIMEOUT_S:g} s (busy, starting or lost)"
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        return f"the engine is unhealthy: {type(cause).__name__}: {str(cause)[:200]}"
    if isinstance(exc, RayActorError):
        return f"the engine replica was lost ({type(exc).__name__})"
    if isinstance(exc, DeploymentUnavailableError):
        return "no engine replica is running"
    return f"the engine cannot be reached ({type(exc).__name__})"


async def _proxy_host() -> str | None:
    """The host Serve's HTTP proxies listen on, from the Serve controller (None: unknown)."""
    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        config = await controller.get_http_config.remote()
    except Exception as exc:
        logger.warning("cannot read Serve's HTTP options: %r", exc)
        return None
    return config.host


def _max_tokens(request: ChatRequest, default: int, max_model_len: int) -> int:
    # 0 is a value, not "unset": it and negative counts are refused, not replaced.
    for field in ("max_completion_tokens", "max_tokens"):
        value = getattr(request, field)
        if value is not None and value < 1:
            raise RequestError(f"{field} must be at least 1, got {value}")
        # A count no prompt leaves room for (every prompt has a token) is the client's mistake,
        # refused here as vLLM's server does. Below it, the engine replica stops a request when
        # the context is full (finish_reason "length"): an augmented request's prompt grows
        # with each tool result, so its room is known only segment by segment.
        if value is not None and value >= max_model_len:
            raise RequestError(
                f"{field}={value} does not fit this model's context of {max_model_len} tokens "
                f"with a prompt: at most {max_model_len - 1}"
            )
    if request.max_completion_tokens is not None:
        return request.max_completion_tokens
    return request.max_tokens if request.max_tokens is not None else default


# Defined last: serve.ingress pickles the FastAPI app, and with it the route methods' globals,
# when the class is created; helpers defined after it would be missing in the replica.
@serve.ingress(app)
class Ingress:
    async def __init__(
        self,
        engine: DeploymentHandle,
        tool_worker: DeploymentHandle,
        settings: dict[str, Any],
        redis_url: str | None,
    ) -> None:
        self._engine = engine
        self._tools = tool_worker
        self.settings = IngressSettings.model_validate(settings)
        # Keys from this replica's environment count as the config's do (secrets need not be
        # written in a config file); without any, serve only where nothing else can reach.
        environment = ApiKeys.from_keys(env_keys(API_KEYS_ENV), env_keys(ADMIN_API_KEYS_ENV))
        self._keys = self.settings.api_keys.merged(environment)
        check_exposure(await _proxy_host(), self._keys)
        self._tool_schemas: dict[str, dict[str, Any]] | None = None
        self._board = EngineStatsBoard(redis_url) if redis_url else None
        self._tool_stats = ToolStatsStore(redis_url) if redis_url else None
        self._in_flight = 0  # chat and trace requests admitted and not finished

    # ---- Python handle API (the HTTP routes below call the same methods) ----

    async def chat(self, request: ChatRequest | dict[str, Any]) -> ChatResponse:
        with self._admitted():
            request = _parse(ChatRequest, request)
            plan = await self._plan(request)
            outcome = None
            with _engine_errors():
                events = self._engine_chat(plan)
                await await_placement(events, self.settings.max_routing_wait_s)
                async for event in events:
                    if isinstance(event, ChatOutcome):
                        outcome = event
            assert outcome is not None
            return _chat_response(plan, self.settings.served_model_name, outcome)

    async def chat_stream(
        self, request: ChatRequest | dict[str, Any]
    ) -> AsyncGenerator[ChatStreamChunk, None]:
        # The admission slot is held until the stream ends or its consumer closes it.
        with self._admitted():
            request = _parse(ChatRequest, request)
            plan = await self._plan(request)
            with _engine_errors():
                events = self._engine_chat(plan)
                await await_placement(events, self.settings.max_routing_wait_s)
                async for chunk in _stream_chunks(plan, self.settings.served_model_name, events):
                    yield chunk

    async def replay(self, request: TraceRequest | dict[str, Any]) -> TraceResponse:
        self._refuse_if_replay_off()
        with self._admitted():
            request = _parse(TraceRequest, request)
            script = await self._check_trace(request)
            # The engine keys on this id (KV holds, swap entries): always the server's own.
            request_id = f"trace-{uuid.uuid4().hex}"
            with _engine_errors():
                response = self._engine.replay.remote(
                    request_id, script, time.time(), request.policy
                )
                await await_placement(response, self.settings.max_routing_wait_s)
                outcome = await response
            return TraceResponse.from_outcome(
                outcome, self.settings.served_model_name, request.request_id
            )

    # ---- HTTP ----

    @app.post("/v1/chat/completions")
    async def http_chat(self, raw: Request) -> Response:
        try:
            self._authorize(raw)
            self._refuse_if_busy()  # before reading the body: overload costs little
            request = _parse(ChatRequest, await _json_body(raw, self.settings.max_body_bytes))
            if not request.stream:
                return JSONResponse((await self.chat(request)).model_dump(mode="json"))
            chunks = self.chat_stream(request)
            first = await anext(chunks)  # validation and the start of generation: 4xx if bad
        except RequestError as exc:
            return _error(exc)
        except Exception:
            return _internal_error()
        return StreamingResponse(_sse(first, chunks), media_type="text/event-stream")

    @app.post(TRACE_ROUTE)
    async def http_trace(self, raw: Request) -> Response:
        try:
            self._authorize(raw)
            self._refuse_if_replay_off()  # 404 before the body is read
            self._refuse_if_busy()
            response = await self.replay(await _json_body(raw, self.settings.max_body_bytes))
        except RequestError as exc:
            return _error(exc)
        except Exception:
            return _internal_error()
        return JSONResponse(response.model_dump(mode="json"))

    @app.get("/v1/models")
    async def http_models(self, raw: Request) -> Response:
        try:
            self._authorize(raw)
        except RequestError as exc:
            return _error(exc)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.settings.served_model_name,
                        "object": "model",
                        "owned_by": "lamps",
                        "max_model_len": self.settings.max_model_len,
                    }
                ],
            }
        )

    @app.post("/v1/admin/measure-costs")
    async def http_measure_costs(self, raw: Request) -> Response:
        """Re-measure the engine's T_fwd and decode step time (one replica: the one routed to)."""
        try:
            self._authorize(raw, admin=True)
            with _engine_errors():
                costs = await self._engine.measure_costs.remote()
        except RequestError as exc:
            return _error(exc)
        except Exception:
            return _internal_error()
        return JSONResponse({"costs": costs})

    @app.get("/health")
    async def http_health(self) -> Response:
        """Open to all (load balancers probe it); a bounded wait, and one line on what is
        wrong."""
        try:
            await asyncio.wait_for(self._engine.check_health.remote(), timeout=HEALTH_TIMEOUT_S)
        except Exception as exc:  # any failure of the engine means unhealthy, whatever its type
            return JSONResponse(
                {"status": "unhealthy", "error": _engine_problem(exc)}, status_code=503
            )
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def http_metrics(self, raw: Request) -> Response:
        try:
            self._authorize(raw)
        except RequestError as exc:
            return _error(exc)
        engines: dict[str, dict[str, Any]] = {}
        tools: dict[str, ToolCallCounts] = {}
        redis_up = False
        if self._board is not None and self._tool_stats is not None:
            try:
                engines = await self._board.collect()
                tools = await self._tool_stats.summary()
                redis_up = True
            except (StatsUnavailableError, RedisError, OSError):
                pass  # reported as lamps_redis_up 0; the service itself is unaffected
        # The replica this call reaches speaks for itself: its gauges stay when Redis is down.
        own = await self._engine_snapshot()
        if own is not None:
            engines[own.pop("replica")] = own
        return Response(
            render_prometheus(engines, tools, redis_up), media_type="text/plain; version=0.0.4"
        )

    @app.get("/openapi.json", include_in_schema=False)
    async def http_openapi(self, raw: Request) -> Response:
        try:
            self._authorize(raw)
        except RequestError as exc:
            return _error(exc)
        return JSONResponse(self._openapi(raw))

    @app.get("/docs", include_in_schema=False)
    async def http_docs(self, raw: Request) -> Response:
        try:
            self._authorize(raw)
        except RequestError as exc:
            return _error(exc)
        root = raw.scope.get("root_path", "").rstrip("/")
        return HTMLResponse(render_api_docs(self._openapi(raw), f"{root}/openapi.json"))

    def _openapi(self, raw: Request) -> dict[str, Any]:
        """The schema of the routes this server answers: a route that is off is not in it."""
        schema: dict[str, Any] = raw.app.openapi()  # FastAPI's cached copy: not changed here
        if self.settings.enable_benchmark_endpoints:
            return schema
        paths = {path: ops for path, ops in schema["paths"].items() if path != TRACE_ROUTE}
        return {**schema, "paths": paths}

    # ---- access ----

    def _engine_chat(self, plan: ChatPlan) -> Any:
        # The conversation's key as Serve's session id: routers that keep sessions (ours reads
        # the same key from the messages, Serve's consistent-hash router reads this) send its
        # next turn where its context is cached. It is computed here, never a client's value.
        key = conversation_key(plan.messages)
        engine = self._engine.options(stream=True, **({"session_id": key} if key else {}))
        return engine.chat.remote(plan)

    def _authorize(self, raw: Request, *, admin: bool = False) -> None:
        self._keys.authorize(raw.headers.get("authorization"), admin=admin)

    async def _engine_snapshot(self) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(
                self._engine.metrics_snapshot.remote(), timeout=METRICS_ENGINE_TIMEOUT_S
            )
        except Exception as exc:  # a missing gauge says enough; /health says why
            logger.warning("engine statistics unavailable: %r", exc)
            return None

    def _refuse_if_replay_off(self) -> None:
        if not self.settings.enable_benchmark_endpoints:
            raise BenchmarkEndpointsDisabledError(REPLAY_OFF)

    # ---- admission ----

    def _refuse_if_busy(self) -> None:
        limit = self.settings.max_in_flight_requests
        if self._in_flight >= limit:
            raise ServerBusyError(
                f"this server has {limit} requests in flight, its limit; retry in "
                f"{ServerBusyError.retry_after_s} s"
            )

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        """Hold one of the in-flight slots while the body runs: beyond the limit a request is
        refused at once (429) instead of queueing without bound behind the others."""
        self._refuse_if_busy()
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    # ---- validation ----

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.served_model_name:
            raise UnknownModelError(
                f"model {model!r} is not served here; "
                f"available: {self.settings.served_model_name!r}"
            )

    async def _check_trace(self, request: TraceRequest) -> TraceScript:
        self._check_model(request.model)
        try:
            script = TraceScript(segments=request.segments)
        except ValidationError as exc:
            raise RequestError(_validation_message(exc)) from None
        if script.num_api_calls > self.settings.max_tool_calls_limit:
            raise TooManyToolCallsError(
                f"the script makes {script.num_api_calls} API calls; the limit is "
                f"{self.settings.max_tool_calls_limit}"
            )
        check_fits(script, self.settings.max_model_len)
        await self._check_api_types(script)
        if request.policy is not None and request.policy not in self.settings.policy_variants:
            raise UnknownPolicyVariantError(
                unknown_variant_message(request.policy, self.settings.policy_variants)
            )
        return script

    async def _check_api_types(self, script: TraceScript) -> None:
        # An API type names the estimate the call is learned as and predicted from: only the
        # server's tools and a fixed set of simulated types, never a name a client invents.
        allowed = SIMULATED_API_TYPES | set(await self._server_tools())
        for index, segment in enumerate(script.segments):
            if segment.api_type is not None and segment.api_type not in allowed:
                raise UnknownApiTypeError(
                    f"segment {index}: unknown api_type {segment.api_type[:64]!r}; allowed: "
                    f"{', '.join(sorted(allowed))}"
                )

    async def _server_tools(self) -> dict[str, dict[str, Any]]:
        if self._tool_schemas is None:
            schemas = await self._tools.schemas.remote()
            tools = {s["function"]["name"]: s for s in schemas}
            if not self.settings.enable_benchmark_endpoints:
                # build_app leaves it out of the tool worker too; this holds for an ingress put
                # in front of another application's workers as well.
                tools.pop(SimulatedApi.name, None)
            self._tool_schemas = tools
        return self._tool_schemas

    async def _plan(self, request: ChatRequest) -> ChatPlan:
        self._check_model(request.model)
        _refuse_unsupported(request)
        tools = await self._requested_tools(request)
        tool_choice = _tool_choice(request, tools)
        max_calls = request.max_tool_calls
        if max_calls is None:
            max_calls = self.settings.default_max_tool_calls
        if max_calls > self.settings.max_tool_calls_limit:
            raise TooManyToolCallsError(
                f"max_tool_calls={max_calls} is over this server's limit of "
                f"{self.settings.max_tool_calls_limit}"
            )
        max_tokens = _max_tokens(
            request, self.settings.default_max_tokens, self.settings.max_model_len
        )
        sampling: dict[str, Any] = {
            "temperature": request.temperature or 0.0,
            "top_p": request.top_p if request.top_p is not None else 1.0,
            "seed": request.seed,
        }
        if request.ignore_eos:  # vLLM's extension: exactly max_tokens (benchmarks ask for it)
            sampling["ignore_eos"] = True
        if request.stop:
            sampling["stop"] = (
                [request.stop] if isinstance(request.stop, str) else list(request.stop)
            )
        return ChatPlan(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            messages=[_plain_message(m) for m in request.messages],
            tools=tools,
            tool_choice=tool_choice,
            max_tokens=max_tokens,
            max_tool_calls=max_calls,
            sampling=sampling,
        )

    async def _requested_tools(self, request: ChatRequest) -> list[dict[str, Any]]:
        """The server's schemas of the tools the request names, each once, in the order first
        named. Everything after this (the engine replica's chat template, the prompt, the
        scheduler's forecast) sees at most one entry per server tool, whatever the client sent:
        12,000 copies of one tool rendered into a prompt held the engine replica's event loop
        for seconds (its health check timed out) before the context limit refused them."""
        if not request.tools:
            return []
        _check_tools_count(request.tools)  # a parsed request (Python handle) is checked here
        known = await self._server_tools()
        tools: dict[str, dict[str, Any]] = {}
        for tool in request.tools:
            name = tool.function.name
            if name not in known:
                raise RequestError(
                    f"unknown tool {name[:64]!r}; this server has: {', '.join(sorted(known))}"
                )
            # Tools run here, so the server's schema is the truth, whatever the client sent.
            tools.setdefault(name, known[name])
        return list(tools.values())
