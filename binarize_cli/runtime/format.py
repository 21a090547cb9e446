"""Constants and checks of the packed file format (``docs/format.md`` is the specification).

A packed file is a safetensors file. Its string metadata holds the format name and version,
the run's scheme, M, N, source model, input geometry and normalisation, and ``graph``: the
network as JSON (an ordered op list naming the safetensors tensors each op reads). This
module is shared by the writer (:mod:`binarize_cli.export.packed`, torch side) and the reader
(:mod:`binarize_cli.runtime.model`, no torch); the op list is :mod:`.optable`, the bit order
:mod:`.bits`.
"""

from __future__ import annotations

import json
from typing import Any

from binarize_cli.core.errors import FormatError
from binarize_cli.runtime.bits import BIT_ORDER
from binarize_cli.runtime.optable import OPS, node_problem

FORMAT_NAME = "binarize-packed"
#: The version the writer produces.
FORMAT_VERSION = 2
#: The versions a reader accepts (a version-1 file uses only the ops of version 1).
READ_VERSIONS = (1, 2)

#: Metadata keys, all values are strings (JSON-encoded where not plain text).
META_KEYS = (
    "format",  # FORMAT_NAME
    "format_version",  # "2" (or "1")
    "bit_order",  # "lsb-first"
    "scheme",  # "pa" | "abc" | ...
    "M",  # run-level weight bases, decimal
    "N",  # run-level activation bases, decimal
    "source_model",  # e.g. "timm:resnet18"
    "num_classes",  # decimal
    "input_size",  # JSON [C, H, W]
    "mean",  # JSON [3 floats] or "null"
    "std",  # JSON [3 floats] or "null"
    "data",  # the data spec converted on ("" when unknown)
    "preprocessing",  # JSON object (docs/format.md, Preprocessing) or "null"; absent in older files
    "graph",  # JSON, see docs/format.md
)


def check_header(meta: dict[str, str] | None, source: str) -> dict[str, Any]:
    """Validate the metadata of a packed file (any of :data:`READ_VERSIONS`, each node against
    the op table and the file's version); returns the parsed graph."""
    if not meta or meta.get("format") != FORMAT_NAME:
        raise FormatError(
            f"{source} is not a binarize packed file (no format={FORMAT_NAME} metadata); "
            "create one with `binarize export --target packed`"
        )
    version = meta.get("format_version", "")
    if version not in [str(v) for v in READ_VERSIONS]:
        readable = " and ".join(str(v) for v in READ_VERSIONS)
        raise FormatError(
            f"{source} has packed format version {version!r}; this binarize reads versions "
            f"{readable}: re-export it with this version"
        )
    if meta.get("bit_order") != BIT_ORDER:
        raise FormatError(f"{source} has bit order {meta.get('bit_order')!r}, expected {BIT_ORDER}")
    try:
        graph = json.loads(meta["graph"])
    except (KeyError, json.JSONDecodeError):
        raise FormatError(f"{source} has no readable graph metadata; re-export it") from None
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise FormatError(f"{source} has a malformed graph (no node list); re-export it")
    for node in graph["nodes"]:
        op = node.get("op") if isinstance(node, dict) else None
        if op not in OPS:
            raise FormatError(
                f"{source} uses op {op!r}, unknown to this runtime (format v{FORMAT_VERSION})"
            )
        problem = node_problem(node, int(version))
        if problem:
            raise FormatError(f"{source}: {problem}")
    return graph
