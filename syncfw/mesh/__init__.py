"""The fleet mesh: who the peers are, when to sync with whom, and how much.

Owns membership from seeds and gossiped peer lists with alive/suspect/dead
failure handling, bounded (``membership``), what a gossiped member may look
like (``addresses``), the new-dial rate and the reports of what gossip refused
(``guard``, with rate-limited warnings from ``notices``), per-peer bandwidth
budgets (``budget``), configuration presets (``config``), the gossip scheduler
with jitter, fanout, eager push and SWIM probes (``mesh``), the member table
kept across restarts in the node's file (``persist``), and the fleet-wide
model-version view (``models``).

Works on a :class:`~syncfw.log.Replica` only, and records its figures in the
node's :class:`~syncfw.metrics.NodeMetrics`. May import: errors, metrics, log,
keys, zones, sync, transport, exchange. Must not import: store, node.
"""

from syncfw.mesh.addresses import check_address, check_node_id
from syncfw.mesh.budget import TokenBucket
from syncfw.mesh.config import GossipBounds, MeshConfig
from syncfw.mesh.guard import GossipGuard
from syncfw.mesh.membership import (
    Choice,
    Learned,
    Member,
    Membership,
    MemberState,
    Saved,
    Transition,
)
from syncfw.mesh.mesh import Mesh
from syncfw.mesh.models import (
    FleetModelView,
    ModelStatus,
    fleet_model_view,
    model_key,
    model_value,
    publish_model,
    read_fleet_models,
)
from syncfw.mesh.persist import MemberFile

__all__ = [
    "Choice",
    "FleetModelView",
    "GossipBounds",
    "GossipGuard",
    "Learned",
    "Member",
    "MemberFile",
    "MemberState",
    "Membership",
    "Mesh",
    "MeshConfig",
    "ModelStatus",
    "Saved",
    "TokenBucket",
    "Transition",
    "check_address",
    "check_node_id",
    "fleet_model_view",
    "model_key",
    "model_value",
    "publish_model",
    "read_fleet_models",
]
