"""The name book: which name an address stands for.

Two kinds of entries, both keyed by the packed address the engine sees as a
flow's destination (4 or 16 bytes):

- fake addresses, handed out from the fake pools (one per name and family),
  kept in least-recently-used order: when a pool is full the address used
  longest ago goes to the new name. They do not expire; they persist across
  restarts through the cache file (tun2xray.dns.cachefile).
- remembered addresses, from real answers (``remember`` mode): address ->
  name until the answer's TTL runs out, bounded, oldest dropped first.

No I/O, no clock of its own: ``clock`` is passed in (a test's virtual clock).
"""

from __future__ import annotations

import collections
import ipaddress
import time

DEFAULT_CAPACITY = 65536        # fake mappings per family
REMEMBER_CAPACITY = 65536       # remembered addresses
REMEMBER_MIN_TTL = 60           # seconds an answer is remembered at least (apps keep answers longer than a
                                # TTL of 0 or 1 says, and connect after the answer arrives)
NAME_MAX = 253


class FakePool:
    """One family's fake addresses: a prefix, the addresses it must never
    hand out (the TUN's own, the DNS server's), and the LRU map."""

    __slots__ = ("net", "alen", "base", "mask", "hosts", "capacity", "next", "avoid", "by_addr", "by_name")

    def __init__(self, net, avoid=(), capacity: int = DEFAULT_CAPACITY):
        self.net = net
        self.alen = 4 if net.version == 4 else 16
        self.base = int(net.network_address)
        self.mask = int(net.netmask)
        # never offset 0 (IPv4's network address, IPv6's subnet-router anycast), nor IPv4's broadcast
        self.hosts = net.num_addresses - (2 if net.version == 4 else 1)
        self.avoid = {int(a) - self.base for a in avoid if a.version == net.version and a in net}
        self.capacity = max(0, min(capacity, self.hosts - len(self.avoid)))
        self.next = 0                    # offsets below this were handed out once
        self.by_addr = collections.OrderedDict()   # packed address -> name, oldest first
        self.by_name = {}                # name -> packed address

    def contains(self, addr: bytes) -> bool:
        return len(addr) == self.alen and (int.from_bytes(addr, "big") & self.mask) == self.base

    def _offset_ok(self, off: int) -> bool:
        return off not in self.avoid and (self.alen == 16 or off < self.net.num_addresses - 1) and off > 0

    def _fresh(self) -> bytes | None:
        """An address never handed out, or None when the pool is used up."""
        while len(self.by_addr) < self.capacity:
            self.next += 1
            off = self.next
            if off >= self.net.num_addresses:
                return None
            if self._offset_ok(off):
                addr = (self.base + off).to_bytes(self.alen, "big")
                if addr not in self.by_addr:
                    return addr
        return None

    def address_for(self, name: str) -> tuple[bytes, bool]:
        """(address, evicted another name?) for *name*, refreshing its LRU place."""
        addr = self.by_name.get(name)
        if addr is not None:
            self.by_addr.move_to_end(addr)
            return addr, False
        evicted = False
        addr = self._fresh()
        if addr is None:
            if not self.by_addr:
                raise ValueError(f"fake pool {self.net} has no usable address")
            addr, old = self.by_addr.popitem(last=False)
            del self.by_name[old]
            evicted = True
        self.by_addr[addr] = name
        self.by_name[name] = addr
        return addr, evicted

    def put(self, addr: bytes, name: str) -> bool:
        """Restore a saved mapping (newest last); False when it cannot be used."""
        if not self.contains(addr) or name in self.by_name or addr in self.by_addr:
            return False
        off = int.from_bytes(addr, "big") - self.base
        if not self._offset_ok(off) or len(self.by_addr) >= self.capacity:
            return False
        self.by_addr[addr] = name
        self.by_name[name] = addr
        if off > self.next:
            self.next = off
        return True


def name_ok(name) -> bool:
    """A name we hand out or restore: DNS letters, digits, '-', '_', dots."""
    if not isinstance(name, str) or not 0 < len(name) <= NAME_MAX or not name.isascii():
        return False
    for label in name.split("."):
        if not label or len(label) > 63 or not all(c.isalnum() or c in "-_" for c in label):
            return False
    return True


class NameBook:
    """Fake pools plus remembered answers. ``lookup`` is what the dial paths
    ask; ``fake_address`` what the DNS server asks."""

    def __init__(self, fake4=None, fake6=None, *, avoid=(), capacity: int = DEFAULT_CAPACITY,
                 remember_capacity: int = REMEMBER_CAPACITY, remember_min_ttl: float = REMEMBER_MIN_TTL,
                 clock=time.monotonic):
        avoid = [ipaddress.ip_address(a) for a in avoid]
        self.pools = {}
        if fake4 is not None:
            self.pools[4] = FakePool(ipaddress.ip_network(fake4), avoid, capacity)
        if fake6 is not None:
            self.pools[6] = FakePool(ipaddress.ip_network(fake6), avoid, capacity)
        self.clock = clock
        self.remembered = collections.OrderedDict()    # packed address -> (name, expires)
        self.remember_capacity = remember_capacity
        self.remember_min_ttl = remember_min_ttl
        self.changed = 0             # fake mappings made (or given to another name) since the last save
        self.touched = 0             # fake mappings only moved in the LRU order since the last save
        self.counters = {"evicted": 0, "unmapped_fake_hits": 0, "remembered": 0, "remember_expired": 0}

    # -- the dial paths' side (the fixed interface)

    def lookup(self, addr: bytes) -> str | None:
        """The name for a fake or remembered address; refreshes its LRU place."""
        for pool in self.pools.values():
            if pool.contains(addr):
                name = pool.by_addr.get(addr)
                if name is not None:
                    pool.by_addr.move_to_end(addr)
                    self.touched += 1
                return name
        hit = self.remembered.get(addr)
        if hit is None:
            return None
        name, expires = hit
        if expires <= self.clock():
            del self.remembered[addr]
            self.counters["remember_expired"] += 1
            return None
        self.remembered.move_to_end(addr)
        return name

    def is_fake(self, addr: bytes) -> bool:
        """Inside a configured fake pool (mapped or not)."""
        for pool in self.pools.values():
            if pool.contains(addr):
                return True
        return False

    def unmapped_hit(self) -> None:
        """A flow went to a fake address with no name (the dial path refused it)."""
        self.counters["unmapped_fake_hits"] += 1

    # -- the DNS server's side

    def fake_address(self, name: str, family: int) -> bytes | None:
        """The fake address of *name* (lower case, no final dot) in that
        family's pool; None when there is no pool for it."""
        pool = self.pools.get(family)
        if pool is None:
            return None
        known = name in pool.by_name
        addr, evicted = pool.address_for(name)
        if evicted:
            self.counters["evicted"] += 1
        if known:
            self.touched += 1
        else:
            self.changed += 1
        return addr

    def remember(self, addr: bytes, name: str, ttl: float) -> None:
        """A real answer said *addr* is *name* for *ttl* seconds (kept at
        least remember_min_ttl)."""
        if self.is_fake(addr):
            return
        r = self.remembered
        r[addr] = (name, self.clock() + max(ttl, self.remember_min_ttl))
        r.move_to_end(addr)
        self.counters["remembered"] += 1
        while len(r) > self.remember_capacity:
            r.popitem(last=False)

    # -- the cache file's side

    def snapshot(self) -> dict:
        """{"ipv4": [[address, name], ...] oldest first, "ipv6": [...]}."""
        out = {}
        for fam, pool in self.pools.items():
            out[f"ipv{fam}"] = [[str(ipaddress.ip_address(a)), n] for a, n in pool.by_addr.items()]
        return out

    def restore(self, data: dict) -> int:
        """Put saved mappings back (what snapshot() gave); entries that do
        not fit the pools as configured now are skipped. Returns how many."""
        n = 0
        for fam, pool in self.pools.items():
            entries = data.get(f"ipv{fam}")
            if not isinstance(entries, list):
                continue
            for e in entries[-pool.capacity:] if pool.capacity else ():
                if not (isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and name_ok(e[1])):
                    continue
                try:
                    addr = ipaddress.ip_address(e[0]).packed
                except ValueError:
                    continue
                if pool.put(addr, e[1]):
                    n += 1
        return n

    def size(self) -> int:
        return sum(len(p.by_addr) for p in self.pools.values())

    def status(self) -> dict:
        return {"fake_mappings": self.size(), "remembered_addresses": len(self.remembered),
                "pools": {f"ipv{f}": {"prefix": str(p.net), "capacity": p.capacity, "used": len(p.by_addr)}
                          for f, p in self.pools.items()},
                **self.counters}
