"""Reading a graph JSON (ours, or circuit-tracer's / Neuronpedia's) back into a ``Graph``, checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from featuredict.pipelines.attribution.graph import REQUIRED_LINK_FIELDS, REQUIRED_NODE_FIELDS, Graph


class GraphFileError(ValueError):
    """A graph file that cannot be read (one line)."""


def graph_from_json(data: Any) -> Graph:
    if not isinstance(data, dict) or not all(k in data for k in ("metadata", "nodes", "links")):
        raise GraphFileError("a graph JSON needs metadata, nodes and links")
    meta, nodes, links = data["metadata"], data["nodes"], data["links"]
    if not isinstance(meta, dict) or "prompt_tokens" not in meta:
        raise GraphFileError("the graph's metadata has no prompt_tokens")
    if not isinstance(nodes, list) or not isinstance(links, list):
        raise GraphFileError("nodes and links must be lists")
    ids = set()
    for i, n in enumerate(nodes):
        missing = [f for f in REQUIRED_NODE_FIELDS if not isinstance(n, dict) or f not in n]
        if missing:
            raise GraphFileError(f"node {i} lacks {', '.join(missing)}")
        ids.add(n["node_id"])
    for i, e in enumerate(links):
        missing = [f for f in REQUIRED_LINK_FIELDS if not isinstance(e, dict) or f not in e]
        if missing:
            raise GraphFileError(f"link {i} lacks {', '.join(missing)}")
        if e["source"] not in ids or e["target"] not in ids:
            raise GraphFileError(f"link {i} joins a node that is not in the graph")
    return Graph(dict(meta), list(nodes), list(links), dict(data.get("qParams") or {}))


def load_graph(path: str | Path) -> Graph:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise GraphFileError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return graph_from_json(json.loads(text))
    except ValueError as e:
        if isinstance(e, GraphFileError):
            raise
        raise GraphFileError(f"{path} is not JSON: {e}") from None


def save_graph(graph: Graph, path: str | Path) -> Path:
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(graph.to_json(), ensure_ascii=False), encoding="utf-8")
    tmp.replace(p)
    return p
