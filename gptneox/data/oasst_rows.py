"""Message trees rebuilt from the flat rows of the oasst1/oasst2 hub datasets (parquet or jsonl).

The hub ships one row per message (``message_id``, ``parent_id`` null at the root, ``message_tree_id``,
``tree_state``, ``role``, ``text``, ``lang``, ``review_result``, ``deleted``, ``synthetic``, ``rank`` and
columns we ignore, such as ``emojis``, ``labels`` and ``detoxify``). Rows are gathered across every file
of a dataset, since a tree may span shards, then each tree is rebuilt in the ``ExportMessageTree`` shape
of the tree export (replies in file order), so the same thread rules apply to both layouts unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

from gptneox.data.readers import RecordError

MESSAGE_FIELDS = ("role", "text", "lang", "review_result", "deleted", "synthetic", "rank")


def is_message_row(record: Any) -> bool:
    """A hub row (one message) rather than an exported tree (which has ``prompt``)."""
    return isinstance(record, dict) and "message_id" in record and "prompt" not in record


class MessageRows:
    """Collects message rows in file order; ``trees`` yields one tree per ``message_tree_id``."""

    def __init__(self) -> None:
        self.trees_by_id: dict[Any, list[tuple[Path, str, dict]]] = {}

    def take(self, path: Path, where: str, record: Any) -> bool:
        """Keep ``record`` if it is a message row (only the fields the thread rules read)."""
        if not is_message_row(record):
            return False
        row = {key: record.get(key) for key in ("message_id", "parent_id", "tree_state") + MESSAGE_FIELDS}
        if isinstance(row["rank"], float) and row["rank"].is_integer():  # pandas writes a nullable int as float
            row["rank"] = int(row["rank"])
        self.trees_by_id.setdefault(record.get("message_tree_id"), []).append((path, where, row))
        return True

    def trees(self) -> Iterator[tuple[Path, str, Callable[[], dict]]]:
        """``(file, location, build)`` per tree, in order of first appearance; ``build()`` returns the tree
        record or raises the RecordError that makes the whole tree a bad record."""
        for tree_id, rows in self.trees_by_id.items():
            path, where, _ = rows[0]
            yield path, f"message tree {tree_id!r} (first row: {where})", lambda t=tree_id, r=rows: _build(t, r)
        self.trees_by_id = {}


def _build(tree_id: Any, rows: list[tuple[Path, str, dict]]) -> dict:
    if not isinstance(tree_id, str):
        raise RecordError("message_tree_id", f"expected str, got {type(tree_id).__name__}")
    nodes: dict[str, dict] = {}
    for path, where, row in rows:
        message_id = row["message_id"]
        if not isinstance(message_id, str):
            raise RecordError("message_id", f"{path.name} {where}: expected str, got {type(message_id).__name__}")
        if message_id in nodes:
            raise RecordError("message_id", f"{path.name} {where}: message {message_id!r} appears twice")
        nodes[message_id] = {**{key: row[key] for key in MESSAGE_FIELDS}, "replies": []}
    roots = []
    for path, where, row in rows:
        node, parent_id = nodes[row["message_id"]], row["parent_id"]
        if parent_id is None:
            roots.append((row, node))
        elif parent_id in nodes:
            nodes[parent_id]["replies"].append(node)
        else:
            raise RecordError("parent_id", f"{path.name} {where}: parent {parent_id!r} of message "
                                           f"{row['message_id']!r} is not in the tree")
    if len(roots) != 1:
        raise RecordError("parent_id", f"the tree has {len(roots)} root messages (parent_id null), expected 1")
    (root_row, root), = roots
    if _count(root) != len(nodes):
        raise RecordError("parent_id", "some messages are not reachable from the root (a parent cycle)")
    return {"message_tree_id": tree_id, "tree_state": root_row["tree_state"], "prompt": root}


def _count(node: dict) -> int:
    count, stack = 0, [node]
    while stack:
        current = stack.pop()
        count += 1
        stack.extend(current["replies"])
    return count
