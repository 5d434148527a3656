"""Read a W&B run back from its local files, no server: wandb 0.31 keeps scalars only in
``run-<id>.wandb``, a LevelDB-style log (32 KiB blocks of CRC-checked chunks) of
``wandb_internal_pb2.Record`` protobufs.

wandb 0.31 has no Python reader of that log (no ``wandb.sdk.internal.datastore`` any
more; nothing in ``wandb.apis`` or ``wandb.sdk.lib`` reads it). Its CLI does:
``wandb leet inspect --json`` prints each record, and on these runs shows the same facts
(history, summary, config, exit code, run id; one file per resumed segment), but we keep
this reader: that output belongs to the LEET terminal UI and has its own rendering
(nested keys joined with ".", where wandb joins them with "/"), its ``--json`` is new in
0.31 (0.30's documentation describes text output only), the older clients
pyproject.toml allows (wandb>=0.17) have no LEET, and it costs a wandb-core process per
segment.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

FILE_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version
CHUNK_HEADER = struct.Struct("<IHB")  # crc32 of (type byte + data), data length, type
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    ident, magic, _ = FILE_HEADER.unpack_from(data)
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path}: not a W&B transaction log"
    records, pos, pending = [], FILE_HEADER.size, b""
    while pos + CHUNK_HEADER.size <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER.size:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        chunk = data[pos + CHUNK_HEADER.size : pos + CHUNK_HEADER.size + length]
        pos += CHUNK_HEADER.size + length
        if kind == 0:
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


@dataclass
class RunSegment:
    """What one process wrote for a run (a resumed run has one segment per attempt)."""

    folder: Path
    run_id: str
    project: str
    entity: str
    group: str
    name: str
    tags: list[str]
    notes: str
    config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per step, with "_step"
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None

    def metric(self, name: str) -> dict[int, Any]:
        return {row["_step"]: row[name] for row in self.history if name in row}


def read_segment(folder: Path) -> RunSegment:
    (path,) = folder.glob("run-*.wandb")
    segment = None
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config = {_key(u): json.loads(u.value_json) for u in run.config.update}
            config.pop("_wandb", None)
            segment = RunSegment(folder, run.run_id, run.project, run.entity, run.run_group, run.display_name,
                                 list(run.tags), run.notes, config)  # fmt: skip
        elif kind == "history":
            segment.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for u in record.summary.update:
                segment.summary[_key(u)] = json.loads(u.value_json)
        elif kind == "exit":
            segment.exit_code = record.exit.exit_code
    assert segment is not None, f"{path}: no run record"
    return segment


def read_run(run_dir: Path) -> list[RunSegment]:
    """The W&B segments of a dcgan run folder, oldest first."""
    return [read_segment(f) for f in sorted((run_dir / "wandb").glob("offline-run-*"))]
