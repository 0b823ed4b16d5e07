"""The reference API's routes without a server: treq's ``StubTreq`` over the
klein resource, storage in memory on the calling thread, so every answer is
there at once (``successResultOf``).  One request per status code and error
form, no port, no thread, no reactor turning.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from mxmrelay_refapi.storage import Database
from mxmrelay_refapi.web import Routes
from tests.refapi_support import CONTENT_TYPE, TOKEN, message, metadata, multipart


class Routing(SynchronousTestCase):
    def setUp(self) -> None:
        db = Database.inline()
        self.addCleanup(db.close)
        # StubTreq sets treq's functions up at run time: no annotation names them.
        self.treq: Any = StubTreq(Routes(db=db, token=TOKEN.encode(),
                                         max_body=64 * 1024).resource())

    def request(self, method: str, path: str, body: bytes | None = None,
                **headers: str | bytes) -> tuple[int, dict[str, str], bytes]:
        response = self.successResultOf(self.treq.request(
            method, "http://refapi.test" + path, data=body,
            headers={k.replace("_", "-"): [v] for k, v in headers.items()}))
        content = self.successResultOf(self.treq.content(response))
        found = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
        return response.code, found, content

    def post(self, body: bytes, **headers: str | bytes) -> tuple[int, dict[str, str], Any]:
        headers = {"Content_Type": CONTENT_TYPE, "Authorization": f"Bearer {TOKEN}",
                   "Idempotency_Key": "key-1", **headers}
        code, found, content = self.request("POST", "/v1/sends", body, **headers)
        return code, found, json.loads(content)

    def test_created_then_duplicate(self) -> None:
        body = multipart(metadata(), message())
        code, headers, answer = self.post(body)
        self.assertEqual((code, answer), (201, {"id": "send-1"}))
        self.assertEqual(headers["location"], "/v1/sends/send-1")
        code, _, answer = self.post(body)
        self.assertEqual((code, answer), (200, {"id": "send-1", "duplicate": True}))
        code, _, answer = self.post(body, Idempotency_Key="key-2")
        self.assertEqual(code, 409, answer)

    def test_each_refusal_is_json(self) -> None:
        body = multipart(metadata(), message())
        cases = [
            ({"Authorization": "Bearer wrong"}, body, 401),
            ({"Idempotency_Key": "has space"}, body, 400),
            ({"Content_Type": "text/plain"}, body, 400),
            ({}, multipart(metadata(flags=16), message()), 400),
            ({}, multipart(metadata(), message(body="x" * 70_000)), 413),
        ]
        for headers, data, status in cases:
            code, found, answer = self.post(data, **headers)
            self.assertEqual(code, status, (headers, answer))
            self.assertEqual(found["content-type"], "application/json")
            self.assertIsInstance(answer["error"], str)
        code, found, _ = self.post(body, Authorization="Bearer wrong")
        self.assertIn('error="invalid_token"', found["www-authenticate"])

    def test_reads_and_routing_errors(self) -> None:
        self.post(multipart(metadata(), message()))
        code, _, content = self.request("GET", "/v1/sends?tag=order")
        self.assertEqual((code, [s["id"] for s in json.loads(content)["sends"]]),
                         (200, ["send-1"]))
        code, found, content = self.request("GET", "/v1/sends/send-1/message")
        self.assertEqual((code, found["content-type"], content), (200, "message/rfc822",
                                                                  message()))
        self.assertEqual(found["content-security-policy"], "sandbox")
        for path, status in [("/v1/sends/nope", 404), ("/v1/sends/bad.id", 404),
                             ("/v1/other", 404), ("/v1/sends?limit=0", 400),
                             ("/v1/sends?before=nope", 400)]:
            code, found, content = self.request("GET", path)
            self.assertEqual(code, status, path)
            self.assertEqual(found["content-type"], "application/json", path)
            self.assertIn("error", json.loads(content))
        code, found, _ = self.request("DELETE", "/v1/sends/send-1")
        self.assertEqual((code, found["allow"]), (405, "GET, HEAD"))

    def test_pages_are_html_and_errors_too(self) -> None:
        self.post(multipart(metadata(), message()))
        for path, status in [("/", 200), ("/sends/send-1", 200), ("/sends/nope", 404),
                             ("/nope", 404), ("/?limit=x", 400)]:
            code, found, content = self.request("GET", path)
            self.assertEqual(code, status, path)
            self.assertEqual(found["content-type"], "text/html; charset=utf-8", path)
            self.assertIn("default-src 'none'", found["content-security-policy"])
        code, _, content = self.request("GET", "/sends/send-1")
        self.assertIn(b"Your order", content)
        code, found, _ = self.request("POST", "/")
        self.assertEqual((code, found["content-type"]), (405, "text/html; charset=utf-8"))
