"""``docs/delivery-api.yaml`` is valid OpenAPI, and the reference API's
responses are what it describes."""

from __future__ import annotations

from typing import Any

import yaml
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.refapi_support import (
    SCHEMA_VIOLATIONS,
    SPEC_PATH,
    APITestCase,
    Response,
    message,
    metadata,
    multipart,
    violating,
)


class OpenAPIDocument(APITestCase):
    """``docs/delivery-api.yaml`` is valid, and describes what the API does."""

    def setUp(self) -> None:
        super().setUp()
        self.spec = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
        resource = Resource.from_contents(self.spec, default_specification=DRAFT202012)
        self.registry: Registry[Any] = Registry().with_resource("urn:delivery-api", resource)

    def validator(self, pointer: str) -> Draft202012Validator:
        return Draft202012Validator(
            {"$ref": "urn:delivery-api#" + pointer},
            registry=self.registry,
            format_checker=Draft202012Validator.FORMAT_CHECKER,
        )

    def check(self, path: str, method: str, response: Response) -> None:
        """``response`` matches the document's schema for its status code."""
        responses = self.spec["paths"][path][method]["responses"]
        described = responses.get(str(response.code))
        self.assertIsNotNone(described, f"{method} {path}: {response.code} is not documented")
        escaped = path.replace("~", "~0").replace("/", "~1")
        pointer = f"/paths/{escaped}/{method}/responses/{response.code}"
        if "$ref" in described:
            pointer = described["$ref"].removeprefix("#")
        self.validator(pointer + "/content/application~1json/schema").validate(response.json())
        self.assertEqual(response.header("Content-Type"), "application/json")

    def test_document_is_valid_openapi_3_1(self) -> None:
        validate_spec(self.spec)
        self.assertTrue(self.spec["openapi"].startswith("3.1"))
        self.assertEqual(self.spec["info"]["version"], "1")
        schemas = self.spec["components"]["schemas"]
        for name in ["Send", "SendMetadata", "Error", "SendCreated", "SendList"]:
            self.assertIn(name, schemas)

    def test_metadata_schema_agrees_with_the_api(self) -> None:
        schema = self.validator("/components/schemas/SendMetadata")
        schema.validate(metadata())
        for change in SCHEMA_VIOLATIONS:
            self.assertFalse(schema.is_valid(violating(change)), change)

    async def test_responses_match_the_document(self) -> None:
        sends, one, message_path = "/v1/sends", "/v1/sends/{id}", "/v1/sends/{id}/message"
        body = multipart(metadata(bcc="b@example.org", bcc_flags=0), message())
        created = await self.post(body)
        self.assertEqual(created.code, 201)
        self.check(sends, "post", created)
        duplicate = await self.post(body)
        self.assertEqual(duplicate.code, 200)
        self.check(sends, "post", duplicate)
        for response in [
            await self.post(b"nonsense"),
            await self.post(body, token="wrong"),
            await self.post(body, key=None),
            await self.post(multipart(metadata(id="a", flags=16), message()), key="k2"),
            await self.post(multipart(metadata(id="send-1"), message()), key="k3"),
            await self.request("PATCH", "/v1/sends"),
        ]:
            self.check(sends, "post", response)
        self.check(sends, "get", await self.request("GET", "/v1/sends"))
        self.check(sends, "get", await self.request("GET", "/v1/sends?tag=order&limit=1"))
        self.check(sends, "get", await self.request("GET", "/v1/sends?limit=0"))
        await self.store("send-2", bcc="b@example.org", bcc_flags=0)
        await self.store("send-3")
        first = await self.request("GET", "/v1/sends?limit=1&to=B@example.org")
        self.check(sends, "get", first)
        self.assertEqual((first.json()["next"], first.json()["prev"]), ("send-2", None))
        middle = await self.request("GET", "/v1/sends?limit=1&before=send-3&since=2000-01-01")
        self.check(sends, "get", middle)
        self.assertEqual((middle.json()["next"], middle.json()["prev"]), ("send-2", "send-2"))
        for query in [
            "before=nope",
            "after=a.b",
            "since=x",
            "until=2000-01-01T00:00Z",
            "to=x",
            "x=1",
        ]:
            response = await self.request("GET", "/v1/sends?" + query)
            self.assertEqual(response.code, 400, query)
            self.check(sends, "get", response)
        parameters = {
            p["$ref"].rsplit("/", 1)[1] for p in self.spec["paths"][sends]["get"]["parameters"]
        }
        self.assertEqual(parameters, {"Tag", "To", "Since", "Until", "Before", "After", "Limit"})
        self.check(one, "get", await self.request("GET", "/v1/sends/send-1"))
        self.check(one, "get", await self.request("GET", "/v1/sends/unknown"))
        self.check(message_path, "get", await self.request("GET", "/v1/sends/unknown/message"))
        listed = (await self.request("GET", "/v1/sends")).json()["sends"]
        self.assertEqual(len(listed), 3)
