"""Ingress: the OpenAI-compatible HTTP API in front of the stages.

A chat request goes: validate (serve.protocol) -> chat template
(deployments.preprocess, in this process for text) -> decoder deployment
(vLLM), whose chunks come back as one JSON body or as server-sent events.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.checkpoint import open_checkpoint
from deployments.messages import (
    DecodeChunk,
    DecodeRequest,
    EngineInfo,
    PreprocessedRequest,
    SamplingSettings,
)
from deployments.preprocess import ChatPreprocessor, image_positions
from serve.config import AppConfig
from serve.errors import APIError, BadRequest, ModelNotFound, RequestTooLarge, ServiceUnavailable
from serve.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    DeltaMessage,
    ModelCard,
    ModelList,
    Usage,
    error_param,
    error_payload,
    new_completion_id,
)

logger = logging.getLogger(__name__)

app = FastAPI(title="ministral-serve", docs_url=None, redoc_url=None)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(
        error_payload(error.message, error.error_type, error.param, error.code),
        status_code=error.status_code,
    )


@app.exception_handler(APIError)
async def _api_error(_: Request, error: APIError) -> JSONResponse:
    return _error_response(error)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    message = (
        f"{request.method} {request.url.path} is not an endpoint of this service"
        if error.status_code in (404, 405)
        else str(error.detail)
    )
    return JSONResponse(
        error_payload(message, "invalid_request_error", None, error.status_code),
        status_code=error.status_code,
    )


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    return _error_response(BadRequest(str(error)))


def parse_body(raw: bytes, max_bytes: int) -> ChatCompletionRequest:
    """Decode and validate a chat request body, naming the offending field on failure."""
    if len(raw) > max_bytes:
        raise RequestTooLarge(f"request body is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from e
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as e:
        # Of a union's failed alternatives, the one that got furthest names the real problem.
        errors = [(error_param(error["loc"]), error["msg"]) for error in e.errors()]
        param, message = max(errors, key=lambda error: len(error[0] or ""))
        raise BadRequest(f"{param}: {message}" if param else message, param=param) from e


def completion_budget(request: ChatCompletionRequest, prompt_tokens: int, info: EngineInfo) -> int:
    """Tokens the completion may use; a request that cannot fit is a 400, never truncated."""
    context = info.max_model_len
    if prompt_tokens >= context:
        raise BadRequest(
            f"messages: the prompt is {prompt_tokens} tokens, but this model's maximum context "
            f"length is {context} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    requested = request.completion_token_limit
    if requested is None:
        return context - prompt_tokens
    if prompt_tokens + requested > context:
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise BadRequest(
            f"{field}: this model's maximum context length is {context} tokens; you requested "
            f"{prompt_tokens + requested} ({prompt_tokens} in the messages, {requested} in the "
            "completion)",
            param=field,
            code="context_length_exceeded",
        )
    return requested


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


# Defined before the class: @serve.ingress snapshots the class's globals when it is applied.
def _stage_error(error: Exception, stage: str) -> APIError:
    """What a failure in a downstream stage means to the client."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, ObjectLostError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    # A stage's own error arrives wrapped once per hop (encoder -> decoder -> here).
    while isinstance(error, RayTaskError) and isinstance(error.cause, Exception):
        error = error.cause
    if isinstance(error, APIError):
        return error
    if isinstance(
        error, ActorDiedError | ActorUnavailableError | DeploymentUnavailableError | ObjectLostError
    ):
        return ServiceUnavailable(f"the {stage} stage is unavailable; retry shortly")
    if isinstance(error, BackPressureError):
        return ServiceUnavailable(f"the {stage} stage is at capacity; retry shortly", code="overloaded")
    logger.exception("%s stage failed", stage, exc_info=error)
    return APIError(f"internal error in the {stage} stage")


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        config: AppConfig,
        decoder: DeploymentHandle,
        preprocess: DeploymentHandle | None = None,
        encoder: DeploymentHandle | None = None,
    ):
        self._config = config
        self._decoder = decoder
        # Absent when images are disabled (images.max_images_per_request: 0).
        self._preprocess = preprocess
        self._encoder = encoder
        checkpoint = open_checkpoint(config.model)
        self._preprocessor = ChatPreprocessor(
            checkpoint, use_default_system_prompt=config.use_default_system_prompt
        )
        self._model_name = config.model.name
        self._created = int(time.time())
        self._engine_info: EngineInfo | None = None

    async def _info(self) -> EngineInfo:
        # The decoder's resolved settings are the truth (vLLM may derive
        # max_model_len from the checkpoint); ask once.
        if self._engine_info is None:
            self._engine_info = await self._decoder.engine_info.remote()
        return self._engine_info

    @app.get("/health")
    async def health(self) -> dict:
        await self._info()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        info = await self._info()
        card = ModelCard(id=self._model_name, created=self._created, max_model_len=info.max_model_len)
        return ModelList(data=[card])

    @app.post("/v1/chat/completions")
    async def chat_completions(self, http_request: Request) -> Response:
        request = parse_body(await http_request.body(), self._config.limits.max_request_bytes)
        if request.model != self._model_name:
            raise ModelNotFound(request.model, [self._model_name])
        if unsupported := request.unsupported_fields():
            raise BadRequest(
                f"{unsupported[0]}: this field is not supported by this service yet",
                param=unsupported[0],
            )
        if unknown := request.unknown_fields():
            logger.info("ignoring unknown request fields %s", unknown)
        prompt = await self._preprocessed(request)
        info = await self._info()
        max_tokens = completion_budget(request, len(prompt.prompt_token_ids), info)
        # Not awaited: the embeddings go from the encoder to the decoder directly.
        images = self._encoder.encode.remote(prompt.images) if prompt.images else None
        decode_request = DecodeRequest(
            request_id=new_completion_id(),
            prompt_token_ids=prompt.prompt_token_ids,
            sampling=SamplingSettings(
                max_tokens=max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                stop=request.stop_sequences,
                ignore_eos=request.ignore_eos,
            ),
        )
        chunks = self._decoder.generate.options(stream=True).remote(decode_request, images)
        if request.stream:
            return StreamingResponse(
                self._stream(request, decode_request, chunks), media_type="text/event-stream"
            )
        return await self._complete(request, decode_request, chunks)

    async def _preprocessed(self, request: ChatCompletionRequest) -> PreprocessedRequest:
        """Text: templated here. Images: fetched, decoded and templated by the Preprocess stage."""
        num_images = len(image_positions(request.messages))
        if not num_images:
            tokenized = self._preprocessor.encode_chat(request.messages)
            return PreprocessedRequest(prompt_token_ids=tokenized.prompt_token_ids)
        limit = self._config.images.max_images_per_request
        if num_images > limit or self._preprocess is None:
            raise BadRequest(
                f"messages: the request has {num_images} images; this service accepts at most {limit}",
                param="messages",
            )
        try:
            return await self._preprocess.preprocess.remote(request.messages)
        except Exception as e:
            raise _stage_error(e, "preprocess") from e

    async def _complete(
        self, request: ChatCompletionRequest, decode: DecodeRequest, chunks: AsyncIterator[DecodeChunk]
    ) -> JSONResponse:
        texts: list[str] = []
        token_ids: list[int] = []
        finish_reason = None
        try:
            async for chunk in chunks:
                texts.append(chunk.text)
                token_ids.extend(chunk.token_ids)
                finish_reason = chunk.finish_reason or finish_reason
        except Exception as e:
            raise _stage_error(e, "decoder") from e
        prompt_tokens = len(decode.prompt_token_ids)
        response = ChatCompletionResponse(
            id=decode.request_id,
            model=self._model_name,
            choices=[
                ChatCompletionChoice(
                    message=AssistantMessage(content="".join(texts)),
                    finish_reason=finish_reason,
                    token_ids=token_ids if request.return_token_ids else None,
                )
            ],
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=len(token_ids),
                total_tokens=prompt_tokens + len(token_ids),
            ),
            prompt_token_ids=decode.prompt_token_ids if request.return_token_ids else None,
        )
        return JSONResponse(response.model_dump(exclude_none=True))

    async def _stream(
        self, request: ChatCompletionRequest, decode: DecodeRequest, chunks: AsyncIterator[DecodeChunk]
    ) -> AsyncIterator[str]:
        created = int(time.time())
        with_ids = request.return_token_ids

        def chunk_json(choice: ChatCompletionStreamChoice | None, usage: Usage | None = None) -> str:
            return ChatCompletionChunk(
                id=decode.request_id,
                created=created,
                model=self._model_name,
                choices=[choice] if choice else [],
                usage=usage,
                prompt_token_ids=decode.prompt_token_ids
                if with_ids and choice and choice.delta.role
                else None,
            ).model_dump_json(exclude_none=True)

        yield _sse(chunk_json(ChatCompletionStreamChoice(delta=DeltaMessage(role="assistant", content=""))))
        completion_tokens = 0
        try:
            async for chunk in chunks:
                completion_tokens += len(chunk.token_ids)
                if not chunk.text and chunk.finish_reason is None:
                    continue
                choice = ChatCompletionStreamChoice(
                    delta=DeltaMessage(content=chunk.text),
                    finish_reason=chunk.finish_reason,
                    token_ids=chunk.token_ids if with_ids else None,
                )
                yield _sse(chunk_json(choice))
        except Exception as e:
            error = _stage_error(e, "decoder")
            logger.warning("stream %s failed: %s", decode.request_id, error.message)
            yield _sse(json.dumps(error_payload(error.message, error.error_type, None, None)))
            return
        if request.stream_options and request.stream_options.include_usage:
            prompt_tokens = len(decode.prompt_token_ids)
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            )
            yield _sse(chunk_json(None, usage))
        yield _sse("[DONE]")
