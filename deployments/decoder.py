"""Decoder stage: vLLM's AsyncLLM on the Ministral 3 language model.

`DecoderEngine` does the work and runs without Ray; `Decoder` is the thin Ray
Serve deployment around it. Text prompts reach vLLM as token ids. Prompts with
images reach it in vLLM's mixed mode: the token ids, plus `prompt_embeds` whose
[IMG] rows are the encoder's image-token embeddings (the other rows are unused
and left zero: vLLM embeds those positions from their token ids). That is the
arithmetic of the monolithic `Mistral3ForConditionalGeneration`, which
replaces the [IMG] rows of the token embeddings with the image features.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, replace

from ray import serve

from autoscaling import policies
from deployments.engine_settings import (
    GREEDY_TEMPERATURE,
    cpu_environment,
    engine_args,
    engine_parallelism,
    sampling_defaults,
    system_fingerprint,
    usable_cores,
)
from deployments.language_model import write_language_model_view
from deployments.output_parsing import ChoiceParser, position_logprobs
from deployments.stream_pacing import chunk_interval_s, paced
from serve.checkpoint import open_checkpoint, reasoning_enabled
from serve.config import AppConfig
from serve.messages import (
    ChoiceDelta,
    DecodeChunk,
    DecodeRequest,
    EngineInfo,
    ImageTokenEmbeddings,
    SamplingSettings,
)

logger = logging.getLogger(__name__)


def engine_prompt(token_ids: list[int], images: ImageTokenEmbeddings | None, image_token_id: int, dtype):
    """vLLM's prompt: token ids, or token ids + image-token embeddings (mixed mode)."""
    import torch
    from vllm.inputs import EmbedsPrompt, TokensPrompt

    if images is None:
        return TokensPrompt(prompt_token_ids=token_ids)
    is_image_token = torch.tensor(token_ids) == image_token_id
    image_rows = images.embeddings  # [num_image_tokens, hidden_size]
    if int(is_image_token.sum()) != image_rows.shape[0]:
        raise ValueError(
            f"the prompt has {int(is_image_token.sum())} [IMG] tokens but the encoder "
            f"returned {image_rows.shape[0]} image-token embeddings"
        )
    embeds = torch.zeros(len(token_ids), image_rows.shape[1], dtype=dtype)  # [num_prompt_tokens, hidden]
    embeds[is_image_token] = image_rows.to(dtype)
    return EmbedsPrompt(
        prompt_embeds=embeds,
        prompt_token_ids=token_ids,
        prompt_is_token_ids=(~is_image_token).tolist(),
    )


class DecoderEngine:
    """One vLLM engine serving the language model of a Ministral 3 checkpoint."""

    def __init__(self, config: AppConfig):
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        from deployments.engine_metrics import EngineLoad, EngineStatLogger

        checkpoint = open_checkpoint(config.model, weights=True)
        self.image_token_id = checkpoint.special_token_id("[IMG]")
        view_dir = write_language_model_view(checkpoint)
        on_gpu = not current_platform.is_cpu()
        cores = usable_cores()
        self.parallelism = engine_parallelism(config.engine, on_gpu=on_gpu, cpu_cores=len(cores))
        if not on_gpu:
            os.environ.update(cpu_environment(config.engine, self.parallelism, cores))
        args = engine_args(
            config.engine,
            self.parallelism,
            model_dir=str(view_dir),
            tokenizer_dir=str(checkpoint.path),
            served_name=config.model.name,
        )
        vllm_config = args.create_engine_config()
        if self.parallelism.executor == "ray":
            import ray

            # The engine core runs in a subprocess that is not a Ray actor:
            # hand it the replica's placement group, one GPU bundle per rank.
            vllm_config.parallel_config.placement_group = ray.util.get_current_placement_group()
            os.environ["VLLM_RAY_PER_WORKER_GPUS"] = str(config.deployments.decoder.num_gpus)
        # The engine's own figures (ray_vllm_*: running and waiting requests,
        # KV-cache use, tokens, latencies) through Ray's metrics agent,
        # labelled with this replica's id.
        # And the load this replica reports to the routers (record_routing_stats).
        self.load = EngineLoad()
        stat_loggers = [self.load.stat_logger]
        if config.engine.export_metrics:
            stat_loggers.append(EngineStatLogger)
        self.engine = AsyncLLM.from_vllm_config(
            vllm_config, stat_loggers=stat_loggers, disable_log_stats=True
        )
        self.streaming = config.streaming
        self.tokenizer = self.engine.get_tokenizer()
        model_config = self.engine.model_config
        cache_config = self.engine.vllm_config.cache_config
        self.default_sampling = sampling_defaults(
            model_config.get_diff_sampling_param(), reasoning=reasoning_enabled(config.model, checkpoint)
        )
        self.info = EngineInfo(
            max_model_len=model_config.max_model_len,
            vocab_size=model_config.get_vocab_size(),
            system_fingerprint=system_fingerprint(checkpoint.config, config.engine),
            kv_cache_blocks=cache_config.num_gpu_blocks or 0,
            kv_block_size=cache_config.block_size,
            kv_cache_tokens=cache_config.kv_cache_size_tokens or 0,
            max_concurrency=cache_config.kv_cache_max_concurrency or 0.0,
        )
        self.load.kv_cache_tokens = self.info.kv_cache_tokens
        self.load.max_running = self.engine.vllm_config.scheduler_config.max_num_seqs
        logger.info(
            "decoder ready: %s, %s, max_model_len=%d, sampling defaults %s",
            checkpoint.path,
            self.parallelism,
            self.info.max_model_len,
            self.default_sampling,
        )

    def sampling_params(self, settings: SamplingSettings):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        requested = {
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "top_k": settings.top_k,
            "min_p": settings.min_p,
            "seed": settings.seed,
            "presence_penalty": settings.presence_penalty,
            "frequency_penalty": settings.frequency_penalty,
        }
        params = {**self.default_sampling}
        params.update({name: value for name, value in requested.items() if value is not None})
        params.pop("max_tokens", None)
        greedy = params.get("temperature", 1.0) < GREEDY_TEMPERATURE
        return SamplingParams(
            **params,
            # vLLM refuses n > 1 when greedy; the choices would all be the same
            # tokens anyway, so one is generated and copied (see `generate`).
            n=1 if greedy else settings.n,
            max_tokens=settings.max_tokens,
            stop=settings.stop or None,
            ignore_eos=settings.ignore_eos,
            logit_bias=settings.logit_bias,
            logprobs=settings.logprobs,
            prompt_logprobs=settings.prompt_logprobs,
            structured_outputs=StructuredOutputsParams(grammar=settings.grammar)
            if settings.grammar
            else None,
            # vLLM's Mistral tokenizer keeps [TOOL_CALLS], [ARGS], [THINK] and
            # [/THINK] in the text when it skips special tokens, so the output
            # parser still sees them. Not skipping them is worse than useless
            # (vLLM 0.32): that branch of `convert_ids_to_tokens` has no byte
            # fallback, so a character split across tokens comes out as U+FFFD.
            skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA,
        )

    async def generate(
        self, request: DecodeRequest, images: ImageTokenEmbeddings | None = None
    ) -> AsyncIterator[DecodeChunk]:
        """Stream the completion; cancelling the iteration aborts the request in vLLM."""
        sampling = self.sampling_params(request.sampling)
        copies = request.sampling.n if sampling.n == 1 else 1
        prompt = engine_prompt(
            request.prompt_token_ids, images, self.image_token_id, self.engine.model_config.dtype
        )
        parsers: dict[int, ChoiceParser] = {}
        first = True
        prompt_tokens = len(request.prompt_token_ids)
        to_generate = sampling.max_tokens * sampling.n
        self.load.admitted(prompt_tokens, to_generate)
        outputs = self.engine.generate(prompt, sampling, request.request_id, priority=request.priority)
        try:
            async for output in paced(outputs, self._chunk_interval_s):
                if first:
                    self.load.prefilled(prompt_tokens)
                generated = sum(len(completion.token_ids) for completion in output.outputs)
                self.load.generated(generated)
                to_generate -= generated
                chunk = self._chunk(request, output, parsers, copies, first)
                if first and images is not None:
                    chunk = replace(chunk, encoder_seconds=images.encoder_seconds)
                yield chunk
                first = False
        finally:
            if first:
                self.load.prefilled(prompt_tokens)
            self.load.generated(to_generate)

    def _chunk(
        self, request: DecodeRequest, output, parsers: dict[int, ChoiceParser], copies: int, first: bool
    ) -> DecodeChunk:
        choices = []
        for completion in output.outputs:
            delta = self._choice_delta(request, completion, parsers)
            if copies == 1:
                choices.append(delta)
            else:
                choices.extend(replace(delta, index=copy) for copy in range(copies))
        prompt_logprobs = None
        if first and request.sampling.prompt_logprobs is not None and output.prompt_logprobs:
            prompt_logprobs = [
                None
                if position is None
                else position_logprobs(self.tokenizer, position, token_id, request.sampling.prompt_logprobs)
                for position, token_id in zip(output.prompt_logprobs, request.prompt_token_ids, strict=False)
            ]
        return DecodeChunk(choices=choices, prompt_logprobs=prompt_logprobs)

    def _chunk_interval_s(self) -> float:
        return chunk_interval_s(self.engine.get_num_unfinished_requests(), self.streaming)

    def _choice_delta(
        self, request: DecodeRequest, completion, parsers: dict[int, ChoiceParser]
    ) -> ChoiceDelta:
        token_ids = list(completion.token_ids)
        finished = completion.finish_reason is not None
        logprobs = None
        if request.sampling.logprobs is not None and completion.logprobs is not None:
            logprobs = [
                position_logprobs(self.tokenizer, position, token_id, request.sampling.logprobs)
                for position, token_id in zip(completion.logprobs, token_ids, strict=True)
            ]
        if request.parsing is None:
            return ChoiceDelta(
                index=completion.index,
                text=completion.text,
                token_ids=token_ids,
                logprobs=logprobs,
                finish_reason=completion.finish_reason,
            )
        parser = parsers.get(completion.index)
        if parser is None:
            parser = parsers[completion.index] = ChoiceParser(
                self.tokenizer, request.parsing, request.prompt_token_ids
            )
        content, reasoning, tool_calls = parser.feed(completion.text, token_ids, finished)
        return ChoiceDelta(
            index=completion.index,
            text=content,
            token_ids=token_ids,
            reasoning=reasoning,
            tool_calls=tool_calls,
            logprobs=logprobs,
            finish_reason=completion.finish_reason,
            reasoning_tokens=parser.reasoning_tokens() if finished else 0,
        )

    def num_unfinished_requests(self) -> int:
        return self.engine.get_num_unfinished_requests()

    async def check_health(self) -> None:
        await self.engine.check_health()

    def shutdown(self) -> None:
        self.engine.shutdown()


@serve.deployment(name="Decoder", health_check_period_s=10, health_check_timeout_s=60)
class Decoder:
    def __init__(self, config: AppConfig):
        self._engine = DecoderEngine(config)

    async def generate(
        self, request: DecodeRequest, images: ImageTokenEmbeddings | None = None
    ) -> AsyncIterator[DecodeChunk]:
        # `images` arrives as the encoder's DeploymentResponse, resolved by
        # Serve in this replica: the embeddings never pass through the ingress.
        async for chunk in self._engine.generate(request, images):
            yield chunk

    async def engine_info(self) -> EngineInfo:
        return self._engine.info

    async def num_unfinished_requests(self) -> int:
        return self._engine.num_unfinished_requests()

    def record_routing_stats(self) -> dict:
        """Polled by Serve's controller (routing.stats_period_s) for the decoder router."""
        return asdict(self._engine.load.load(time.time()))

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The decoder's autoscaling signals (autoscaling/policies.py)."""
        load = self._engine.load.load(time.time())
        return {policies.WAITING: load.waiting, policies.KV_CACHE_USAGE: load.kv_cache_usage}

    async def check_health(self) -> None:
        await self._engine.check_health()

    def __del__(self):
        # Stops vLLM's engine-core process with the replica; absent if
        # __init__ failed before the engine started.
        if engine := getattr(self, "_engine", None):
            engine.shutdown()
