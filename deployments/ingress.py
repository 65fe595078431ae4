"""The front door: OpenAI-compatible HTTP and the same operations for Python handles.

Validation happens here, before any generation, so bad input costs no engine time and gets a 4xx
with a message saying what is wrong.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from redis.exceptions import RedisError
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatMessage,
)
from vllm.entrypoints.openai.engine.protocol import DeltaMessage, UsageInfo
from vllm.exceptions import VLLMClientError

from deployments.api_models import (
    ChatRequest,
    ChatResponse,
    ChatStreamChunk,
    RequestTimings,
    ToolExecutionInfo,
    TraceRequest,
    TraceResponse,
)
from deployments.metrics import EngineStatsBoard, render_prometheus
from lamps_core.policies import POLICY_NAMES
from lamps_core.trace import TraceScript
from lamps_vllm.chat_session import ChatOutcome, ChatPlan, TextDelta, ToolExecution
from lamps_vllm.errors import (
    RequestError,
    TooManyToolCallsError,
    UnknownModelError,
    UnsupportedParameterError,
)
from lamps_vllm.trace_replay import check_fits
from tool_workers.stats import StatsUnavailableError, ToolCallCounts, ToolStatsStore

app = FastAPI(title="LAMPS", description="Serving for tool-augmented LLMs")


class IngressSettings(BaseModel):
    served_model_name: str
    max_model_len: int
    default_max_tokens: int = 256
    default_max_tool_calls: int = 4
    max_tool_calls_limit: int = 32


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
    if isinstance(content, list):
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


async def _sse(first: ChatStreamChunk, rest: AsyncIterator[ChatStreamChunk]) -> AsyncIterator[str]:
    yield f"data: {first.model_dump_json(exclude_none=True)}\n\n"
    try:
        async for chunk in rest:
            yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
    except RequestError as exc:  # found mid-stream: the status is sent already
        yield f"data: {json.dumps(_error_body(exc))}\n\n"
    yield "data: [DONE]\n\n"


async def _json_body(raw: Request) -> Any:
    body = await raw.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], data: M | dict[str, Any]) -> M:
    if isinstance(data, model):
        return data
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestError(_validation_message(exc)) from None
    except VLLMClientError as exc:  # vLLM's protocol models raise their own from some validators
        raise RequestError(f"invalid request: {exc}") from None


def _validation_message(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        problems.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(problems)


def _error_body(exc: Exception) -> dict[str, Any]:
    status = getattr(exc, "status_code", 400)
    return {"error": {"message": str(exc), "type": type(exc).__name__, "code": status}}


def _error(exc: Exception) -> JSONResponse:
    return JSONResponse(_error_body(exc), status_code=getattr(exc, "status_code", 400))


# Defined last: serve.ingress pickles the FastAPI app, and with it the route methods' globals,
# when the class is created; helpers defined after it would be missing in the replica.
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        engine: DeploymentHandle,
        tool_worker: DeploymentHandle,
        settings: dict[str, Any],
        redis_url: str | None,
    ) -> None:
        self._engine = engine
        self._tools = tool_worker
        self.settings = IngressSettings.model_validate(settings)
        self._tool_schemas: dict[str, dict[str, Any]] | None = None
        self._board = EngineStatsBoard(redis_url) if redis_url else None
        self._tool_stats = ToolStatsStore(redis_url) if redis_url else None

    # ---- Python handle API (the HTTP routes below call the same methods) ----

    async def chat(self, request: ChatRequest | dict[str, Any]) -> ChatResponse:
        request = _parse(ChatRequest, request)
        plan = await self._plan(request)
        outcome = None
        async for event in self._engine.options(stream=True).chat.remote(plan):
            if isinstance(event, ChatOutcome):
                outcome = event
        assert outcome is not None
        return _chat_response(plan, self.settings.served_model_name, outcome)

    async def chat_stream(
        self, request: ChatRequest | dict[str, Any]
    ) -> AsyncIterator[ChatStreamChunk]:
        request = _parse(ChatRequest, request)
        plan = await self._plan(request)
        events = self._engine.options(stream=True).chat.remote(plan)
        async for chunk in _stream_chunks(plan, self.settings.served_model_name, events):
            yield chunk

    async def replay(self, request: TraceRequest | dict[str, Any]) -> TraceResponse:
        request = _parse(TraceRequest, request)
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
        if request.policy is not None and request.policy not in POLICY_NAMES:
            raise RequestError(
                f"unknown policy {request.policy!r}; known: {', '.join(POLICY_NAMES)}"
            )
        request_id = request.request_id or f"trace-{uuid.uuid4().hex}"
        outcome = await self._engine.replay.remote(
            request_id, script, time.time(), request.policy, request.policy_options
        )
        return TraceResponse.from_outcome(outcome, self.settings.served_model_name)

    # ---- HTTP ----

    @app.post("/v1/chat/completions")
    async def http_chat(self, raw: Request) -> Response:
        try:
            request = _parse(ChatRequest, await _json_body(raw))
            if not request.stream:
                return JSONResponse((await self.chat(request)).model_dump(mode="json"))
            chunks = self.chat_stream(request)
            first = await anext(chunks)  # validation and the start of generation: 4xx if bad
        except RequestError as exc:
            return _error(exc)
        return StreamingResponse(_sse(first, chunks), media_type="text/event-stream")

    @app.post("/v1/traces")
    async def http_trace(self, raw: Request) -> Response:
        try:
            response = await self.replay(await _json_body(raw))
        except RequestError as exc:
            return _error(exc)
        return JSONResponse(response.model_dump(mode="json"))

    @app.get("/v1/models")
    async def http_models(self) -> dict[str, Any]:
        return {
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

    @app.post("/v1/admin/measure-costs")
    async def http_measure_costs(self) -> dict[str, Any]:
        """Re-measure the engine's T_fwd and decode step time (one replica: the one routed to)."""
        return {"costs": await self._engine.measure_costs.remote()}

    @app.get("/health")
    async def http_health(self) -> Response:
        try:
            await asyncio.wait_for(self._engine.check_health.remote(), timeout=10.0)
        except Exception as exc:  # any failure of the engine means unhealthy, whatever its type
            return JSONResponse({"status": "unhealthy", "error": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def http_metrics(self) -> Response:
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
        return Response(
            render_prometheus(engines, tools, redis_up), media_type="text/plain; version=0.0.4"
        )

    # ---- validation ----

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.served_model_name:
            raise UnknownModelError(
                f"model {model!r} is not served here; "
                f"available: {self.settings.served_model_name!r}"
            )

    async def _server_tools(self) -> dict[str, dict[str, Any]]:
        if self._tool_schemas is None:
            schemas = await self._tools.schemas.remote()
            self._tool_schemas = {s["function"]["name"]: s for s in schemas}
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
        max_tokens = (
            request.max_completion_tokens or request.max_tokens or self.settings.default_max_tokens
        )
        sampling: dict[str, Any] = {
            "temperature": request.temperature or 0.0,
            "top_p": request.top_p if request.top_p is not None else 1.0,
            "seed": request.seed,
        }
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
        if not request.tools:
            return []
        known = await self._server_tools()
        tools = []
        for tool in request.tools:
            name = tool.function.name
            if name not in known:
                raise RequestError(
                    f"unknown tool {name!r}; this server has: {', '.join(sorted(known))}"
                )
            # Tools run here, so the server's schema is the truth, whatever the client sent.
            tools.append(known[name])
        return tools
