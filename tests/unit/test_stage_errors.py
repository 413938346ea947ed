"""A failed stage call as the client sees it, and the retry of a lost replica (serve/stage_errors.py).

Ray's exceptions are built as Ray builds them, without a running Ray: an
error raised in a replica arrives wrapped in a `RayTaskError` per hop, the
first an instance of the cause's class too (`as_instanceof_cause`).
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, ObjectLostError, RayTaskError
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException

from serve.errors import APIError, BadRequest, ServiceUnavailable, TooManyRequests
from serve.stage_errors import lost_its_replica, stage_error, with_retry_on_lost_replica

RETRY_AFTER_S = 7
# In the cause's message and its traceback: none of it may reach the client.
SECRET = "/models/ministral-3/tokenizer.json leaked 0xdeadbeef"


def crossed(cause: Exception, hops: int = 1) -> Exception:
    """`cause` as it arrives after `hops` calls between replicas."""
    for hop in range(hops):
        traceback = f"Traceback (most recent call last):\n  hop {hop}\n{type(cause).__name__}: {cause}"
        cause = RayTaskError(
            f"Replica.call_{hop}", traceback, cause, proctitle="ray::ServeReplica", pid=4242, ip="10.0.0.9"
        ).as_instanceof_cause()
    return cause


def serve_error_caused_by(cause: Exception) -> RayServeException:
    """Serve's "upstream actor died" error, raised from `cause` as Serve raises it."""
    try:
        raise RayServeException(f"Request failed because an upstream actor died: {SECRET}") from cause
    except RayServeException as raised:
        return raised


LOST = [
    pytest.param(ActorDiedError(), id="actor-died"),
    pytest.param(ActorUnavailableError(f"connection reset {SECRET}", None), id="actor-unavailable"),
    pytest.param(
        DeploymentUnavailableError(DeploymentID(name="Encoder", app_name="ministral")), id="deployment"
    ),
    pytest.param(ObjectLostError("ab" * 14, None, SECRET), id="object-lost"),
    pytest.param(crossed(ActorDiedError()), id="actor-died-one-hop"),
    pytest.param(crossed(ObjectLostError("cd" * 14, None, SECRET), hops=2), id="object-lost-two-hops"),
    # Serve's error for a call whose argument came from a replica that died: the loss is its cause.
    pytest.param(serve_error_caused_by(crossed(ActorDiedError())), id="serve-upstream-actor-died"),
]


@pytest.mark.parametrize("error", LOST)
def test_a_lost_replica_is_a_503_naming_only_the_stage(error):
    mapped = stage_error(error, "encoder", RETRY_AFTER_S)
    assert isinstance(mapped, ServiceUnavailable)
    assert (mapped.status_code, mapped.error_type, mapped.code) == (503, "service_unavailable", None)
    assert mapped.message == "the encoder stage is unavailable; retry shortly"
    assert mapped.headers is None


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(BackPressureError(num_queued_requests=9, max_queued_requests=8), id="direct"),
        pytest.param(crossed(BackPressureError(num_queued_requests=9, max_queued_requests=8)), id="one-hop"),
    ],
)
def test_a_full_queue_is_a_429_with_retry_after(error):
    mapped = stage_error(error, "decoder", RETRY_AFTER_S)
    assert isinstance(mapped, TooManyRequests)
    assert (mapped.status_code, mapped.error_type, mapped.code) == (429, "rate_limit_error", "overloaded")
    assert mapped.headers == {"Retry-After": "7"}
    assert mapped.message == "the decoder stage is at capacity (its queue is full); retry after 7 s"


@pytest.mark.parametrize("hops", [0, 1, 2])
def test_a_client_error_raised_in_a_stage_passes_through_unchanged(hops):
    raised = BadRequest("messages[0].content[1].image_url: not an image", param="messages")
    mapped = stage_error(crossed(raised, hops), "preprocess", RETRY_AFTER_S)
    assert mapped is raised
    assert (mapped.status_code, mapped.error_type, mapped.param) == (400, "invalid_request_error", "messages")


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(ValueError(SECRET), id="direct"),
        pytest.param(crossed(KeyError(SECRET)), id="one-hop"),
        pytest.param(crossed(RuntimeError(SECRET), hops=2), id="two-hops"),
        # Serve's own error, without a lost replica behind it.
        pytest.param(RayServeException(f"upstream failed: {SECRET}"), id="serve-error"),
    ],
)
def test_anything_else_is_a_500_that_tells_the_client_nothing_of_its_cause(error, caplog):
    with caplog.at_level(logging.ERROR, logger="serve.stage_errors"):
        mapped = stage_error(error, "decoder", RETRY_AFTER_S)
    assert type(mapped) is APIError
    assert (mapped.status_code, mapped.error_type, mapped.code, mapped.param) == (
        500,
        "internal_error",
        None,
        None,
    )
    assert mapped.message == "internal error in the decoder stage"
    assert mapped.headers is None
    assert "leaked" not in mapped.message and "0xdeadbeef" not in str(mapped)
    # ... and the operator's log has it.
    assert "0xdeadbeef" in caplog.text


class FakeStage:
    """A stage call that fails with `failures` in turn, then answers `reply`."""

    def __init__(self, *failures: Exception, reply: str = "done"):
        self.failures = list(failures)
        self.reply = reply
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return self.reply


def retried(stage: FakeStage, stage_name: str = "preprocess", **options) -> str:
    call = with_retry_on_lost_replica(stage, stage=stage_name, retry_after_s=RETRY_AFTER_S, **options)
    return asyncio.run(call)


def test_a_lost_replica_is_tried_again_once():
    stage = FakeStage(crossed(ActorDiedError()))
    assert retried(stage) == "done"
    assert stage.calls == 2


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        pytest.param(crossed(BadRequest("too many images")), BadRequest, id="bad-request"),
        pytest.param(
            BackPressureError(num_queued_requests=9, max_queued_requests=8), TooManyRequests, id="full"
        ),
        pytest.param(crossed(ValueError(SECRET)), APIError, id="bug"),
    ],
)
def test_other_failures_are_not_tried_again(failure, expected):
    stage = FakeStage(failure)
    with pytest.raises(expected) as raised:
        retried(stage)
    assert stage.calls == 1
    assert raised.value.__cause__ is failure


@pytest.mark.parametrize("attempts", [1, 2, 3])
def test_a_replica_lost_every_time_is_a_503_after_the_last_attempt(attempts):
    failures = [crossed(ActorDiedError()) for _ in range(attempts + 1)]
    stage = FakeStage(*failures)
    with pytest.raises(ServiceUnavailable, match="the preprocess stage is unavailable") as raised:
        retried(stage, attempts=attempts)
    assert stage.calls == attempts
    assert raised.value.__cause__ is failures[attempts - 1]


async def fake_response(error: Exception | None = None) -> str:
    """A stage's `DeploymentResponse`, awaited: raises `error`, or answers."""
    if error is not None:
        raise error
    return "embeddings"


@pytest.mark.parametrize(
    ("error", "lost"),
    [
        pytest.param(crossed(ActorDiedError()), True, id="replica-died"),
        pytest.param(crossed(BadRequest("not an image")), False, id="bad-request"),
        pytest.param(None, False, id="answered"),
    ],
)
def test_lost_its_replica(error, lost):
    assert asyncio.run(lost_its_replica(fake_response(error))) is lost


UPSTREAM_DIED = "Request to deployment 'Decoder' failed because an upstream actor died"


def test_the_decoder_is_tried_again_when_the_encoder_it_was_given_lost_its_replica():
    # The decoder's call fails with Serve's error for an argument whose replica died; the
    # encoder's response says why. It is asked only while another try is left.
    asked = []

    async def encoder_lost(error: Exception) -> bool:
        asked.append(error)
        return await lost_its_replica(fake_response(crossed(ActorDiedError())))

    decoder = FakeStage(RayServeException(UPSTREAM_DIED), reply="first chunk")
    assert retried(decoder, "decoder", lost=encoder_lost) == "first chunk"
    assert (decoder.calls, len(asked)) == (2, 1)

    asked.clear()
    decoder = FakeStage(RayServeException(UPSTREAM_DIED), RayServeException(UPSTREAM_DIED))
    with pytest.raises(APIError, match="internal error in the decoder stage"):
        retried(decoder, "decoder", lost=encoder_lost)
    assert (decoder.calls, len(asked)) == (2, 1)


def test_a_decoder_failure_with_a_healthy_encoder_is_not_tried_again():
    async def encoder_lost(error: Exception) -> bool:
        return await lost_its_replica(fake_response())

    decoder = FakeStage(crossed(ActorDiedError()))
    with pytest.raises(ServiceUnavailable, match="the decoder stage is unavailable"):
        retried(decoder, "decoder", lost=encoder_lost)
    assert decoder.calls == 1
