"""Regenerate the committed gRPC stubs in ``syncfw/transport/_pb/``.

Usage: ``python protos/generate.py [OUT_DIR]`` (default: the package folder).

protoc writes absolute imports (``from syncfw.v1 import sync_pb2``) that would
resolve against the top-level ``syncfw`` package; the stubs live inside
``syncfw.transport._pb``, so imports between them are rewritten as relative.
``tests/test_protos.py`` runs this into a temporary folder and fails if the
result differs from the committed files.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTOS = (
    "syncfw/v1/sync.proto",
    "grpc/health/v1/health.proto",
    "syncfw/v1/feed.proto",
    "syncfw/v1/artifacts.proto",
)
# generated module name -> the proto file it comes from
MODULES = {
    "sync": "syncfw/v1/sync.proto",
    "health": "grpc/health/v1/health.proto",
    "feed": "syncfw/v1/feed.proto",
    "artifacts": "syncfw/v1/artifacts.proto",
}


def generate(out_dir: Path) -> list[Path]:
    """Generate flat, relatively-importing stubs into ``out_dir``; return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "_gen"
    tmp.mkdir(exist_ok=True)
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    for proto in PROTOS:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{ROOT}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                proto,
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed on {proto} (exit {rc})")
    written: list[Path] = []
    for _name, proto in MODULES.items():
        stem = proto[: -len(".proto")]
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            src = tmp / (stem + suffix)
            text = src.read_text()
            pkg = ".".join(Path(stem).parent.parts)
            # "from syncfw.v1 import sync_pb2 as ..." -> "from . import sync_pb2 as ..."
            text = re.sub(rf"^from {re.escape(pkg)} import ", "from . import ", text, flags=re.M)
            # grpcio-tools stamps its own version into the _grpc stub; stamp the grpcio
            # floor of pyproject.toml instead, so the stubs' own runtime check matches
            # what the package declares and a harmless tools upgrade changes nothing
            text = re.sub(
                r"^GRPC_GENERATED_VERSION = .*$",
                "GRPC_GENERATED_VERSION = '1.85.1'",
                text,
                flags=re.M,
            )
            dst = out_dir / (Path(stem).name + suffix)
            dst.write_text(text)
            written.append(dst)
    for path in sorted(tmp.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    tmp.rmdir()
    init = out_dir / "__init__.py"
    init.write_text('"""Generated gRPC stubs (see protos/generate.py). Do not edit."""\n')
    written.append(init)
    return written


if __name__ == "__main__":
    target = (
        Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "syncfw" / "transport" / "_pb"
    )
    for path in generate(target):
        print(path)
