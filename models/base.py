"""Record base class and the pydantic -> Arrow schema derivation (schemas are never written twice)."""

from __future__ import annotations

import types
import typing
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin

import pyarrow as pa
from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """A row of a stage's Parquet shards. Field order is column order."""

    model_config = ConfigDict(extra="forbid")


class Strict(BaseModel):
    """A config section: unknown keys are errors naming the key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _arrow_type(tp: Any) -> tuple[pa.DataType, bool]:
    """(arrow type, nullable) for a python annotation."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union {tp!r}")
        return _arrow_type(args[0])[0], True
    if origin is Literal:
        return pa.string(), False
    if origin is typing.Annotated:
        return _arrow_type(get_args(tp)[0])
    if origin in (list, tuple):
        (item,) = get_args(tp)[:1]
        return pa.list_(_arrow_type(item)[0]), False
    if origin is dict:
        k, v = get_args(tp)
        return pa.map_(_arrow_type(k)[0], _arrow_type(v)[0]), False
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return pa.struct(_fields(tp)), False
    simple = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
    if tp in simple:
        return simple[tp], False
    raise TypeError(f"no Arrow type for {tp!r}")


def _fields(model: type[BaseModel]) -> list[pa.Field]:
    out = []
    for name, info in model.model_fields.items():
        typ, _ = _arrow_type(info.annotation)
        out.append(pa.field(name, typ))
    return out


@cache
def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    """The Parquet schema of a record class, derived from its fields."""
    return pa.schema(_fields(model))


def to_table(records: typing.Iterable[BaseModel | dict], model: type[BaseModel]) -> pa.Table:
    """Validate rows against the model and build a table with the model's fixed schema."""
    rows = [r.model_dump() if isinstance(r, model) else model.model_validate(r).model_dump() for r in records]
    return pa.Table.from_pylist(rows, schema=arrow_schema(model))


def _unmap(value: Any, typ: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_map(typ):
        return {k: _unmap(v, typ.item_type) for k, v in value}
    if pa.types.is_list(typ):
        return [_unmap(v, typ.value_type) for v in value]
    if pa.types.is_struct(typ):
        return {f.name: _unmap(value.get(f.name), f.type) for f in typ}
    return value


def _has_map(typ: pa.DataType) -> bool:
    if pa.types.is_map(typ):
        return True
    if pa.types.is_list(typ):
        return _has_map(typ.value_type)
    if pa.types.is_struct(typ):
        return any(_has_map(f.type) for f in typ)
    return False


def table_rows(table: pa.Table) -> list[dict]:
    """Rows as plain dicts, with Arrow maps turned back into dicts."""
    rows = table.to_pylist()
    fixes = [f for f in table.schema if _has_map(f.type)]
    for row in rows:
        for f in fixes:
            row[f.name] = _unmap(row.get(f.name), f.type)
    return rows


def from_table(table: pa.Table, model: type[BaseModel]) -> list:
    """Rows of a table as model instances."""
    return [model.model_validate(r) for r in table_rows(table)]
