"""The asyncio driver. One ``ClientConnection`` protocol object per client connection
(``session``) drives the sans-IO layers; a CONNECT becomes a ``Tunnel`` (``tunnel``), an
absolute-URI request an ``Exchange`` (``forward``) over an ``Upstream`` connection that may be
reused (``upstream``). ``server`` owns listeners, the sweeper (timeouts), reload and drain.

No task lives for the life of a tunnel or a keep-alive connection: data moves in protocol
callbacks (``data_received`` -> ``transport.write``) with pause/resume back-pressure, and a
task exists only while a request is being decided and dialed.
"""
