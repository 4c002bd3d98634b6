"""Model artifacts: signed release manifests, content-addressed chunks, peer-to-peer transfer.

Owns the release manifest and its verification against the fleet authority's
key (``manifest``), the chunk store beside the node's database (``chunks``),
what nodes advertise they hold (``adverts``), fetching missing chunks from any
peer that advertises them (``fetch``), the artifact figures (``figures``) and
the node-side join of them all (``artifacts``: :class:`Artifacts`). The
transfer itself rides the transport's second stream kind
(:mod:`syncfw.transport.artifacts`) under the same mTLS identity and the same
per-peer bandwidth budget as sync (:mod:`syncfw.transport.budget`), at bulk
priority.

May import: node, mesh, transport, store, inference (lazily, for ONNX
signatures), and everything below them. Must not import: cli, testing, cloud.
"""

from syncfw.models.adverts import Advert, advert_key, advert_value, parse_adverts
from syncfw.models.artifacts import ArtifactConfig, Artifacts
from syncfw.models.chunks import ChunkStore, chunk_folder
from syncfw.models.fetch import FetchConfig, Fetcher, FetchProgress, Source
from syncfw.models.figures import ArtifactMetrics
from syncfw.models.manifest import (
    DEFAULT_CHUNK_BYTES,
    MANIFEST_PREFIX,
    MODEL_TAG,
    Judgement,
    ReleaseManifest,
    build_manifest,
    judge_releases,
    manifest_key,
    open_manifest,
    parse_manifest_key,
    seal_manifest,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MANIFEST_PREFIX",
    "MODEL_TAG",
    "Advert",
    "ArtifactConfig",
    "ArtifactMetrics",
    "Artifacts",
    "ChunkStore",
    "FetchConfig",
    "FetchProgress",
    "Fetcher",
    "Judgement",
    "ReleaseManifest",
    "Source",
    "advert_key",
    "advert_value",
    "build_manifest",
    "chunk_folder",
    "judge_releases",
    "manifest_key",
    "open_manifest",
    "parse_adverts",
    "parse_manifest_key",
    "seal_manifest",
]
