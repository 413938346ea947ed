"""Tenants: who a key belongs to, and what that tenant may use.

The tenants file (`auth.tenants_file`, or MINISTRAL_TENANTS_FILE; YAML) lists
each tenant with its keys and limits:

    tenants:
      - name: search-backend
        keys: ["sha256:9f86d081884c7d65..."]   # `ministral-serve hash-key KEY` prints one
        requests_per_minute: 600
        tokens_per_minute: 200000
        max_concurrent_requests: 32
        priority: high                        # the highest a request may ask for
        weight: 2                             # share under contention
      - name: nightly-labelling
        keys: ["sha256:..."]
        priority: low

Keys are stored as SHA-256 digests; a plain key is accepted and warned about.
A presented key is hashed and looked up by digest, so no comparison of
secrets takes time that depends on them. The keys of `auth.api_keys` and
MINISTRAL_API_KEYS form one more tenant, `default`, without limits.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

logger = logging.getLogger(__name__)

TENANTS_FILE_ENV = "MINISTRAL_TENANTS_FILE"
DEFAULT_TENANT = "default"
# The one label for requests whose key matched no tenant (or that sent none): tenant names
# come from the file, so the metrics' series stay bounded whatever clients send.
UNKNOWN_TENANT = "unknown"
# The one tenant of a service without keys (the local demo).
ANONYMOUS_TENANT = "anonymous"
HASH_PREFIX = "sha256:"

Priority = Literal["high", "normal", "low"]
# vLLM's priority scheduling serves the lowest value first.
PRIORITY_RANK: Mapping[str, int] = {"high": 0, "normal": 1, "low": 2}


def key_digest(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


class TenantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    keys: list[str] = Field(min_length=1)
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    max_concurrent_requests: int | None = Field(default=None, ge=1)
    priority: Priority = "normal"
    weight: float = Field(default=1.0, gt=0)

    @field_validator("keys")
    @classmethod
    def _keys_given(cls, keys: list[str]) -> list[str]:
        for i, key in enumerate(keys):
            if not key.strip():
                raise ValueError(f"keys[{i}] is empty")
            if key.startswith(HASH_PREFIX) and len(key) != len(HASH_PREFIX) + 64:
                raise ValueError(f"keys[{i}]: a {HASH_PREFIX} digest has 64 hex digits")
        return keys

    @property
    def limited(self) -> bool:
        """Whether any limit needs the application-wide quota ledger."""
        return any(
            limit is not None
            for limit in (self.requests_per_minute, self.tokens_per_minute, self.max_concurrent_requests)
        )


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: list[TenantSpec]

    @model_validator(mode="after")
    def _unique(self) -> TenantsFile:
        names = [tenant.name for tenant in self.tenants]
        for name in (DEFAULT_TENANT, UNKNOWN_TENANT, ANONYMOUS_TENANT):
            if name in names:
                raise ValueError(f"tenant name {name!r} is reserved")
        if len(set(names)) != len(names):
            raise ValueError("tenant names must be unique")
        digests = [_digest(key) for tenant in self.tenants for key in tenant.keys]
        if len(set(digests)) != len(digests):
            raise ValueError("a key belongs to more than one tenant")
        return self


def _digest(key: str) -> str:
    return key.lower() if key.startswith(HASH_PREFIX) else key_digest(key.strip())


@dataclass(frozen=True)
class TenantDirectory:
    """Key digest -> tenant, from the tenants file and the plain key list."""

    by_digest: Mapping[str, TenantSpec]
    # Whether the tenants came from a file: then the application has a quota ledger.
    from_file: bool = False

    @property
    def open(self) -> bool:
        """No keys at all: every request is the anonymous tenant's."""
        return not self.by_digest

    @property
    def tenants(self) -> list[TenantSpec]:
        return sorted(
            {tenant.name: tenant for tenant in self.by_digest.values()}.values(), key=lambda t: t.name
        )

    def find(self, key: str) -> TenantSpec | None:
        return self.by_digest.get(key_digest(key))


ANONYMOUS = TenantSpec(name=ANONYMOUS_TENANT, keys=["-"])


def parse_tenants_file(text: str, source: str = "the tenants file") -> TenantsFile:
    """The file's tenants, or ValueError naming what is wrong (never echoing a key)."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{source} is not valid YAML: {e}") from None
    try:
        return TenantsFile.model_validate(document)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in e.errors()
        )
        raise ValueError(f"{source}: {problems}") from None


def build_directory(tenants_file: TenantsFile | None, plain_keys: Iterable[str]) -> TenantDirectory:
    by_digest: dict[str, TenantSpec] = {}
    plain = sorted({key.strip() for key in plain_keys if key.strip()})
    if plain:
        default = TenantSpec(name=DEFAULT_TENANT, keys=plain)
        by_digest.update((key_digest(key), default) for key in plain)
    for tenant in tenants_file.tenants if tenants_file else ():
        if any(not key.startswith(HASH_PREFIX) for key in tenant.keys):
            logger.warning(
                "tenant %s has keys in plain text in the tenants file; store them as digests "
                "(`ministral-serve hash-key KEY`)",
                tenant.name,
            )
        by_digest.update((_digest(key), tenant) for key in tenant.keys)
    return TenantDirectory(by_digest=by_digest, from_file=tenants_file is not None)


def tenants_file_path(configured: str | None, environ: Mapping[str, str] = os.environ) -> Path | None:
    """The environment's file wins over the config's, as MINISTRAL_API_KEYS adds to it."""
    path = environ.get(TENANTS_FILE_ENV) or configured
    return Path(path) if path else None


class TenantsFileWatcher:
    """Re-reads the tenants file when it changes (a Kubernetes Secret volume swaps a symlink,
    so the content, not only the modification time, is compared)."""

    def __init__(self, path: Path, plain_keys: Iterable[str]):
        self.path = path
        self._plain_keys = tuple(plain_keys)
        self._text: str | None = None
        self.directory = self._load(path.read_text())

    def _load(self, text: str) -> TenantDirectory:
        directory = build_directory(parse_tenants_file(text, str(self.path)), self._plain_keys)
        self._text = text
        return directory

    def refresh(self) -> bool:
        """Whether the directory changed. A file that became unreadable or invalid keeps the
        tenants it had: a half-written file must not lock every tenant out."""
        try:
            text = self.path.read_text()
            if text == self._text:
                return False
            self.directory = self._load(text)
        except (OSError, ValueError) as e:
            logger.error("keeping the previous tenants: %s", e)
            return False
        logger.info("tenants file %s reloaded: %d tenants", self.path, len(self.directory.tenants))
        return True
