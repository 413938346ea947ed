"""What a failed stage call means to the client, and the retry of a stage whose replica was lost.

A stage call (preprocess, encoder, decoder) fails with one of:

    lost replica (ActorDiedError, ActorUnavailableError,
      DeploymentUnavailableError, ObjectLostError)   -> 503, names only the stage
    BackPressureError (the stage's queue is full)    -> 429 with Retry-After
    APIError raised in the stage (a client mistake)  -> itself
    anything else                                    -> 500, cause in the log only

each wrapped in a `RayTaskError` once per hop it crossed (encoder -> decoder
-> ingress). Ray is imported inside the functions: this module imports
without Ray, and its tests build Ray's exceptions without a running Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from serve.errors import APIError, ServiceUnavailable, TooManyRequests

logger = logging.getLogger(__name__)

# Tries of an idempotent stage (preprocess, encoder) whose replica was lost.
STAGE_ATTEMPTS = 2

Result = TypeVar("Result")


def root_cause(error: BaseException) -> BaseException:
    """A stage's own error, unwrapped: it arrives wrapped once per hop (encoder -> decoder -> here)."""
    from ray.exceptions import RayTaskError

    while isinstance(error, RayTaskError) and isinstance(error.cause, Exception):
        error = error.cause
    return error


def replica_lost(error: BaseException) -> bool:
    """Whether `error` means the replica (or an object it held) went away, not that the request was bad.

    Serve reports a call whose argument came from a replica that died as its own error
    ("upstream actor died"), the loss as its `__cause__`: causes are followed too."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, ObjectLostError
    from ray.serve.exceptions import DeploymentUnavailableError

    lost = (ActorDiedError, ActorUnavailableError, DeploymentUnavailableError, ObjectLostError)
    seen: set[int] = set()
    cause: BaseException | None = root_cause(error)
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, lost):
            return True
        seen.add(id(cause))
        cause = root_cause(cause.__cause__) if cause.__cause__ is not None else None
    return False


async def lost_its_replica(response: Awaitable[object]) -> bool:
    """Whether a stage's call (its `DeploymentResponse`) failed because its replica was lost.

    Only asked once a later stage has failed: awaiting fetches the stage's
    result into this process, which the normal path never does."""
    try:
        await response
    except Exception as e:
        return replica_lost(e)
    return False


def stage_error(error: Exception, stage: str, retry_after_s: int) -> APIError:
    """What a failure in a downstream stage means to the client."""
    from ray.serve.exceptions import BackPressureError

    cause = root_cause(error)
    if isinstance(cause, APIError):
        return cause
    if replica_lost(cause):
        # The client's 503 says only "retry"; the operator's log says why.
        logger.warning("%s stage unavailable: %s", stage, cause)
        return ServiceUnavailable(f"the {stage} stage is unavailable; retry shortly")
    if isinstance(cause, BackPressureError):
        return TooManyRequests(
            f"the {stage} stage is at capacity (its queue is full); retry after {retry_after_s} s",
            retry_after_s=retry_after_s,
        )
    logger.exception("%s stage failed", stage, exc_info=cause)
    return APIError(f"internal error in the {stage} stage")


async def raised_by_lost_replica(error: Exception) -> bool:
    """The default retry condition: the call's own replica was lost."""
    return replica_lost(error)


async def with_retry_on_lost_replica(
    attempt: Callable[[], Awaitable[Result]],
    *,
    stage: str,
    retry_after_s: int,
    attempts: int = STAGE_ATTEMPTS,
    lost: Callable[[Exception], Awaitable[bool]] = raised_by_lost_replica,
    lost_replica: str = "",
) -> Result:
    """`attempt()`'s result, tried up to `attempts` times while `lost(error)` says that the
    failed try lost a replica of an idempotent stage; any other failure, and the last try's,
    raised as `stage_error(error, stage, retry_after_s)`.

    `attempt` makes the stage calls afresh each time (Serve routes the new call to a live
    replica). `lost` is asked only when another try is left. `lost_replica` names the lost
    replica in the operator's log (default: one of `stage`'s)."""
    for _ in range(attempts - 1):
        try:
            return await attempt()
        except Exception as e:
            if not await lost(e):
                raise stage_error(e, stage, retry_after_s) from e
            replica = lost_replica or f"a {stage} replica"
            logger.warning("%s was lost; trying again: %s", replica, root_cause(e))
    try:
        return await attempt()
    except Exception as e:
        raise stage_error(e, stage, retry_after_s) from e
