"""Zero-configuration discovery: who is on the LAN, as verified sightings and events.

Three backends with one interface (:class:`Discovery`): :class:`MdnsDiscovery`
(real mDNS, python-zeroconf bridged into trio), :class:`BootstrapDiscovery`
(known peers dialed directly, beyond one LAN) and :class:`MemoryDiscovery`
(an in-memory hub for the simulator and tests).  Both judge announcements
with :func:`fedup.protocol.announce.verify_announcement`.  What they report
is a hint: the membership layer admits a peer only after a handshake.
"""

from fedup.net.discovery.base import (
    Counters,
    Discovery,
    DiscoveryCore,
    DiscoveryError,
    DiscoveryEvent,
    EventKind,
    LostCause,
    Sighting,
)
from fedup.net.discovery.bootstrap import (
    BootstrapDiscovery,
    answer_peer_list,
    request_peer_list,
)
from fedup.net.discovery.mdns import MdnsDiscovery, choose_interfaces, lan_interfaces
from fedup.net.discovery.memory import MemoryDiscovery, MemoryDiscoveryHub
from fedup.protocol.announce import SERVICE_TYPE, NetworkScope, RejectReason

__all__ = [
    "SERVICE_TYPE",
    "BootstrapDiscovery",
    "Counters",
    "Discovery",
    "DiscoveryCore",
    "DiscoveryError",
    "DiscoveryEvent",
    "EventKind",
    "LostCause",
    "MdnsDiscovery",
    "MemoryDiscovery",
    "MemoryDiscoveryHub",
    "NetworkScope",
    "RejectReason",
    "Sighting",
    "answer_peer_list",
    "choose_interfaces",
    "lan_interfaces",
    "request_peer_list",
]
