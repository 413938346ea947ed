"""The image-URL guard: every spelling of a non-public address is refused, and nothing connects anywhere else.

Names resolve through an injected resolver (no DNS). Fetches go through
`FakeInternet`, a named fake of the public internet: it answers for one
documented public address from a table, passes loopback connections to the
real local image server, and fails the test on any other address, so that
even a broken guard sends no packet off this machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket

import httpx
import pytest

from deployments.image_loading import ImageError, decode_upright, fetch_url, load_image_bytes
from deployments.url_guard import RefusedUrl, UnfetchableHost, checked_target, host_allowed, system_resolver
from serve.config import ImagesConfig
from tests.image_server import image_bytes
from tests.ports import free_port

PUBLIC = "93.184.216.34"
NAMES = {
    "localhost": ["127.0.0.1", "::1"],
    "public.test": [PUBLIC],
    "rebind.test": ["127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "intranet.test": ["192.168.1.10"],
    "mixed.test": [PUBLIC, "10.0.0.1"],
    "ula.test": ["fd00::1"],
    "nat64.test": ["64:ff9b::a9fe:a9fe"],
    "a.cdn.test": [PUBLIC],
    "cdn.test": [PUBLIC],
    "evilcdn.test": [PUBLIC],
    "vm.internal.test": ["10.1.2.3"],
    "azure.test": ["168.63.129.16"],
    "sitelocal.test": ["fec0::1"],
}


async def resolve(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    if host not in NAMES:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return [ipaddress.ip_address(address) for address in NAMES[host]]


def target(url: str, limits: ImagesConfig | None = None):
    return asyncio.run(checked_target(url, limits or ImagesConfig(), resolve))


REFUSED = [
    "http://127.0.0.1/a.png",
    "http://localhost/a.png",
    "http://LOCALHOST./a.png",
    "HTTP://127.0.0.1/a.png",
    "hTtPs://localhost/a.png",
    "http://2130706433/a.png",
    "http://0x7f000001/a.png",
    "http://0177.0.0.1/a.png",
    "http://0x7f.1/a.png",
    "http://127.1/a.png",
    "http://127.0.0.1./a.png",
    "http://08.0.0.1/a.png",
    "http://[::1]/a.png",
    "http://[::]/a.png",
    "http://[::ffff:127.0.0.1]/a.png",
    "http://[::ffff:7f00:1]/a.png",
    "http://[::127.0.0.1]/a.png",
    "http://[::8.8.8.8]/a.png",
    "http://[64:ff9b::7f00:1]/a.png",
    "http://[64:ff9b::a9fe:a9fe]/a.png",
    "http://[64:ff9b:1::808:808]/a.png",
    "http://[2002:7f00:1::]/a.png",
    "http://[2002:a9fe:a9fe::1]/a.png",
    "http://[2001::1]/a.png",
    "http://[fe80::1]/a.png",
    "http://[fd00::1]/a.png",
    "http://[ff02::1]/a.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/a.png",
    "http://172.16.0.1/a.png",
    "http://192.168.1.1/a.png",
    "http://100.64.0.1/a.png",
    "http://0.0.0.0/a.png",
    "http://224.0.0.1/a.png",
    "http://255.255.255.255/a.png",
    "http://[fec0::1]/a.png",
    "http://[::ffff:0:808:808]/a.png",
    "http://[::ffff:0:7f00:1]/a.png",
    "http://168.63.129.16/a.png",
    "http://[::ffff:168.63.129.16]/a.png",
    "http://[64:ff9b::a83f:8110]/a.png",
    "http://azure.test/a.png",
    "http://sitelocal.test/a.png",
    "http://user:secret@public.test/a.png",
    "http://public.test@127.0.0.1/a.png",
    "http://127.0.0.1:80@public.test/a.png",
    "http://ｌｏｃａｌｈｏｓｔ/a.png",
    "http://①②⑦.0.0.1/a.png",
    "http://rebind.test/a.png",
    "http://metadata.test/a.png",
    "http://intranet.test/a.png",
    "http://mixed.test/a.png",
    "http://ula.test/a.png",
    "http://nat64.test/a.png",
    "http://no-such-host.test/a.png",
    "http://public.test:99999/a.png",
    "http://public.test:8080/a.png",
    "https://public.test:22/a.png",
    "ftp://public.test/a.png",
    "file:///etc/passwd",
    "gopher://public.test/",
    "http:///a.png",
]


@pytest.mark.parametrize("url", REFUSED)
def test_every_form_of_a_non_public_target_is_refused(url):
    with pytest.raises(RefusedUrl) as refused:
        target(url)
    # Refused for what it is, not because a look-alike name failed to resolve.
    assert "no-such-host" in url or "cannot resolve" not in str(refused.value)


def test_the_refusal_names_the_address_and_the_setting():
    with pytest.raises(RefusedUrl) as refused:
        target("http://[64:ff9b::a9fe:a9fe]/a.png")
    assert str(refused.value) == (
        "64:ff9b::a9fe:a9fe is a NAT64 address of 169.254.169.254, a link-local address: this service "
        "fetches images only from public addresses (images.allow_private_networks)"
    )
    with pytest.raises(RefusedUrl, match=r"mixed\.test resolves to 10\.0\.0\.1, which is a private address"):
        target("http://mixed.test/a.png")


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("fec0::1", "a site-local address (deprecated)"),
        ("::ffff:0:808:808", "an IPv4-translated address (RFC 2765), never public"),
        ("168.63.129.16", "Azure's host endpoint (WireServer)"),
        (
            "::ffff:168.63.129.16",
            "an IPv4-mapped address of 168.63.129.16, Azure's host endpoint (WireServer)",
        ),
    ],
)
def test_addresses_that_look_public_but_are_not_are_refused(address, reason):
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(RefusedUrl, match=re.escape(f"is {reason}:")):
        target(f"http://{host}/a.png")


@pytest.mark.parametrize(
    ("url", "allowed_ports", "refused_port"),
    [
        ("http://public.test/a.png", None, None),
        ("https://public.test/a.png", None, None),
        ("http://public.test:443/a.png", None, None),
        ("http://public.test:8080/a.png", None, 8080),
        ("https://public.test:6379/a.png", None, 6379),
        ("http://public.test/a.png", [8080], 80),
        ("http://public.test:8080/a.png", [8080], None),
        ("http://public.test:6379/a.png", [], None),
    ],
)
def test_only_the_allowed_ports_are_fetched(url, allowed_ports, refused_port):
    limits = ImagesConfig() if allowed_ports is None else ImagesConfig(allowed_ports=allowed_ports)
    if refused_port is None:
        assert target(url, limits).address == ipaddress.ip_address(PUBLIC)
    else:
        with pytest.raises(RefusedUrl, match=rf"port {refused_port} is not one .* \(images\.allowed_ports\)"):
            target(url, limits)


def test_the_config_refuses_a_port_out_of_range():
    with pytest.raises(ValueError, match="not a TCP port"):
        ImagesConfig(allowed_ports=[443, 0])


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://public.test/a.png", ("http://93.184.216.34/a.png", "public.test", None)),
        (
            "https://public.test:8443/a.png?v=2#top",
            ("https://93.184.216.34:8443/a.png?v=2", "public.test:8443", "public.test"),
        ),
        ("http://PUBLIC.test./a.png", ("http://93.184.216.34/a.png", "public.test", None)),
        ("http://8.8.8.8/a.png", ("http://8.8.8.8/a.png", "8.8.8.8", None)),
        ("https://[2606:4700::1111]/a.png", ("https://[2606:4700::1111]/a.png", "2606:4700::1111", None)),
        ("http://[::ffff:8.8.8.8]/a.png", ("http://[::ffff:808:808]/a.png", "::ffff:8.8.8.8", None)),
        ("http://[64:ff9b::808:808]/a.png", ("http://[64:ff9b::808:808]/a.png", "64:ff9b::808:808", None)),
    ],
)
def test_a_public_target_is_fetched_from_the_address_that_was_checked(url, expected):
    checked = target(url, ImagesConfig(allowed_ports=[80, 443, 8443]))
    assert (checked.url, checked.host_header, checked.sni_hostname) == expected


def test_private_networks_are_an_opt_in():
    checked = target(
        "http://localhost:8080/a.png", ImagesConfig(allow_private_networks=True, allowed_ports=[8080])
    )
    assert checked.url == "http://127.0.0.1:8080/a.png"
    assert checked.host_header == "localhost:8080"


@pytest.mark.parametrize(
    ("host", "allowed"),
    [("a.cdn.test", True), ("public.test", True), ("cdn.test", False), ("evilcdn.test", False)],
)
def test_an_allowlist_limits_the_hosts(host, allowed):
    limits = ImagesConfig(allowed_hosts=["public.test", "*.cdn.test"])
    if allowed:
        assert target(f"http://{host}/a.png", limits).address == ipaddress.ip_address(PUBLIC)
    else:
        with pytest.raises(RefusedUrl, match=r"images\.allowed_hosts"):
            target(f"http://{host}/a.png", limits)


def test_the_config_refuses_a_malformed_allowlist():
    with pytest.raises(ValueError, match="not a lower-case host name"):
        ImagesConfig(allowed_hosts=["http://example.com"])


PNG = image_bytes((8, 6))


class FakeInternet(httpx.AsyncBaseTransport):
    """A fake of the public internet (see the module docstring); records every request it answers."""

    def __init__(self, pages: dict[str, httpx.Response] | None = None, delay_s: float = 0.0):
        self.pages = pages or {}
        self.delay_s = delay_s
        self.requests: list[httpx.Request] = []
        self.in_flight = self.most_in_flight = 0
        self._loopback = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        address = ipaddress.ip_address(request.url.host)
        if address.is_loopback:
            return await self._loopback.handle_async_request(request)
        if str(address) != PUBLIC:
            pytest.fail(f"the guard let a connection to {address} through")
        self.requests.append(request)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        page = self.pages.get(request.url.path, httpx.Response(200, content=PNG))
        # A stream, as a real transport gives: the fetch reads the raw body.
        return httpx.Response(page.status_code, headers=page.headers, stream=httpx.ByteStream(page.content))


def fetch(url: str, internet: FakeInternet, resolver=resolve, limits: ImagesConfig | None = None) -> bytes:
    async def run():
        async with httpx.AsyncClient(transport=internet) as http:
            return await fetch_url(url, limits or ImagesConfig(), http, resolver)

    return asyncio.run(run())


def redirect(location: str) -> httpx.Response:
    return httpx.Response(302, headers={"Location": location})


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://rebind.test/a.png",
        "http://[::ffff:10.0.0.1]/a.png",
        "HTTP://0x7f.1/a.png",
        "file:///etc/passwd",
    ],
)
def test_every_redirect_hop_is_checked(location):
    internet = FakeInternet({"/hop": redirect(location)})
    with pytest.raises(ImageError, match=r"only from public addresses|must be http|could not fetch"):
        fetch("http://public.test/hop", internet)
    assert [r.url.path for r in internet.requests] == ["/hop"]


def test_a_relative_redirect_keeps_the_host_the_client_named():
    internet = FakeInternet({"/old.png": redirect("/new.png")})
    assert fetch("http://public.test/old.png", internet) == PNG
    assert [(r.url.path, r.headers["host"]) for r in internet.requests] == [
        ("/old.png", "public.test"),
        ("/new.png", "public.test"),
    ]


def test_a_name_that_rebinds_after_the_check_is_still_fetched_from_the_checked_address():
    answers = iter([[ipaddress.ip_address(PUBLIC)], [ipaddress.ip_address("127.0.0.1")]])

    async def rebinding(host: str):
        return next(answers)

    internet = FakeInternet()
    assert fetch("http://flip.test/a.png", internet, rebinding) == PNG
    assert [str(r.url) for r in internet.requests] == [f"http://{PUBLIC}/a.png"]


def test_the_opted_in_local_image_server_still_works(image_server):
    url = image_server.add("photo.png", PNG, "image/png")
    local = ImagesConfig(allow_private_networks=True, allowed_ports=[])
    assert fetch(url, FakeInternet(), limits=local) == PNG
    with pytest.raises(ImageError, match="is a loopback address"):
        fetch(url, FakeInternet(), limits=ImagesConfig(allowed_ports=[]))


ANY_LOCAL_PORT = ImagesConfig(allow_private_networks=True, allowed_ports=[])


@pytest.mark.parametrize(
    ("url", "limits", "logged"),
    [
        ("http://vm.internal.test/a.png", ImagesConfig(), "vm.internal.test resolves to 10.1.2.3"),
        ("http://mixed.test/a.png", ImagesConfig(), "mixed.test resolves to 10.0.0.1"),
        ("http://no-such-host.test/a.png", ImagesConfig(), "cannot resolve 'no-such-host.test'"),
        ("http://public.test/missing.png", ImagesConfig(), "HTTP 404"),
        (f"http://127.0.0.1:{free_port()}/a.png", ANY_LOCAL_PORT, "ConnectError"),
    ],
)
def test_what_only_the_network_knows_goes_to_the_log_not_to_the_client(caplog, url, limits, logged):
    # What a name resolves to, whether a port answers, an HTTP status: told to the client,
    # these would let it map the networks the service reaches.
    internet = FakeInternet({"/missing.png": httpx.Response(404, content=b"no")})
    with (
        caplog.at_level(logging.INFO, logger="deployments.image_loading"),
        pytest.raises(ImageError) as refused,
    ):
        fetch(url, internet, limits=limits)
    assert str(refused.value) == f"could not fetch {url} (the service's log says why)"
    assert logged in caplog.text


def test_fetches_wait_for_a_slot_beyond_the_cap():
    internet = FakeInternet(delay_s=0.1)
    slots = asyncio.Semaphore(2)

    async def run():
        async with httpx.AsyncClient(transport=internet) as http:
            return await asyncio.gather(
                *(
                    load_image_bytes(f"http://public.test/{i}.png", ImagesConfig(), http, resolve, slots)
                    for i in range(6)
                )
            )

    assert [decode_upright(data, ImagesConfig()).size for data in asyncio.run(run())] == [(8, 6)] * 6
    assert internet.most_in_flight == 2


def test_the_wait_for_a_fetch_slot_counts_in_the_fetch_time_limit():
    async def run():
        slots = asyncio.Semaphore(1)
        await slots.acquire()  # held by a fetch that never ends
        async with httpx.AsyncClient(transport=FakeInternet()) as http, asyncio.timeout(2.0):
            await load_image_bytes(
                "http://public.test/a.png", ImagesConfig(fetch_timeout_s=0.2), http, resolve, slots
            )

    with pytest.raises(ImageError, match=r"longer than 0\.2 s"):
        asyncio.run(run())


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("2001::1", "a Teredo tunnel address"),
        ("ff02::1", "a multicast address"),
        ("224.0.0.1", "a multicast address"),
        ("0.0.0.0", "the unspecified address"),
        ("::1", "a loopback address"),
        ("100.64.0.1", "not a globally routable address"),
        ("64:ff9b:1::808:808", "a local-use NAT64 address, never public"),
        ("::2", "an IPv4-compatible address (deprecated), never public"),
        ("::8.8.8.8", "an IPv4-compatible address (deprecated), never public"),
        ("2002:7f00:1::", "a 6to4 address of 127.0.0.1, a loopback address"),
    ],
)
def test_the_refusal_says_what_kind_of_address_it_is(address, reason):
    host = f"[{address}]" if ":" in address else address
    canonical = ipaddress.ip_address(address)  # as the refusal writes it: ::8.8.8.8 is ::808:808
    with pytest.raises(RefusedUrl, match=re.escape(f"{canonical} is {reason}: ")):
        target(f"http://{host}/a.png")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://public.test/a.png", "image URLs must be http://, https:// or data: URLs"),
        ("http://user@public.test/a.png", "image URLs may not carry credentials (user:password@)"),
        ("http://user:secret@public.test/a.png", "image URLs may not carry credentials (user:password@)"),
        ("http:///a.png", "the image URL has no host"),
        ("http://08.0.0.1/a.png", "'08.0.0.1' is neither an IP address nor a host name"),
        ("http://a..b/a.png", "'a..b' is not a valid host name"),
    ],
)
def test_a_malformed_url_is_refused_saying_what_is_wrong(url, message):
    # The message is the client's 400: it says what to fix.
    with pytest.raises(RefusedUrl) as refused:
        target(url)
    assert str(refused.value) == message


def test_a_port_out_of_range_is_refused_as_not_valid():
    with pytest.raises(RefusedUrl, match=r"^the image URL's port is not valid: "):
        target("http://public.test:99999/a.png")


def test_an_absolute_name_is_the_same_host_to_the_allowlist():
    assert host_allowed("public.test.", ["public.test"])
    assert host_allowed("a.cdn.test.", ["*.cdn.test"])
    assert not host_allowed(".public.test", ["public.test"])


def test_a_url_without_a_path_fetches_the_root():
    assert target("http://public.test").url == f"http://{PUBLIC}/"


def test_an_exact_allowlist_entry_does_not_allow_names_that_end_with_it():
    with pytest.raises(
        RefusedUrl, match=r"notpublic\.test is not one of the hosts .* \(images\.allowed_hosts\)"
    ):
        target("http://notpublic.test/a.png", ImagesConfig(allowed_hosts=["public.test"]))


def test_a_name_that_resolves_to_nothing_is_unfetchable():
    async def nothing(host):
        return []

    with pytest.raises(UnfetchableHost, match=r"^empty\.test resolves to no address$"):
        asyncio.run(checked_target("http://empty.test/a.png", ImagesConfig(), nothing))


def test_the_system_resolver_answers_each_address_once():
    # A literal resolves to itself without a DNS server: one answer, not one per socket type.
    assert asyncio.run(system_resolver("127.0.0.1")) == [ipaddress.ip_address("127.0.0.1")]
    assert asyncio.run(system_resolver("fe80::1%1")) == [ipaddress.ip_address("fe80::1")]


@pytest.mark.parametrize(
    ("url", "host", "sni"),
    [
        ("http://public.test/a.png", "public.test", None),
        ("https://public.test/a.png", "public.test", "public.test"),
        ("https://PUBLIC.test./a.png", "public.test", "public.test"),
        ("https://public.test:8443/a.png", "public.test:8443", "public.test"),
    ],
)
def test_a_fetch_asks_for_the_image_uncompressed_and_by_the_name_the_client_gave(url, host, sni):
    """README: image fetches send `Accept-Encoding: identity`, and keep the URL's name for the Host
    header and for TLS (SNI) while connecting to the address that was checked."""
    internet = FakeInternet()
    assert fetch(url, internet, limits=ImagesConfig(allowed_ports=[80, 443, 8443])) == PNG
    (request,) = internet.requests
    # httpx asks for gzip, deflate (and more) unless told otherwise.
    assert request.headers.get_list("accept-encoding") == ["identity"]
    assert request.url.host == PUBLIC
    assert request.headers.get_list("host") == [host]
    assert request.extensions.get("sni_hostname") == sni
