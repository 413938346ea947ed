"""Which image URLs the preprocess stage may fetch, and the one address it connects to for each.

Clients choose the URLs, so every host must be a public unicast address in
whatever spelling it arrives: IPv4 in decimal, octal, hex or short forms,
IPv6 with an IPv4 address inside (mapped, compatible, NAT64, 6to4), an IDNA
name, a trailing dot. Names are resolved once, here, and every address they
resolve to must pass; the fetch then connects to the address that passed,
with the URL's host in the Host header and in TLS's SNI, so a DNS answer that
changes between the check and the connection (rebinding) changes nothing.
Ports are limited too (`images.allowed_ports`).

What a name resolved to is never told to the client (`UnfetchableHost`):
that would let clients map the names the service's resolver knows.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from serve.config import ImagesConfig

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], Awaitable[list[Address]]]

IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # RFC 2765 (SIIT)
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
# What inet_aton reads as IPv4: 127.1, 2130706433, 0x7f.0.0.1, 0177.0.0.1.
_NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}", re.IGNORECASE)
DEFAULT_PORTS = {"http": 80, "https": 443}
PUBLIC_ONLY = "this service fetches images only from public addresses (images.allow_private_networks)"
# Public addresses that reach the cloud host, not the internet: a VM's requests to them are
# answered by its own hypervisor. (The other clouds' metadata and host endpoints lie in
# link-local, shared or reserved ranges, refused as such.)
CLOUD_HOST_ENDPOINTS = {
    ipaddress.IPv4Address("168.63.129.16"): "Azure's host endpoint (WireServer)",
}


class RefusedUrl(ValueError):
    """A URL the service will not fetch, with the reason for the client."""


class UnfetchableHost(RefusedUrl):
    """A host name that resolves to no address, or to one the service does not fetch from.

    The message says what it resolved to and is for the log: the client is told only that
    the URL could not be fetched."""


@dataclass(frozen=True)
class FetchTarget:
    """Where one request goes: the checked address, and the names the server expects."""

    url: str  # the URL with its host replaced by `address`
    address: Address
    host_header: str  # the URL's host[:port]
    sni_hostname: str | None  # https: the name TLS checks the certificate against


def non_public_reason(address: Address) -> str | None:
    """Why `address` is not a public unicast address, or None when it is one."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            form, ipv4 = embedded
            if ipv4 is None:
                return f"{form}, never public"
            reason = non_public_reason(ipv4)
            return f"{form} of {ipv4}, {reason}" if reason else None
        if address.teredo:
            return "a Teredo tunnel address"
        if address.is_site_local:
            return "a site-local address (deprecated)"
    if address in CLOUD_HOST_ENDPOINTS:
        return CLOUD_HOST_ENDPOINTS[address]
    if address.is_multicast:
        return "a multicast address"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "not a globally routable address"
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address | None] | None:
    """An IPv4 address an IPv6 one carries, with the name of the form; None when it carries none."""
    if address.ipv4_mapped is not None:
        return "an IPv4-mapped address", address.ipv4_mapped
    if address in IPV4_TRANSLATED:
        return "an IPv4-translated address (RFC 2765)", None
    if address in NAT64_LOCAL:
        return "a local-use NAT64 address", None
    if address in NAT64:
        return "a NAT64 address", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    # :: and ::1 are the unspecified and loopback addresses, refused as such.
    if address in IPV4_COMPATIBLE and int(address) > 1:
        return "an IPv4-compatible address (deprecated)", None
    if address.sixtofour is not None:
        return "a 6to4 address", address.sixtofour
    return None


def literal_address(host: str) -> Address | None:
    """The address `host` spells out, in any form a resolver would read as one; None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            raise RefusedUrl(f"{host!r} is neither an IP address nor a host name") from None
    return None


def ascii_host(hostname: str) -> str:
    """The host name as DNS sees it: IDNA-encoded, lower case (full-width and other look-alikes folded)."""
    try:
        return hostname.encode("idna").decode("ascii").lower()
    except UnicodeError as e:
        raise RefusedUrl(f"{hostname!r} is not a valid host name") from e


def host_allowed(host: str, allowed_hosts: list[str]) -> bool:
    if not allowed_hosts:
        return True
    name = host.rstrip(".")
    return any(
        name.endswith(pattern[1:]) if pattern.startswith("*.") else name == pattern
        for pattern in allowed_hosts
    )


async def system_resolver(host: str) -> list[Address]:
    """The addresses of `host`; OSError (socket.gaierror) when it has none."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    # An IPv6 link-local answer may carry a zone (fe80::1%eth0).
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


async def checked_target(url: str, limits: ImagesConfig, resolve: Resolver = system_resolver) -> FetchTarget:
    """Where to send a GET for `url` (limits.allowed_hosts, .allowed_ports and
    .allow_private_networks apply), or RefusedUrl saying why it may not be fetched."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise RefusedUrl("image URLs must be http://, https:// or data: URLs")
    if parts.username is not None or parts.password is not None:
        raise RefusedUrl("image URLs may not carry credentials (user:password@)")
    if not parts.hostname:
        raise RefusedUrl("the image URL has no host")
    try:
        port = parts.port
    except ValueError as e:
        raise RefusedUrl(f"the image URL's port is not valid: {e}") from e
    # A trailing dot (an absolute name) names the same host.
    host = ascii_host(parts.hostname).removesuffix(".")
    if not host_allowed(host, limits.allowed_hosts):
        raise RefusedUrl(
            f"{host} is not one of the hosts this service fetches images from (images.allowed_hosts)"
        )
    effective_port = DEFAULT_PORTS[parts.scheme] if port is None else port
    if limits.allowed_ports and effective_port not in limits.allowed_ports:
        raise RefusedUrl(
            f"port {effective_port} is not one this service fetches images from (images.allowed_ports)"
        )
    literal = literal_address(host)
    addresses = [literal] if literal is not None else await _resolved(host, resolve)
    if not limits.allow_private_networks:
        for address in addresses:
            reason = non_public_reason(address)
            if reason and literal is not None:
                raise RefusedUrl(f"{address} is {reason}: {PUBLIC_ONLY}")
            if reason:
                raise UnfetchableHost(f"{host} resolves to {address}, which is {reason}: {PUBLIC_ONLY}")
    address = addresses[0]
    netloc = f"[{address}]" if address.version == 6 else str(address)
    port_suffix = f":{port}" if port is not None else ""
    return FetchTarget(
        url=urlunsplit((parts.scheme, netloc + port_suffix, parts.path or "/", parts.query, "")),
        address=address,
        host_header=host + port_suffix,
        sni_hostname=host if parts.scheme == "https" and literal is None else None,
    )


async def _resolved(host: str, resolve: Resolver) -> list[Address]:
    try:
        addresses = await resolve(host)
    except OSError as e:
        raise UnfetchableHost(f"cannot resolve {host!r}: {e}") from e
    if not addresses:
        raise UnfetchableHost(f"{host} resolves to no address")
    return addresses
