"""How many call setups the PBX has not vouched for may reserve money: pure policy,
time passed in.

Anyone who may connect to the call-setup port (by default every local user) can send
a made-up AGI environment or channel data, for any account and any channel id. A
setup for a channel the PBX's event link has already reported is a call; any other is
a suspect (supervision.py) until the PBX reports it, and a ghost if its channel list
still lacks it at the check. Suspects are rationed: from one peer, `rate` a second
(burst `burst`), and each account holds at most `per_account` at once. A suspect over
either limit is not refused at once: it waits a moment for its channel's first event
(on FreeSWITCH CHANNEL_CREATE comes after the socket connects), so calls the PBX
reports still go through while made-up ones are denied.
"""

from __future__ import annotations

import ipaddress


def peer_key(host: str) -> str:
    """What one peer is for the rate: any loopback address is the same one (a local user
    can bind every address of 127.0.0.0/8)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return "loopback" if address.is_loopback else str(address)


class PeerBuckets:
    """A token bucket per peer: `rate` setups a second, `burst` at once. At most
    `max_peers` are remembered (the allow-list admits few), the oldest forgotten first."""

    def __init__(self, rate: float, burst: int, max_peers: int = 4096):
        self.rate, self.burst, self.max_peers = rate, burst, max_peers
        self._buckets: dict[str, list[float]] = {}  # peer -> [tokens, when counted]

    def take(self, peer: str, now: float) -> bool:
        """One token for `peer` at `now` (seconds), if it has one left."""
        bucket = self._buckets.get(peer)
        if bucket is None:
            if len(self._buckets) >= self.max_peers:
                del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[peer] = [float(self.burst), now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1
        return True
