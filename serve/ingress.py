"""Ingress: the OpenAI-compatible HTTP API in front of the stages.

A chat request goes: read the body within limits.max_request_bytes
(serve.limits) -> validate (serve.protocol) and check the request limits
(serve.limits) -> grammar for tools / JSON (serve.grammar) -> chat template
(serve.chat_template, in this process for text; the Preprocess deployment
for images, then the Encoder) -> Decoder (vLLM), whose typed chunks, once the
first has arrived and within limits.request_timeout_s (serve.streams), become
one JSON body or server-sent events (serve.chat). Completions skip the
template (serve.completions).

A full stage queue is a 429 with Retry-After; a preprocess or encoder
replica lost mid-request is retried once (both stages are idempotent); a
decoder lost mid-request ends the request with a 503 or an error event
(serve.stage_errors).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import TypeVar

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.auth import TenantMiddleware, api_keys, tenant_of
from serve.chat import ChatOutput, sse
from serve.chat_template import ChatTemplate, image_positions
from serve.checkpoint import open_checkpoint, reasoning_enabled
from serve.completions import CompletionOutput
from serve.config import AppConfig, LimitsConfig
from serve.errors import APIError, BadRequest, ModelNotFound, echoed
from serve.grammar import CompiledGrammars, GrammarBuilder
from serve.health import stage_states
from serve.limits import check_collection_sizes, check_json_values, check_limits, read_body
from serve.messages import (
    DecodeChunk,
    DecodeRequest,
    EngineInfo,
    OutputParsing,
    PreprocessedRequest,
    ToolSpec,
)
from serve.protocol.chat import ChatCompletionRequest, ChatMessage, ToolDefinition, new_chat_completion_id
from serve.protocol.common import (
    FieldError,
    ModelCard,
    ModelList,
    SamplingFields,
    error_param,
    error_payload,
)
from serve.protocol.completions import (
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    new_completion_id,
)
from serve.request_metrics import (
    RequestMetrics,
    RequestMetricsMiddleware,
    error_code,
    error_response,
    mark_error,
    received_at,
)
from serve.sampling import ResponseShape, check_token_ids, completion_budget, sampling_settings
from serve.stage_errors import lost_its_replica, stage_error, with_retry_on_lost_replica
from serve.streams import started, until_deadline
from serve.tenancy import Tenancy
from serve.tenants import tenants_file_path

logger = logging.getLogger(__name__)

app = FastAPI(title="ministral-serve", docs_url=None, redoc_url=None)
# The last added runs first: requests refused for their key are counted too.
app.add_middleware(TenantMiddleware)
app.add_middleware(RequestMetricsMiddleware)

# OpenAI's legacy completions default.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

# Characters of text (or token ids) above which the tokeniser runs off the event loop:
# below, the thread hop costs more than the tokeniser.
TOKENIZE_INLINE_CHARS = 16_384

# Request bodies above this size are parsed off the event loop (about 4 ms of decoding
# per MiB): a 28 MiB list of token ids held every stream of the replica for 2 s.
PARSE_INLINE_BYTES = 1024 * 1024

# How long /health reuses Serve's view of the stages: each fresh look is a call to Serve's
# controller, and /health answers anyone, without a key.
HEALTH_CACHE_S = 1.0

# Served paths under /v1 (with another method, they are a 405, not a 404).
SERVED_OPERATIONS = {"chat/completions", "completions", "models", "usage"}

# OpenAI paths for what a text-generating vision-language model cannot do.
UNSERVABLE_OPERATIONS = {
    "embeddings": "embeddings",
    "images/generations": "image generation",
    "images/edits": "image editing",
    "images/variations": "image variations",
    "audio/speech": "speech synthesis",
    "audio/transcriptions": "audio transcription",
    "audio/translations": "audio translation",
    "videos": "video generation",
    "video/generations": "video generation",
    "rerank": "reranking",
    "score": "scoring",
    "moderations": "moderation",
}


@app.exception_handler(APIError)
async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return error_response(request.scope, error)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    message = {
        404: f"{echoed(request.method)} {echoed(request.url.path)} is not an endpoint of this service",
        405: f"{echoed(request.method)} is not allowed on {echoed(request.url.path)}",
    }.get(error.status_code, str(error.detail))
    mark_error(request.scope, str(error.status_code))
    return JSONResponse(
        error_payload(message, "invalid_request_error", None, error.status_code),
        status_code=error.status_code,
    )


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return error_response(request.scope, BadRequest(str(error)))


Body = TypeVar("Body", bound=BaseModel)
Reply = TypeVar("Reply")


def parse_body(
    raw: bytes,
    schema: type[Body] = ChatCompletionRequest,
    limits: LimitsConfig | None = None,
    max_model_len: int | None = None,
) -> Body:
    """Decode and validate a request body, naming the offending field on failure.

    Types are OpenAI's, strictly: `"stream": "yes"` or `"max_tokens": "5"` is a 400, not a
    coercion. With `limits`, collections past their limit are refused before validation,
    which would otherwise build an object for each of their millions of elements."""
    if limits is not None:
        check_json_values(raw, limits, max_model_len)
    try:
        payload = msgspec.json.decode(raw)
    except RecursionError as e:
        raise BadRequest("request body is nested too deeply to parse", code="limit_exceeded") from e
    except msgspec.MsgspecError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from e
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    if limits is not None:
        check_collection_sizes(payload, limits, max_model_len)
    try:
        return schema.model_validate(payload, strict=True)
    except ValidationError as e:
        # Of a union's failed alternatives, the one that got furthest names the real problem.
        param, message = max(map(_field_and_message, e.errors()), key=lambda error: len(error[0] or ""))
        raise BadRequest(f"{param}: {message}" if param else message, param=param) from e


def _field_and_message(error: dict) -> tuple[str | None, str]:
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, FieldError):
        return error_param((*error["loc"], cause.field)), str(cause)
    return error_param(error["loc"]), error["msg"]


def _text_chars(messages: list[ChatMessage]) -> int:
    """Characters of text in the messages' content (strings and text parts)."""
    return sum(
        len(message.content)
        if isinstance(message.content, str)
        else sum(len(getattr(part, "text", "")) for part in message.content or ())
        for message in messages
    )


async def _guarded_events(
    events: AsyncIterator[str], request_id: str, scope: dict, retry_after_s: int
) -> AsyncIterator[str]:
    """A stream that fails mid-way ends with an OpenAI-shaped error event, not a cut connection."""
    try:
        async for event in events:
            yield event
    except Exception as e:
        error = stage_error(e, "decoder", retry_after_s)
        logger.warning("stream %s failed: %s", request_id, error.message)
        mark_error(scope, error_code(error))
        yield sse(json.dumps(error_payload(error.message, error.error_type, error.param, error.code)))


# Helpers above are defined before the class: @serve.ingress snapshots the
# class's globals when it is applied.
@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        config: AppConfig,
        decoder: DeploymentHandle,
        preprocess: DeploymentHandle | None = None,
        encoder: DeploymentHandle | None = None,
        ledger: DeploymentHandle | None = None,
    ):
        self._config = config
        self._decoder = decoder
        # Absent when images are disabled (images.max_images_per_request: 0).
        self._preprocess = preprocess
        self._encoder = encoder
        checkpoint = open_checkpoint(config.model, weights=False)
        self._template = ChatTemplate.from_config(checkpoint, config)
        self._reasoning = reasoning_enabled(config.model, checkpoint)
        # Grammar compilation and long tokenisations: off the event loop, so
        # that one pathological request does not stall every other stream here.
        self._cpu_work = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ingress-cpu")
        self._grammars = CompiledGrammars(
            GrammarBuilder(self._template.tokenizer, reasoning=self._reasoning),
            self._cpu_work,
            config.limits.grammar_cache_bytes,
        )
        self._model_name = config.model.name
        self._created = int(time.time())
        self._engine_info: EngineInfo | None = None
        self._engine_info_asked = asyncio.Lock()
        self._stage_states_asked = asyncio.Lock()
        self._stage_states_seen: dict[str, str] = {}
        self._stage_states_at = -float("inf")
        self._metrics = RequestMetricsMiddleware.metrics = RequestMetrics(self._model_name)
        self._tenancy = Tenancy(
            config,
            api_keys(key.get_secret_value() for key in config.auth.api_keys),
            tenants_file_path(config.auth.tenants_file),
            ledger,
            self._model_name,
        )
        TenantMiddleware.tenants = self._tenancy

    async def _info(self) -> EngineInfo:
        # The decoder's resolved settings are the truth (vLLM may derive
        # max_model_len from the checkpoint); ask once, for every request
        # that arrives before the answer.
        if self._engine_info is not None:
            return self._engine_info
        async with self._engine_info_asked:
            if self._engine_info is None:
                try:
                    self._engine_info = await self._decoder.engine_info.remote()
                except Exception as e:
                    raise stage_error(e, "decoder", self._config.limits.retry_after_s) from e
        return self._engine_info

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 while every stage has a running replica (serve.health); 503 naming those that do not."""
        states = await self._stage_states()
        healthy = all(state == "ok" for state in states.values())
        return JSONResponse(
            {"status": "ok" if healthy else "unhealthy", "stages": states},
            status_code=200 if healthy else 503,
        )

    async def _stage_states(self) -> dict[str, str]:
        """Serve's view of the stages, at most HEALTH_CACHE_S old; one look at a time."""
        async with self._stage_states_asked:
            if time.monotonic() - self._stage_states_at > HEALTH_CACHE_S:
                self._stage_states_seen = await self._look_at_stages()
                self._stage_states_at = time.monotonic()
        return self._stage_states_seen

    async def _look_at_stages(self) -> dict[str, str]:
        stages = {"decoder": self._decoder, "preprocess": self._preprocess, "encoder": self._encoder}
        deployments = {name: handle.deployment_name for name, handle in stages.items() if handle is not None}
        status = await asyncio.to_thread(serve.status)
        application = status.applications.get(serve.get_replica_context().app_name)
        found = application.deployments if application is not None else {}
        return stage_states(
            {
                stage: found[name].replica_states if name in found else None
                for stage, name in deployments.items()
            }
        )

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        info = await self._info()
        card = ModelCard(id=self._model_name, created=self._created, max_model_len=info.max_model_len)
        return ModelList(data=[card])

    @app.post("/v1/chat/completions")
    async def chat_completions(self, http_request: Request) -> Response:
        request = await self._parse(http_request, ChatCompletionRequest)
        request_id = new_chat_completion_id()
        priority, deadline_s = await self._admitted_to_quota(
            http_request,
            request,
            request_id,
            text_chars=_text_chars(request.messages),
            images=len(image_positions(request.messages)),
        )
        grammar = await self._grammars.for_chat(request)
        prompt, preprocess_response = await self._preprocessed(request.messages, request.tools)
        info = await self._info()
        max_tokens = completion_budget(
            len(prompt.prompt_token_ids),
            request.completion_token_limit,
            info,
            self._config.limits,
            ResponseShape(
                choices=request.n,
                logprobs_per_token=(request.top_logprobs or 0) + 1
                if request.logprobs and not request.stream
                else 0,
            ),
            field=request.completion_token_field,
        )
        await self._admitted_past_the_gate(
            http_request, request, prompt.prompt_token_ids, max_tokens, priority, deadline_s
        )
        decode = DecodeRequest(
            request_id=request_id,
            prompt_token_ids=prompt.prompt_token_ids,
            sampling=sampling_settings(
                request,
                max_tokens=max_tokens,
                info=info,
                logprobs=(request.top_logprobs or 0) if request.logprobs else None,
                grammar=grammar,
            ),
            parsing=self._chat_parsing(request),
            priority=priority,
        )
        if prompt.images:
            self._metrics.image_request()
        chunks = await self._generate(
            decode,
            http_request,
            preprocess_response if prompt.images else None,
            image_hashes=tuple(image.content_hash for image in prompt.images),
        )
        output = ChatOutput(request, decode, self._model_name, info.system_fingerprint)
        if request.stream:
            return self._stream(output.events(chunks), decode.request_id, http_request)
        return JSONResponse((await self._decoded(output.response(chunks))).model_dump())

    @app.post("/v1/completions")
    async def completions(self, http_request: Request) -> Response:
        request = await self._parse(http_request, CompletionRequest)
        request_id = new_completion_id()
        priority, deadline_s = await self._admitted_to_quota(
            http_request,
            request,
            request_id,
            text_chars=len(request.prompt) if isinstance(request.prompt, str) else 0,
            prompt_ids=0 if isinstance(request.prompt, str) else len(request.prompt),
        )
        info = await self._info()
        if isinstance(request.prompt, str):
            prompt_text = request.prompt
            prompt_ids = await self._tokenizer_call(len(prompt_text), self._template.encode_text, prompt_text)
        else:
            prompt_ids, prompt_text = request.prompt, None
        requested = request.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
        held_logprobs = request.logprobs is not None and not request.stream
        max_tokens = completion_budget(
            len(prompt_ids),
            requested,
            info,
            self._config.limits,
            ResponseShape(
                choices=request.n,
                logprobs_per_token=request.logprobs + 1 if held_logprobs else 0,
                echoed_prompt_tokens=len(prompt_ids) if request.echo else 0,
            ),
            prompt_field="prompt",
        )
        if prompt_text is None:
            # Checked and decoded once the prompt is known to fit the context.
            check_token_ids(request.prompt, info, "prompt")
            prompt_text = await self._tokenizer_call(len(prompt_ids), self._template.decode, prompt_ids)
        await self._admitted_past_the_gate(
            http_request, request, prompt_ids, max_tokens, priority, deadline_s
        )
        decode = DecodeRequest(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            sampling=sampling_settings(
                request,
                max_tokens=max_tokens,
                info=info,
                logprobs=request.logprobs,
                prompt_logprobs=request.logprobs if request.echo else None,
            ),
            priority=priority,
        )
        chunks = await self._generate(decode, http_request)
        output = CompletionOutput(request, decode, self._model_name, info.system_fingerprint, prompt_text)
        if request.stream:
            return self._stream(output.events(chunks), decode.request_id, http_request)
        return JSONResponse((await self._decoded(output.response(chunks))).model_dump())

    @app.post("/tokenize")
    async def tokenize(self, http_request: Request) -> TokenizeResponse:
        request = await self._parsed_body(http_request, TokenizeRequest)
        info = await self._info()
        if request.prompt is not None:
            tokens = await self._tokenizer_call(
                len(request.prompt),
                self._template.encode_text,
                request.prompt,
                add_bos=request.add_special_tokens,
            )
        else:
            tokens = (await self._preprocessed(request.messages))[0].prompt_token_ids
        if len(tokens) > info.max_model_len:
            field = "prompt" if request.prompt is not None else "messages"
            raise BadRequest(
                f"{field}: {len(tokens)} tokens, but this model's maximum context length is "
                f"{info.max_model_len} tokens",
                param=field,
                code="context_length_exceeded",
            )
        pieces = None
        if request.return_token_strs:
            pieces = await self._tokenizer_call(len(tokens), self._template.decode_each, tokens)
        return TokenizeResponse(
            count=len(tokens), max_model_len=info.max_model_len, tokens=tokens, token_strs=pieces
        )

    @app.post("/detokenize")
    async def detokenize(self, http_request: Request) -> DetokenizeResponse:
        request = await self._parsed_body(http_request, DetokenizeRequest)
        check_token_ids(request.tokens, await self._info(), "tokens")
        text = await self._tokenizer_call(len(request.tokens), self._template.decode, request.tokens)
        return DetokenizeResponse(prompt=text)

    @app.get("/v1/usage")
    async def usage(self, http_request: Request) -> JSONResponse:
        """The numbers of the tenant whose key the request carries, application-wide."""
        tenant = tenant_of(http_request.scope)
        usage = await self._tenancy.usage(tenant)
        return JSONResponse({"object": "tenant.usage", "tenant": tenant.name, **asdict(usage)})

    @app.api_route("/v1/{operation:path}", methods=["GET", "POST"])
    async def unservable(self, operation: str, http_request: Request) -> Response:
        what = UNSERVABLE_OPERATIONS.get(operation.strip("/"))
        if operation.strip("/") in SERVED_OPERATIONS:
            raise StarletteHTTPException(405)
        if what is None:
            raise StarletteHTTPException(404)
        raise BadRequest(
            f"{self._model_name} is a text-generating vision-language model (Ministral 3); "
            f"it does not support {what}. This service serves /v1/chat/completions and /v1/completions.",
            param="model",
            code="unsupported_operation",
        )

    async def _admitted_to_quota(
        self,
        http_request: Request,
        request: SamplingFields,
        request_id: str,
        text_chars: int,
        images: int = 0,
        prompt_ids: int = 0,
    ) -> tuple[int, float | None]:
        """The request's priority and deadline, once its tenant's quotas have room for it
        (serve.tenancy); before any work is spent on it."""
        scope = http_request.scope
        priority = Tenancy.priority(tenant_of(scope), request.priority)
        deadline_s = Tenancy.deadline_s(http_request.headers, request.request_timeout)
        self._tenancy.started(scope, request_id)
        completion = request.completion_token_limit
        estimate = self._tenancy.estimated_tokens(
            text_chars, images, prompt_ids, completion * request.n if completion else None
        )
        await self._tenancy.admit_quota(scope, estimate)
        return priority, deadline_s

    async def _admitted_past_the_gate(
        self,
        http_request: Request,
        request: SamplingFields,
        prompt_token_ids: list[int],
        max_tokens: int,
        priority: int,
        deadline_s: float | None,
    ) -> None:
        """Wait for a slot of the admission gate (serve.admission), within the time limit."""
        image_tokens = prompt_token_ids.count(self._template.image_token_id)
        completion = request.completion_token_limit or self._config.admission.expected_completion_tokens
        elapsed = time.perf_counter() - received_at(http_request.scope)
        await self._tenancy.admit(
            http_request.scope,
            priority,
            text_tokens=len(prompt_token_ids) - image_tokens,
            image_tokens=image_tokens,
            completion_tokens=min(completion, max_tokens),
            choices=request.n,
            deadline_s=deadline_s,
            timeout_s=max(0.0, self._config.limits.request_timeout_s - elapsed),
        )

    async def _body(self, http_request: Request) -> bytes:
        return await read_body(
            http_request.headers.get("content-length"),
            http_request.stream(),
            self._config.limits.max_request_bytes,
        )

    async def _parse(self, http_request: Request, schema: type[SamplingFields]) -> SamplingFields:
        request = await self._parsed_body(http_request, schema)
        if unsupported := request.unsupported_fields():
            raise BadRequest(
                f"{unsupported[0]}: this field is not supported by this service",
                param=unsupported[0],
            )
        check_limits(request, self._config.limits)
        if unknown := request.unknown_fields():
            logger.info("ignoring %d unknown request fields: %s", len(unknown), echoed(", ".join(unknown)))
        return request

    async def _parsed_body(self, http_request: Request, schema: type[Body]) -> Body:
        """The body, read within limits.max_request_bytes, parsed and validated (a large one off the
        event loop), for the model this service serves."""
        raw = await self._body(http_request)
        parse = functools.partial(
            parse_body, raw, schema, self._config.limits, (await self._info()).max_model_len
        )
        if len(raw) <= PARSE_INLINE_BYTES:
            request = parse()
        else:
            request = await asyncio.get_running_loop().run_in_executor(self._cpu_work, parse)
        self._check_model(request.model)
        return request

    async def _tokenizer_call(self, size: int, call: Callable[..., Reply], *args, **kwargs) -> Reply:
        """`call` (tokenising `size` characters or decoding `size` tokens), off the event loop when large."""
        if size <= TOKENIZE_INLINE_CHARS:
            return call(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._cpu_work, lambda: call(*args, **kwargs))

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self._model_name:
            raise ModelNotFound(model, [self._model_name])

    def _chat_parsing(self, request: ChatCompletionRequest) -> OutputParsing | None:
        """None (raw text, the fast path) unless tools may be called or the model reasons."""
        if not (request.calls_tools or self._reasoning):
            return None
        tools = None
        if request.calls_tools:
            tools = [ToolSpec(name=t.function.name, parameters=t.function.parameters) for t in request.tools]
        return OutputParsing(tools=tools, reasoning=self._reasoning)

    async def _generate(
        self,
        decode: DecodeRequest,
        http_request: Request,
        preprocessed: DeploymentResponse | None = None,
        image_hashes: tuple[str, ...] = (),
    ) -> AsyncIterator[DecodeChunk]:
        """The decoder's chunk stream for one request, started (its first chunk in hand),
        bounded by limits.request_timeout_s and counted in the request metrics.

        `preprocessed`: the Preprocess stage's response for an image request.
        The encoder takes it, and the decoder the encoder's response, both
        unresolved, so that pixels and embeddings never pass through here; `image_hashes`
        go with it for the encoder router."""
        limits = self._config.limits
        images: DeploymentResponse | None = None  # the encoder's call of the latest try

        async def decode_once() -> AsyncIterator[DecodeChunk]:
            nonlocal images
            # Counted from the request's arrival: a retry gets only what is left.
            time_left = limits.request_timeout_s - (time.perf_counter() - received_at(http_request.scope))
            if preprocessed is not None:
                images = self._encoder.encode.remote(preprocessed, image_hashes=image_hashes)
            stream = self._decoder.generate.options(stream=True).remote(decode, images)
            chunks = self._metrics.decoded(
                until_deadline(stream, time_left),
                http_request.scope,
                prompt_tokens=len(decode.prompt_token_ids),
            )
            return await started(chunks)

        async def encoder_lost(error: Exception) -> bool:
            # The encoder is tried again; a decoder lost mid-request ends the request.
            return images is not None and await lost_its_replica(images)

        return await with_retry_on_lost_replica(
            decode_once,
            stage="decoder",
            retry_after_s=limits.retry_after_s,
            lost=encoder_lost,
            lost_replica=f"the encoder replica of request {decode.request_id}",
        )

    async def _decoded(self, response: Awaitable[Reply]) -> Reply:
        try:
            return await response
        except Exception as e:
            raise stage_error(e, "decoder", self._config.limits.retry_after_s) from e

    def _stream(
        self, events: AsyncIterator[str], request_id: str, http_request: Request
    ) -> StreamingResponse:
        return StreamingResponse(
            _guarded_events(events, request_id, http_request.scope, self._config.limits.retry_after_s),
            media_type="text/event-stream",
        )

    async def _preprocessed(
        self, messages: list[ChatMessage], tools: list[ToolDefinition] | None = None
    ) -> tuple[PreprocessedRequest, DeploymentResponse | None]:
        """Text: templated here. Images: fetched, decoded and templated by the Preprocess stage.

        For images, the stage's response comes back too, for the encoder to
        take unresolved: the pixel arrays then go from stage to stage through
        the object store, not through this replica."""
        num_images = len(image_positions(messages))
        if not num_images:
            tokenized = await self._tokenizer_call(
                _text_chars(messages), self._template.encode_chat, messages, tools=tools
            )
            return PreprocessedRequest(prompt_token_ids=tokenized.prompt_token_ids), None
        limit = self._config.images.max_images_per_request
        if num_images > limit or self._preprocess is None:
            raise BadRequest(
                f"messages: the request has {num_images} images; this service accepts at most {limit}",
                param="messages",
            )

        async def preprocess_once() -> tuple[PreprocessedRequest, DeploymentResponse]:
            response = self._preprocess.preprocess.remote(messages, tools)
            return await response, response

        return await with_retry_on_lost_replica(
            preprocess_once, stage="preprocess", retry_after_s=self._config.limits.retry_after_s
        )
