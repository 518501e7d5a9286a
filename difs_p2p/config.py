"""Validated, frozen configuration, built once at the edge (CLI or API).

Every default says where it comes from. Tests build configs; nothing patches module
constants.
"""

from __future__ import annotations

from pathlib import Path

from difs_p2p.addresses import check_listen, check_zone, format_address, ip_of, split_hostport
from difs_p2p.addresses import parse_hostport as parse_hostport
from difs_p2p.classgen import field, valueclass
from difs_p2p.errors import UsageError
from difs_p2p.sizes import format_size as format_size
from difs_p2p.sizes import parse_size as parse_size


def parse_http(text: str, option: str = "--http") -> tuple[str, int] | None:
    """The gateway's address (``--http``): ``HOST:PORT`` with an IP address (``[IPv6]:PORT``,
    ``localhost``), or ``off`` (None)."""
    if text.strip().lower() == "off":
        return None
    head, _, port_text = text.strip().rpartition(":")
    # port 0 (a free port, for tests) is refused by split_hostport, which reads peers' ports
    any_port = port_text == "0"
    try:
        host, port = split_hostport(f"{head}:1" if any_port else text)
        return check_listen(host), 0 if any_port else port
    except UsageError:
        raise UsageError(
            f"{option} must be HOST:PORT with an IP address (127.0.0.1:8080, [::1]:8080,"
            f" 0.0.0.0:8080) or off, not {text!r}"
        ) from None


def parse_s3(text: str) -> tuple[str, int] | None:
    """The S3 API's address (``--s3``): ``HOST:PORT`` with an IP address, or ``off``."""
    return parse_http(text, "--s3")


@valueclass
class RepairConfig:
    """How a peer looks after what it holds."""

    # Seconds between maintenance rounds.
    interval: float = 60.0
    # Failed rounds in a row before a holder is dead: detection within 3 minutes by default.
    dead_after: int = 3
    # A holder answering a probe slower than this is slow (still alive); probes time out at
    # 2x this.
    slow_after: float = 2.0
    # Repair traffic per peer, bytes per second (50 MB/s leaves most of a link to users).
    bandwidth: float = 50e6
    # Retention (`difs-peer join --keep-versions N`): a holder keeps a version until its
    # owner has published `keep` newer ones (or deleted the name), so the newest `keep`
    # versions stay retrievable and older ones are collected. 3 as in the original design
    # (`get --version` of the last few versions); 1 keeps only the current version.
    keep: int = 3
    # Re-announce holder entries and re-store manifests this often (records expire in 48 h).
    republish_every: float = 3600.0
    # Orphans: a holding whose version has no manifest in the DHT this long after it began
    # (plus orphan_per_segment for each segment of the object: a large object's place
    # takes a while before the manifest is published) belongs to a failed publish and is
    # freed; a segment nothing keeps (no holding, no upload in progress) is deleted this
    # long after it was stored; an upload connection idle this long is dropped. A publish
    # stores its manifest seconds after its segments, so 5 minutes leaves a wide margin
    # while bounding what failed uploads cost (the entry peer frees them at once).
    orphan_grace: float = 300.0
    # 0.05 s per segment: room for a placement as slow as 20 segments/s (20 MiB/s with
    # 1 MiB segments; `make bench` places at 130-350 MB/s).
    orphan_per_segment: float = 0.05
    # Names looked after per round at most: each adds its ranges to the probes (and now
    # and then a DHT lookup), so a peer holding many names spreads them over several
    # rounds (a name comes up every ceil(names / max_keys_per_round) rounds) and its
    # background traffic stays bounded however much it holds.
    max_keys_per_round: int = 64
    # A name is read from the DHT (one lookup, ~40 datagrams) on one round in
    # `resolve_every` (and at once when one of its holders turns suspect or dead, or a
    # range looks short of copies); the rounds in between probe the holders the last read
    # found. Superseded and deleted versions are thus collected within resolve_every
    # rounds of the name (10 minutes by default); 1 reads every name every round.
    resolve_every: int = 10
    # A dead holder is probed again after 1, 2, 4... rounds, at least every `dead_backoff`
    # rounds (16 minutes by default): its entries outlive it by up to 48 h.
    dead_backoff: int = 16

    def __post_init__(self) -> None:
        if self.resolve_every < 1 or self.dead_backoff < 1:
            raise UsageError("resolve_every and dead_backoff must be at least 1")
        if self.keep < 1:
            raise UsageError("--keep-versions must be at least 1")
        if self.orphan_grace < 0 or self.orphan_per_segment < 0:
            raise UsageError("orphan_grace and orphan_per_segment must not be negative")


@valueclass
class DhtConfig:
    """Tuning of the DHT adapter."""

    # k and alpha from the Kademlia paper, as in the library's defaults.
    ksize: int = 20
    alpha: int = 3
    # The library waits 5 s per RPC; a LAN answers in well under 1 ms, so 2 s is generous.
    rpc_timeout: float = 2.0
    # A lookup request unanswered for the stall time stops holding one of the alpha slots,
    # and the lookup may end without it (as libtorrent's "short timeout"): a dead contact
    # then costs a lookup the stall time instead of rpc_timeout. Its reply still counts if
    # it comes before the lookup ends. The stall time adapts like TCP's retransmission
    # timeout (smoothed round trip + 4 deviations, from this peer's lookup replies),
    # between lookup_stall_min and lookup_stall (also the value before any reply). Writes
    # to the k closest (put_with_entries, add_entries) stop waiting for a peer the stall
    # time after the latest reply the same way.
    lookup_stall: float = 0.5
    lookup_stall_min: float = 0.2
    # The library evicts a contact after one lost reply; the paper suggests tolerating several.
    evict_after_failures: int = 3
    # The kernel default (208 KiB) drops replies during parallel lookups; 4 MiB is rmem_max here.
    recv_buffer: int = 4 << 20
    # Largest datagram we decode: the library's request cap is 8,192 B plus headers.
    max_datagram: int = 9000
    # Re-run bootstrap (far-bucket refresh) this often, as the paper's bucket refresh.
    refresh_interval: float = 600.0
    # Contacts are pinged this often; a crashed peer is evicted after evict_after_failures
    # pings, so within about liveness_interval x evict_after_failures (3 min by default).
    liveness_interval: float = 60.0
    # Stored records expire unless re-stored within this time (republish interval x 2).
    record_ttl: float = 48 * 3600.0
    # Caps on what one peer stores for the network: count of records and of set entries.
    max_records: int = 100_000
    max_entries_per_key: int = 512
    # Sybil cost: routing-table contacts per IPv4 address or IPv6 /64 (S/Kademlia-style
    # limit; `difs-peer join --max-contacts-per-ip`). Peers beyond it are kept in a
    # bounded overflow (overflow_contacts), usable as holders but not for routing.
    max_contacts_per_ip: int = 4
    # store/add_entries requests per second per sender address, with this burst.
    write_rate: float = 50.0
    write_burst: float = 200.0
    # Loopback addresses are exempt from the two limits above (local networks, tests),
    # unless this is set.
    limit_loopback: bool = False
    # Proven node IDs remembered (public keys), times 10 before the cache is reset.
    max_verified: int = 1000
    # A store or add_entries within this many seconds of a lookup of the same key goes to
    # the k closest peers that lookup found instead of looking them up again (a publish
    # resolves its name first). Short, so that peers that left since are rarely asked;
    # 0 always looks up.
    closest_reuse: float = 10.0
    # Node-ID work (S/Kademlia's static crypto puzzle): a contact's node ID must hash
    # (SHA-256 under a domain, see ``difs_p2p.idwork``) to this many leading zero bits,
    # or it fails the identify check. 11 bits is 2,048 key generations on average: about
    # 0.1 s at ~19,500 keys/s on one core here (0.3 s on a loaded machine), once, at a
    # peer's first start, in a thread (the key is kept); every ID an attacker grinds near a
    # key costs 2,048 times more. 0 turns the
    # check off (the simulator and the tests, which create many identities).
    id_difficulty: int = 11
    # Record and entry lookups (get, resolve, get_entries) and writes run over this many
    # disjoint paths (S/Kademlia): a peer asked by one path is not asked by another, and
    # each path ends at its own k closest, so a cluster of IDs near a key cannot be every
    # path's answer. Writes go to every path's k closest (up to paths x k peers).
    disjoint_paths: int = 2
    # A write reads its record back from the peers of each path that took it; it is
    # reported done only if this many paths serve it (at most the paths that found peers).
    write_quorum_paths: int = 2
    # Return-routability tokens (as BEP 5's token, QUIC's address validation): a source
    # that has not proved it receives at its address gets replies no larger than its
    # request; the token it is given lasts one to two periods of this length.
    token_period: float = 300.0
    # Hand-over to a newcomer: at most this many records (each with at most 32 entries).
    handover_max_records: int = 1000
    # Placement across failure domains: verified peers refused a routing-table slot only
    # by max_contacts_per_ip are kept, up to this many (the least recently seen dropped),
    # and named in find_node replies and placement lookups when among the closest (at
    # most max_contacts_per_ip of one address per reply); 0 keeps none. 64 = 3 x k,
    # about the peers a busy host of containers puts beyond the cap.
    overflow_contacts: int = 64
    # Rejoin (membership.py). The routing table is "thin" below this share of the most
    # contacts it held (capped at ksize): a quarter, 5 of k = 20, leaves lookups a few
    # paths but tells a peer that lost most of the network from one that lost a few
    # contacts; "isolated" at 0. A thin or isolated peer retries its lost contacts,
    # --bootstrap peers and saved contacts at once, then after rejoin_min doubling up to
    # rejoin_max seconds (TCP-like backoff: a healed link is found within a minute
    # without flooding the peers of a long partition), with jitter; never gives up.
    thin_share: float = 0.25
    rejoin_min: float = 1.0
    rejoin_max: float = 60.0
    # How often the rejoin loop looks at the routing table's size (a len(): cheap).
    rejoin_check: float = 1.0
    # Contacts evicted for not answering that are remembered to retry (newest kept).
    lost_remembered: int = 64
    # -- small objects: resolve cache --
    # A client's resolve is answered from this peer's last resolve of the same key if
    # that ended at most this many seconds ago (and no write through this peer touched
    # the key since it began): the staleness bound a reader at another entry peer sees
    # (a writer reads its own write at once through its entry peer). 0, the default,
    # turns it off (`difs-peer join --resolve-cache 1` turns it on).
    resolve_cache: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.thin_share <= 1:
            raise UsageError("thin_share must be in (0, 1]")
        if not 0 < self.rejoin_min <= self.rejoin_max or self.rejoin_check <= 0:
            raise UsageError("need 0 < rejoin_min <= rejoin_max and rejoin_check > 0")
        if self.lost_remembered < 0:
            raise UsageError("lost_remembered must not be negative")
        if not 0 <= self.resolve_cache <= 60:
            raise UsageError("--resolve-cache must be 0-60 seconds")
        if self.ksize < 1 or self.alpha < 1:
            raise UsageError("ksize and alpha must be at least 1")
        if self.rpc_timeout <= 0:
            raise UsageError("rpc_timeout must be positive")
        if not 0 < self.lookup_stall_min <= self.lookup_stall:
            raise UsageError("need 0 < lookup_stall_min <= lookup_stall")
        if self.closest_reuse < 0:
            raise UsageError("closest_reuse must not be negative")
        if not 0 <= self.id_difficulty <= 32:
            raise UsageError("id_difficulty must be 0-32 bits")
        if self.disjoint_paths < 1 or self.write_quorum_paths < 1:
            raise UsageError("disjoint_paths and write_quorum_paths must be at least 1")
        if self.token_period <= 0:
            raise UsageError("token_period must be positive")
        if self.handover_max_records < 0:
            raise UsageError("handover_max_records must not be negative")
        if self.max_contacts_per_ip < 1:
            raise UsageError("--max-contacts-per-ip must be at least 1")
        if self.overflow_contacts < 0:
            raise UsageError("overflow_contacts must not be negative")


@valueclass
class ProofConfig:
    """How a DHT peer challenges the holder entries it admits (holdproof.py)."""

    # share of challenges that also read one segment: 2/k with k = 20 (DhtConfig.ksize)
    segment_share: float = 0.1
    # a challenge that took longer failed: a live holder answers in milliseconds
    # (2.7 ms on loopback), so 5 s is generous to slow links and loaded peers
    timeout: float = 5.0
    # a proven claim is not challenged again for an hour (entries are re-announced)
    proven_ttl: float = 3600.0
    # a failed (signer, address) is refused for ten minutes
    failed_ttl: float = 600.0
    # claims remembered in each cache (about 100 bytes each)
    remembered: int = 10_000
    # challenges waiting or running, in all, per key and per signer
    max_pending: int = 256
    max_pending_per_key: int = 32
    max_pending_per_signer: int = 64
    # challenges running at once
    concurrency: int = 8
    # -- batched challenges and kept connections (holdproof.py) --
    # a holder's new claims are gathered this long, then challenged in one prove_many
    gather: float = 0.1
    # claims per prove_many (at most ops.MAX_PROVE_ITEMS)
    batch: int = 64
    # idle connections to holders kept for the next challenge, and for how long
    pool: int = 64
    pool_idle: float = 10.0
    # new connections to holders per second (a burst of as many): a flood of entries
    # naming many addresses cannot make this peer open thousands of connections
    connects_per_s: float = 50.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.segment_share <= 1.0:
            raise UsageError("segment_share must be between 0 and 1")
        if self.timeout <= 0 or self.proven_ttl < 0 or self.failed_ttl < 0:
            raise UsageError("proof timeout must be positive and the cache times not negative")
        if min(self.remembered, self.max_pending, self.concurrency) < 1:
            raise UsageError("proof caches, pending challenges and concurrency must be >= 1")
        if min(self.max_pending_per_key, self.max_pending_per_signer) < 1:
            raise UsageError("pending challenges per key and per signer must be >= 1")
        if not 1 <= self.batch <= 64 or self.pool < 0:
            raise UsageError("proof batch must be 1 to 64 claims and the pool not negative")
        if self.gather < 0 or self.pool_idle <= 0 or self.connects_per_s <= 0:
            raise UsageError("proof gather must not be negative, pool_idle and rate positive")


@valueclass
class PeerConfig:
    """Everything a storage peer needs to start."""

    data_dir: Path
    # The address the sockets bind (--listen): IPv4, IPv6, 0.0.0.0 or :: (dual-stack).
    # Loopback by default: a peer reachable from other hosts is the operator's choice.
    host: str = "127.0.0.1"
    # 0 picks a free port; the same number serves UDP (DHT) and TCP (segments) unless
    # tcp_port is set.
    port: int = 0
    bootstrap: tuple[tuple[str, int], ...] = ()
    # 10 GiB: a storage peer's default share of its disk; set with --capacity.
    capacity: int = 10 << 30
    dht: DhtConfig = field(default_factory=DhtConfig)
    # Bootstrap retries: 5 attempts with exponential backoff from 0.5 s (about 15 s in all).
    bootstrap_attempts: int = 5
    bootstrap_backoff: float = 0.5
    # How long a TCP peer may stall on one frame before we drop the connection.
    io_timeout: float = 30.0
    # Bound on concurrent inbound TCP connections.
    max_connections: int = 256
    repair: RepairConfig = field(default_factory=RepairConfig)
    # Challenges of the holder entries other peers send (docs/SECURITY.md).
    proof: ProofConfig = field(default_factory=ProofConfig)
    # Inbound TCP connections from one IP address: an eighth of max_connections, so that
    # one address cannot take every slot (a fetch opens up to 8 holder connections, a
    # client one more to its entry peer).
    max_connections_per_address: int = 32
    # Loopback addresses count against that limit like any other; local benchmarks and
    # simulations that send every connection through 127.0.0.1 turn this off.
    tcp_limit_loopback: bool = True
    # A connection without a request (HELLO does not count) for this long is closed, even
    # if it keeps sending HELLOs: an idle slot goes back to the pool. As the I/O timeout.
    idle_timeout: float = 30.0
    # Upload bytes (PUT_SEG payloads) held in memory at once, over all connections: 16
    # maximal segments. Buffers are allocated only after the sender proved its role.
    upload_budget: int = 256 << 20
    # Work a stranger may queue (`suspect`: re-verify a segment): per second, with a burst.
    open_work_rate: float = 1.0
    open_work_burst: float = 8.0
    # Leaving the network (drain): on SIGTERM/SIGINT hand every range and record over to
    # the next closest peers before stopping (`difs-peer join --drain`); off by default,
    # as a stop for a restart needs no hand-over.
    drain_on_signal: bool = False
    # -- real networks (addresses) --
    # What holder entries and the address file carry (--advertise HOST:PORT; a host name
    # is resolved at start; port 0, or HOST alone: the peer's own TCP port). None: the
    # bound address, or for a wildcard bind the address at least two other peers observe
    # (addresses.AddressVotes).
    advertise: tuple[str, int] | None = None
    # The TCP port of the segment service (--tcp-port); 0: the UDP port's number.
    tcp_port: int = 0
    # A label of where the peer runs (--zone: a rack, a site), told to others in the
    # identify info block, so that placement spreads copies over zones. "": none.
    zone: str = ""
    # -- HTTP gateway --
    # Where the read-only HTTP gateway listens (--http HOST:PORT; gateway.py). None: no
    # gateway, the default here so that tests and embedders opt in; the CLI's default is
    # 127.0.0.1:8080, as kubo's gateway.
    http: tuple[str, int] | None = None
    # The address is the CLI's default, not the operator's choice: if it is taken, the peer
    # logs a warning and runs without a gateway (a chosen address that cannot be bound
    # fails the start).
    http_optional: bool = False
    # -- S3 API --
    # Where the S3 API listens (--s3 HOST:PORT; s3api.py). None: no S3 API, the default
    # (the CLI's too): it publishes with the peer's control token for every access key in
    # DATA/s3keys.sqlite3, so an operator turns it on.
    s3: tuple[str, int] | None = None
    # -- Upload window --
    # Segment bytes (PUT_SEG payloads) one connection may have received and not yet
    # answered: past it the peer stops reading that connection until an answer is done, so
    # a chain's hops (each holding a segment until its downstream acknowledged it) hold at
    # most this much of an upload each, whatever its size. At least one segment frame.
    upload_window: int = 16 << 20
    # -- S3 multipart expiry --
    # Seconds after its last activity an unfinished S3 multipart upload (no part arriving)
    # is removed with what it stored (--s3-upload-expiry; S3 lifecycle rules commonly abort
    # incomplete uploads after a day).
    s3_upload_expiry: float = 86400.0
    # -- S3 slow answers --
    # Seconds a CompleteMultipartUpload may work before its answer starts: past them the S3
    # API answers 200 at once and sends a space every this many seconds until the document
    # (or an Error) follows, as S3 does, so that no client or proxy read timeout (60 s for
    # boto3 and the aws CLI) fires while a large object's copies are made (--s3-keepalive).
    s3_keepalive: float = 10.0

    @property
    def listen(self) -> str:
        """The bound address (``host``; --listen)."""
        return self.host

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", check_listen(self.host))
        if self.advertise is not None:
            host, port = self.advertise
            ip = ip_of(host)
            if not 0 <= port < 65536 or (ip is not None and (ip.is_unspecified or ip.is_multicast)):
                raise UsageError(
                    f"--advertise must be a reachable HOST:PORT, not {format_address(host, port)}"
                )
        if not 0 <= self.tcp_port < 65536:
            raise UsageError(f"--tcp-port must be 0-65535, not {self.tcp_port}")
        check_zone(self.zone)
        if self.http is not None:
            if not 0 <= self.http[1] < 65536:
                raise UsageError(f"--http port must be 0-65535, not {self.http[1]}")
            object.__setattr__(self, "http", (check_listen(self.http[0]), self.http[1]))
        if not self.s3_upload_expiry > 0:
            raise UsageError(f"--s3-upload-expiry must be positive, not {self.s3_upload_expiry}")
        if not self.s3_keepalive > 0:
            raise UsageError(f"--s3-keepalive must be positive, not {self.s3_keepalive}")
        if self.s3 is not None:
            if not 0 <= self.s3[1] < 65536:
                raise UsageError(f"--s3 port must be 0-65535, not {self.s3[1]}")
            object.__setattr__(self, "s3", (check_listen(self.s3[0]), self.s3[1]))
        if not 0 <= self.port < 65536:
            raise UsageError(f"--port must be 0-65535, not {self.port}")
        if self.capacity < 0:
            raise UsageError("--capacity must not be negative")
        if self.max_connections < 1 or self.max_connections_per_address < 1:
            raise UsageError("max_connections and max_connections_per_address must be >= 1")
        if self.idle_timeout <= 0:
            raise UsageError("idle_timeout must be positive")
        if self.upload_budget < 16 * 1024 * 1024 + 64:
            raise UsageError("upload_budget must hold at least one maximal segment frame")
        if self.upload_window <= 0 or self.upload_window > self.upload_budget:
            raise UsageError("upload_window must be positive and at most upload_budget")
