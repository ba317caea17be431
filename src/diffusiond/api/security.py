"""Access control: which Host and Origin a request may carry, and the bearer API key.

`SameSiteMiddleware` is the defence of a server with no key on loopback against web pages:
a page on another origin may not drive it (a cross-site POST, even as `text/plain`, carries
an `Origin` the server refuses), and a page that rebinds its own name to 127.0.0.1 may not
read it (the browser still sends that name as `Host`, which the server refuses). The rules
follow what other local servers settled on after DNS-rebinding reports: a Host allow-list
of loopback names, the bound address and names the operator lists; an address written as
digits is safe (no DNS lookup, so nothing to rebind); an empty host name is refused.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import socket
from collections.abc import Callable, Collection, Iterable, Mapping

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from diffusiond.api.errors import error_response

OPEN_PATHS = frozenset({"/health", "/"})
# The web page's script and style sheet: they hold no data, and every API call the page makes
# carries the key (it asks for it on the first 401).
OPEN_PREFIXES = ("/ui/",)


def is_open(path: str) -> bool:
    """Whether `path` is the page or one of its files. A path with `.` or `..` segments,
    or a backslash, is never open: it names something else than it seems to."""
    if path in OPEN_PATHS:
        return True
    if not path.startswith(OPEN_PREFIXES) or "\\" in path:
        return False
    return not any(segment in {".", ".."} for segment in path.split("/"))


def host_name(host_header: str) -> str:
    """The name part of a Host header, lower-case, without port or brackets:
    `[::1]:8081` -> `::1`, `Example.com.:80` -> `example.com`."""
    text = host_header.strip().lower()
    if text.startswith("["):
        name, _, _ = text[1:].partition("]")
    elif text.count(":") == 1:
        name = text.partition(":")[0]
    else:  # a bare name, or an IPv6 address sent without brackets
        name = text
    return name.rstrip(".")


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class HostPolicy:
    """The Host names this server answers to."""

    def __init__(self, bound_host: str, allowed: Collection[str] = ()) -> None:
        self._any = "*" in allowed
        self._names = {"localhost"}
        self._domains: list[str] = []
        for entry in allowed:
            if entry.startswith("."):
                self._domains.append(entry.lower())
            elif entry != "*":
                self._names.add(host_name(entry))
        # Listening on every address: any address typed as digits reaches this server.
        bound = host_name(bound_host)
        unspecified = _ip(bound)
        self._any_ip = not bound or (unspecified is not None and unspecified.is_unspecified)
        if self._any_ip:
            bound = ""
        if bound:
            self._names.add(bound)
        bound_ip = _ip(bound)
        on_loopback = bound == "localhost" or (bound_ip is not None and bound_ip.is_loopback)
        if not on_loopback:
            self._names.update(_own_names())

    def allows(self, host_header: str) -> bool:
        if self._any:
            return True
        name = host_name(host_header)
        if not name:
            return False
        address = _ip(name)
        if address is not None:
            return address.is_loopback or self._any_ip or name in self._names
        return (
            name in self._names
            or name.endswith(".localhost")  # RFC 6761: never resolved beyond this machine
            or any(name == d[1:] or name.endswith(d) for d in self._domains)
        )


def _own_names() -> set[str]:
    """This machine's names, for a server that listens beyond loopback."""
    names = {socket.gethostname().lower()}
    with contextlib.suppress(OSError):
        names.add(socket.getfqdn().lower())
    return {name.rstrip(".") for name in names if name}


class SameSiteMiddleware:
    """403 FORBIDDEN_HOST for a Host the policy refuses; 403 FORBIDDEN_ORIGIN for an
    `Origin` that is neither this server's own (the one the Host names) nor a CORS origin.

    A request without `Origin` (curl, scripts, the page's own GETs) passes the Origin rule:
    browsers send one on every cross-origin request that could change or read anything.
    """

    def __init__(self, app: ASGIApp, hosts: HostPolicy, cors_origins: Iterable[str]) -> None:
        self._app = app
        self._hosts = hosts
        self._cors = frozenset(origin.lower() for origin in cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not self._hosts.allows(host):
            response = error_response(
                403,
                "FORBIDDEN_HOST",
                "this server does not answer to the host name this request was sent to",
                suggestion="Use http://localhost or http://127.0.0.1, or list the name in "
                "DIFFUSIOND_ALLOWED_HOSTS.",
            )
        elif not self._origin_allowed(headers.get("origin"), scope["scheme"], host):
            response = error_response(
                403,
                "FORBIDDEN_ORIGIN",
                "requests from web pages of another origin are refused",
                suggestion="Serve the page from this server, or list its origin in "
                "DIFFUSIOND_CORS_ORIGINS.",
            )
        else:
            await self._app(scope, receive, send)
            return
        await response(scope, receive, send)

    def _origin_allowed(self, origin: str | None, scheme: str, host: str) -> bool:
        if origin is None:
            return True
        origin = origin.strip().lower()
        if "*" in self._cors or origin.rstrip("/") in self._cors:
            return True
        # The page's own origin: the Host was checked above, so a rebound name never gets
        # here. (Behind a TLS proxy the scheme is what the proxy forwards, as uvicorn reads
        # X-Forwarded-Proto; or list the public origin in DIFFUSIOND_CORS_ORIGINS.)
        return origin == f"{scheme}://{host.strip().lower()}"


def carries_key(headers: Headers, api_key: str) -> bool:
    """Whether the request carries `Authorization: Bearer <api_key>` (constant time)."""
    given = headers.get("authorization", "").encode("latin-1", "replace")
    return hmac.compare_digest(given, f"Bearer {api_key}".encode())


class BearerKeyMiddleware:
    """Answers 401 UNAUTHORIZED unless `Authorization: Bearer <key>` matches.

    The key is compared in constant time (hmac.compare_digest), so the time a wrong key
    takes tells nothing about how much of it was right. `dialects` maps a path prefix to
    the 401 of another API's error shape (the OpenAI front door answers in OpenAI's).
    """

    def __init__(
        self,
        app: ASGIApp,
        api_key: str,
        dialects: Mapping[str, Callable[[str], Response]] | None = None,
    ) -> None:
        self._app = app
        self._expected = f"Bearer {api_key}".encode()
        self._dialects = dict(dialects or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]):
            await self._app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        if hmac.compare_digest(given, self._expected):
            await self._app(scope, receive, send)
            return
        message = "a valid API key is required" if given else "an API key is required"
        for prefix, refusal in self._dialects.items():
            if scope["path"].startswith(prefix):
                await refusal(message)(scope, receive, send)
                return
        response = error_response(
            401,
            "UNAUTHORIZED",
            message,
            suggestion="Send the header 'Authorization: Bearer <IMAGE_API_KEY>'.",
            headers={"WWW-Authenticate": 'Bearer realm="diffusiond"'},
        )
        await response(scope, receive, send)
