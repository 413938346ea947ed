"""Where a request should go: the routing policy of the decoder and encoder routers.

Pure functions and small classes, no Ray: `deployments/router.py` is the
Ray Serve glue that feeds them each replica's stats and the router's own
live counts, and turns their ranking into Serve's.

For every candidate replica the policy estimates when the new request would
be done there, and ranks the replicas soonest first.

Decoder (continuous batching: a request joins the running batch and gets one
token per engine step, and each step takes longer the larger the batch):

    b          = requests the replica holds (running + waiting)
    step(b+1)  = step_s x (min(b + 1, max_running) + C) / (batch + C)
    wait       = max(0, b + 1 - max_running) / max_running x tokens left per held request
    estimate_s = step(b+1) x (wait + max_new_tokens + PREFILL_TOKEN_WEIGHT x uncached prompt tokens)

`step_s` and `batch` are the replica's own measured mean step time and batch
while busy; a replica at half speed takes twice as long per step. C
(`step_fixed_sequences`) is what a step costs with no sequence in it, in
sequences: a step's time is fixed cost plus cost per sequence, and the
fixed part dominates small batches (on a GPU, reading the weights). A
throughput in tokens per second would not do: it grows with the batch, so
the busiest replica would look the fastest and draw yet more work.

Encoder (a replica encodes its pending images in batches):

    estimate_s = (pending images + images of the request it does not hold) / images per second

Affinity: a replica that holds part of the request already (the
conversation's earlier turns in its prefix cache, the images' embeddings in
its cache) is moved to the front unless its estimate exceeds the best by
more than `affinity_tolerance`: cached work is worth a little waiting, not a
queue. A decoder replica whose KV cache cannot take the request goes last
(vLLM would queue it, or preempt others for it).

Stats arrive late (the controller polls them every few seconds), so the
router also counts what it has sent to each replica and not yet seen finish
(`InFlightLedger`), from the moment it ranks a replica first (requests
routed at the same instant see each other); the larger of the two views of
held work is used.
Each rank holds one replica: Serve tries them in order, skipping a replica at
its `max_ongoing_requests`.
"""

from __future__ import annotations

import hashlib
import statistics
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from serve.messages import DecoderLoad, EncoderLoad

# Work per prompt token relative to a generated token: a prefill step handles
# many prompt tokens at once, so each costs a fraction of a decode step.
PREFILL_TOKEN_WEIGHT = 0.1
PREFIX_BLOCK_TOKENS = 64
MAX_PREFIX_BLOCKS = 256
HELD_IMAGE_PREFIX_CHARS = 12
# A request ranked and never reported routed stops counting in flight after this long.
TENTATIVE_S = 60.0


@dataclass(frozen=True)
class RoutingSettings:
    affinity_tolerance: float = 1.5  # a cached replica is preferred up to this x the best estimate
    affinity_slack_s: float = 0.05  # ... plus this, so that near-idle replicas keep their affinity
    stale_after_s: float = 10.0  # older stats count for speed only, not for load
    kv_usage_limit: float = 0.95
    step_fixed_sequences: float = 16.0  # C above
    default_step_s: float = 0.03  # before any replica has measured its steps
    default_images_per_s: float = 10.0


@dataclass(frozen=True)
class Candidate:
    """One replica as the ranking sees it."""

    replica_id: str
    estimate_s: float
    affinity: float = 0.0  # how much of the request it holds (tokens or images); 0: none
    fits: bool = True


def rank(candidates: Sequence[Candidate], settings: RoutingSettings) -> list[list[str]]:
    """Replica ids in ranks of one, best first: soonest estimated finish, affinity within
    tolerance, replicas that cannot take the request last; exact ties by replica id."""
    if not candidates:
        return []
    fitting = sorted((c for c in candidates if c.fits), key=lambda c: (c.estimate_s, c.replica_id))
    full = sorted((c for c in candidates if not c.fits), key=lambda c: (c.estimate_s, c.replica_id))
    ranks: list[list[str]] = []
    if fitting:
        best_s = fitting[0].estimate_s
        holders = [c for c in fitting if c.affinity > 0]
        if holders:
            holder = max(holders, key=lambda c: (c.affinity, -c.estimate_s))
            if holder.estimate_s <= best_s * settings.affinity_tolerance + settings.affinity_slack_s:
                ranks.append([holder.replica_id])
                fitting = [c for c in fitting if c is not holder]
        ranks.extend([c.replica_id] for c in fitting)
    ranks.extend([c.replica_id] for c in full)
    return ranks


class ThroughputWindow:
    """Work per second while busy, over the last `window_s` seconds.

    Time with no work in hand does not count: an idle replica keeps the speed
    it showed when it last worked, instead of looking slow. A gap between two
    records longer than `max_step_s` is idle time, whatever `busy` says (no
    engine step takes that long; the first step after an idle spell does not
    make the spell busy)."""

    def __init__(self, window_s: float = 30.0, max_step_s: float = 2.0):
        self.window_s = window_s
        self.max_step_s = max_step_s
        self._intervals: deque[tuple[float, float, float]] = deque()  # (end, busy seconds, work)
        self._last: float | None = None

    def record(self, now: float, work: float, busy: bool) -> None:
        """Called after each step: `work` done since the previous call; `busy`: work was in hand."""
        if self._last is not None and busy and 0 < now - self._last <= self.max_step_s:
            self.add(now, now - self._last, work)
        self._last = now

    def add(self, now: float, busy_s: float, work: float) -> None:
        """`work` done in `busy_s` seconds of work, ending now (a batch, timed by its caller)."""
        self._intervals.append((now, busy_s, work))
        while self._intervals and self._intervals[0][0] < now - self.window_s:
            self._intervals.popleft()

    def rate(self) -> float:
        busy_s = sum(seconds for _, seconds, _ in self._intervals)
        work = sum(done for _, _, done in self._intervals)
        return work / busy_s if busy_s > 0 else 0.0

    def mean_step(self) -> tuple[float, float]:
        """(seconds, work) of the mean recorded step; (0, 0) before any."""
        if not self._intervals:
            return 0.0, 0.0
        steps = len(self._intervals)
        return (
            sum(seconds for _, seconds, _ in self._intervals) / steps,
            sum(done for _, _, done in self._intervals) / steps,
        )


def prefix_block_hashes(token_ids: Sequence[int], block_tokens: int = PREFIX_BLOCK_TOKENS) -> list[bytes]:
    """Chained hashes of the prompt's full blocks, as vLLM's prefix cache keys its blocks:
    two prompts share the first k hashes exactly when they share the first k blocks."""
    hashes = []
    previous = b""
    full_blocks = min(len(token_ids) // block_tokens, MAX_PREFIX_BLOCKS)
    for block in range(full_blocks):
        tokens = token_ids[block * block_tokens : (block + 1) * block_tokens]
        previous = hashlib.blake2b(
            previous + b"".join(t.to_bytes(4, "little") for t in tokens), digest_size=12
        ).digest()
        hashes.append(previous)
    return hashes


class AffinityIndex:
    """Which replicas were sent each key (a prefix block, an image), least recently used dropped."""

    def __init__(self, max_keys: int = 65536, replicas_per_key: int = 4):
        self.max_keys = max_keys
        self.replicas_per_key = replicas_per_key
        self._replicas_of: OrderedDict[Hashable, tuple[str, ...]] = OrderedDict()

    def record(self, keys: Sequence[Hashable], replica_id: str) -> None:
        for key in keys:
            others = tuple(r for r in self._replicas_of.pop(key, ()) if r != replica_id)
            self._replicas_of[key] = (*others, replica_id)[-self.replicas_per_key :]
        while len(self._replicas_of) > self.max_keys:
            self._replicas_of.popitem(last=False)

    def prefix_matches(self, chained_keys: Sequence[Hashable]) -> dict[str, int]:
        """Per replica, how many leading keys it was sent. The keys are chained (each names
        its whole prefix), so a replica sent key k has seen keys 0..k."""
        matches: dict[str, int] = {}
        for position, key in enumerate(chained_keys):
            for replica_id in self._replicas_of.get(key, ()):
                matches[replica_id] = position + 1
        return matches

    def holders(self, keys: Sequence[Hashable]) -> dict[str, int]:
        """Per replica, how many of the keys it was sent."""
        counts: dict[str, int] = {}
        for key in keys:
            for replica_id in self._replicas_of.get(key, ()):
                counts[replica_id] = counts.get(replica_id, 0) + 1
        return counts

    def forget(self, replica_ids: set[str]) -> None:
        """Drop replicas that are gone (their caches went with them)."""
        for key, holders in list(self._replicas_of.items()):
            kept = tuple(r for r in holders if r not in replica_ids)
            if kept:
                self._replicas_of[key] = kept
            else:
                del self._replicas_of[key]


@dataclass(frozen=True)
class InFlight:
    """What this router has sent a replica and not yet seen finish."""

    requests: int = 0
    work: float = 0  # decoder: tokens still to generate (max_tokens each); encoder: images
    prefill_tokens: int = 0  # decoder: prompt tokens


@dataclass(frozen=True)
class _Sent:
    replica_id: str
    work: InFlight


@dataclass(frozen=True)
class _Tentative:
    """A request ranked and not yet routed: counted in flight on its first-ranked replica."""

    replica_id: str
    work: InFlight
    when: float
    affinity_keys: Sequence[Hashable]  # computed for the ranking, recorded once it is routed


class InFlightLedger:
    """What a router has sent each replica and not yet seen finish, per replica.

    A request counts from the moment it is `ranked` (on its first-ranked replica,
    so that requests ranked at the same instant see each other), then where it
    was `routed`, until it is `completed`. One ranked and never routed stops
    counting `tentative_s` after its ranking; a replica that is gone is
    `forgotten` with every entry on it."""

    def __init__(self, tentative_s: float = TENTATIVE_S):
        self.tentative_s = tentative_s
        self._held: dict[str, InFlight] = {}
        self._sent: dict[str, _Sent] = {}  # by request id
        self._tentative: dict[str, _Tentative] = {}  # by request id

    @property
    def held(self) -> Mapping[str, InFlight]:
        """Per replica id, what it holds of this router's requests (absent: nothing)."""
        return self._held

    def ranked(
        self,
        request_id: str,
        first_replica_id: str | None,
        work: InFlight,
        affinity_keys: Sequence[Hashable],
        now: float,
    ) -> None:
        """Counts the request on its first-ranked replica (none: no replica ranked) instead of
        where an earlier ranking of it put it; drops rankings older than `tentative_s`."""
        for stale in [r for r, t in self._tentative.items() if now - t.when > self.tentative_s]:
            self._untentative(stale)
        self._untentative(request_id)
        if first_replica_id is not None:
            self._tentative[request_id] = _Tentative(first_replica_id, work, now, affinity_keys)
            self._add(first_replica_id, work, +1)

    def routed(self, request_id: str, replica_id: str, work: InFlight) -> Sequence[Hashable] | None:
        """Counts the request where it went; the affinity keys its ranking computed (None: it was
        routed without a ranking, or its ranking was dropped)."""
        tentative = self._untentative(request_id)
        self._sent[request_id] = _Sent(replica_id, work)
        self._add(replica_id, work, +1)
        return tentative.affinity_keys if tentative else None

    def completed(self, request_id: str) -> None:
        if (sent := self._sent.pop(request_id, None)) is not None:
            self._add(sent.replica_id, sent.work, -1)

    def forget(self, replica_ids: Iterable[str]) -> None:
        """Drops replicas that are gone, and every request counted on them."""
        gone = set(replica_ids)
        for replica_id in gone:
            self._held.pop(replica_id, None)
        self._sent = {r: sent for r, sent in self._sent.items() if sent.replica_id not in gone}
        self._tentative = {r: t for r, t in self._tentative.items() if t.replica_id not in gone}

    def _untentative(self, request_id: str) -> _Tentative | None:
        if (tentative := self._tentative.pop(request_id, None)) is not None:
            self._add(tentative.replica_id, tentative.work, -1)
        return tentative

    def _add(self, replica_id: str, work: InFlight, sign: int) -> None:
        held = self._held.get(replica_id, InFlight())
        self._held[replica_id] = InFlight(
            requests=max(0, held.requests + sign * work.requests),
            prefill_tokens=max(0, held.prefill_tokens + sign * work.prefill_tokens),
            work=max(0, held.work + sign * work.work),
        )


@dataclass(frozen=True)
class DecodeJob:
    prompt_tokens: int
    max_new_tokens: int  # max_tokens x choices


def _fresh(measured_at: float | None, now: float, settings: RoutingSettings) -> bool:
    return measured_at is not None and now - measured_at <= settings.stale_after_s


def _known_rate(rates: list[float], default: float) -> float:
    """Rate for a replica that has not measured its own: the median of those that have."""
    measured = [rate for rate in rates if rate > 0]
    return statistics.median(measured) if measured else default


def decoder_candidates(
    replica_ids: Sequence[str],
    loads: dict[str, DecoderLoad],
    in_flight: Mapping[str, InFlight],
    prefix_matches: dict[str, int],
    job: DecodeJob,
    now: float,
    settings: RoutingSettings,
) -> list[Candidate]:
    """Decoder replicas as candidates, by the estimate in the module's docstring.

    `prefix_matches`: per replica, leading prompt tokens it has been sent before (the affinity
    index). Its affinity is what it holds beyond the best other replica: a prefix every
    replica holds (a shared system prompt) pulls nowhere. A replica that has not measured its
    steps takes the median of those that have; without fresh stats, only the router's
    in-flight count says what it holds."""
    speed_limit_s = settings.stale_after_s * 6
    measured = {
        r: loads[r]
        for r in replica_ids
        if r in loads and loads[r].step_s > 0 and now - loads[r].measured_at <= speed_limit_s
    }
    # A replica yet to measure: the median replica's step time per (batch + C).
    unit_step_s = _known_rate(
        [load.step_s / (load.batch + settings.step_fixed_sequences) for load in measured.values()],
        settings.default_step_s / (1 + settings.step_fixed_sequences),
    )
    candidates = []
    for replica_id in replica_ids:
        load = loads.get(replica_id)
        live = in_flight.get(replica_id, InFlight())
        held, tokens_left = live.requests, live.work
        fits = True
        max_running = 0
        if load is not None and _fresh(load.measured_at, now, settings):
            held = max(held, load.running + load.waiting)
            tokens_left = max(tokens_left, load.decode_tokens_pending)
            max_running = load.max_running
            if load.kv_cache_tokens > 0:
                needed = (job.prompt_tokens + job.max_new_tokens) / load.kv_cache_tokens
                fits = load.kv_cache_usage + needed <= settings.kv_usage_limit
        if replica_id in measured:
            step = measured[replica_id]
            unit_s = step.step_s / (step.batch + settings.step_fixed_sequences)
        else:
            unit_s = unit_step_s
        batch_joined = min(held + 1, max_running) if max_running else held + 1
        step_s = unit_s * (batch_joined + settings.step_fixed_sequences)
        wait_tokens = 0.0
        if max_running and held + 1 > max_running:
            wait_tokens = (held + 1 - max_running) / max_running * tokens_left / max(held, 1)
        cached = min(prefix_matches.get(replica_id, 0), job.prompt_tokens)
        best_elsewhere = max((m for r, m in prefix_matches.items() if r != replica_id), default=0)
        work = wait_tokens + job.max_new_tokens + PREFILL_TOKEN_WEIGHT * (job.prompt_tokens - cached)
        candidates.append(
            Candidate(
                replica_id=replica_id,
                estimate_s=step_s * work,
                affinity=max(0, cached - min(best_elsewhere, job.prompt_tokens)),
                fits=fits,
            )
        )
    return candidates


def encoder_candidates(
    replica_ids: Sequence[str],
    loads: dict[str, EncoderLoad],
    in_flight: Mapping[str, InFlight],
    routed_images: dict[str, int],
    image_hashes: Sequence[str],
    now: float,
    settings: RoutingSettings,
) -> list[Candidate]:
    """Encoder replicas as candidates, in images: an image a replica holds (its reported cache,
    or `routed_images`: sent there by this router) costs it nothing."""
    speed_limit_s = settings.stale_after_s * 6
    rates = {
        r: loads[r].images_per_s if r in loads and now - loads[r].measured_at <= speed_limit_s else 0.0
        for r in replica_ids
    }
    fallback = _known_rate(list(rates.values()), settings.default_images_per_s)
    prefixes = [h[:HELD_IMAGE_PREFIX_CHARS] for h in image_hashes]
    candidates = []
    for replica_id in replica_ids:
        load = loads.get(replica_id)
        queued = in_flight.get(replica_id, InFlight()).work
        held = routed_images.get(replica_id, 0)
        if load is not None and _fresh(load.measured_at, now, settings):
            queued = max(queued, load.pending_images)
            reported = set(load.held_images)
            held = max(held, sum(prefix in reported for prefix in prefixes))
        held = min(held, len(image_hashes))
        candidates.append(
            Candidate(
                replica_id=replica_id,
                estimate_s=(queued + len(image_hashes) - held) / (rates[replica_id] or fallback),
                affinity=held,
            )
        )
    return candidates
