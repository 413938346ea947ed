"""/health's verdict on each stage, from Serve's replica counts."""

from serve.health import stage_states


def test_a_stage_is_ok_while_one_replica_runs():
    states = stage_states(
        {
            "decoder": {"RUNNING": 1, "STARTING": 1},
            "preprocess": {"STARTING": 1, "STOPPING": 1},
            "encoder": {},
            "ghost": None,
        }
    )
    assert states == {
        "decoder": "ok",
        "preprocess": "no running replica (1 starting, 1 stopping)",
        "encoder": "no running replica (none)",
        "ghost": "not deployed",
    }


def test_a_replica_count_of_zero_is_not_running():
    assert stage_states({"decoder": {"RUNNING": 0, "RECOVERING": 1}}) == {
        "decoder": "no running replica (1 recovering)"
    }
