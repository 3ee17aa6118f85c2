"""DNS in the engine: fake-IP answers, remembered answers, the name book.

- ``book``: which name an address stands for (fake pools with LRU reuse,
  remembered real answers within their TTL); the dial paths read it as
  ``engine.names``.
- ``cachefile``: the fake mappings across restarts (atomic, bounded).
- ``settings``: --dns / --dns-upstream and the profile's ``dns`` object.
- ``message``: reading and writing DNS messages (dnspython, imported only
  when DNS handling is on).
- ``forward``: real queries to the upstream (dokodemo or SOCKS5 UDP).
- ``server``: one query in, its answer out (``build`` makes it from settings).

Only ``book``, ``cachefile`` and ``settings`` load without dnspython.
"""
