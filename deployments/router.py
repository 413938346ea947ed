"""Ray Serve request routers of the decoder and encoder: thin glue around deployments/routing.py.

Selected by `request_router_config` (serve/config.py `RoutingConfig`), they run
where the stages' handles live: in the ingress replicas. Each call of
`choose_replicas` reads the candidates' routing stats (`record_routing_stats`
of the replicas, polled by Serve's controller) and this router's own count of
what it has sent and not seen finish, and returns the policy's ranking, one
replica per rank. Serve tries them in order, skipping a replica at its
`max_ongoing_requests` (it probes the replica's queue length for that).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import fields

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from deployments.routing import (
    PREFIX_BLOCK_TOKENS,
    AffinityIndex,
    Candidate,
    DecodeJob,
    InFlight,
    InFlightLedger,
    RoutingSettings,
    decoder_candidates,
    encoder_candidates,
    prefix_block_hashes,
    rank,
)
from serve.messages import DecodeRequest, DecoderLoad, EncoderLoad
from serve.metrics import (
    ROUTER_AFFINITY_HITS,
    ROUTER_REPLICA_IN_FLIGHT,
    ROUTER_REPLICA_KV_CACHE_USAGE,
    ROUTER_REPLICA_TOKENS_PER_S,
    keep_alive,
    ray_metric,
)

logger = logging.getLogger(__name__)


def _load(cls, stats: dict):
    """A replica's stats as their message, or None before its first report (or from another version)."""
    try:
        return cls(**{f.name: stats[f.name] for f in fields(cls) if f.name in stats}) if stats else None
    except TypeError:
        return None


class RouterMetrics:
    """What one router sees of each replica, kept on /metrics while idle."""

    def __init__(self, stage: str):
        self.stage = stage
        self._tokens_per_s = ray_metric(ROUTER_REPLICA_TOKENS_PER_S)
        self._in_flight = ray_metric(ROUTER_REPLICA_IN_FLIGHT)
        self._kv_cache_usage = ray_metric(ROUTER_REPLICA_KV_CACHE_USAGE)
        self._affinity_hits = ray_metric(ROUTER_AFFINITY_HITS)
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int, float | None]] = {}
        keep_alive(self._set_all)

    def saw(self, replica_id: str, rate: float, in_flight: int, kv_cache_usage: float | None) -> None:
        with self._lock:
            self._seen[replica_id] = (rate, in_flight, kv_cache_usage)

    def forget(self, replica_ids: set[str]) -> None:
        with self._lock:
            for replica_id in replica_ids:
                self._seen.pop(replica_id, None)

    def affinity_hit(self) -> None:
        self._affinity_hits.inc(tags={"stage": self.stage})

    def _set_all(self) -> None:
        with self._lock:
            seen = dict(self._seen)
        for replica_id, (rate, in_flight, kv_cache_usage) in seen.items():
            tags = {"stage": self.stage, "routed_replica": replica_id}
            self._tokens_per_s.set(rate, tags=tags)
            self._in_flight.set(in_flight, tags=tags)
            if kv_cache_usage is not None:
                self._kv_cache_usage.set(kv_cache_usage, tags=tags)


class _StageRouter(RequestRouter):
    """What both routers share: settings, the replicas' loads, the in-flight ledger, the
    affinity index, forgetting vanished replicas."""

    stage = ""
    load_type: type = DecoderLoad
    speed_field = "tokens_per_s"  # the load's speed, for the metrics
    kv_field: str | None = "kv_cache_usage"

    def initialize_state(self, **settings):
        self._settings = RoutingSettings(**settings)
        self._affinity = AffinityIndex()
        self._in_flight = InFlightLedger()
        self._affinity_choice: dict[str, str] = {}  # request id -> the replica its affinity picked
        self._metrics = RouterMetrics(self.stage)

    def update_replicas(self, replicas: list[RunningReplica]):
        current = {r.replica_id.unique_id for r in replicas}
        gone = {r.unique_id for r in self._replicas} - current
        if gone:
            self._affinity.forget(gone)
            self._metrics.forget(gone)
            self._in_flight.forget(gone)
        return super().update_replicas(replicas)

    def _loads(self, candidate_replicas: list[RunningReplica]) -> tuple[list[str], dict]:
        """The candidates' ids and the loads of those that have reported, as the metrics see them."""
        replica_ids = [r.replica_id.unique_id for r in candidate_replicas]
        loads = {r.replica_id.unique_id: _load(self.load_type, r.routing_stats) for r in candidate_replicas}
        loads = {replica_id: load for replica_id, load in loads.items() if load is not None}
        for replica_id in replica_ids:
            load = loads.get(replica_id)
            self._metrics.saw(
                replica_id,
                getattr(load, self.speed_field) if load else 0.0,
                self._in_flight.held.get(replica_id, InFlight()).requests,
                getattr(load, self.kv_field) if load and self.kv_field else None,
            )
        return replica_ids, loads

    def _routed(
        self,
        pending_request: PendingRequest,
        replica_id: ReplicaID,
        work: InFlight,
        affinity_keys: Callable[[], Sequence[Hashable]],
    ) -> None:
        """Counts the request in flight where it went, and records its affinity keys there (those
        its ranking computed; `affinity_keys()` if it was routed without one)."""
        request_id = pending_request.metadata.internal_request_id
        chosen = replica_id.unique_id
        ranked_keys = self._in_flight.routed(request_id, chosen, work)
        self._affinity.record(ranked_keys if ranked_keys is not None else affinity_keys(), chosen)
        if self._affinity_choice.pop(request_id, None) == chosen:
            self._metrics.affinity_hit()

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._in_flight.completed(internal_request_id)

    def _ranked(
        self,
        candidate_replicas: list[RunningReplica],
        candidates: list[Candidate],
        pending_request: PendingRequest,
        work: InFlight,
        affinity_keys: Sequence[Hashable],
    ) -> list[list[RunningReplica]]:
        """The policy's ranking as Serve's. The first is counted as in flight until the request
        is routed (a request never routed is dropped from the count after a minute)."""
        request_id = pending_request.metadata.internal_request_id
        ranks = rank(candidates, self._settings)
        first = ranks[0][0] if ranks else None
        self._in_flight.ranked(request_id, first, work, affinity_keys, time.monotonic())
        if first is not None and any(c.replica_id == first and c.affinity > 0 for c in candidates):
            self._affinity_choice[request_id] = first
            if len(self._affinity_choice) > 4096:
                self._affinity_choice.pop(next(iter(self._affinity_choice)))
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[replica_id] for replica_id in group] for group in ranks]


class DecoderRouter(_StageRouter):
    """Sends a generation where it finishes soonest, with affinity for the conversation's prefix."""

    stage = "decoder"

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        request = _decode_request(pending_request)
        if not candidate_replicas or request is None:
            # Calls other than a generation (engine info, health): any replica.
            return _any(candidate_replicas)
        replica_ids, loads = self._loads(candidate_replicas)
        blocks = prefix_block_hashes(request.prompt_token_ids)
        matched_blocks = self._affinity.prefix_matches(blocks)
        job = _job(request)
        candidates = decoder_candidates(
            replica_ids,
            loads,
            self._in_flight.held,
            {r: n * PREFIX_BLOCK_TOKENS for r, n in matched_blocks.items()},
            job,
            time.time(),
            self._settings,
        )
        return self._ranked(candidate_replicas, candidates, pending_request, _work(job), blocks)

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        request = _decode_request(pending_request)
        if request is None:
            return
        self._routed(
            pending_request,
            replica_id,
            _work(_job(request)),
            lambda: prefix_block_hashes(request.prompt_token_ids),
        )


def _any(candidate_replicas: list[RunningReplica]) -> list[list[RunningReplica]]:
    """One rank of every candidate, in random order: Serve takes the shortest queue in a rank and
    the first of equals, so without the shuffle idle replicas would all send one replica the work."""
    return [random.sample(candidate_replicas, len(candidate_replicas))] if candidate_replicas else []


def _decode_request(pending_request: PendingRequest | None) -> DecodeRequest | None:
    if pending_request is None or not pending_request.args:
        return None
    request = pending_request.args[0]
    return request if isinstance(request, DecodeRequest) else None


def _work(job: DecodeJob) -> InFlight:
    return InFlight(requests=1, work=job.max_new_tokens, prefill_tokens=job.prompt_tokens)


def _job(request: DecodeRequest) -> DecodeJob:
    return DecodeJob(
        prompt_tokens=len(request.prompt_token_ids),
        max_new_tokens=request.sampling.max_tokens * request.sampling.n,
    )


class EncoderRouter(_StageRouter):
    """Sends images to the replica that holds their embeddings, otherwise where they are encoded soonest."""

    stage = "encoder"
    load_type = EncoderLoad
    speed_field = "images_per_s"
    kv_field = None

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        image_hashes = _image_hashes(pending_request)
        if not candidate_replicas or not image_hashes:
            return _any(candidate_replicas)
        replica_ids, loads = self._loads(candidate_replicas)
        candidates = encoder_candidates(
            replica_ids,
            loads,
            self._in_flight.held,
            self._affinity.holders(image_hashes),
            image_hashes,
            time.time(),
            self._settings,
        )
        work = InFlight(requests=1, work=len(image_hashes))
        return self._ranked(candidate_replicas, candidates, pending_request, work, image_hashes)

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        image_hashes = _image_hashes(pending_request)
        if not image_hashes:
            return
        self._routed(
            pending_request, replica_id, InFlight(requests=1, work=len(image_hashes)), lambda: image_hashes
        )


def _image_hashes(pending_request: PendingRequest | None) -> tuple[str, ...]:
    if pending_request is None:
        return ()
    return tuple(pending_request.kwargs.get("image_hashes", ()))
