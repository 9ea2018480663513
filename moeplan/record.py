"""Record: the base of the values moeplan's own code computes (plans, speeds, layouts, cache terms)
and of its built-in tables (GPUs, links, engines, quantizations).

Why not a pydantic BaseModel: creating a pydantic class costs ~0.5 ms (it collects and evaluates
every field's annotation), and building an instance validates it. `moeplan fit` defines ~25 such
classes and makes hundreds of instances from values its own arithmetic has just produced out of an
already validated ModelSpec; as BaseModels they cost ~15 ms of a start-up that issue 17 bounds at
1.15x a bare typer app. Deployment specs are still pydantic models.

Model specs (moeplan.spec) are user input, so they are Records that validate: a class that sets
__record_validate__ is validated by its twin (below) on every construction, with the validators and
config it gives the twin (__twin_validators__, __twin_config__); model_construct builds one without
validation, for a spec already validated once (the precompiled card index), so a plain `fit` of a
bundled card builds no pydantic class for it.

So a Record is a plain frozen class: its fields are its annotations (the class attribute, if any, is
the default), an instance holds the values it was given and the defaults for the rest, with no
coercion but one: an int given to a float field is made a float, as validation would (448 prints
448.0 in JSON). A missing or unknown field is a TypeError naming it (a bug in moeplan).

Everything pydantic does for these classes, JSON output (model_dump), JSON Schema (`moeplan schema`)
and validation, goes through a pydantic "twin": a BaseModel with the same name, docstring, fields
and defaults, built the first time it is needed (never on a plain `fit` run). A Record used as a
field of a BaseModel (CheckResult.plan) is validated and serialized through its twin
(__get_pydantic_core_schema__). The test suite runs with MOEPLAN_VALIDATE_RECORDS=1
(tests/conftest.py): every Record the tests make is then validated by its twin, so a wrong type fails
there; tests/test_records.py checks that output is byte-identical either way.
"""

from __future__ import annotations

import copy
import os
from typing import Any, ClassVar

VALIDATE = os.environ.get("MOEPLAN_VALIDATE_RECORDS") == "1"
_set = object.__setattr__
_MISSING = object()
_MUTABLE = (list, dict, set)


class Record:
    """A frozen record of typed fields (see the module docstring)."""

    # The field values live in __dict__; which were given (model_fields_set) in a slot beside it, so
    # that equality, hashing and repr see the values only, as a BaseModel's do.
    __slots__ = ("__dict__", "_fields_set")

    # Per class, built on first use: (name, default or _MISSING) in declaration order, base classes'
    # fields first; the float fields; the pydantic twin.
    __record_fields__: ClassVar[tuple[tuple[str, Any], ...]]
    __record_floats__: ClassVar[frozenset[str]]

    # A class whose instances come from user input sets this: every instance is then validated by its
    # twin, as a BaseModel's is (model_construct skips it, for values already validated once).
    __record_validate__: ClassVar[bool] = False
    # The twin's ConfigDict beyond frozen=True and defer_build=True (extra="forbid", ...).
    __twin_config__: ClassVar[dict[str, Any]] = {}

    @classmethod
    def __twin_validators__(cls) -> dict[str, Any]:
        """pydantic validators (field_validator / model_validator objects) for this class's twin, by
        name; called once, when the twin is built, so pydantic is imported only then. A twin inherits
        its base twin's. In them, `type(self).__record__` (or `cls.__record__`) is the Record class."""
        return {}

    def __init__(self, /, **data: Any) -> None:
        cls = type(self)
        if VALIDATE or cls.__record_validate__:
            _fill(self, _twin(cls)(**data))
            return
        _build(self, data)

    @classmethod
    def model_construct(cls, **data: Any) -> Record:
        """An instance of `data`, unvalidated, as BaseModel.model_construct (defaults filled, an int in
        a float field made a float): for values already validated once (the precompiled card index)."""
        out = object.__new__(cls)
        _build(out, data)
        return out

    # -- frozen, compared and hashed by value, as a frozen BaseModel ---------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: {name!r} cannot be set (use model_copy(update=...))")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: {name!r} cannot be deleted")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self), *self.__dict__.values()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"

    def __copy__(self) -> Record:
        out = object.__new__(type(self))
        _set(out, "__dict__", dict(self.__dict__))
        _set(out, "_fields_set", self._fields_set)
        return out

    def __deepcopy__(self, memo: dict[int, Any]) -> Record:
        out = object.__new__(type(self))
        memo[id(self)] = out
        _set(out, "__dict__", copy.deepcopy(self.__dict__, memo))
        _set(out, "_fields_set", self._fields_set)
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {"values": self.__dict__, "fields_set": self._fields_set}

    def __setstate__(self, state: dict[str, Any]) -> None:
        _set(self, "__dict__", dict(state["values"]))
        _set(self, "_fields_set", state["fields_set"])

    # -- the part of pydantic's BaseModel API moeplan uses -------------------------------------------

    @property
    def model_fields_set(self) -> set[str]:
        return set(self._fields_set)

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Record:
        """A copy with `update`'s fields replaced, unvalidated, as BaseModel.model_copy."""
        out = copy.deepcopy(self) if deep else copy.copy(self)
        if update:
            unknown = set(update) - out.__dict__.keys()
            if unknown:
                raise TypeError(f"{type(self).__name__}: unknown field(s) {', '.join(map(repr, sorted(unknown)))}")
            out.__dict__.update(update)
            _set(out, "_fields_set", self._fields_set | frozenset(update))
        return out

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        """As BaseModel.model_dump (the twin's serializer; nested Records included)."""
        return _as_twin(self).model_dump(**kwargs)  # type: ignore[no-any-return]

    def model_dump_json(self, **kwargs: Any) -> str:
        return _as_twin(self).model_dump_json(**kwargs)  # type: ignore[no-any-return]

    @classmethod
    def model_json_schema(cls, **kwargs: Any) -> dict[str, Any]:
        return _twin(cls).model_json_schema(**kwargs)  # type: ignore[no-any-return]

    @classmethod
    def model_validate(cls, obj: Any) -> Record:
        """Validated by the twin whatever VALIDATE says (data from outside: a file, a test)."""
        if isinstance(obj, cls):
            return obj
        out = object.__new__(cls)
        _fill(out, _twin(cls).model_validate(obj))
        return out

    @classmethod
    def record_fields(cls) -> tuple[str, ...]:
        """The field names, in order (BaseModel.model_fields' keys, without building the twin)."""
        return tuple(name for name, _ in _fields(cls))

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        """A Record as a field of a BaseModel: validated by its twin (a Record instance passes as it
        is, as a model instance does), serialized and described (JSON Schema) as its twin."""
        from pydantic_core import core_schema

        inner = handler(_twin(cls))

        def validate(value: Any, next_: Any) -> Any:
            if isinstance(value, cls):
                return value
            out = object.__new__(cls)
            _fill(out, next_(value))
            return out

        return core_schema.no_info_wrap_validator_function(
            validate, inner, serialization=core_schema.plain_serializer_function_ser_schema(
                lambda v: _as_twin(v) if isinstance(v, Record) else v, return_schema=inner))


def _build(record: Record, data: dict[str, Any]) -> None:
    """`record` holds `data` and the defaults for the rest, unvalidated (see the module docstring)."""
    cls = type(record)
    fields = _fields(cls)
    floats = cls.__dict__["__record_floats__"]
    values: dict[str, Any] = {}
    given = 0
    for name, default in fields:
        if name in data:
            value = data[name]
            values[name] = float(value) if type(value) is int and name in floats else value
            given += 1
        elif default is _MISSING:
            raise TypeError(f"{cls.__name__}: missing required field {name!r}")
        else:
            values[name] = copy.deepcopy(default) if isinstance(default, _MUTABLE) else default
    if given != len(data):
        raise TypeError(f"{cls.__name__}: unknown field(s) {', '.join(map(repr, sorted(data.keys() - values.keys())))}")
    _set(record, "__dict__", values)
    _set(record, "_fields_set", frozenset(data))


def _fields(cls: type[Record]) -> tuple[tuple[str, Any], ...]:
    """The class's fields with their defaults, read once per class from its annotations (strings,
    under `from __future__ import annotations`): names starting with "_" and ClassVars are not
    fields, as in pydantic."""
    own = cls.__dict__.get("__record_fields__")
    if own is not None:
        return own  # type: ignore[no-any-return]
    out: dict[str, Any] = {}
    floats: set[str] = set()
    for klass in reversed(cls.__mro__):
        if klass is Record or not issubclass(klass, Record):
            continue
        if klass is not cls:
            _fields(klass)
            floats |= klass.__dict__["__record_floats__"]
        for name, ann in klass.__dict__.get("__annotations__", {}).items():
            text = ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann))
            if name.startswith("_") or text.startswith(("ClassVar", "typing.ClassVar")):
                continue
            out[name] = klass.__dict__.get(name, _MISSING)
            kinds = {part.strip() for part in text.replace("Optional[", "").rstrip("]").split("|")}
            if "float" in kinds and "int" not in kinds:
                floats.add(name)
            else:
                floats.discard(name)
    fields = tuple(out.items())
    _set_class(cls, "__record_fields__", fields)
    _set_class(cls, "__record_floats__", frozenset(floats))
    return fields


def _set_class(cls: type, name: str, value: Any) -> None:
    type.__setattr__(cls, name, value)


def _twin(cls: type[Record]) -> Any:
    """The pydantic model of `cls`, built once: same name, module, docstring, fields and defaults, a
    subclass of its Record base's twin. Annotations resolve in the Record's own module."""
    twin = cls.__dict__.get("__record_twin__")
    if twin is not None:
        return twin
    from pydantic import BaseModel, ConfigDict

    fields = _fields(cls)
    base = next((b for b in cls.__bases__ if issubclass(b, Record) and b is not Record), None)
    parent = _twin(base) if base is not None else BaseModel
    own = cls.__dict__.get("__annotations__", {})
    namespace: dict[str, Any] = {
        "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
        "__annotations__": {name: own[name] for name, _ in fields if name in own},
        "model_config": ConfigDict(frozen=True, defer_build=True, **cls.__dict__.get("__twin_config__", {})),
        "__record__": cls,
    }
    if "__twin_validators__" in cls.__dict__:  # its own; a base twin's are inherited
        namespace.update(cls.__twin_validators__())
    for name, default in fields:
        if name in own and default is not _MISSING:
            namespace[name] = default
    # The annotations resolve in the namespace of the module __module__ names (the Record's), not in
    # this function's frame.
    twin = type(BaseModel)(cls.__name__, (parent,), namespace, __pydantic_reset_parent_namespace__=False)
    _set_class(cls, "__record_twin__", twin)
    return twin


def _as_twin(record: Record) -> Any:
    """The twin instance holding the same values (nested Records stay Records: their twins' schemas
    serialize them), built as model_construct builds one, without validation."""
    twin = _twin(type(record))
    out = twin.__new__(twin)
    _set(out, "__dict__", dict(record.__dict__))
    _set(out, "__pydantic_fields_set__", set(record._fields_set))
    _set(out, "__pydantic_extra__", None)
    _set(out, "__pydantic_private__", None)
    return out


def _fill(record: Record, validated: Any) -> None:
    """`record` holds a validated twin instance's values, in the Record's field order."""
    values = validated.__dict__
    _set(record, "__dict__", {name: values[name] for name, _ in _fields(type(record))})
    _set(record, "_fields_set", frozenset(validated.model_fields_set))
