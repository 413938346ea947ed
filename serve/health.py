"""/health: every stage must have a replica that answers, asked afresh on each call."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

logger = logging.getLogger(__name__)

# Long enough for a busy replica to answer, short enough for a load balancer's probe.
PROBE_TIMEOUT_S = 2.0


async def stage_health(
    probes: dict[str, Awaitable[object]], timeout_s: float = PROBE_TIMEOUT_S
) -> dict[str, str]:
    """Each stage's state: "ok" when its probe answered within `timeout_s`, else what went wrong."""

    async def state(stage: str, probe: Awaitable[object]) -> str:
        async def answered() -> object:
            return await probe

        try:
            await asyncio.wait_for(answered(), timeout_s)
        except TimeoutError:
            logger.warning("health: the %s stage did not answer within %s s", stage, timeout_s)
            return f"no replica answered within {timeout_s} s"
        except Exception as e:
            logger.warning("health: the %s stage failed its check: %s", stage, e)
            return f"unavailable ({type(e).__name__})"
        return "ok"

    states = await asyncio.gather(*(state(stage, probe) for stage, probe in probes.items()))
    return dict(zip(probes, states, strict=True))
