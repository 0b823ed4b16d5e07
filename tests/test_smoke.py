from twisted.trial import unittest

from tests.support import RelayUnderTest, fetch_json, in_thread, message


class Smoke(unittest.TestCase):
    async def test_send(self) -> None:
        relay = RelayUnderTest(self)

        def send() -> tuple[int, bytes]:
            c = relay.smtp()
            try:
                c.sendmail("app@example.com", ["someone@example.org"], message())
                return c.noop()
            finally:
                c.quit()

        def send2() -> tuple[int, bytes]:
            c = relay.smtp()
            c.mail("app@example.com")
            c.rcpt("someone@example.org")
            code, text = c.data(message())
            c.quit()
            return code, text

        code, text = await in_thread(send2)
        self.assertEqual(code, 250, text)
        send_id = text.split()[-1].decode()
        assert relay.api is not None
        stored = await fetch_json(f"{relay.api.url}/{send_id}")
        self.assertEqual(stored["id"], send_id)
        self.assertEqual(stored["to"], "someone@example.org")
