"""Trust: who may sign which chain, and the proofs that travel with ops.

Pure core, above the log: authority statements (:mod:`.statements`), signed chain
heads and the key ring (:mod:`.ring`), fork evidence (:mod:`.evidence`). No I/O:
key files on disk and X.509 certificates live outside the core, in
:mod:`syncfw.keyfiles`.
"""

from syncfw.trust.evidence import (
    EVIDENCE_KIND,
    MAX_BRANCH_OPS,
    ForkEvidence,
    branch_from,
    verify_fork,
)
from syncfw.trust.ring import (
    MAX_TRIES,
    SEAL_BYTES,
    SEAL_EVERY,
    SIG_BYTES,
    UNSIGNED,
    Cover,
    KeyEntry,
    KeyRing,
    NodeSigner,
    cover,
    head_message,
)
from syncfw.trust.statements import (
    KEEP_KIND,
    KEYREG_KIND,
    REVOKE_KIND,
    STATEMENT_KIND_OF,
    ForkResolution,
    Registration,
    Revocation,
    Statement,
    open_statement,
    public_key_bytes,
    seal_statement,
)

__all__ = [
    "EVIDENCE_KIND",
    "KEEP_KIND",
    "KEYREG_KIND",
    "MAX_BRANCH_OPS",
    "MAX_TRIES",
    "REVOKE_KIND",
    "SEAL_BYTES",
    "SEAL_EVERY",
    "SIG_BYTES",
    "STATEMENT_KIND_OF",
    "UNSIGNED",
    "Cover",
    "ForkEvidence",
    "ForkResolution",
    "KeyEntry",
    "KeyRing",
    "NodeSigner",
    "Registration",
    "Revocation",
    "Statement",
    "branch_from",
    "cover",
    "head_message",
    "open_statement",
    "public_key_bytes",
    "seal_statement",
    "verify_fork",
]
