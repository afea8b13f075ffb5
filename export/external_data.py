"""Where an ONNX graph's external data may live: only in files its export's manifest lists.

An ONNX graph can name, for any tensor, a file holding its bytes (``location``, relative to
the graph's folder) and a byte range in it. ONNX Runtime and TensorRT open those files
themselves, so a graph could read ``../../secret`` or an absolute path, or data the manifest
never vouched for. :func:`check_external_data` reads each graph's structure only (no tensor
data) and refuses, in one line, any reference that is absolute, climbs out with ``..``,
leads outside the export through a symlink, names a file the manifest does not list, or
asks for bytes beyond that file's end, before either runtime opens the graph.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from loc3r.errors import ModelError

if TYPE_CHECKING:  # onnx loads when a graph is read (``Manifest.verify`` remembers the verdict)
    import onnx

_FIX = "re-copy the whole export folder, or re-run loc3r-export"


def external_references(graph_file: Path) -> Iterator[tuple[str, str, int, int | None]]:
    """(tensor name, location, offset, length) of every tensor of ``graph_file`` whose data
    is external, in the main graph, subgraphs and node attributes."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(graph_file), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelError(f"{graph_file} is not a readable ONNX graph ({exc})", _FIX) from None
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries["length"]) if "length" in entries else None
        except ValueError:
            raise ModelError(f"{graph_file}: tensor {tensor.name!r} has a malformed external-data offset or length", _FIX) from None
        yield tensor.name, entries.get("location", ""), offset, length


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    yield from (sparse.values for sparse in graph.sparse_initializer)
    yield from (sparse.indices for sparse in graph.sparse_initializer)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def check_external_data(root: Path, graph: str, listed: Mapping[str, object]) -> None:
    """Refuse any external-data reference of ``root / graph`` that is not a file listed in
    ``listed`` (the manifest's ``files``, paths relative to ``root``) or that reads past its end."""
    graph_file = root / graph
    real_root = root.resolve()
    for tensor, location, offset, length in external_references(graph_file):
        where = f"{graph_file}: tensor {tensor!r} takes its data from {location!r}"
        pure = PurePosixPath(location)
        if not location or "\x00" in location or pure.is_absolute() or "\\" in location or ".." in pure.parts:
            raise ModelError(f"{where}, which is not a plain path inside the export", _FIX)
        target = graph_file.parent / pure
        if not target.resolve().is_relative_to(real_root):
            raise ModelError(f"{where}, which leads outside the export (a symlink out)", _FIX)
        relative = target.resolve().relative_to(real_root).as_posix()
        if relative not in listed or (root / relative).is_symlink():
            raise ModelError(f"{where}, which the export's manifest does not list (its bytes were never verified)", _FIX)
        size = target.stat().st_size
        if offset < 0 or (length is not None and length < 0) or offset + (length or 0) > size:
            raise ModelError(f"{where} at bytes {offset}..{offset + (length or 0)}, beyond its {size} bytes", _FIX)
