"""Storage peers: identity, restart, status and the errors a user meets when starting one."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import struct
from pathlib import Path

import pytest

from difs_p2p.control import OperatorCredential, PeerCredential
from difs_p2p.errors import NetworkError, PeerError, StorageError
from difs_p2p.identity import Identity
from difs_p2p.names import NameKey
from difs_p2p.peer import Peer
from difs_p2p.segments import SegmentId, segment_hash
from difs_p2p.transfer import Connection
from difs_p2p.wire import MESSAGES, Error, ErrorCode, GetSeg, MsgType, encode_header
from tests.helpers import client_for, peer_config, raw_call, start_peers, stop_all, wait_for


async def test_identity_is_persistent_and_private(tmp_path: Path) -> None:
    """The key file is mode 0600 and a restarted peer keeps its node ID."""
    peer = Peer(peer_config(tmp_path / "p"))
    await peer.start()
    first_id = peer.node_id
    await peer.stop()
    mode = stat.S_IMODE(os.stat(tmp_path / "p" / "peer.key").st_mode)
    assert mode == 0o600
    again = Peer(peer_config(tmp_path / "p"))
    await again.start()
    try:
        assert again.node_id == first_id
    finally:
        await again.stop()


async def test_restarted_peer_rejoins_from_saved_contacts(tmp_path: Path) -> None:
    """A restarted peer rejoins from contacts.json (JSON, not pickle) without --bootstrap."""
    peers = await start_peers(tmp_path, 4)
    try:
        leaver = peers[3]
        await leaver.stop()
        saved = json.loads((tmp_path / "p3" / "contacts.json").read_text())
        assert saved["version"] == 1 and len(saved["contacts"]) == 3
        back = Peer(peer_config(tmp_path / "p3"))
        await back.start()
        peers[3] = back
        assert len(back.dht.contacts()) == 3  # type: ignore[union-attr]
        await wait_for(
            lambda: all(back.node_id in {c.node_id for c in p.dht.contacts()} for p in peers[:3])  # type: ignore[union-attr]
        )
    finally:
        await stop_all(peers)


async def test_status_reports_network_and_storage(tmp_path: Path) -> None:
    """status() shows ID, address, routing table size, a contact sample, storage and DHT
    traffic."""
    peers = await start_peers(tmp_path, 3, capacity=5 << 20)
    try:
        status = peers[1].status()
        assert status["node_id"] == peers[1].node_id.hex()
        assert status["address"] == f"127.0.0.1:{peers[1].port}"
        assert status["routing_table"] == 2
        assert {c["id"] for c in status["contacts"]} == {
            peers[0].node_id.hex(),
            peers[2].node_id.hex(),
        }
        assert status["storage"] == {"used": 0, "capacity": 5 << 20, "segments": 0}
        dht = status["dht"]
        assert dht["sent"] > 0 and dht["received"] > 0  # joining took datagrams
        assert dht["lookups"] >= 1
    finally:
        await stop_all(peers)


async def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    """Starting on a taken port fails with NetworkError and leaves nothing running."""
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    try:
        peer = Peer(peer_config(tmp_path / "p", port=port))
        with pytest.raises(NetworkError, match="in use"):
            await peer.start()
        assert not (tmp_path / "p" / "address").exists()
    finally:
        blocker.close()


async def test_data_dir_not_writable(tmp_path: Path) -> None:
    """A data directory that cannot be created is a StorageError naming it."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="not writable"):
        await Peer(peer_config(blocker / "data")).start()


async def test_one_data_dir_one_peer(tmp_path: Path) -> None:
    """A second peer on the same data directory is refused while the first runs."""
    first = Peer(peer_config(tmp_path / "p"))
    await first.start()
    try:
        with pytest.raises(StorageError, match="in use"):
            await Peer(peer_config(tmp_path / "p")).start()
    finally:
        await first.stop()


async def test_unreachable_bootstrap_gives_up_saying_what_was_tried(tmp_path: Path) -> None:
    """Bootstrap retries with backoff, then fails naming the addresses it tried."""
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    address = dead.getsockname()
    try:
        config = peer_config(
            tmp_path / "p", bootstrap=(address,), bootstrap_attempts=2, bootstrap_backoff=0.05
        )
        with pytest.raises(NetworkError, match=f"127.0.0.1:{address[1]} after 2 attempts"):
            await Peer(config).start()
    finally:
        dead.close()


async def test_stalled_tcp_peer_is_dropped_and_others_are_served(tmp_path: Path) -> None:
    """A connection that stalls mid-frame is closed after the I/O timeout; service goes on."""
    import asyncio

    from difs_p2p.transfer import Connection

    peer = Peer(peer_config(tmp_path / "p", io_timeout=0.3))
    await peer.start()
    loop = asyncio.get_running_loop()
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setblocking(False)
    try:
        await loop.sock_connect(stalled, peer.address)
        await loop.sock_sendall(stalled, b"\x01\x02\x00")  # 3 of 12 header bytes, then silence
        async with asyncio.timeout(5):
            assert await loop.sock_recv(stalled, 100) == b""  # closed by the peer
        conn = await Connection.open(
            peer.address, io_timeout=5, credential=OperatorCredential(peer.control_token)
        )
        try:
            assert (await raw_call(conn, "status"))["node_id"] == peer.node_id.hex()
        finally:
            conn.close()
        oversized = b"\x01\x02\x00\x00\x00\x00\x00\x01\xff\xff\xff\xff"  # CALL of 4 GiB
        bad = await Connection.open(peer.address, io_timeout=5)
        try:
            await loop.sock_sendall(bad.sock, oversized)
            frame = await bad.read_frame()
            assert frame is not None and type(frame).__name__ == "Error"
        finally:
            bad.close()
    finally:
        stalled.close()
        await peer.stop()


async def test_a_failing_handler_answers_with_an_internal_error(tmp_path: Path) -> None:
    """A bug in a control handler gets an INTERNAL error reply, and the connection goes on."""
    import asyncio

    from difs_p2p.errors import DifsError
    from difs_p2p.transfer import Connection

    peer = Peer(peer_config(tmp_path / "p"))
    await peer.start()

    async def broken(conn: Connection, request: object) -> object:
        raise KeyError("a bug")

    peer._controls["status"] = broken
    try:
        conn = await Connection.open(
            peer.address, io_timeout=5, credential=OperatorCredential(peer.control_token)
        )
        try:
            async with asyncio.timeout(5):
                with pytest.raises(DifsError, match="internal error in the peer"):
                    await raw_call(conn, "status")
                holds = await raw_call(conn, "holds", key="00" * 20, version=1, start=0, end=0)
            assert holds == {"holds": False}
        finally:
            conn.close()
    finally:
        await peer.stop()


async def test_handlers_take_typed_requests_and_answer_typed_replies(tmp_path: Path) -> None:
    """A handler gets the CALL decoded into its typed request; a reply of another
    operation's type is a bug answered INTERNAL, the connection going on."""
    from typing import Any

    from difs_p2p import ops
    from difs_p2p.errors import RemoteError

    peer = Peer(peer_config(tmp_path / "p"))
    await peer.start()
    seen: list[object] = []
    holds = peer._controls["holds"]

    async def recording(conn: Connection, request: Any) -> Any:
        seen.append(request)
        return await holds(conn, request)

    async def confused(conn: Connection, request: object) -> object:
        return ops.HoldsReply(True)

    peer._controls["holds"] = recording
    peer._controls["status"] = confused
    try:
        conn = await Connection.open(
            peer.address, io_timeout=5, credential=OperatorCredential(peer.control_token)
        )
        try:
            async with asyncio.timeout(5):
                reply = await raw_call(conn, "holds", key="0a" * 20, version=3, start=1, end=2)
                assert reply == {"holds": False}
                assert seen == [ops.RangeRequest(NameKey(b"\x0a" * 20), 3, 1, 2)]
                with pytest.raises(RemoteError, match="internal error in the peer") as caught:
                    await conn.request(ops.StatusRequest())
                assert caught.value.code == ErrorCode.INTERNAL
                typed = await conn.request(ops.RangeRequest(NameKey(b"\x0a" * 20), 3, 1, 2))
                assert typed == ops.HoldsReply(False)
        finally:
            conn.close()
    finally:
        await peer.stop()


async def test_pipelined_segments_are_stored_each_with_its_own_bytes(tmp_path: Path) -> None:
    """Segments sent back to back, of different sizes and with a corrupt one among them,
    are each stored intact: a receive buffer serves the next frame only once the segment
    it held is written, and a refused segment leaves the others alone."""
    import asyncio

    import blake3

    from difs_p2p import wire
    from difs_p2p.transfer import Connection

    peer = Peer(peer_config(tmp_path / "p"))
    await peer.start()
    sizes = [1 << 20, 300_000, 1 << 20, (1 << 20) + 7, 5, 1 << 20] * 3
    blobs = [os.urandom(n) for n in sizes]
    ids = [SegmentId(blake3.blake3(b).digest()) for b in blobs]
    corrupt = 4
    try:
        conn = await Connection.open(
            peer.address, io_timeout=10, credential=OperatorCredential(peer.control_token)
        )
        try:
            async with asyncio.timeout(30):
                for i, (seg_id, data) in enumerate(zip(ids, blobs, strict=True)):
                    sent = data[::-1] if i == corrupt else data
                    await conn.send(wire.PutSeg(request_id=i, seg_id=seg_id, data=sent))
                replies = [await conn.read_frame() for _ in blobs]
        finally:
            conn.close()
        for i, reply in enumerate(replies):
            assert reply is not None and reply.request_id == i
            assert isinstance(reply, wire.Error if i == corrupt else wire.Ack), reply
        store = peer._store()
        for i, (seg_id, data) in enumerate(zip(ids, blobs, strict=True)):
            if i == corrupt:
                assert not store.has(seg_id)
            else:
                assert store.read(seg_id) == data
    finally:
        await peer.stop()


def test_buffer_pool_reuses_buffers_large_enough_and_keeps_a_few() -> None:
    from difs_p2p.transfer import BufferPool

    pool = BufferPool(keep=2)
    a = pool.take(100)
    assert len(a) == 100
    pool.give(a)
    assert pool.take(50) is a  # large enough: reused
    pool.give(a)
    b = pool.take(200)  # `a` is too small: dropped, a new one made
    assert b is not a and len(b) == 200
    given = [bytearray(10), bytearray(10), bytearray(10)]
    for buf in given:
        pool.give(buf)  # the third is beyond `keep`: not kept
    taken = [pool.take(1), pool.take(1), pool.take(1)]
    assert taken[0] is given[1] and taken[1] is given[0]
    assert all(t is not g for t in taken[2:] for g in given)


async def test_a_file_shorter_than_announced_closes_the_connection(tmp_path: Path) -> None:
    """send_file announces the length it was given; if the file ends early the frame
    cannot be completed, so the sender raises and closes instead of leaving the
    receiver waiting for bytes that never come."""
    import asyncio

    from difs_p2p import wire
    from difs_p2p.errors import PeerError
    from difs_p2p.transfer import Connection

    listener = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    listener.close()
    a.setblocking(False)
    b.setblocking(False)
    sender, receiver = Connection(a, io_timeout=5), Connection(b, io_timeout=5)
    path = tmp_path / "seg"
    path.write_bytes(b"x" * 1000)
    try:
        with path.open("rb") as fh:
            await sender.send_file(7, fh, 0, 1000, msg_type=wire.MsgType.PUT_SEG, prefix=b"i" * 32)
            frame = await receiver.read_frame()
            assert isinstance(frame, wire.PutSeg) and frame.seg_id == b"i" * 32
            assert bytes(frame.data) == b"x" * 1000
            with pytest.raises(PeerError, match="ended after 1000 of 5000"):
                await sender.send_file(8, fh, 0, 5000)
        assert sender.closed
        async with asyncio.timeout(5):
            with pytest.raises(PeerError):
                await receiver.read_frame()  # the truncated frame ends with the connection
    finally:
        sender.close()
        receiver.close()


async def test_connections_reset_by_the_client_give_back_their_address_slots(
    tmp_path: Path,
) -> None:
    """Connections reset right after connecting free their per-address slots."""
    peers = await start_peers(tmp_path, 1, max_connections_per_address=4)
    server = peers[0].server
    assert server is not None
    try:
        for _ in range(4):
            with socket.create_connection(peers[0].address) as sock:
                # close with RST: the server's getpeername fails on these
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

        async def served() -> bool:
            # refused while the resets still hold (or, unfixed, keep) the address's slots
            try:
                conn = await Connection.open(
                    peers[0].address, io_timeout=5, credential=PeerCredential(Identity.generate())
                )
            except (NetworkError, PeerError):
                return False
            conn.close()
            return True

        await wait_for(served)
        await wait_for(lambda: server.connections_from("127.0.0.1") == 0)
    finally:
        await stop_all(peers)


@pytest.mark.parametrize(
    "msg_type", [MsgType.DATA, MsgType.REPLY, MsgType.ACK, MsgType.ERROR], ids=lambda t: t.name
)
async def test_frames_that_are_never_requests_are_refused_from_their_header(
    tmp_path: Path, msg_type: MsgType
) -> None:
    """A DATA, REPLY, ACK or ERROR frame is refused unread and closes the connection."""
    peers = await start_peers(tmp_path, 1)
    try:
        conn = await Connection.open(peers[0].address, io_timeout=5)
        try:
            length = MESSAGES[msg_type].max_payload  # the most it may announce
            # only the header: the peer must answer without waiting for the payload
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(conn.sock, encode_header(msg_type, 7, length))
            answer = await conn.read_frame()
            assert isinstance(answer, Error) and answer.code == ErrorCode.BAD_REQUEST
            assert answer.request_id == 7
            assert await conn.read_frame() is None
        finally:
            conn.close()
    finally:
        await stop_all(peers)


async def test_a_client_that_never_reads_its_segments_loses_its_connection(
    tmp_path: Path,
) -> None:
    """A send that times out with the reply queue full closes the connection and its files."""
    peers = await start_peers(tmp_path / "net", 1, io_timeout=1.0, idle_timeout=600.0)
    peer = peers[0]
    assert peer.server is not None
    server = peer.server
    try:
        client = client_for(peer, publisher=Identity.generate())
        data = os.urandom(1 << 20)
        (tmp_path / "src").write_bytes(data)
        await client.put(tmp_path / "src", "/w/x", segment_size=1 << 20, replicas=1)
        await client.close()
        await wait_for(lambda: server.connections == 0)
        seg_id = segment_hash(data)
        conn = await Connection.open(peer.address, io_timeout=5)
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            # far more than the socket buffers and the reply queue hold; no reply is read
            await conn.send_many(
                [GetSeg(request_id=i, seg_id=seg_id, offset=0, length=0) for i in range(64)]
            )
            await wait_for(lambda: server.connections == 0, timeout=20)
        finally:
            conn.close()

        def segment_files_open() -> int:
            fds = Path("/proc/self/fd")
            return sum(seg_id.hex() in str(fd.readlink()) for fd in fds.iterdir() if fd.exists())

        await wait_for(lambda: segment_files_open() == 0)
    finally:
        await stop_all(peers)
