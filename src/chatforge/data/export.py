"""Canonical records -> a Parquet table, so cleaned data can go to any other tool.

``chatforge data convert FILE... -o out.parquet`` writes one row per record with the
columns the kinds present need, in this order: ``kind``, ``messages`` (conversations),
``prompt`` (every other kind), ``chosen`` / ``rejected`` (preferences), ``responses`` /
``tiers`` (rankings), ``meta`` (the JSON text of the record's meta: its keys differ from
record to record, which no fixed column type holds). A message is a struct of ``role``
and ``content``; only when some record calls tools do messages also get ``tool_calls``
(``[{id, type, function: {name, arguments}}]``, ``arguments`` the JSON string, as in
OpenAI's format), ``tool_call_id`` and ``name`` -- so a plain chat table stays exactly
what TRL and ``datasets`` expect of a ``messages`` column, without null fields in it.

The rows are first written as canonical JSON Lines beside the output (one pass over the
inputs, which are streams), then converted in batches once the schema is known; the
Parquet file appears only when complete (written as ``OUT.tmp``, then renamed).
:mod:`chatforge.data.formats.chat` (``chatforge``) reads such a table back losslessly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from chatforge.data.records import Record, to_dict

BATCH_ROWS = 4096
COLUMNS = ("kind", "messages", "prompt", "chosen", "rejected", "responses", "tiers", "meta")
_NEEDS = {"conversation": ("messages",), "prompt": ("prompt",), "preference": ("prompt", "chosen", "rejected"),
          "ranking": ("prompt", "responses", "tiers")}


def schema(kinds: set[str], tools: bool) -> Any:
    """The table's schema for these record kinds (tool fields only when ``tools``)."""
    import pyarrow as pa

    fields = [pa.field("role", pa.string()), pa.field("content", pa.string())]
    if tools:
        function = pa.struct([pa.field("name", pa.string()), pa.field("arguments", pa.string())])
        call = pa.struct([pa.field("id", pa.string()), pa.field("type", pa.string()), pa.field("function", function)])
        fields += [pa.field("tool_calls", pa.list_(call)), pa.field("tool_call_id", pa.string()),
                   pa.field("name", pa.string())]
    message = pa.struct(fields)
    types = {"kind": pa.string(), "messages": pa.list_(message), "prompt": pa.list_(message), "chosen": message,
             "rejected": message, "responses": pa.list_(message), "tiers": pa.list_(pa.int64()), "meta": pa.string()}
    used = {"kind", "meta"} | {c for k in kinds for c in _NEEDS[k]}
    return pa.schema([pa.field(c, types[c]) for c in COLUMNS if c in used])


def _message(m: dict) -> dict:
    calls = m.get("tool_calls")
    if not calls:
        return m
    out = dict(m)
    out["tool_calls"] = [{"id": c.get("id"), "type": c.get("type", "function"),
                          "function": {"name": c["function"]["name"],
                                       "arguments": json.dumps(c["function"].get("arguments", {}), ensure_ascii=False)}}
                         for c in calls]
    return out


def table_row(d: dict) -> dict:
    """A canonical record dict (:func:`chatforge.data.records.to_dict`) as a table row."""
    row: dict[str, Any] = {"kind": d["kind"], "meta": json.dumps(d.get("meta", {}), ensure_ascii=False, default=str)}
    for k in ("messages", "prompt", "responses"):
        if k in d:
            row[k] = [_message(m) for m in d[k]]
    for k in ("chosen", "rejected"):
        if k in d:
            row[k] = _message(d[k])
    if d.get("tiers") is not None:
        row["tiers"] = d["tiers"]
    return row


class ParquetWriter:
    """``write(record)`` many times, then ``close(ok)``: the Parquet file exists only if ok."""

    def __init__(self, path: str):
        self.path, self.n = path, 0
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.rows_path = f"{path}.rows.jsonl"
        self.f = open(self.rows_path, "w", encoding="utf-8")
        self.kinds: set[str] = set()
        self.tools = False

    def write(self, rec: Record) -> None:
        d = to_dict(rec)
        self.kinds.add(rec.kind)
        if not self.tools:
            msgs = d.get("messages") or d.get("prompt") or []
            self.tools = any(m["role"] == "tool" or "tool_calls" in m for m in msgs)
        self.f.write(json.dumps(table_row(d), ensure_ascii=False) + "\n")
        self.n += 1

    def close(self, ok: bool) -> None:
        self.f.close()
        try:
            if ok:
                self._convert()
        finally:
            os.unlink(self.rows_path)

    def _convert(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        sch = schema(self.kinds or {"conversation"}, self.tools)
        tmp = f"{self.path}.tmp"
        with pq.ParquetWriter(tmp, sch) as w, open(self.rows_path, encoding="utf-8") as f:
            batch: list[dict] = []
            for line in f:
                batch.append(json.loads(line))
                if len(batch) >= BATCH_ROWS:
                    w.write_table(pa.Table.from_pylist(batch, schema=sch))
                    batch = []
            if batch or not self.n:
                w.write_table(pa.Table.from_pylist(batch, schema=sch))
        os.replace(tmp, self.path)
