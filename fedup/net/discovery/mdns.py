"""Zero-configuration discovery over mDNS / DNS-SD (python-zeroconf, bridged into trio).

Each peer registers one service of type ``_fedup._tcp.local.`` under a random
instance name (``fedup-<12 hex>``, new every run, never the peer ID), with
the SRV port and A/AAAA addresses of its listen addresses and its signed peer
record in the TXT record (:mod:`fedup.protocol.announce`).  It browses the
same type and judges every service it resolves with the shared
:class:`~fedup.net.discovery.base.DiscoveryCore`.

**The bridge.**  python-zeroconf runs its own asyncio loop in a thread (no
asyncio loop runs under trio).  Blocking calls (creating the instance,
registering, which probes for about 1.7 s, updating, resolving, closing) run in
``trio.to_thread.run_sync``, abandoned on cancellation and bounded by
deadlines.  Browser callbacks run in zeroconf's browser thread and only hand
the name to trio with ``TrioToken.run_sync_soon``; a bounded channel takes it,
and when it is full the notice is dropped and counted (``drops["notices"]``):
the periodic cache scan below finds the service anyway.

**Multicast questions.**  Our browser and resolver ask QM questions (answers
multicast), not zeroconf's default QU first question (answer unicast to port
5353): several zeroconf instances on one host share port 5353, and the kernel
hands a unicast answer to just one of them, so with QU a peer on the same host
(the loopback mode) often only learns of the others from the second query, a
second later.  On a LAN the cost is one multicast answer per new browser.

**Expiry.**  zeroconf's browser reports a service as removed on a goodbye, or
when its PTR record expires; but it raises every PTR TTL it receives to at
least 1125 s, so a peer that vanishes without a goodbye (a crash, a cut
cable) would linger for about 19 minutes.  We therefore do for the SRV record
what RFC 6762 section 5.2 asks of queriers and zeroconf does only for PTRs:
announce SRV and A/AAAA records with ``record_ttl`` (120 s by default, the
RFC's TTL for host records), re-query each service we track at 75-85 % of its
SRV TTL, and declare the peer lost (``cause=expired``) when the SRV record
has expired from the cache.  A peer is noticed lost at most about
``record_ttl`` after it went silent.

**Interfaces.**  By default the IPv4 addresses of the interfaces a LAN peer
should use: up, multicast-capable, not loopback, not link-local, and not
named like a container or VM bridge or a VPN (docker0, br-*, veth*, virbr*,
...), because "all interfaces" on a host with many bridges floods them all
(see :func:`choose_interfaces`).  zeroconf's ``InterfaceChoice.Default``
(0.0.0.0) would instead rely on the default route, which a lab LAN may not
have.  ``interfaces=[...]`` picks by address or interface name;
``loopback=True`` uses 127.0.0.1 only, for several peers on one host.  IPv6
(and ``::1``, which python-zeroconf cannot listen on) is refused for now.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import random
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager

import ifaddr
import trio
import zeroconf

# DNSOutgoing, DNSPointer, DNSQuestion and DNSService are importable from
# zeroconf's package but missing from its __all__.
from zeroconf import (  # type: ignore[attr-defined]
    DNSOutgoing,
    DNSPointer,
    DNSQuestion,
    DNSQuestionType,
    DNSService,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
    current_time_millis,
)

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import ConfigError, LocalProtocolError
from fedup.net.discovery.base import (
    Discovery,
    DiscoveryCore,
    DiscoveryError,
    LostCause,
)
from fedup.net.groups import collapse_single_exception
from fedup.protocol.announce import SERVICE_TYPE, NetworkScope, encode_txt
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import Address, PeerRecordBook, SignedPeerRecord

log = logging.getLogger("fedup.discovery.mdns")

ADDRESS_SETTLE = 1.2
"""Seconds to wait before re-checking an address mismatch: a cache keeps a replaced
A record for 1 s after its successor arrives (RFC 6762 section 10.2)."""
MAX_CONCURRENT_RESOLVES = 8
"""Worker threads resolving at once; bounds the cost of an announcement flood."""
MAX_PROBE_BACKOFF = 60.0
"""Seconds: the slowest we re-query a service that stopped answering."""

# DNS numbers (RFC 1035, 2782, 3596); fixed forever.
_TYPE_A, _TYPE_PTR, _TYPE_TXT, _TYPE_AAAA, _TYPE_SRV = 1, 12, 16, 28, 33
_CLASS_IN = 1
_FLAGS_QR_QUERY = 0x0000

_IFF_UP, _IFF_LOOPBACK, _IFF_MULTICAST = 0x1, 0x8, 0x1000
_NOT_LAN = (
    "docker", "br-", "veth", "virbr", "vmnet", "vboxnet", "lxc", "lxd", "cni", "flannel",
    "cali", "weave", "podman", "kube", "tailscale", "zt", "wg", "tun", "tap", "utun",
)  # fmt: skip


# --- interfaces ---------------------------------------------------------------------


def _flags(name: str) -> int | None:
    """The interface's flags on Linux (``/sys/class/net/NAME/flags``), else None."""
    try:
        with open(os.path.join("/sys/class/net", name, "flags")) as f:
            return int(f.read().strip(), 16)
    except (OSError, ValueError):
        return None


def _ipv4_of(adapter: ifaddr.Adapter) -> Iterator[tuple[str, int]]:
    for ip in adapter.ips:
        if ip.is_IPv4 and isinstance(ip.ip, str):
            yield ip.ip, ip.network_prefix


def lan_interfaces() -> list[tuple[str, str]]:
    """``(interface name, IPv4 address)`` of the interfaces a LAN peer should use."""
    out = []
    for adapter in ifaddr.get_adapters():
        name = str(adapter.name)
        flags = _flags(name)
        if flags is not None and (
            not flags & _IFF_UP or not flags & _IFF_MULTICAST or flags & _IFF_LOOPBACK
        ):
            continue
        if name.startswith(_NOT_LAN):
            continue
        for ip, prefix in _ipv4_of(adapter):
            addr = ipaddress.IPv4Address(ip)
            if addr.is_loopback or addr.is_link_local or prefix == 32:
                continue
            out.append((name, ip))
    return out


def choose_interfaces(
    interfaces: Sequence[str] | None = None, *, loopback: bool = False
) -> list[str]:
    """The IPv4 addresses mDNS should use; see the module docstring.

    ``interfaces`` names interfaces (``eth0``) or their IPv4 addresses;
    ``loopback`` means 127.0.0.1 only.  Raises
    :class:`~fedup.errors.ConfigError` naming the problem: an unknown name or
    address, an IPv6 address, both options at once, or no LAN interface.
    """
    if loopback:
        if interfaces:
            raise ConfigError("choose either loopback or interfaces, not both")
        return ["127.0.0.1"]
    if not interfaces:
        chosen = [ip for _, ip in lan_interfaces()]
        if not chosen:
            raise ConfigError(
                "no LAN interface with an IPv4 address is up; name one with --interface, "
                "or use --loopback for peers on this host"
            )
        return list(dict.fromkeys(chosen))
    adapters = {str(a.name): a for a in ifaddr.get_adapters()}
    local = {ip for a in adapters.values() for ip, _ in _ipv4_of(a)}
    out: list[str] = []
    for item in interfaces:
        try:
            ip = ipaddress.ip_address(item)
        except ValueError:
            adapter = adapters.get(item)
            if adapter is None:
                raise ConfigError(
                    f"no interface named {item!r} (have: {', '.join(sorted(adapters))})"
                ) from None
            ips = [ip for ip, _ in _ipv4_of(adapter)]
            if not ips:
                raise ConfigError(f"interface {item!r} has no IPv4 address") from None
            out.extend(ips)
            continue
        if ip.version == 6:
            if ip.is_loopback:
                raise ConfigError(
                    "mDNS cannot listen on ::1 (python-zeroconf); use 127.0.0.1 (--loopback)"
                )
            raise ConfigError(
                f"{item}: IPv6 interfaces are not supported yet; give an IPv4 address"
            )
        if str(ip) not in local:
            raise ConfigError(f"{item} is not an address of this host")
        out.append(str(ip))
    return list(dict.fromkeys(out))


def _open_zeroconf(addresses: list[str]) -> Zeroconf:
    try:
        return Zeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
    except (OSError, zeroconf.Error, RuntimeError) as exc:
        raise DiscoveryError(f"cannot open mDNS on {', '.join(addresses)}: {exc}") from exc


def _shutdown(zc: Zeroconf, browser: ServiceBrowser | None) -> None:
    """Stop browsing, send goodbyes for what we registered, close (worker thread)."""
    if browser is not None:
        browser.cancel()
    zc.close()


class _Tracked:
    """What the liveness check remembers of one service name."""

    __slots__ = ("backoff", "expired", "last_query", "refresh_at", "retry_at")

    def __init__(self, initial_backoff: float) -> None:
        self.expired = False  # its SRV record expired: the service went silent
        self.retry_at = 0.0  # ms (zeroconf's clock): next probe or re-resolve
        self.backoff = initial_backoff  # s
        self.last_query = 0.0  # ms
        self.refresh_at = random.uniform(0.75, 0.85)  # fraction of the SRV TTL


class MdnsDiscovery(Discovery):
    """Discovery on the LAN with mDNS; open with :meth:`open`."""

    def __init__(
        self,
        zc: Zeroconf,
        core: DiscoveryCore,
        *,
        interfaces: list[str],
        service_type: str,
        record_ttl: int,
        resolve_timeout: float,
        queue_size: int,
        shutdown_timeout: float,
    ) -> None:
        super().__init__(core)
        self.interfaces = interfaces
        """The IPv4 addresses mDNS runs on."""
        self.instance = f"fedup-{secrets.token_hex(6)}"
        """This run's instance name (a new random one after :meth:`withdraw`)."""
        self.registration_seconds: float | None = None
        """How long zeroconf's registration (probing and announcing) took."""
        self._zc = zc
        self._type = service_type
        self._ttl = record_ttl
        self._resolve_timeout = resolve_timeout
        self._shutdown_timeout = shutdown_timeout
        self._check_interval = min(max(record_ttl / 10, 0.25), 10.0)
        self._token = trio.lowlevel.current_trio_token()
        self._notices_send, self._notices = trio.open_memory_channel[tuple[str, bool]](queue_size)
        self._limiter = trio.CapacityLimiter(MAX_CONCURRENT_RESOLVES)
        self._tracked: dict[str, _Tracked] = {}
        self._resolving: set[str] = set()
        self._dirty: set[str] = set()
        self._registered: ServiceInfo | None = None
        self._last_seq = -1
        self._announce_lock = trio.Lock()
        self._browser: ServiceBrowser | None = None
        self._nursery: trio.Nursery | None = None

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        *,
        scope: NetworkScope,
        interfaces: Sequence[str] | None = None,
        loopback: bool = False,
        local_peer: PeerId | None = None,
        record_ttl: int | None = None,
        resolve_timeout: float | None = None,
        service_type: str = SERVICE_TYPE,
        limits: Limits = DEFAULT_LIMITS,
        book: PeerRecordBook | None = None,
        max_sources: int | None = None,
        queue_size: int | None = None,
        shutdown_timeout: float | None = None,
    ) -> AsyncIterator[MdnsDiscovery]:
        """Open mDNS on the chosen interfaces and browse until the block is left.

        Nothing is announced until :meth:`announce` is called (so a passive
        browser only sends queries).  Leaving the block sends goodbyes for
        what was announced and closes the sockets, within ``shutdown_timeout``
        even when cancelled.

        Raises :class:`~fedup.errors.ConfigError` for an unusable interface
        choice and :class:`DiscoveryError` when the sockets cannot be opened.
        """
        record_ttl = limits.discovery_record_ttl if record_ttl is None else record_ttl
        resolve_timeout = (
            limits.discovery_resolve_timeout if resolve_timeout is None else resolve_timeout
        )
        max_sources = limits.max_discovery_sources if max_sources is None else max_sources
        queue_size = limits.discovery_queue_size if queue_size is None else queue_size
        shutdown_timeout = (
            limits.discovery_shutdown_timeout if shutdown_timeout is None else shutdown_timeout
        )
        if record_ttl < 1:
            raise ConfigError("record_ttl must be at least 1 second")
        addresses = choose_interfaces(interfaces, loopback=loopback)
        zc = await trio.to_thread.run_sync(_open_zeroconf, addresses)
        core = DiscoveryCore(
            scope=scope, limits=limits, local_peer=local_peer, book=book, max_sources=max_sources
        )
        self = cls(
            zc,
            core,
            interfaces=addresses,
            service_type=service_type,
            record_ttl=record_ttl,
            resolve_timeout=resolve_timeout,
            queue_size=queue_size,
            shutdown_timeout=shutdown_timeout,
        )
        log.debug("mDNS browsing %s on %s", service_type, ", ".join(addresses))
        try:
            self._browser = ServiceBrowser(
                zc, service_type, handlers=[self._on_change], question_type=DNSQuestionType.QM
            )
            with collapse_single_exception():
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._process)
                    nursery.start_soon(self._liveness)
                    try:
                        yield self
                    finally:
                        nursery.cancel_scope.cancel()
        finally:
            self._notices_send.close()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self._shutdown_timeout) as deadline:
                    await trio.to_thread.run_sync(
                        _shutdown, zc, self._browser, abandon_on_cancel=True
                    )
                if deadline.cancelled_caught:
                    log.warning(
                        "mDNS shutdown took over %.1f s; abandoned it", self._shutdown_timeout
                    )
            self._close_subscribers()

    # --- announcing -----------------------------------------------------------------

    def _service_info(self, signed: SignedPeerRecord) -> ServiceInfo:
        addresses = signed.record.addresses
        port = addresses[0].port
        if any(a.port != port for a in addresses):
            raise LocalProtocolError(
                "mDNS advertises a single port: every address of the record must share it"
            )
        name = self._registered.name if self._registered else f"{self.instance}.{self._type}"
        return ServiceInfo(
            self._type,
            name,
            port=port,
            properties=encode_txt(signed.envelope, limits=self._core.limits),
            server=f"{self.instance}.local.",
            parsed_addresses=[a.host for a in addresses],
            host_ttl=self._ttl,
        )

    async def announce(self, signed: SignedPeerRecord) -> None:
        """Register our service, or update it with a newer record.

        Registration probes the name first (about 1.7 s).  Raises
        :class:`~fedup.errors.LocalProtocolError` for a record that is not
        newer than the last one announced or whose addresses do not share one
        port, and :class:`DiscoveryError` when zeroconf fails.
        """
        async with self._announce_lock:
            if signed.record.seq <= self._last_seq:
                raise LocalProtocolError("an announced record must be newer than the previous one")
            info = self._service_info(signed)
            self._core.local_peer = signed.peer_id
            self._core.own_sources.add(info.name)
            started = trio.current_time()
            try:
                if self._registered is None:
                    register = functools.partial(
                        self._zc.register_service, info, allow_name_change=True
                    )
                    await trio.to_thread.run_sync(register, abandon_on_cancel=True)
                    self.registration_seconds = trio.current_time() - started
                else:
                    await trio.to_thread.run_sync(
                        self._zc.update_service, info, abandon_on_cancel=True
                    )
            except zeroconf.Error as exc:
                raise DiscoveryError(f"cannot announce on mDNS: {exc!r}") from exc
            self._core.own_sources.add(info.name)
            self._registered = info
            self._local = signed
            self._last_seq = signed.record.seq
            log.info(
                "announcing %s as %s on %s", signed.peer_id, info.name, ", ".join(self.interfaces)
            )

    async def withdraw(self) -> None:
        """Unregister (goodbyes), bounded by the shutdown deadline."""
        async with self._announce_lock:
            info, self._registered, self._local = self._registered, None, None
            if info is None:
                return
            self.instance = f"fedup-{secrets.token_hex(6)}"
            with trio.move_on_after(self._shutdown_timeout):
                try:
                    await trio.to_thread.run_sync(
                        self._zc.unregister_service, info, abandon_on_cancel=True
                    )
                except zeroconf.Error as exc:
                    log.warning("mDNS goodbye failed: %r", exc)

    # --- the bridge from zeroconf's thread ----------------------------------------------

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """Browser callback, in zeroconf's thread: hand over to trio, never block."""
        removed = state_change is ServiceStateChange.Removed
        try:
            self._token.run_sync_soon(self._enqueue, name, removed)
        except trio.RunFinishedError:
            pass

    def _enqueue(self, name: str, removed: bool) -> None:
        # Runs in trio's thread as a run_sync_soon callback: must never raise.
        try:
            self._notices_send.send_nowait((name, removed))
        except trio.WouldBlock:
            self._core.drops.add("notices")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def _process(self) -> None:
        async for name, removed in self._notices:
            if name in self._core.own_sources:
                continue
            if removed:
                self._tracked.pop(name, None)
                self._publish(self._core.remove(name, cause=LostCause.GOODBYE))
            elif self._track(name):
                self._schedule_resolve(name)

    def _track(self, name: str) -> bool:
        if name in self._tracked:
            return True
        if len(self._tracked) >= self._core.max_sources:
            victim = self._core.victim(self._tracked)
            if victim is None:
                self._core.drops.add("too-many-sources")
                return False
            del self._tracked[victim]  # unresolved, refused, or never proven: it may come back
            self._core.drops.add("evicted")
            self._publish(self._core.remove(victim, cause=LostCause.EXPIRED))
        self._tracked[name] = _Tracked(self._check_interval)
        return True

    # --- resolution -------------------------------------------------------------------

    def _schedule_resolve(self, name: str) -> None:
        if name in self._resolving:
            self._dirty.add(name)  # resolve again when the current attempt ends
            return
        assert self._nursery is not None
        self._resolving.add(name)
        self._nursery.start_soon(self._resolve_loop, name)

    async def _resolve_loop(self, name: str) -> None:
        try:
            while True:
                self._dirty.discard(name)
                await self._resolve(name)
                if name not in self._dirty or name not in self._tracked:
                    return
        finally:
            self._resolving.discard(name)
            self._dirty.discard(name)

    async def _resolve(self, name: str) -> None:
        provisional = True
        while True:
            async with self._limiter:
                found = await trio.to_thread.run_sync(self._request, name, abandon_on_cancel=True)
            tracked = self._tracked.get(name)
            if tracked is None:
                return  # removed meanwhile
            if found is None:
                log.debug("could not resolve %r within %.1f s", name, self._resolve_timeout)
                self._back_off(tracked)
                return
            txt, advertised = found
            observation = self._core.observe(
                name, txt, advertised, now=trio.current_time(), provisional=provisional
            )
            if not observation.retry:
                self._publish(observation.events)
                return
            provisional = False
            await trio.sleep(ADDRESS_SETTLE)

    def _request(self, name: str) -> tuple[bytes, tuple[Address, ...]] | None:
        """Resolve ``name`` (worker thread): TXT RDATA and advertised addresses, or None."""
        try:
            info = ServiceInfo(self._type, name)
            timeout_ms = int(self._resolve_timeout * 1000)
            if not info.request(self._zc, timeout_ms, question_type=DNSQuestionType.QM):
                return None
        except zeroconf.Error:
            return None
        port = info.port
        advertised = []
        for ip in info.parsed_addresses():
            try:
                advertised.append(Address.checked(ip.partition("%")[0], port or 0))
            except ValueError:
                continue
        return bytes(info.text or b""), tuple(advertised)

    # --- liveness ---------------------------------------------------------------------

    def _back_off(self, tracked: _Tracked) -> None:
        tracked.retry_at = current_time_millis() + tracked.backoff * 1000
        tracked.backoff = min(tracked.backoff * 2, MAX_PROBE_BACKOFF)

    async def _liveness(self) -> None:
        while True:
            await trio.sleep(self._check_interval)
            self._check()

    def _check(self) -> None:
        """Refresh, expire and re-find services from zeroconf's cache (no blocking)."""
        now = current_time_millis()
        cache = self._zc.cache
        for ptr in cache.get_all_by_details(self._type, _TYPE_PTR, _CLASS_IN):
            if not isinstance(ptr, DNSPointer):
                continue
            name = ptr.alias
            if name in self._tracked or name in self._core.own_sources or ptr.is_expired(now):
                continue
            if self._track(name):  # a notice was dropped, or the name came back
                self._schedule_resolve(name)
        for name, tracked in list(self._tracked.items()):
            srv = cache.get_by_details(name, _TYPE_SRV, _CLASS_IN)
            if not isinstance(srv, DNSService) or srv.is_expired(now):
                if self._core.sighting(name) is not None:
                    self._publish(self._core.remove(name, cause=LostCause.EXPIRED))
                if not tracked.expired:
                    tracked.expired = True
                    tracked.backoff = self._check_interval
                    tracked.retry_at = 0.0
                if now >= tracked.retry_at:  # is it back? (an answer refreshes the cache)
                    self._query(name, None)
                    self._back_off(tracked)
                continue
            if tracked.expired:  # it answered again
                tracked.expired = False
                tracked.backoff = self._check_interval
                tracked.retry_at = 0.0
            sighting = self._core.sighting(name)
            if sighting is None:
                # back after expiring, or never resolved: resolve (with back-off)
                if name not in self._resolving and now >= tracked.retry_at:
                    self._back_off(tracked)
                    self._schedule_resolve(name)
                continue
            if not sighting.verified:
                continue  # no refreshing for refused services: let them expire
            tracked.backoff = self._check_interval
            ttl = float(srv.ttl)
            remaining = float(srv.get_remaining_ttl(now))
            if remaining > ttl * (1 - tracked.refresh_at):
                continue
            if now - tracked.last_query >= max(ttl * 50.0, 250.0):  # 5 % of the TTL, in ms
                self._query(name, srv.server)
                tracked.last_query = now
                tracked.refresh_at = random.uniform(0.75, 0.85)

    def _query(self, name: str, server: str | None) -> None:
        """Multicast a query for a service's SRV, TXT and address records (no known answers)."""
        out = DNSOutgoing(_FLAGS_QR_QUERY)
        out.add_question(DNSQuestion(name, _TYPE_SRV, _CLASS_IN))
        out.add_question(DNSQuestion(name, _TYPE_TXT, _CLASS_IN))
        if server:
            out.add_question(DNSQuestion(server, _TYPE_A, _CLASS_IN))
            out.add_question(DNSQuestion(server, _TYPE_AAAA, _CLASS_IN))
        try:
            self._zc.send(out)
        except RuntimeError:  # zeroconf's loop already closed (shutting down)
            pass
