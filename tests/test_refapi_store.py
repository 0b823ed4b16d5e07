"""The reference API takes sends: storing, refusing, idempotency (over HTTP)."""

from __future__ import annotations

import json

from twisted.internet.defer import ensureDeferred, gatherResults

from tests.refapi_support import (
    BOUNDARY,
    CONTENT_TYPE,
    SCHEMA_VIOLATIONS,
    TOKEN,
    APITestCase,
    Response,
    message,
    metadata,
    multipart,
    violating,
)


class StoreAndReadBack(APITestCase):
    async def test_store_and_read_back(self) -> None:
        # 8-bit bytes, a NUL, a bare LF, and a line that starts like the
        # boundary without being it: all message content.
        msg = message(body="Grüße\r\n") + bytes(range(256)) + b"\r\n--" + BOUNDARY + b"x\r\nend"
        response = await self.post(multipart(metadata(), msg))
        self.assertEqual(response.code, 201, response.body)
        self.assertEqual(response.json(), {"id": "send-1"})
        self.assertEqual(response.header("Location"), "/v1/sends/send-1")

        one = await self.request("GET", "/v1/sends/send-1")
        self.assertEqual(one.code, 200)
        stored = one.json()
        expected = metadata()
        del expected["version"]
        self.assertEqual({k: stored[k] for k in expected}, expected)
        self.assertEqual(stored["size"], len(msg))
        self.assertEqual(stored["idempotency_key"], "key-1")
        self.assertRegex(stored["received_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")

        raw = await self.request("GET", "/v1/sends/send-1/message")
        self.assertEqual(raw.code, 200)
        self.assertEqual(raw.header("Content-Type"), "message/rfc822")
        self.assertEqual(raw.body, msg)

    async def test_multi_megabyte_message(self) -> None:
        line = bytes(range(128, 256)) + b"0123456789" * 10 + b"\r\n"
        msg = message() + line * (5 * 1024 * 1024 // len(line))
        self.assertGreater(len(msg), 5_000_000)
        response = await self.post(multipart(metadata(), msg))
        self.assertEqual(response.code, 201, response.body)
        raw = await self.request("GET", "/v1/sends/send-1/message")
        self.assertEqual(len(raw.body), len(msg))
        self.assertEqual(raw.body, msg)
        one = await self.request("GET", "/v1/sends/send-1")
        self.assertEqual(one.json()["size"], len(msg))

    async def test_all_fields_nullable_and_bcc(self) -> None:
        meta = metadata(
            bcc="audit@example.com",
            bcc_flags=0,
            tags=[],
            message_id=None,
            client={"address": "2001:db8::1", "tls_version": None, "listener": "smtp"},
        )
        response = await self.post(multipart(meta, message()))
        self.assertEqual(response.code, 201, response.body)
        stored = (await self.request("GET", "/v1/sends/send-1")).json()
        self.assertEqual(stored["bcc"], "audit@example.com")
        self.assertEqual(stored["bcc_flags"], 0)
        self.assertEqual(stored["tags"], [])
        self.assertIsNone(stored["message_id"])
        self.assertIsNone(stored["client"]["tls_version"])

    async def test_plain_site(self) -> None:
        """Under a plain ``Site`` (twisted.web parsing the body too) it still works."""
        _, url = self.serve(self.folder / "plain.sqlite3", plain=True)
        msg = message() + b"\xff\xfe 8-bit\r\n"
        response = await self.post(multipart(metadata(), msg), url=url)
        self.assertEqual(response.code, 201, response.body)
        raw = await self.request("GET", "/v1/sends/send-1/message", url=url)
        self.assertEqual(raw.body, msg)


class Refusals(APITestCase):
    async def test_missing_or_wrong_token(self) -> None:
        body = multipart(metadata(), message())
        for token, invalid in [(None, False), ("wrong", True), (TOKEN + "x", True), ("", True)]:
            response = await self.post(body, token=token)
            await self.assert_error(response, 401)
            challenge = response.header("WWW-Authenticate") or ""
            self.assertTrue(challenge.startswith("Bearer"), challenge)
            self.assertEqual("invalid_token" in challenge, invalid)
        response = await self.request(
            "POST", "/v1/sends", body, Authorization=f"Basic {TOKEN}", Idempotency_Key="k"
        )
        await self.assert_error(response, 401)
        self.assertEqual(await self.list_ids(), [])

    async def test_idempotency_key_required_and_checked(self) -> None:
        body = multipart(metadata(), message())
        for key in [None, "", "x" * 129, "has space", "slash/y", "dot.y", "ünï"]:
            response = await self.post(body, key=key.encode().decode("latin-1") if key else key)
            await self.assert_error(response, 400, "Idempotency-Key")
        response = await self.post(body, key="K" * 128)
        self.assertEqual(response.code, 201)

    async def test_bad_multipart(self) -> None:
        good_meta = json.dumps(metadata()).encode()
        part_meta = (
            b'Content-Disposition: form-data; name="metadata"\r\n'
            b"Content-Type: application/json\r\n\r\n" + good_meta
        )
        part_msg = (
            b'Content-Disposition: form-data; name="message"\r\n'
            b"Content-Type: message/rfc822\r\n\r\n" + message()
        )
        d = b"--" + BOUNDARY

        def parts(*ps: bytes, close: bool = True) -> bytes:
            return b"".join(d + b"\r\n" + p + b"\r\n" for p in ps) + (
                d + b"--\r\n" if close else b""
            )

        cases: list[tuple[str, bytes, bytes]] = [
            ("not multipart", b"{}", b"application/json"),
            ("no boundary", multipart(metadata(), message()), b"multipart/form-data"),
            ("other boundary", multipart(metadata(), message(), b"other"), CONTENT_TYPE),
            ("empty body", b"", CONTENT_TYPE),
            ("one part", parts(part_meta), CONTENT_TYPE),
            ("wrong order", parts(part_msg, part_meta), CONTENT_TYPE),
            ("three parts", parts(part_meta, part_msg, part_msg), CONTENT_TYPE),
            ("not closed", parts(part_meta, part_msg, close=False), CONTENT_TYPE),
            (
                "message not rfc822",
                parts(part_meta, part_msg.replace(b"message/rfc822", b"text/plain")),
                CONTENT_TYPE,
            ),
            (
                "metadata not json",
                parts(part_meta.replace(b"application/json", b"text/plain"), part_msg),
                CONTENT_TYPE,
            ),
            (
                "no disposition",
                parts(part_meta.split(b"\r\n", 1)[1], part_msg),
                CONTENT_TYPE,
            ),
            (
                "empty message",
                parts(part_meta, part_msg.split(b"\r\n\r\n")[0] + b"\r\n\r\n"),
                CONTENT_TYPE,
            ),
            (
                "base64 message",
                parts(
                    part_meta,
                    part_msg.replace(
                        b"\r\n\r\n", b"\r\nContent-Transfer-Encoding: base64\r\n\r\n", 1
                    ),
                ),
                CONTENT_TYPE,
            ),
        ]
        for name, body, content_type in cases:
            response = await self.post(body, content_type=content_type, key=f"k{len(name)}")
            self.assertEqual(response.code, 400, f"{name}: {response.body!r}")
            await self.assert_error(response, 400)
        self.assertEqual(await self.list_ids(), [])
        # The same parts, well formed, and with a preamble: accepted.
        response = await self.post(b"preamble\r\n" + parts(part_meta, part_msg))
        self.assertEqual(response.code, 201, response.body)

    async def test_bad_json(self) -> None:
        for raw in [b"{", b"[]", b'"x"', b"\xff{}", b'{"version": NaN}', b"[" * 100_000]:
            response = await self.post(multipart(raw, message()))
            await self.assert_error(response, 400, "metadata")

    async def test_schema_violations(self) -> None:
        no_listener = {"address": "192.0.2.1", "tls_version": None}
        for change in SCHEMA_VIOLATIONS:
            response = await self.post(multipart(violating(change), message()))
            await self.assert_error(response, 400, "metadata")
        missing = metadata()
        del missing["bcc"]
        response = await self.post(multipart(missing, message()))
        await self.assert_error(response, 400, "bcc")
        response = await self.post(multipart(metadata(client=no_listener), message()))
        await self.assert_error(response, 400, "listener")
        self.assertEqual(await self.list_ids(), [])

    async def test_too_large(self) -> None:
        _, url = self.serve(self.folder / "small.sqlite3", max_body=4096)
        big = multipart(metadata(), message(body="x" * 5000))
        response = await self.post(big, url=url)
        await self.assert_error(response, 413)
        small = multipart(metadata(), message())
        response = await self.post(small, url=url)
        self.assertEqual(response.code, 201)
        # A plain Site spools it all, but the resource still refuses it.
        _, plain = self.serve(self.folder / "plain.sqlite3", max_body=4096, plain=True)
        await self.assert_error(await self.post(big, url=plain), 413)

    async def test_other_methods(self) -> None:
        for method, path in [
            ("PUT", "/v1/sends"),
            ("DELETE", "/v1/sends/send-1"),
            ("POST", "/v1/sends/send-1/message"),
        ]:
            response = await self.request(method, path)
            await self.assert_error(response, 405)
            self.assertIn("GET", response.header("Allow") or "")
        response = await self.request("POST", "/")
        self.assertEqual(response.code, 405)

    async def test_not_found(self) -> None:
        await self.store("exists")
        for path in [
            "/v1/sends/nope",
            "/v1/sends/nope/message",
            "/v1/sends/bad.id",
            "/v1/sends/exists/other",
            "/v1/other",
        ]:
            await self.assert_error(await self.request("GET", path), 404)
        for path in ["/sends/nope", "/nope", "/sends/exists/x"]:
            response = await self.request("GET", path)
            self.assertEqual(response.code, 404, path)
            self.assertEqual(response.header("Content-Type"), "text/html; charset=utf-8")



class Idempotency(APITestCase):
    async def test_replay_returns_first_id(self) -> None:
        first = await self.post(multipart(metadata(id="first"), message()), key="same")
        self.assertEqual(first.code, 201)
        again = await self.post(multipart(metadata(id="second"), message("other")), key="same")
        self.assertEqual(again.code, 200, again.body)
        self.assertEqual(again.json(), {"id": "first", "duplicate": True})
        self.assertEqual(await self.list_ids(), ["first"])
        await self.assert_error(await self.request("GET", "/v1/sends/second"), 404)
        raw = await self.request("GET", "/v1/sends/first/message")
        self.assertEqual(raw.body, message())

    async def test_replay_is_still_checked(self) -> None:
        await self.store("first", key="same")
        response = await self.post(multipart(metadata(flags=99), message()), key="same")
        await self.assert_error(response, 400)

    async def test_keys_are_per_customer(self) -> None:
        await self.store("a", key="same")
        response = await self.post(
            multipart(metadata(id="b", customer="acme"), message()), key="same"
        )
        self.assertEqual(response.code, 201)
        self.assertEqual(await self.list_ids(), ["b", "a"])

    async def test_same_id_other_key_conflicts(self) -> None:
        await self.store("a", key="one")
        response = await self.post(multipart(metadata(id="a"), message()), key="two")
        await self.assert_error(response, 409)

    async def test_concurrent_posts_store_one(self) -> None:
        responses = await gatherResults(
            [
                ensureDeferred(
                    self.post(multipart(metadata(id=f"race-{i}"), message()), key="race")
                )
                for i in range(2)
            ]
        )
        await self.assert_one_winner(responses)

    async def test_concurrent_writers_on_one_database(self) -> None:
        """Two API instances (two connections, two threads) on one file."""
        _, other = self.serve()
        responses = await gatherResults(
            [
                ensureDeferred(
                    self.post(multipart(metadata(id=f"race-{i}"), message()), key="race", url=url)
                )
                for i, url in enumerate([self.url, other] * 2)
            ]
        )
        await self.assert_one_winner(responses)

    async def assert_one_winner(self, responses: list[Response]) -> None:
        codes = sorted(r.code for r in responses)
        self.assertEqual(codes, [200] * (len(responses) - 1) + [201])
        winner = next(r.json()["id"] for r in responses if r.code == 201)
        self.assertEqual({r.json()["id"] for r in responses}, {winner})
        self.assertEqual(await self.list_ids(), [winner])
