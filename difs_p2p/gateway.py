"""The HTTP gateway: content by name for browsers, video players and curl (read-only).

``difs-peer join --http HOST:PORT`` runs one :class:`Gateway` in the peer's process. It
is owned by the peer: started once the peer is up, stopped first at shutdown. Routes::

    GET, HEAD /<name...>[?version=N]   the object (ranges, conditional requests)
    GET, HEAD /<folder...>/[?after=T]  the folder's page of names, HTML or JSON (Accept,
                                       ?format=json); /<folder> without the slash is
                                       301 to it when it has no object but a listing
    OPTIONS   /<anything>              CORS preflight
    GET       /healthz                 200 "ok" while the peer's network state is ok,
                                       else 503 with the state
    GET       /metrics                 the peer's figures for Prometheus (metrics.py)

Each request is answered through one :class:`~difs_p2p.client.Client` of the peer's own
TCP service, without the control token: the gateway is a stranger to its peer, so it can
resolve and fetch and nothing else. What to answer is decided by ``httprules`` (pure);
this module only moves bytes: the body is written chunk by chunk as the fetch verifies it
(``await resp.write``: a slow client holds the fetch back, memory stays bounded), a client
that goes away cancels the handler, which closes the fetch, and a failure after the status
line aborts the connection, so that a client never takes a short body for a whole one.
Every response is counted in the peer's ``GatewayMetrics`` (status, time to the status
line, which for a body is the time to its first verified chunk), with the requests in
flight and the bytes sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from difs_p2p import httprules
from difs_p2p.addresses import format_address, is_ipv6, is_wildcard
from difs_p2p.client import Client, Resolved
from difs_p2p.errors import BusyError, DifsError, NetworkError, NotFoundError, UsageError
from difs_p2p.fetch import choose_version
from difs_p2p.listing import normalize_folder
from difs_p2p.manifest import Manifest
from difs_p2p.metrics import GatewayMetrics
from difs_p2p.names import normalize_name
from difs_p2p.stream import ObjectStream

log = logging.getLogger(__name__)

# Names on one directory page (Client.list_page's default); ?after= continues it.
PAGE = 1000
# Seconds a request may spend resolving its name before it is answered 504.
RESOLVE_TIMEOUT = 30.0
# CORS: any page may read content (it is public and the gateway is read-only).
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": (
        "Content-Range, Content-Length, ETag, Accept-Ranges, Last-Modified, Content-Disposition"
    ),
}
PREFLIGHT = {
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": (
        "Range, If-Match, If-None-Match, If-Modified-Since, If-Unmodified-Since, If-Range"
    ),
    "Access-Control-Max-Age": "86400",
}
ALLOW = "GET, HEAD, OPTIONS"
# Bodies streamed at once; more requests for content are answered 503 (Retry-After). Each
# stream holds up to BODY_BUFFER for a client that does not read, so slow clients hold at
# most 128 MiB; and each takes a connection to each holder it reads from, well under the 32
# a holder allows one address.
MAX_STREAMS = 16
# What one body's fetch may hold ahead of its client: half a stream's default (16 MiB),
# still 8 segments of 1 MiB in flight for a fast client (8 slow clients measured 213 MB of
# peer memory with 16 MiB each).
BODY_BUFFER = 8 << 20
# The Prometheus text format's media type.
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_STARTED = web.RequestKey("started", float)


def loopback_of(host: str) -> str:
    """Where a local client reaches a socket bound to ``host``: ``host``, or for a
    wildcard the loopback address of its family."""
    if is_wildcard(host):
        return "::1" if is_ipv6(host) else "127.0.0.1"
    return host


def http_url(host: str, port: int) -> str:
    """The URL a local client reaches a gateway bound to ``host``:``port`` at."""
    return f"http://{format_address(loopback_of(host), port)}/"


def bind_gateway(address: tuple[str, int] | None, *, optional: bool) -> socket.socket | None:
    """The gateway's socket on ``address`` (None: no gateway). An ``optional`` address
    (the CLI's default) that is taken leaves the peer without a gateway, with a warning;
    one the operator chose raises NetworkError."""
    if address is None:
        return None
    try:
        return listen(*address)
    except NetworkError as exc:
        if not optional:
            raise
        log.warning("gateway_off reason=%s: the peer runs without its HTTP gateway", exc)
        return None


def listen(host: str, port: int) -> socket.socket:
    """The gateway's listening socket (``::`` takes IPv4 too); NetworkError if it cannot
    be bound."""
    try:
        if host == "::":
            return socket.create_server(
                (host, port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=128
            )
        family = socket.AF_INET6 if is_ipv6(host) else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise NetworkError(f"cannot serve HTTP on {format_address(host, port)}: {reason}") from None


def host_of(sock: socket.socket) -> str:
    """The address ``sock`` is bound to (``::`` for a dual-stack wildcard)."""
    return str(sock.getsockname()[0])


async def serve(app: web.Application, sock: socket.socket) -> web.AppRunner:
    """Serve ``app`` on the bound ``sock`` (from :func:`listen`), which it then owns (closed
    here if serving cannot start). A client that disconnects cancels its handler, which
    closes what the handler opened (a stream's fetch); ``cleanup()`` of the runner stops."""
    try:
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
    except BaseException:
        sock.close()
        raise
    try:
        await web.SockSite(runner, sock).start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    return runner


class Gateway:
    """The HTTP server. ``await gw.start(listen(host, port))``, then ``await gw.stop()``."""

    def __init__(
        self,
        entry: tuple[str, int],
        *,
        state: Callable[[], str],
        metrics: GatewayMetrics,
        render: Callable[[], bytes],
        io_timeout: float = 30.0,
    ) -> None:
        """``entry``: the peer's own TCP service; ``state``: its network state (``ok``,
        ``thin``, ``isolated``); ``metrics``: where responses are counted; ``render``:
        the peer's figures in the Prometheus text format."""
        self.client = Client(entry, io_timeout=io_timeout)
        self._state = state
        self.metrics = metrics
        self._render = render
        self._runner: web.AppRunner | None = None
        # bodies being streamed, and how many may be at once
        self.streams = 0
        self.max_streams = MAX_STREAMS
        self.bound: tuple[str, int] = ("", 0)
        app = web.Application(middlewares=[self._count])
        app.on_response_prepare.append(self._prepared)
        app.router.add_get("/healthz", self._healthz, allow_head=True)
        app.router.add_get("/metrics", self._metrics, allow_head=True)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.app = app

    @property
    def url(self) -> str:
        return http_url(*self.bound)

    async def start(self, sock: socket.socket) -> None:
        """Serve on ``sock`` (from :func:`listen`), which the gateway now owns."""
        self.bound = (host_of(sock), sock.getsockname()[1])
        try:
            self._runner = await serve(self.app, sock)
        except BaseException:
            await self.stop()
            raise
        log.info("gateway_started url=%s", self.url)

    async def stop(self) -> None:
        """Stop serving: requests under way are cancelled, their fetches closed."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        await self.client.close()

    # -- handlers ------------------------------------------------------------------------------

    @web.middleware
    async def _count(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        request[_STARTED] = time.perf_counter()
        with self.metrics.inflight():
            return await handler(request)

    async def _prepared(self, request: web.Request, response: web.StreamResponse) -> None:
        """Each response as its status line goes out: CORS headers, and counted."""
        response.headers.update(CORS)
        started = request.get(_STARTED)
        ttfb = time.perf_counter() - started if started is not None else None
        self.metrics.observe(response.status, ttfb)

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self._render())
        response.headers["Content-Type"] = METRICS_TYPE
        return response

    async def _healthz(self, request: web.Request) -> web.Response:
        status, text = httprules.health(self._state())
        return web.Response(status=status, text=text)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return web.Response(status=204, headers=PREFLIGHT)
        if request.method not in ("GET", "HEAD"):
            return self._error(request, 405, f"{request.method} is not allowed", {"Allow": ALLOW})
        try:
            if request.path.endswith("/"):
                return await self._directory(request)
            return await self._object(request)
        except DifsError as exc:
            return self._error(request, httprules.error_status(exc), str(exc))
        except TimeoutError:
            return self._error(request, 504, "the network did not answer in time")
        except OSError as exc:
            return self._error(request, 502, f"the network failed: {exc}")

    def _error(
        self,
        request: web.Request,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        as_json = httprules.wants_json(request.headers.get("Accept"), request.query.get("format"))
        body, ctype = httprules.error_body(status, message, as_json)
        extra = dict(headers or {})
        if httprules.retry_after(status):
            extra["Retry-After"] = str(httprules.RETRY_AFTER)
        response = web.Response(status=status, body=body, headers=extra)
        response.content_type = ctype.split(";")[0]
        if "charset" in ctype:
            response.charset = "utf-8"
        return response

    async def _is_folder(self, name: str) -> bool:
        """Whether ``name`` has a listing with at least one name in it."""
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                page = await self.client.list_page(name, limit=1)
        except (DifsError, TimeoutError, OSError):
            return False
        return bool(page.entries)

    async def _directory(self, request: web.Request) -> web.Response:
        """A folder's page of names: HTML, or JSON when asked (Accept, ?format=json)."""
        if request.path == "/":
            raise NotFoundError("/ has no listing: open a folder such as /key/<fingerprint>/")
        folder = normalize_folder(request.path)
        after = request.query.get("after")
        async with asyncio.timeout(RESOLVE_TIMEOUT):
            page = await self.client.list_page(folder, after=after, limit=PAGE)
        prefix = folder + "/"
        headers = {"Cache-Control": httprules.LATEST, "X-Content-Type-Options": "nosniff"}
        if httprules.wants_json(request.headers.get("Accept"), request.query.get("format")):
            body = json.dumps(httprules.directory_json(prefix, page.entries, page.next))
            response = web.Response(text=body, headers=headers)
            response.content_type = "application/json"
            return response
        text = httprules.directory_html(prefix, page.entries, page.next)
        response = web.Response(text=text, headers=headers)
        response.content_type = "text/html"
        response.charset = "utf-8"
        return response

    async def _version(self, request: web.Request) -> int | None:
        text = request.query.get("version")
        if text is None:
            return None
        if not (text.isascii() and text.isdigit()) or len(text) > 12:
            raise UsageError(f"bad version {text!r}: a positive number")
        return int(text)

    async def _object(self, request: web.Request) -> web.StreamResponse:
        name = normalize_name(request.path)
        version = await self._version(request)
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                resolved: Resolved = await self.client.resolve(name)
        except NotFoundError:
            if version is None and await self._is_folder(name):
                raw = request.rel_url
                query = f"?{raw.raw_query_string}" if raw.raw_query_string else ""
                raise web.HTTPMovedPermanently(f"{raw.raw_path}/{query}") from None
            raise
        manifest = choose_version(resolved.manifest, resolved.history, version)
        res = httprules.Resource(
            manifest.name,
            manifest.size,
            httprules.etag_of(manifest.hash),
            manifest.created,
            pinned=version is not None,
            media_type=manifest.meta.content_type if manifest.meta else None,
        )
        boundary = secrets.token_hex(16)
        ans = httprules.answer(request.method, request.headers, res, boundary)
        if ans.status in (304, 412, 416):
            body = b"" if ans.status == 304 else f"{ans.status} {ans.reason}\n".encode()
            short = web.Response(status=ans.status, headers=ans.headers, body=body or None)
            if body:
                short.content_type = "text/plain"
            return short
        response = web.StreamResponse(status=ans.status, headers=ans.headers)
        response.content_length = ans.length
        if request.method == "HEAD" or not ans.spans:
            await response.prepare(request)
            await response.write_eof()
            return response
        if self.streams >= self.max_streams:
            raise BusyError(f"the gateway is streaming {self.streams} bodies, its most: try later")
        self.streams += 1
        try:
            await self._send(request, response, ans, resolved, manifest, version)
        finally:
            self.streams -= 1
        return response

    async def _send(
        self,
        request: web.Request,
        response: web.StreamResponse,
        ans: httprules.Answer,
        resolved: Resolved,
        manifest: Manifest,
        version: int | None,
    ) -> None:
        """Stream the answer's spans. The first chunk is fetched before the status line,
        so that a fetch that cannot start is still an error status; a failure after it
        resets the connection and is logged once here (a client that went away at DEBUG);
        the handler then returns as if done, aiohttp's write to the reset connection
        failing quietly."""
        multipart = bool(ans.boundary)
        for i, span in enumerate(ans.spans):
            started = False
            stream: ObjectStream | None = None
            try:
                stream = await self.client.open_stream(
                    resolved, version=version, span=span, buffer=BODY_BUFFER
                )
                async for chunk in stream:
                    if not response.prepared:
                        await response.prepare(request)
                    if multipart and not started:
                        head = httprules.part_head(
                            ans.boundary, ans.part_type, span, manifest.size, i == 0
                        )
                        await response.write(head)
                    started = True
                    await response.write(chunk)
                    self.metrics.sent(len(chunk))
            except (DifsError, OSError, TimeoutError) as exc:
                if not response.prepared:
                    raise
                # the status line is out: only a dropped connection tells the client
                _abort(request)
                gone = isinstance(exc, ConnectionError)  # the client went away
                log.log(
                    logging.DEBUG if gone else logging.WARNING,
                    "gateway_body_failed name=%s error=%s",
                    manifest.name,
                    exc,
                )
                return
            finally:
                if stream is not None:
                    await stream.aclose()
                    self.metrics.received(stream.received)
        if multipart:
            await response.write(httprules.multipart_tail(ans.boundary))
        await response.write_eof()


def _abort(request: web.Request) -> None:
    """Drop the connection: the body already promised more bytes than will come."""
    transport = request.transport
    if transport is not None:
        transport.abort()
