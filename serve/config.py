"""The application's configuration: one pydantic tree, validated at start-up.

`build_app` (serve/app.py) takes the raw `args` of a Serve config file,
validates them into `AppConfig`, and only then binds deployments. Unknown keys
are errors, so a typo fails at deploy time instead of being ignored.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from autoscaling import policies
from serve.layouts import check_shape, get_layout


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    source: str = Field(
        default="demo",
        description=(
            "Where the checkpoint is: a local directory, a Hugging Face repository id "
            "(e.g. 'mistralai/Ministral-3-3B-Instruct-2512'), or 'demo' for the generated "
            "demo checkpoint (random weights, meaningless output)."
        ),
    )
    served_name: str | None = Field(
        default=None,
        description=(
            "Model name clients send in `model` and see in /v1/models. Defaults to the "
            "repository id, the directory name, or 'ministral-3-demo'."
        ),
    )
    demo_seed: int = Field(default=0, description="Seed of the demo checkpoint (source 'demo').")
    demo_variant: Literal["instruct", "reasoning"] = Field(
        default="instruct", description="Which demo checkpoint to generate (source 'demo')."
    )
    reasoning: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "Whether the model writes [THINK]...[/THINK] traces: they are returned as "
            "`reasoning_content`, allowed before constrained output (tools, JSON), and the "
            "default temperature is the Reasoning card's 0.7. 'auto': on when the tokenizer "
            "has [THINK] tokens and the source names a Reasoning checkpoint (or the "
            "reasoning demo)."
        ),
    )

    @property
    def names_a_reasoning_checkpoint(self) -> bool:
        if self.source == "demo":
            return self.demo_variant == "reasoning"
        return "reasoning" in Path(self.source.rstrip("/")).name.lower()

    @property
    def name(self) -> str:
        if self.served_name:
            return self.served_name
        if self.source == "demo":
            return "ministral-3-demo"
        looks_like_path = self.source.startswith((".", "/", "~")) or self.source.count("/") != 1
        # A Hugging Face id is served under its full name, as vLLM does.
        return Path(self.source).name if looks_like_path else self.source


class EngineConfig(_Strict):
    """vLLM engine settings of each decoder replica."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="Compute dtype; 'auto' takes the checkpoint's (bfloat16 for Ministral 3).",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        description=(
            "Longest prompt + completion in tokens. None uses the checkpoint's maximum "
            "(262,144 for Ministral 3), which needs KV-cache room for one full sequence."
        ),
    )
    max_num_seqs: int = Field(default=64, ge=1, description="Most sequences batched at once.")
    max_num_batched_tokens: int | None = Field(
        default=None, ge=16, description="Token budget of one engine step (None: vLLM's default)."
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        description="Fraction of GPU memory vLLM may use (weights + activations + KV cache).",
    )
    cpu_kv_cache_space_gib: int = Field(
        default=2,
        ge=1,
        description="KV-cache size on CPU machines (vLLM's VLLM_CPU_KVCACHE_SPACE), in GiB.",
    )
    cpu_omp_threads_bind: str = Field(
        default="auto",
        description="vLLM's VLLM_CPU_OMP_THREADS_BIND on CPU machines ('auto', 'all', '0-3').",
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per pipeline stage.")
    pipeline_parallel_size: int = Field(default=1, ge=1, description="Pipeline stages.")
    enforce_eager: bool = Field(
        default=True,
        description="Skip CUDA-graph / torch.compile warm-up (faster start, slower steps).",
    )
    enable_prefix_caching: bool = Field(default=True, description="Reuse KV of shared prefixes.")
    export_metrics: bool = Field(
        default=True,
        description=(
            "Export vLLM's engine metrics (ray_vllm_*: running and waiting requests, KV-cache use, "
            "tokens, latencies) from every decoder replica through Ray's metrics agent."
        ),
    )


class AutoscalingBounds(_Strict):
    """Bounds, targets and delays of a stage's autoscaling (autoscaling/policies.py).

    Each stage scales on its own signals against their targets per replica:
    the decoder on waiting requests, KV-cache use and ongoing requests; the
    encoder on pending images; preprocess and the ingress on ongoing requests.
    """

    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas kept running.")
    max_replicas: int = Field(default=1, ge=1, description="Most replicas started under load.")
    target_ongoing_requests: float = Field(
        default=16, gt=0, description="Requests in flight per replica that autoscaling aims for."
    )
    target_waiting_requests: float = Field(
        default=2,
        gt=0,
        description="Decoder: requests waiting in vLLM's queue per replica (batch or KV cache full).",
    )
    target_kv_cache_usage: float = Field(
        default=0.8, gt=0, le=1, description="Decoder: fraction of the KV cache in use per replica."
    )
    target_pending_images: float = Field(
        default=8, gt=0, description="Encoder: images waiting to be encoded per replica."
    )
    upscale_delay_s: float = Field(
        default=30, ge=0, description="How long more replicas must be wanted before one is started."
    )
    downscale_delay_s: float = Field(
        default=300, ge=0, description="How long fewer replicas must be wanted before one is stopped."
    )
    look_back_period_s: float = Field(
        default=10, gt=0, description="Window over which each replica's signals are averaged."
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingBounds:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self

    def targets(self, stage: str) -> dict[str, float]:
        """The signals `stage` scales on and their targets per replica."""
        return {
            "decoder": {
                policies.WAITING: self.target_waiting_requests,
                policies.KV_CACHE_USAGE: self.target_kv_cache_usage,
                policies.ONGOING: self.target_ongoing_requests,
            },
            "encoder": {policies.PENDING_IMAGES: self.target_pending_images},
        }.get(stage, {policies.ONGOING: self.target_ongoing_requests})

    def serve_config(self, stage: str) -> dict:
        """Serve's `autoscaling_config` for `stage`: our policy applies the delays, so Serve's are 0."""
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "look_back_period_s": self.look_back_period_s,
            "upscale_delay_s": 0,
            "downscale_delay_s": 0,
            "policy": {
                "policy_function": "autoscaling.policies:StagePolicy",
                "policy_kwargs": {
                    "targets": self.targets(stage),
                    "upscale_delay_s": self.upscale_delay_s,
                    "downscale_delay_s": self.downscale_delay_s,
                },
            },
        }


class DeploymentConfig(_Strict):
    """Replicas and resources of one stage."""

    num_replicas: int | None = Field(
        default=1, ge=1, description="Fixed replica count; null to autoscale within `autoscaling`."
    )
    autoscaling: AutoscalingBounds | None = Field(
        default=None, description="Autoscaling bounds (used when num_replicas is null)."
    )
    num_cpus: float = Field(default=0.0, ge=0.0, description="Logical CPUs per replica.")
    num_gpus: float = Field(default=0.0, ge=0.0, description="GPUs (or a fraction) per replica.")
    max_ongoing_requests: int = Field(
        default=256, ge=1, description="Requests one replica accepts before Serve queues them."
    )
    max_queued_requests: int | None = Field(
        default=256,
        ge=1,
        description=(
            "Requests queued for this stage (in each calling replica) while all its replicas hold "
            "max_ongoing_requests. Beyond them the client gets a 429 with Retry-After at once, "
            "instead of a latency without bound. null: no bound."
        ),
    )
    health_check_period_s: float = Field(
        default=5.0,
        gt=0,
        description=(
            "How often Serve checks each replica (Ray's default is 10 s): a replica that died is "
            "noticed, and replaced, within about this long."
        ),
    )
    graceful_shutdown_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description=(
            "How long a replica being stopped (scale-down, redeploy, shutdown) keeps serving the "
            "requests it holds before it is killed; it takes no new ones meanwhile."
        ),
    )

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> DeploymentConfig:
        if self.num_replicas is None and self.autoscaling is None:
            raise ValueError("set either num_replicas or autoscaling")
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set num_replicas or autoscaling, not both (num_replicas: null)")
        return self

    def serve_options(self, stage: str) -> dict:
        """Keyword arguments of `Deployment.options` for this stage."""
        options: dict = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": -1 if self.max_queued_requests is None else self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "health_check_period_s": self.health_check_period_s,
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.serve_config(stage)
        else:
            options["num_replicas"] = self.num_replicas
        return options


class DeploymentsConfig(_Strict):
    ingress: DeploymentConfig = Field(
        # Requests it cannot take wait in Serve's proxy, which answers 429 past the queue.
        default_factory=lambda: DeploymentConfig(max_ongoing_requests=1024, max_queued_requests=1024),
        description="HTTP ingress: validation, chat templating of text-only requests, SSE framing.",
    )
    preprocess: DeploymentConfig = Field(
        default_factory=DeploymentConfig,
        description="Image requests: fetch and decode images, chat template with image tokens (CPU).",
    )
    encoder: DeploymentConfig = Field(
        default_factory=DeploymentConfig,
        description=(
            "Pixtral vision tower + projector. On a GPU machine give it a GPU or a fraction of "
            "the decoder's (then lower engine.gpu_memory_utilization to leave it room)."
        ),
    )
    decoder: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(num_cpus=1.0, max_ongoing_requests=512),
        description=(
            "vLLM decoder replicas. Here num_gpus is per rank: with GPUs, each replica gets a "
            "placement group of tensor x pipeline parallel bundles of num_gpus each."
        ),
    )

    @property
    def encoder_shares_decoder_gpu(self) -> bool:
        return 0 < self.encoder.num_gpus < 1 and 0 < self.decoder.num_gpus < 1

    @model_validator(mode="after")
    def _shared_gpu_fits(self) -> DeploymentsConfig:
        encoder, decoder = self.encoder.num_gpus, self.decoder.num_gpus
        if self.encoder_shares_decoder_gpu and encoder + decoder > 1:
            raise ValueError(
                f"encoder.num_gpus ({encoder}) + decoder.num_gpus ({decoder}) exceed one GPU: "
                "to share a GPU their fractions must sum to at most 1"
            )
        return self


AspectMode = Literal["keep", "crop", "pad"]


class AspectRatioPolicy(_Strict):
    """The model card's advice: images close to 1:1 work best."""

    mode: AspectMode = Field(
        default="keep",
        description=(
            "'keep' sends images as they are; 'crop' centre-crops, 'pad' pads (with the "
            "normalisation mean colour) images whose long/short side ratio exceeds "
            "`max_aspect_ratio`, down to that ratio."
        ),
    )
    max_aspect_ratio: float = Field(
        default=2.0, ge=1.0, description="Long side / short side above which 'crop' or 'pad' applies."
    )


class ImagesConfig(_Strict):
    """Limits and policies of the image path (preprocess stage)."""

    max_images_per_request: int = Field(
        default=8, ge=0, description="Most images in one request (all messages together); 0 disables images."
    )
    max_image_bytes: int = Field(
        default=20 * 1024 * 1024,
        ge=1024,
        description="Largest encoded image (fetched or data URL), in bytes.",
    )
    max_image_pixels: int = Field(
        default=4096 * 4096,
        ge=1,
        description=(
            "Largest image decoded, width x height (of a JPEG, at the reduced scale it is decoded at). "
            "Checked before pixels are decoded; Pillow's own decompression-bomb guard stays on behind "
            "it. The model sees at most 1540 px a side (Ministral 3's tokenizer resizes larger images "
            "down), so 4096 x 4096 is well above what it uses, while a few KiB of PNG that would "
            "decode to hundreds of MiB is refused."
        ),
    )
    decode_workers: int = Field(
        default=2,
        ge=1,
        description=(
            "Threads of each preprocess replica that decode and template images: at most this many "
            "images are decoded at once, each up to max_image_pixels x 4 bytes and a CPU-second."
        ),
    )
    fetch_timeout_s: float = Field(default=10.0, gt=0, description="Time limit for fetching one image URL.")
    max_redirects: int = Field(default=3, ge=0, description="Redirects followed when fetching an image URL.")
    allow_private_networks: bool = Field(
        default=False,
        description=(
            "Fetch image URLs whose host resolves to a loopback, private, link-local or reserved "
            "address. Off by default so that clients cannot make the service reach internal hosts."
        ),
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description=(
            "Host names image URLs may point to: exact names, or *.example.com for its subdomains. "
            "Empty: any host whose addresses are public. Private addresses still need "
            "allow_private_networks."
        ),
    )
    allowed_ports: list[int] = Field(
        default_factory=lambda: [80, 443],
        description=(
            "Ports image URLs may point to; a URL without one uses its scheme's (80 for http, 443 "
            "for https). Other ports of a public host are seldom an image server and often an admin "
            "or database port. Empty: any port (a test image server listening on a random port)."
        ),
    )
    max_concurrent_fetches: int = Field(
        default=16, ge=1, description="Image URLs one preprocess replica fetches at once; the rest wait."
    )
    aspect_ratio: AspectRatioPolicy = Field(default_factory=AspectRatioPolicy)
    preprocessed_cache_bytes: int = Field(
        default=256 * 1024**2,
        ge=0,
        description=(
            "Byte budget of each preprocess replica's LRU of preprocessed images (normalised pixels), "
            "keyed by the image's bytes: an image sent again is not decoded, resized or normalised "
            "again. 0 disables it."
        ),
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, hosts: list[str]) -> list[str]:
        pattern = re.compile(r"(\*\.)?[a-z0-9-]+(\.[a-z0-9-]+)*\.?")
        for host in hosts:
            if not pattern.fullmatch(host):
                raise ValueError(f"{host!r} is not a lower-case host name or *.domain pattern")
        return hosts

    @field_validator("allowed_ports")
    @classmethod
    def _ports(cls, ports: list[int]) -> list[int]:
        for port in ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"{port} is not a TCP port (1-65535)")
        return ports


class EncoderConfig(_Strict):
    """Vision encoder settings of each encoder replica (its dtype is `engine.dtype`)."""

    max_batch_size: int = Field(default=8, ge=1, description="Most images encoded in one forward pass.")
    batch_wait_timeout_s: float = Field(
        default=0.005, ge=0, description="How long a batch waits for more images before it runs."
    )
    cache_bytes: int = Field(
        default=1024**3,
        ge=0,
        description="Byte budget of the LRU cache of image-token embeddings (per replica); 0 disables it.",
    )


class StreamingConfig(_Strict):
    """How generated tokens travel from the decoder to the client.

    Each chunk crosses three hops (decoder -> ingress -> proxy -> client), each
    a Ray message with a fixed CPU cost, so a chunk budget per decoder replica
    bounds what streaming costs the serving processes: the interval between
    chunks of one request widens with the number of requests in the replica,
    from `interval_ms` up to `max_interval_ms` (deployments/stream_pacing.py).
    """

    interval_ms: float = Field(
        default=50.0,
        ge=0.0,
        le=1000.0,
        description=(
            "Least time between two chunks of one request leaving the decoder. Tokens generated "
            "meanwhile go out together in one chunk (vLLM merges them). The first chunk (time to "
            "first token) and the last (end of the stream) are never held. Ray Serve LLM batches "
            "its streams the same way, 50 ms by default. 0, with max_chunks_per_s null, sends every "
            "engine step on its own."
        ),
    )
    max_chunks_per_s: float | None = Field(
        default=80.0,
        gt=0.0,
        description=(
            "Chunk budget of one decoder replica, summed over its requests: with N requests in "
            "the replica, one request's chunks are N / max_chunks_per_s apart (at least "
            "interval_ms, at most max_interval_ms). null keeps every request at interval_ms."
        ),
    )
    max_interval_ms: float = Field(
        default=200.0,
        ge=0.0,
        le=1000.0,
        description="Widest time between two chunks of one request that the chunk budget may set.",
    )

    @model_validator(mode="after")
    def _interval_range(self) -> StreamingConfig:
        if self.max_interval_ms < self.interval_ms:
            raise ValueError(
                f"streaming.max_interval_ms ({self.max_interval_ms}) is below "
                f"streaming.interval_ms ({self.interval_ms})"
            )
        return self


class LimitsConfig(_Strict):
    """What one request may ask for and how long it may take (checked by serve/limits.py).

    Each limit refused is a 4xx whose message names the limit, so that a
    client sees which setting it ran into and an operator which to raise.
    """

    max_request_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description=(
            "Largest request body accepted, in bytes; enforced while the body is read. It must "
            "hold an image of images.max_image_bytes sent as a base64 data URL."
        ),
    )
    max_json_values: int = Field(
        default=1024 * 1024,
        ge=1024,
        description=(
            "Most JSON values (array elements and object members) in one request body, counted "
            "before it is parsed as its commas, brackets and braces (those inside strings too): "
            "parsing costs about 40 ms per million values, all of it holding the ingress's event loop."
        ),
    )
    max_messages: int = Field(default=1024, ge=1, description="Most messages in one chat request.")
    max_content_parts: int = Field(
        default=2048, ge=1, description="Most content parts (text and images) over all messages of a request."
    )
    max_choices: int = Field(default=16, ge=1, description="Largest `n` (choices generated per request).")
    max_stop_sequences: int = Field(default=16, ge=0, description="Most stop sequences in one request.")
    max_stop_sequence_chars: int = Field(
        default=256, ge=1, description="Longest stop sequence, in characters."
    )
    max_tools: int = Field(default=128, ge=0, description="Most tools in one chat request (OpenAI's limit).")
    max_schema_bytes: int = Field(
        default=64 * 1024,
        ge=64,
        description="Largest JSON Schema (a tool's parameters or response_format's schema), as compact JSON.",
    )
    max_schema_depth: int = Field(
        default=64,
        ge=2,
        description=(
            "Deepest nesting of JSON objects and arrays in one JSON Schema (an object property "
            "nested in another takes two: `properties` and the property's schema)."
        ),
    )
    max_logit_bias: int = Field(default=300, ge=0, description="Most logit_bias entries (OpenAI's limit).")
    default_max_tokens: int | None = Field(
        default=16_384,
        ge=1,
        description=(
            "Tokens a chat completion may generate per choice when the request sets neither "
            "max_tokens nor max_completion_tokens (at most the rest of the context, and within "
            "max_total_completion_tokens and max_logprob_entries). null: the rest of the context "
            "(262,144 tokens on the published checkpoints). The reply's finish_reason is 'length' "
            "when it stops there."
        ),
    )
    max_total_completion_tokens: int = Field(
        default=65_536,
        ge=1,
        description=(
            "Most tokens one request may ask the engine to generate over all its choices "
            "(n x max_tokens): what one request can cost the decoder."
        ),
    )
    max_logprob_entries: int = Field(
        default=131_072,
        ge=1,
        description=(
            "Most log-probabilities one non-streaming reply may hold: every choice's tokens (and "
            "with echo, its prompt tokens) x (top_logprobs + 1). About 80 bytes of JSON each; it "
            "bounds the reply the ingress builds in memory. Streams are sent as they are made and "
            "are not held to it."
        ),
    )
    grammar_cache_bytes: int = Field(
        default=64 * 1024**2,
        ge=0,
        description=(
            "Byte budget of each ingress replica's cache of compiled grammars (tools and "
            "response_format, by a hash of what they were compiled from). 0 disables it."
        ),
    )
    request_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description=(
            "Longest a generation request may run, from its arrival to its last token. Past it the "
            "engine request is aborted and the client gets a 504 (or an error event when streaming)."
        ),
    )
    retry_after_s: int = Field(
        default=1, ge=0, description="The Retry-After (seconds) sent with a 429 when a stage's queue is full."
    )

    @model_validator(mode="after")
    def _every_choice_gets_a_token(self) -> LimitsConfig:
        if self.max_total_completion_tokens < self.max_choices:
            raise ValueError(
                f"limits.max_total_completion_tokens ({self.max_total_completion_tokens}) must be at "
                f"least limits.max_choices ({self.max_choices}): each choice needs a token"
            )
        return self


class AuthConfig(_Strict):
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description=(
            "Keys clients must send as `Authorization: Bearer KEY` on every route but /health. "
            "MINISTRAL_API_KEYS (comma-separated, in the replicas' environment) adds to them; "
            "with neither, the service is open."
        ),
    )
    allow_anonymous: bool = Field(
        default=False,
        description=(
            "Serve without API keys where others can reach the service. Without keys and without "
            "this, `ministral-serve run --host` with an address beyond loopback refuses to start and "
            "the Helm chart refuses to render; on loopback, a service without keys is always open."
        ),
    )
    tenants_file: str | None = Field(
        default=None,
        description=(
            "A YAML file of tenants: their keys (SHA-256 digests) and limits, priorities and weights "
            "(docs/tenancy.md). MINISTRAL_TENANTS_FILE in the replicas' environment names it too, "
            "and wins. The file is re-read every tenants_reload_s; the keys of api_keys and "
            "MINISTRAL_API_KEYS form one more tenant, `default`, without limits."
        ),
    )
    tenants_reload_s: float = Field(
        default=3.0,
        gt=0,
        le=60,
        description="How often each ingress replica looks for a changed tenants file.",
    )


class AdmissionConfig(_Strict):
    """The ingress's admission gate (serve/admission.py): how many requests go past each ingress
    replica to the encoder and decoder at once, and in which order the rest follow."""

    max_in_flight: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Requests past one ingress replica at once; the rest wait at the ingress in order of "
            "priority, then by weighted fair share of cost. null: with a tenants file, the "
            "decoders' batch slots (engine.max_num_seqs x decoder replicas, max_replicas when "
            "autoscaling) divided among the ingress replicas; without one, no gate. 0: no gate."
        ),
    )
    max_waiting: int = Field(
        default=1024,
        ge=1,
        description="Requests that may wait at one ingress replica's gate; beyond them, a 429 at once.",
    )
    reserved_for_high: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Of the gate's slots, how many only high-priority requests may take, so that one "
            "starts at once under a flood of others (the engine does not preempt running "
            "requests for it). null: an eighth of the slots, rounded down."
        ),
    )
    prompt_token_cost: float = Field(
        default=0.1,
        ge=0,
        description="A prompt token's cost, in generated tokens (a prefill step handles many at once).",
    )
    image_token_cost: float = Field(
        default=0.25,
        ge=0,
        description="An image token's cost, in generated tokens: its prefill and the encoder's work.",
    )
    expected_completion_tokens: int = Field(
        default=256,
        ge=1,
        description=(
            "Completion tokens assumed for a request that does not set max_tokens, when its cost and "
            "its tokens-per-minute charge are estimated (the charge is corrected when it ends)."
        ),
    )


ROUTER_CLASSES = {
    "decoder": "deployments.router:DecoderRouter",
    "encoder": "deployments.router:EncoderRouter",
}


class RoutingConfig(_Strict):
    """How the ingress picks a decoder and an encoder replica (deployments/routing.py)."""

    router: Literal["throughput", "serve_default"] = Field(
        default="throughput",
        description=(
            "throughput: each request goes where it is estimated to finish soonest, from the "
            "replicas' measured speed and queued work, with affinity for cached prefixes and images. "
            "serve_default: Ray Serve's own (power of two choices on queue length)."
        ),
    )
    stats_period_s: float = Field(
        default=2.0,
        gt=0,
        description="How often Serve polls each replica's routing stats (Ray's default: 10 s).",
    )
    affinity_tolerance: float = Field(
        default=1.5,
        ge=1,
        description=(
            "A replica holding part of a request (its prefix, its images) gets it while its estimated "
            "finish is within this factor of the best replica's."
        ),
    )
    kv_usage_limit: float = Field(
        default=0.95,
        gt=0,
        le=1,
        description=(
            "A decoder replica whose KV cache would pass this fraction with the request is tried last."
        ),
    )

    def request_router_config(self, stage: Literal["decoder", "encoder"]) -> dict | None:
        """Serve's `request_router_config` for a stage; None for Serve's default router."""
        if self.router == "serve_default":
            return None
        return {
            "request_router_class": ROUTER_CLASSES[stage],
            "request_router_kwargs": {
                "affinity_tolerance": self.affinity_tolerance,
                "kv_usage_limit": self.kv_usage_limit,
                # Stats older than a few polls describe a replica that has moved on.
                "stale_after_s": max(5 * self.stats_period_s, 5.0),
            },
            "request_routing_stats_period_s": self.stats_period_s,
        }


class AppConfig(_Strict):
    """Arguments of `serve.app:build_app` (the `args:` of a Serve config file)."""

    layout: str | None = Field(
        default=None,
        description=(
            "A GPU layout preset (serve/layouts.py: 1gpu, 2gpu-tp, 2gpu-pp, 2gpu-dp, 2gpu-encoder, "
            "3gpu-pp, 4gpu-tp, 4gpu-pp, 4gpu-tp2pp2, 4gpu-dp, 4gpu-encoder-pp3). It sets the "
            "decoder's tensor/pipeline parallel sizes, replicas and GPUs, the encoder's GPUs, and "
            "engine.gpu_memory_utilization (which may still be lowered); setting those too is an error."
        ),
    )
    gpus_per_node: int | None = Field(
        default=None,
        ge=1,
        description="GPUs on each node of the cluster; when set, a layout whose TP group needs more fails.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    deployments: DeploymentsConfig = Field(default_factory=DeploymentsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    streaming: StreamingConfig = Field(default_factory=StreamingConfig)
    use_default_system_prompt: bool = Field(
        default=True,
        description=(
            "Prepend the checkpoint's SYSTEM_PROMPT.txt (dates filled in) when a "
            "conversation has no system message."
        ),
    )
    system_prompt_date: dt.date | None = Field(
        default=None,
        description=(
            "The date the default system prompt gives as today (yesterday is the day before). "
            "null: the replica's date when the request arrives. Pin it where a prompt must not "
            "change from one day to the next (tests, reproducible evaluations)."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _expand_layout(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("layout") is None:
            return data
        layout = get_layout(data["layout"])
        return _merge_layout(data, layout.config_overrides(), layout.name, path=())

    @model_validator(mode="after")
    def _shape_fits_model_and_nodes(self) -> AppConfig:
        check_shape(
            self.engine.tensor_parallel_size,
            self.engine.pipeline_parallel_size,
            gpus_per_node=self.gpus_per_node,
        )
        return self

    @model_validator(mode="after")
    def _an_image_fits_in_a_request(self) -> AppConfig:
        if self.images.max_images_per_request == 0:
            return self
        # A data URL carries the image base64-encoded: 4 characters per 3 bytes, plus its header.
        data_url_bytes = 4 * -(-self.images.max_image_bytes // 3) + len("data:image/jpeg;base64,")
        if data_url_bytes > self.limits.max_request_bytes:
            raise ValueError(
                f"images.max_image_bytes ({self.images.max_image_bytes}) is {data_url_bytes} bytes as a "
                f"data URL, more than limits.max_request_bytes ({self.limits.max_request_bytes}) lets "
                "through: lower the first or raise the second"
            )
        return self

    @model_validator(mode="after")
    def _decoder_leaves_room_for_a_shared_encoder(self) -> AppConfig:
        # On a shared card the encoder is held to its GPU fraction of memory
        # (torch's per-process memory fraction); vLLM must leave it that much.
        encoder_share = self.deployments.encoder.num_gpus
        utilization = self.engine.gpu_memory_utilization
        if self.deployments.encoder_shares_decoder_gpu and utilization + encoder_share > 1:
            raise ValueError(
                f"the encoder shares the decoder's GPU with {encoder_share} of it, so "
                f"engine.gpu_memory_utilization ({utilization}) must be at most {1 - encoder_share:.2f}"
            )
        return self


# Settings a user may lower below the layout's: the layout's value is an upper bound.
_LAYOUT_CEILINGS = {("engine", "gpu_memory_utilization")}


def _merge_layout(data: dict, overrides: dict, layout: str, path: tuple[str, ...]) -> dict:
    merged = dict(data)
    for key, value in overrides.items():
        where = (*path, key)
        if isinstance(value, dict):
            merged[key] = _merge_layout(dict(data.get(key) or {}), value, layout, where)
        elif key not in data:
            merged[key] = value
        elif where in _LAYOUT_CEILINGS:
            merged[key] = min(data[key], value)
        elif data[key] != value:
            raise ValueError(
                f"{'.'.join(where)} is {data[key]!r} but layout {layout!r} sets it to {value!r}: "
                "remove one of the two"
            )
    return merged
