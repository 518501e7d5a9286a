"""Slow S3 answers (``s3api.answer_slowly``) on a real aiohttp server and client: 200 and
the XML declaration at once, a space per keepalive while the work runs, then the document
or the Error, which botocore's own check reads as a failure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any
from xml.etree import ElementTree

import aiohttp
import pytest
from aiohttp import web
from botocore.handlers import _looks_like_special_case_error

from difs_p2p import s3xml
from difs_p2p.s3api import answer_slowly
from difs_p2p.s3errors import S3Error

EVERY = 0.05
DECLARATION = s3xml.XML_DECLARATION


def error_document(exc: Exception) -> bytes:
    assert isinstance(exc, S3Error)
    return s3xml.error_xml(exc.code, exc.message, "/b/k", "REQ1", exc.extra)


Work = Callable[[], Coroutine[Any, Any, bytes]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Work], Coroutine[Any, Any, str]]]:
    """Serve ``POST /`` with answer_slowly of a work; the URL."""
    runners: list[web.AppRunner] = []

    async def start(work: Work) -> str:
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                return await answer_slowly(request, work(), EVERY, error_document)
            except S3Error as exc:  # as S3Server._dispatch answers it
                return web.Response(status=exc.status, body=error_document(exc))

        app = web.Application()
        app.router.add_post("/", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}/"

    yield start
    for runner in runners:
        await runner.cleanup()


async def read_spaces(resp: aiohttp.ClientResponse, spaces: int) -> bytes:
    """What the answer sent until ``spaces`` keepalive spaces followed the declaration."""
    got = b""
    while len(got) < len(DECLARATION) + spaces:
        chunk = await asyncio.wait_for(resp.content.readany(), 10)
        assert chunk, f"the answer ended early: {got!r}"
        got += chunk
    return got


async def test_a_quick_answer_is_a_plain_document(serve: Any) -> None:
    async def work() -> bytes:
        return s3xml.complete_multipart("/b/k", "b", "k", '"e-2"')

    url = await serve(work)
    async with aiohttp.ClientSession() as session, session.post(url) as resp:
        body = await resp.read()
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(body))  # not streamed
    assert body == s3xml.complete_multipart("/b/k", "b", "k", '"e-2"')


async def test_a_slow_answer_sends_spaces_then_its_document(serve: Any) -> None:
    release = asyncio.Event()

    async def work() -> bytes:
        await release.wait()
        return s3xml.complete_multipart("/b/k", "b", "k", '"e-2"')

    url = await serve(work)
    async with aiohttp.ClientSession() as session, session.post(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/xml"
        head = await read_spaces(resp, 3)
        assert head == DECLARATION + b" " * (len(head) - len(DECLARATION))
        release.set()
        body = head + await resp.read()
    root = ElementTree.fromstring(body)  # the declaration, spaces, the root: well-formed
    assert root.tag.endswith("CompleteMultipartUploadResult")
    assert root.findtext(f"{{{s3xml.NS}}}ETag") == '"e-2"'
    assert not _looks_like_special_case_error(200, body)


async def test_a_slow_failure_is_an_error_in_the_200_answer(serve: Any) -> None:
    release = asyncio.Event()

    async def work() -> bytes:
        await release.wait()
        raise S3Error("ServiceUnavailable", "the copies could not be made")

    url = await serve(work)
    async with aiohttp.ClientSession() as session, session.post(url) as resp:
        assert resp.status == 200
        head = await read_spaces(resp, 2)
        release.set()
        body = head + await resp.read()
    root = ElementTree.fromstring(body)
    assert root.tag == "Error"
    assert root.findtext("Code") == "ServiceUnavailable"
    # botocore turns such an answer into a 500 that it retries, then raises
    assert _looks_like_special_case_error(200, body)


async def test_a_quick_failure_is_raised_as_before(serve: Any) -> None:
    async def work() -> bytes:
        raise S3Error("InvalidPart", "no such part")

    url = await serve(work)
    async with aiohttp.ClientSession() as session, session.post(url) as resp:
        assert resp.status == 400  # raised to the handler: the error's own status
        assert ElementTree.fromstring(await resp.read()).findtext("Code") == "InvalidPart"


async def test_work_goes_on_when_the_client_leaves(serve: Any) -> None:
    release, finished = asyncio.Event(), asyncio.Event()

    async def work() -> bytes:
        await release.wait()
        finished.set()
        return s3xml.complete_multipart("/b/k", "b", "k", '"e-2"')

    url = await serve(work)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(url)
        await read_spaces(resp, 1)
        resp.close()  # the client is gone mid-answer
    release.set()
    await asyncio.wait_for(finished.wait(), 10)
