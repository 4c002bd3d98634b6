"""The key layout of the per-node zones: the one place that spells ``results/<id>/``.

Every node owns three zones with no grant needed (``Fleet.node_zones``):

| zone | holds | written by |
| --- | --- | --- |
| ``fleet/<id>/`` | what the fleet should see of the node: its running model (``model``), inference mode (``inference/mode``), demo status (``status``) | mesh model view, ladder, applications |
| ``results/<id>/`` | inference results, ``results/<id>/<model>/<key>`` | the inference engine |
| ``telemetry/<id>/`` | bounded, low-priority data: sampled inputs, ``telemetry/<id>/samples/<model>/<slot>`` | the inference engine |

Inference, the mesh's model view, the demo and the simulator build keys only
through these functions, so a change of layout is a change here.
"""

from __future__ import annotations

__all__ = [
    "FLEET_TEMPLATE",
    "NODE_TEMPLATES",
    "RESULTS_TEMPLATE",
    "TELEMETRY_TEMPLATE",
    "fleet_key",
    "fleet_prefix",
    "mode_key",
    "model_key",
    "node_of_fleet_key",
    "result_key",
    "results_prefix",
    "sample_key",
    "status_key",
    "telemetry_prefix",
]

FLEET_TEMPLATE = "fleet/{node}/"
RESULTS_TEMPLATE = "results/{node}/"
TELEMETRY_TEMPLATE = "telemetry/{node}/"
NODE_TEMPLATES = (FLEET_TEMPLATE, RESULTS_TEMPLATE, TELEMETRY_TEMPLATE)
"""The default ``Fleet.node_zones``."""

_MODEL = "model"
_MODE = "inference/mode"
_STATUS = "status"


def fleet_prefix(node_id: str) -> str:
    """The node's own fleet-visible zone, ``fleet/<id>/``."""
    return FLEET_TEMPLATE.format(node=node_id)


def results_prefix(node_id: str) -> str:
    """The node's own results zone, ``results/<id>/``."""
    return RESULTS_TEMPLATE.format(node=node_id)


def telemetry_prefix(node_id: str) -> str:
    """The node's own (bounded, lower priority) telemetry zone, ``telemetry/<id>/``."""
    return TELEMETRY_TEMPLATE.format(node=node_id)


def fleet_key(node_id: str, name: str) -> str:
    """``fleet/<id>/<name>``."""
    return fleet_prefix(node_id) + name


def model_key(node_id: str) -> str:
    """Where a node reports the model it runs."""
    return fleet_key(node_id, _MODEL)


def mode_key(node_id: str) -> str:
    """Where a node's degradation ladder writes its transitions."""
    return fleet_key(node_id, _MODE)


def status_key(node_id: str) -> str:
    """Where an application (the demo) reports a node's phase."""
    return fleet_key(node_id, _STATUS)


def result_key(node_id: str, model: str, key: str) -> str:
    """One inference result: ``results/<id>/<model>/<key>``."""
    return f"{results_prefix(node_id)}{model}/{key}"


def sample_key(node_id: str, model: str, slot: int) -> str:
    """One slot of the sampled-input ring: ``telemetry/<id>/samples/<model>/<slot>``."""
    return f"{telemetry_prefix(node_id)}samples/{model}/{slot:05d}"


def node_of_fleet_key(key: str, name: str) -> str | None:
    """The node id of a ``fleet/<id>/<name>`` key, or None if ``key`` is not one."""
    head, tail = FLEET_TEMPLATE.split("{node}")
    suffix = tail + name
    if not (key.startswith(head) and key.endswith(suffix)):
        return None
    node = key[len(head) : len(key) - len(suffix)]
    return node if node and "/" not in node else None
