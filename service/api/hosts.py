"""Which Host names the API answers to, and whether a request comes straight from this machine.

Two attacks share one cause, trusting the TCP peer address alone. A reverse proxy on this host makes
every internet client look like 127.0.0.1; a web page a local browser loads from evil.example can
resolve that name to 127.0.0.1 (DNS rebinding) and call the API from the browser. Both show in the
headers: a proxy adds forwarding headers, and a rebound page keeps its own name in Host.
"""

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.auth import is_loopback
from service.api.errors import error_response

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
# Set by proxies (RFC 7239, and the two de facto ones). uvicorn reads X-Forwarded-For alone, and only from
# FORWARDED_ALLOW_IPS; any of them means the TCP peer is not the client.
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def host_name(host: str | None) -> str | None:
    """The name in a Host header, lower case, without port or trailing dot; None if it is no host name."""
    host = (host or "").strip().lower()
    if host.startswith("["):  # an IPv6 literal: [::1]:8000
        end = host.find("]") + 1
        name, port = (host[:end], host[end:]) if end else ("", "")
    else:
        name, colon, digits = host.partition(":")
        port = colon + digits
    if port and not (port.startswith(":") and port[1:].isdigit()):
        return None
    return name.removesuffix(".") or None


def is_loopback_host(host: str | None) -> bool:
    return host_name(host) in LOOPBACK_NAMES


def parse_allowed_hosts(setting: str) -> frozenset[str] | None:
    """CHATLOOP_ALLOWED_HOSTS as a set of names ('*' among them: any); None when unset (the default rule)."""
    names = {n.strip().lower().removesuffix(".") for n in setting.split(",") if n.strip()}
    return frozenset(names) or None


def host_allowed(host: str | None, allowed: frozenset[str] | None, local_address: str) -> bool:
    """Whether a request naming `host` that reached this server on `local_address` is served.

    Unset, the rule is: a request that reached a loopback address must name a loopback host (only this
    machine reaches that address, so any other name is a page rebound to it, or a proxy on this host
    nobody told the server about); one that reached another interface may name any host.
    """
    if allowed is None:
        return not is_loopback(local_address) or is_loopback_host(host)
    return "*" in allowed or host_name(host) in allowed


def straight_from_this_machine(headers: Headers) -> bool:
    """No proxy in between (no forwarding header) and the Host names this machine: a loopback peer
    address then really is a local client."""
    return not any(h in headers for h in FORWARDING_HEADERS) and is_loopback_host(headers.get("host"))


class HostCheckMiddleware:
    """Answer 400 (OpenAI error JSON) to requests whose Host header the server does not answer to."""

    def __init__(self, app: ASGIApp, allowed_hosts: str) -> None:
        self.app, self.allowed = app, parse_allowed_hosts(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = Headers(scope=scope).get("host")
        local_address = (scope.get("server") or ("", None))[0] or ""
        if host_allowed(host, self.allowed, local_address):
            return await self.app(scope, receive, send)
        message = f"this server does not answer to Host {host!r} (CHATLOOP_ALLOWED_HOSTS)"
        await error_response(400, message, "host", "invalid_host")(scope, receive, send)
