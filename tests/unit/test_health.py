"""/health's verdict on each stage, from probes that answer, fail or hang."""

import asyncio

from serve.health import stage_health


async def answers():
    return None


async def fails():
    raise ConnectionError("replica died")


async def hangs():
    await asyncio.sleep(60)


def test_each_stage_is_judged_by_its_own_probe():
    states = asyncio.run(
        asyncio.wait_for(
            stage_health({"decoder": answers(), "preprocess": fails(), "encoder": hangs()}, timeout_s=0.2), 5
        )
    )
    assert states == {
        "decoder": "ok",
        "preprocess": "unavailable (ConnectionError)",
        "encoder": "no replica answered within 0.2 s",
    }


def test_all_stages_answering_is_healthy():
    assert asyncio.run(stage_health({"decoder": answers()})) == {"decoder": "ok"}
