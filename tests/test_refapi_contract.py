"""The reference API's validator and ``docs/delivery-api.yaml`` agree, bound for bound.

The document is the oracle: every probe below is derived from the limits
the YAML states (types, ``const``, ``minimum``/``maximum``,
``minLength``/``maxLength``, ``pattern``, ``maxItems``, ``required``,
``additionalProperties``), on both sides of each bound, and the API must
accept exactly what the document's JSON Schema accepts.  Where the document
states no limit, a probe far past any plausible one checks that the API
invents none.  A keyword the probes do not know fails the test, so that a
limit added to the document is probed, not silently skipped.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Iterator
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from twisted.trial import unittest

from mxmrelay_refapi.contract import IDEMPOTENCY_KEY, BadRequest, SendMetadata
from mxmrelay_refapi.query import SendQuery
from tests.refapi_support import SPEC_PATH, metadata

#: Keywords that state no limit.
_NOTES = {"description", "examples", "default", "title"}
#: Keywords the probes know.
_KNOWN = _NOTES | {"type", "const", "enum", "minimum", "maximum", "minLength", "maxLength",
                   "pattern", "items", "minItems", "maxItems", "oneOf", "anyOf",
                   "properties", "required", "additionalProperties"}
#: Longer than any limit a contract would state without saying so.
_UNSTATED = 10_000
#: A pattern of one character class and a length range: ``^[...]{m,n}$``.
_CLASS_PATTERN = re.compile(r"\^(\[[^\]]+\])\{(\d+),(\d+)\}\$")


class Spec:
    def __init__(self) -> None:
        self.doc = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
        resource = Resource.from_contents(self.doc, default_specification=DRAFT202012)
        self.registry: Registry[Any] = Registry().with_resource("urn:api", resource)

    def validator(self, pointer: str) -> Draft202012Validator:
        return Draft202012Validator({"$ref": "urn:api#" + pointer}, registry=self.registry,
                                    format_checker=Draft202012Validator.FORMAT_CHECKER)

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            node: Any = self.doc
            for part in schema["$ref"].removeprefix("#/").split("/"):
                node = node[part]
            schema = node
        return schema


def probes(spec: Spec, schema: dict[str, Any]) -> Iterator[Any]:
    """Values on both sides of every bound ``schema`` states."""
    schema = spec.resolve(schema)
    unknown = set(schema) - _KNOWN
    if unknown:
        raise AssertionError(f"no probes for {sorted(unknown)} in {schema}: add them")
    yield from (None, True, 0, 1, 1.0, 2.5, "", "x", [], {}, ["x"])
    for branch in schema.get("oneOf", []) + schema.get("anyOf", []):
        yield from probes(spec, branch)
    if "const" in schema:
        yield schema["const"]
        if isinstance(schema["const"], int):
            yield schema["const"] + 1
            yield float(schema["const"])
    for value in schema.get("enum", []):
        yield value
    for key, step in (("minimum", -1), ("maximum", 1)):
        if key in schema:
            bound = schema[key]
            yield from (bound, bound + step, float(bound), bound - step)
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if "string" in types:
        yield from string_probes(schema)
    if "array" in types:
        item = schema.get("items", {})
        example = next(v for v in probes(spec, item) if
                       Draft202012Validator(item).is_valid(v)) if "$ref" not in item else "x"
        for value in probes(spec, item):
            yield [value]
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if low:
            yield from ([example] * (low - 1), [example] * low)
        yield from ([example] * high, [example] * (high + 1)) if high else ([example] * 1000,)


def string_probes(schema: dict[str, Any]) -> Iterator[str]:
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    fill = "a"
    pattern = schema.get("pattern")
    if pattern is not None:
        match = _CLASS_PATTERN.fullmatch(pattern)
        if match is None:
            raise AssertionError(f"no probes for pattern {pattern!r}: add them")
        # Every printable ASCII character and a few others, alone: the
        # class is probed character by character.
        yield from string.printable + "é€\u00a0\x00"
        low, high = max(low, int(match[2])), min(high or 10**9, int(match[3]))
    yield from (fill * max(low - 1, 0), fill * low)
    if high is not None:
        yield from (fill * high, fill * (high + 1))
    else:
        yield fill * _UNSTATED


def accepts_metadata(doc: dict[str, Any]) -> bool:
    try:
        SendMetadata.from_json(json.dumps(doc).encode("utf-8"))
    except BadRequest:
        return False
    return True


class MetadataAgrees(unittest.SynchronousTestCase):
    """``SendMetadata`` accepts exactly what ``#/components/schemas/SendMetadata`` does."""

    def setUp(self) -> None:
        self.spec = Spec()
        self.oracle = self.spec.validator("/components/schemas/SendMetadata")
        self.schema = self.spec.resolve({"$ref": "#/components/schemas/SendMetadata"})

    def agree(self, doc: dict[str, Any], where: str) -> bool:
        expected: bool = self.oracle.is_valid(doc)
        self.assertEqual(accepts_metadata(doc), expected,
                         f"{where}: the document says {'valid' if expected else 'invalid'}")
        return expected

    def check_object(self, schema: dict[str, Any], base: dict[str, Any],
                     build: Callable[[dict[str, Any]], dict[str, Any]], where: str) -> None:
        """Every property's probes, each required key missing, an unknown key
        (and an optional key, ``sandbox``, left out: still valid)."""
        optional = set(schema["properties"]) - set(schema["required"])
        self.assertEqual(optional, {"sandbox"} if "sandbox" in schema["properties"] else set(),
                         where)
        for key, sub in schema["properties"].items():
            outcomes = set()
            for value in [*([base[key]] if key in base else []), *probes(self.spec, sub)]:
                doc = build({**base, key: value})
                outcomes.add(self.agree(doc, f"{where}.{key} = {str(value)[:40]!r}"))
            self.assertEqual(outcomes, {True, False}, f"{where}.{key}: probes on one side only")
            missing = {k: v for k, v in base.items() if k != key}
            self.assertEqual(self.agree(build(missing), f"{where}: without {key}"),
                             key in optional)
        extra = self.agree(build({**base, "surprise": 1}), f"{where}: an unknown key")
        self.assertEqual(extra, schema.get("additionalProperties", True) is not False)

    def test_every_bound_of_the_metadata(self) -> None:
        self.assertTrue(self.agree(metadata(), "the example"))
        self.check_object(self.schema, metadata(), lambda doc: doc, "metadata")

    def test_every_bound_of_the_client(self) -> None:
        client = self.spec.resolve(self.schema["properties"]["client"])
        self.check_object(client, metadata()["client"], lambda c: metadata(client=c),
                          "metadata.client")

    def test_flags_are_the_documented_bits(self) -> None:
        flags = self.spec.resolve({"$ref": "#/components/schemas/Flags"})
        self.assertEqual((flags["minimum"], flags["maximum"]), (0, 15))
        for value in range(-2, 18):
            self.agree(metadata(flags=value), f"flags = {value}")
            self.agree(metadata(bcc_flags=value), f"bcc_flags = {value}")


def query_accepts(*pairs: tuple[str, str]) -> bool:
    args: dict[bytes, list[bytes]] = {}
    for name, value in pairs:
        args.setdefault(name.encode(), []).append(value.encode())
    try:
        SendQuery.from_args(args)
    except BadRequest:
        return False
    return True


class ParametersAgree(unittest.SynchronousTestCase):
    """The list's query parameters and the Idempotency-Key header."""

    def setUp(self) -> None:
        self.spec = Spec()
        self.parameters = self.spec.doc["components"]["parameters"]

    def oracle(self, name: str) -> Draft202012Validator:
        return self.spec.validator(f"/components/parameters/{name}/schema")

    def test_limit(self) -> None:
        oracle = self.oracle("Limit")
        schema = self.parameters["Limit"]["schema"]
        for value in probes(self.spec, schema):
            if isinstance(value, int) and not isinstance(value, bool):
                self.assertEqual(query_accepts(("limit", str(value))), oracle.is_valid(value),
                                 value)
        self.assertTrue(query_accepts())  # the default, then

    def test_tags(self) -> None:
        most = self.parameters["Tag"]["schema"]["maxItems"]
        tags = [("tag", f"t{i}") for i in range(most + 1)]
        self.assertTrue(query_accepts(*tags[:most]))
        self.assertFalse(query_accepts(*tags))
        self.assertTrue(query_accepts(("tag", "x" * _UNSTATED)))  # no maxLength stated

    def test_to(self) -> None:
        longest = self.parameters["To"]["schema"]["maxLength"]
        domain = "@example.org"
        for length in (longest - 1, longest, longest + 1):
            address = "a" * (length - len(domain)) + domain
            self.assertEqual(query_accepts(("to", address)),
                             self.oracle("To").is_valid(address), length)

    def test_cursors_are_send_ids(self) -> None:
        for name in ("before", "after"):
            oracle = self.oracle(name.capitalize())
            for value in probes(self.spec, self.parameters[name.capitalize()]["schema"]):
                if isinstance(value, str) and value and "\x00" not in value:
                    self.assertEqual(query_accepts((name, value)), oracle.is_valid(value),
                                     (name, value))

    def test_times_take_the_documented_examples(self) -> None:
        for name in ("Since", "Until"):
            for example in self.parameters[name]["schema"]["examples"]:
                self.assertTrue(query_accepts((name.lower(), example)), example)

    def test_idempotency_key(self) -> None:
        oracle = self.oracle("IdempotencyKey")
        outcomes = set()
        for value in probes(self.spec, self.parameters["IdempotencyKey"]["schema"]):
            if isinstance(value, str):
                valid = oracle.is_valid(value)
                outcomes.add(valid)
                self.assertEqual(bool(IDEMPOTENCY_KEY.fullmatch(value)), valid, value)
        self.assertEqual(outcomes, {True, False})
