"""The tenants file (serve/tenants.py) and what the ingress reads from a request for its tenant
(serve/tenancy.py): keys by digest, reloads, priority ceilings, deadlines."""

import hashlib
import logging

import pytest

from serve.errors import BadRequest
from serve.tenancy import Tenancy
from serve.tenants import (
    DEFAULT_TENANT,
    TenantsFileWatcher,
    build_directory,
    key_digest,
    parse_tenants_file,
)

SEARCH_KEY = "sk-search-0123"
BATCH_KEY = "sk-batch-4567"
TENANTS = f"""
tenants:
  - name: search
    keys: ["sha256:{hashlib.sha256(SEARCH_KEY.encode()).hexdigest()}"]
    requests_per_minute: 600
    priority: high
    weight: 2
  - name: batch
    keys: ["{BATCH_KEY}"]
    priority: low
"""


def test_keys_are_found_by_their_digest_and_plain_keys_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING):
        directory = build_directory(parse_tenants_file(TENANTS), ["sk-plain"])
    assert directory.find(SEARCH_KEY).name == "search"
    assert directory.find(SEARCH_KEY).limited and directory.find(SEARCH_KEY).weight == 2
    assert directory.find(BATCH_KEY).name == "batch" and not directory.find(BATCH_KEY).limited
    assert directory.find("sk-plain").name == DEFAULT_TENANT
    assert directory.find("sk-search-012") is None and directory.find(key_digest(SEARCH_KEY)) is None
    assert [tenant.name for tenant in directory.tenants] == ["batch", "default", "search"]
    warnings = [record.getMessage() for record in caplog.records]
    assert any("batch" in message and "plain text" in message for message in warnings)
    assert not any(BATCH_KEY in message for message in warnings)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("tenants: [{name: a, keys: [k1]}, {name: a, keys: [k2]}]", "unique"),
        ("tenants: [{name: a, keys: [k1]}, {name: b, keys: [k1]}]", "more than one tenant"),
        ("tenants: [{name: default, keys: [k1]}]", "reserved"),
        ("tenants: [{name: a, keys: ['sha256:abc']}]", "64 hex digits"),
        ("tenants: [{name: a, keys: [k1], priority: urgent}]", "tenants.0.priority"),
        ("tenants: [{name: a, keys: [k1], requests_per_minute: 0}]", "tenants.0.requests_per_minute"),
        ("tenants: [{name: 'a b', keys: [k1]}]", "tenants.0.name"),
        ("tenants: [{name: a, keys: [k1], burst: 3}]", "tenants.0.burst"),
        ("tenants: [{name: a", "not valid YAML"),
    ],
)
def test_a_bad_file_is_refused_naming_what_is_wrong_and_never_a_key(text, problem):
    with pytest.raises(ValueError) as refused:
        parse_tenants_file(text, "tenants.yaml")
    assert problem in str(refused.value) and "tenants.yaml" in str(refused.value)
    assert "k1" not in str(refused.value).replace("keys", "")


def test_the_watcher_follows_the_file_and_keeps_the_tenants_of_a_broken_one(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS)
    watcher = TenantsFileWatcher(path, plain_keys=())
    assert watcher.directory.find(BATCH_KEY) is not None
    assert not watcher.refresh()  # unchanged
    path.write_text(TENANTS.replace(BATCH_KEY, "sk-batch-rotated"))
    assert watcher.refresh()
    assert watcher.directory.find(BATCH_KEY) is None
    assert watcher.directory.find("sk-batch-rotated").name == "batch"
    path.write_text("tenants: [{name: ")  # half written
    assert not watcher.refresh()
    assert watcher.directory.find("sk-batch-rotated").name == "batch"
    path.unlink()
    assert not watcher.refresh()
    assert watcher.directory.find(SEARCH_KEY).name == "search"


def test_a_request_may_lower_its_priority_but_not_raise_it_past_its_tenant():
    directory = build_directory(parse_tenants_file(TENANTS), ())
    search, batch = directory.find(SEARCH_KEY), directory.find(BATCH_KEY)
    assert Tenancy.priority(search, None) == 0 and Tenancy.priority(search, "low") == 2
    assert Tenancy.priority(batch, None) == 2 and Tenancy.priority(batch, "low") == 2
    with pytest.raises(BadRequest) as refused:
        Tenancy.priority(batch, "normal")
    assert refused.value.param == "priority" and "'low'" in refused.value.message


@pytest.mark.parametrize(
    ("headers", "in_body", "deadline"),
    [
        ({}, None, None),
        ({}, 4.5, 4.5),
        ({"x-request-timeout": "2"}, 9.0, 2.0),
        ({"x-request-timeout": "0.5"}, None, 0.5),
    ],
)
def test_the_deadline_comes_from_the_header_or_the_body(headers, in_body, deadline):
    assert Tenancy.deadline_s(headers, in_body) == deadline


@pytest.mark.parametrize("header", ["0", "-1", "soon", "nan", "inf"])
def test_a_bad_timeout_header_is_a_400_naming_it(header):
    with pytest.raises(BadRequest) as refused:
        Tenancy.deadline_s({"x-request-timeout": header}, None)
    assert refused.value.param == "X-Request-Timeout"
