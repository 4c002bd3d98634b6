"""The public testing kit: what applications and syncfw's own tests build on.

Owns the in-memory :class:`~syncfw.log.Replica` (``memory``), op chain
builders (``ops``) and the deterministic simulator (``sim``): seeded scheduler,
virtual time, partitions, drops/duplicates/reordering, crashes, clock drift and
a convergence checker. May import every pure layer (log, codec, sync) and the
in-memory side of transport; never grpc directly.
"""
