"""Rebuild a fleet's state from the JetStream stream an aggregator exports to.

    python examples/jetstream_consumer.py --nats nats://127.0.0.1:4222 \\
        --db replica.db --fleet mine-7 [--authority cloud] [--shared site/] \\
        [--stream SYNCFW] [--durable syncfw-rebuild]

A durable JetStream pull consumer reads every op message in stream order,
turns each back into the op it carries
(``syncfw.cloud.export_subjects.op_from_message``: subject by zone, headers
with origin, seq, HLC, kind, key, zone, epoch, chain hash and signature; the
body is the op's payload) and applies the ops to a local syncfw replica with
``node.apply_remote``, the same call the sync protocol uses. A batch is
acknowledged only once it is applied, so stopping and running it again
resumes where the durable consumer stopped (a batch applied but not yet
acknowledged comes again and is a no-op). When the stream is drained it
prints the replica's state digest, which equals the aggregator's
(``await aggregator.node.state_digest()``): the same ops, the same state.

The replica needs the fleet's bootstrap (fleet id, authority, grants) that
the aggregator was started with, as every node of the fleet does.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
from nats.js import api

from syncfw import Fleet, Grant, Node
from syncfw.cloud.export_subjects import op_from_message


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """What :func:`rebuild` did."""

    digest: str
    messages: int
    applied: int
    version_vector: dict[str, int]


async def rebuild(
    servers: Sequence[str],
    db: str | Path,
    fleet: Fleet,
    *,
    stream: str = "SYNCFW",
    durable: str = "syncfw-rebuild",
    node_id: str = "jetstream-replica",
    batch: int = 500,
    limit: int | None = None,
    idle_s: float = 1.0,
) -> Rebuilt:
    """Drain ``stream`` into the replica at ``db`` through durable consumer ``durable``.

    Args:
        servers: NATS URLs.
        db: the replica's SQLite file (created if absent; reused to resume).
        fleet: the fleet's bootstrap, as the aggregator has it.
        stream: the exported stream.
        durable: the durable consumer's name (its position is kept by JetStream).
        node_id: the replica's own node id (it writes nothing).
        batch: messages fetched at once.
        limit: stop after about this many messages (None: until drained).
        idle_s: the stream counts as drained after a fetch this long finds nothing.
    """
    nc = await nats.connect(servers=list(servers), connect_timeout=2)
    node = await Node.open(db, node_id=node_id, fleet=fleet)
    messages = applied = 0
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            "",
            durable=durable,
            stream=stream,
            config=api.ConsumerConfig(
                ack_policy=api.AckPolicy.ALL,
                deliver_policy=api.DeliverPolicy.ALL,
                max_ack_pending=batch * 4,
            ),
        )
        while limit is None or messages < limit:
            try:
                msgs = await sub.fetch(batch, timeout=idle_s)
            except nats.errors.TimeoutError:
                break  # drained
            ops = [op_from_message(dict(m.headers or {}), m.data).op for m in msgs]
            result = await node.apply_remote(ops)
            applied += result.applied + result.rejected
            # AckPolicy.ALL: acking the last acknowledges the whole batch, once applied.
            await msgs[-1].ack_sync()
            messages += len(msgs)
        return Rebuilt(
            digest=await node.state_digest(),
            messages=messages,
            applied=applied,
            version_vector=dict(await node.version_vector()),
        )
    finally:
        await node.close()
        await nc.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nats", required=True, help="NATS URL(s), comma-separated")
    p.add_argument("--db", required=True, help="the replica's SQLite file")
    p.add_argument("--fleet", default="default", help="the fleet id")
    p.add_argument("--authority", default="cloud", help="the fleet authority's node id")
    p.add_argument("--shared", action="append", default=[], metavar="PREFIX",
                   help="a prefix every node may write (as the aggregator was given)")
    p.add_argument("--stream", default="SYNCFW")
    p.add_argument("--durable", default="syncfw-rebuild")
    args = p.parse_args(argv)
    fleet = Fleet(fleet_id=args.fleet, authority=args.authority,
                  grants=tuple(Grant.of(s, "*") for s in args.shared))
    out = asyncio.run(
        rebuild(args.nats.split(","), args.db, fleet, stream=args.stream, durable=args.durable)
    )
    print(f"{out.messages} messages read, {out.applied} ops applied")
    print(f"state digest {out.digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
