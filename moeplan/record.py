"""Record: the base of the values moeplan's own code computes (plans, speeds, layouts, cache terms)
and of its built-in tables (GPUs, links, engines, quantizations).

Why not a plain BaseModel: pydantic validates every instance, and builds a class's validator the
first time one is made. `moeplan fit` makes instances of ~20 such classes, so a plain run spent
~30 ms of its start-up (issue 17: the whole process is bounded at 1.15x a bare typer app) building
validators for values that its own arithmetic had just produced from an already validated
ModelSpec. What users and files hand moeplan (model specs, deployment specs, routing, layout
requests) is still validated as before; those classes are not Records.

So a Record is built as pydantic's model_construct builds one: the fields given, the defaults for
the rest, no coercion. The test suite runs with MOEPLAN_VALIDATE_RECORDS=1 (tests/conftest.py), so
every Record the tests make is validated, a wrong type fails there; and
tests/test_records.py checks that fit, perf and memory print the same JSON either way.
JSON output (model_dump, model_json_schema) is pydantic's, unchanged.
"""

from __future__ import annotations

import os
import types
from functools import lru_cache
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict

VALIDATE = os.environ.get("MOEPLAN_VALIDATE_RECORDS") == "1"
_set = object.__setattr__


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    def __init__(self, /, **data: Any) -> None:
        if VALIDATE:
            super().__init__(**data)
            return
        cls = type(self)
        floats = _float_fields(cls)
        values: dict[str, Any] = {}
        for name, field in cls.__pydantic_fields__.items():
            if name in data:
                value = data[name]
                # The one coercion validation did that output shows: 448 in a float field prints 448.0.
                values[name] = float(value) if name in floats and type(value) is int else value
            elif field.is_required():  # a bug in moeplan, not in the input: say which field
                raise TypeError(f"{cls.__name__}: missing required field {name!r}")
            else:
                values[name] = field.get_default(call_default_factory=True, validated_data=values)
        _set(self, "__dict__", values)
        _set(self, "__pydantic_fields_set__", set(data))
        _set(self, "__pydantic_extra__", None)
        private = cls.__private_attributes__
        _set(self, "__pydantic_private__", {k: a.get_default() for k, a in private.items()} if private else None)


@lru_cache(maxsize=None)
def _float_fields(cls: type[Record]) -> frozenset[str]:
    """The fields typed float or float | None, read once per class."""
    out = set()
    for name, field in cls.__pydantic_fields__.items():
        ann = field.annotation
        args = get_args(ann) if get_origin(ann) in (Union, types.UnionType) else (ann,)
        if float in args and int not in args:
            out.add(name)
    return frozenset(out)
