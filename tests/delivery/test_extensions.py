"""
Outbound ESMTP extensions (mailgate.delivery.extensions, mailgate.delivery.chunking) against the
sinks of tests/sinks.py on loopback: BDAT when the hop offers CHUNKING, 8BITMIME, SMTPUTF8
(and the 5.6.7 bounce when the hop lacks it), DSN parameters passed on to a DSN-capable hop.
"""

from twisted.internet import reactor

from mailgate.config import DeliveryConfig, TLSConfig
from mailgate.delivery import chunking
from mailgate.delivery.client import Deliverer
from mailgate.delivery.extensions import Transfer, plan_transaction
from mailgate.envelope import Envelope, Hop
from tests.delivery.test_client import MESSAGE, RCPT, SENDER, DeliveryTestCase, dot_message, make_route

EIGHT_BIT = b"Subject: caf\xc3\xa9\r\n\r\nd\xc3\xa9j\xc3\xa0 vu\r\n"
HOP = Hop("mx.dest.test", "127.0.0.1", 25)


class PlanTests(DeliveryTestCase):
    def test_plain(self):
        plan = plan_transaction({b"8BITMIME": None}, None, SENDER, [RCPT], MESSAGE, HOP)
        self.assertEqual(plan.mail, b"MAIL FROM:<sender@origin.test>")
        self.assertEqual(plan.rcpt(RCPT), b"RCPT TO:<user@dest.test>")
        self.assertEqual((plan.refused, plan.chunking, plan.dsn), ({}, False, False))

    def test_dsn_parameters_only_to_a_dsn_hop(self):
        transfer = Transfer(ret="HDRS", envid="id+1 x", notify={RCPT: ("SUCCESS", "FAILURE")},
                            orcpt={RCPT: "rfc822;orig+x@dest.test"})
        plan = plan_transaction({b"DSN": None}, transfer, SENDER, [RCPT, "b@dest.test"], MESSAGE,
                                HOP)
        self.assertEqual(plan.mail, b"MAIL FROM:<sender@origin.test> RET=HDRS ENVID=id+2B1+20x")
        self.assertEqual(plan.rcpt(RCPT), b"RCPT TO:<user@dest.test> NOTIFY=SUCCESS,FAILURE "
                                          b"ORCPT=rfc822;orig+2Bx@dest.test")
        self.assertEqual(plan.rcpt("b@dest.test"),
                         b"RCPT TO:<b@dest.test> ORCPT=rfc822;b@dest.test")
        plan = plan_transaction({}, transfer, SENDER, [RCPT], MESSAGE, HOP)
        self.assertEqual(plan.mail, b"MAIL FROM:<sender@origin.test>")
        self.assertEqual(plan.rcpt(RCPT), b"RCPT TO:<user@dest.test>")

    def test_eight_bit(self):
        plan = plan_transaction({b"8BITMIME": None}, None, SENDER, [RCPT], EIGHT_BIT, HOP)
        self.assertEqual(plan.mail, b"MAIL FROM:<sender@origin.test> BODY=8BITMIME")
        plan = plan_transaction({}, None, SENDER, [RCPT], EIGHT_BIT, HOP)
        self.assertEqual(plan.refused[RCPT].status, "5.6.3")
        self.assertEqual(plan.rcpts, {})

    def test_smtputf8(self):
        rcpts = ["jörg@bücher.test", "bob@bücher.test"]
        plan = plan_transaction({b"SMTPUTF8": None}, Transfer(smtputf8=True), SENDER, rcpts,
                                MESSAGE, HOP)
        self.assertEqual(plan.mail, b"MAIL FROM:<sender@origin.test> SMTPUTF8")
        self.assertEqual(plan.rcpt(rcpts[0]), "RCPT TO:<jörg@bücher.test>".encode())
        plan = plan_transaction({}, Transfer(smtputf8=True), SENDER, rcpts, MESSAGE, HOP)
        self.assertEqual(plan.refused[rcpts[0]].code, 553)
        self.assertEqual(plan.refused[rcpts[0]].status, "5.6.7")
        self.assertEqual(plan.rcpt(rcpts[1]), b"RCPT TO:<bob@xn--bcher-kva.test>")
        plan = plan_transaction({}, None, "jörg@origin.test", [RCPT], MESSAGE, HOP)
        self.assertEqual(plan.refused[RCPT].status, "5.6.7")
        # An ASCII envelope of a message sent with SMTPUTF8 goes without it.
        plan = plan_transaction({}, Transfer(smtputf8=True), SENDER, [RCPT], MESSAGE, HOP)
        self.assertEqual(plan.mail, b"MAIL FROM:<sender@origin.test>")

    def test_transfer_of_an_envelope(self):
        envelope = Envelope("Q", "a@b.test", ("u@d.test", "v@d.test"), "192.0.2.1",
                            smtputf8=True, ret="FULL", envid="E",
                            dsn=(("u@d.test", ("NEVER",), None), ("v@d.test", None, "rfc822;x")))
        self.assertEqual(Transfer.of(envelope), Transfer(True, "FULL", "E", {"u@d.test": ("NEVER",)},
                                                         {"v@d.test": "rfc822;x"}))

    def test_crlf(self):
        self.assertEqual(chunking.crlf(b"a\nb\rc\r\nd"), b"a\r\nb\r\nc\r\nd")


class WireTests(DeliveryTestCase):
    def deliverer(self, chunking=True, **kw):
        config = DeliveryConfig(connect_timeout=5.0, command_timeout=5.0, data_timeout=10.0,
                                chunking=chunking)
        return Deliverer(reactor, "gw.test.example", config, TLSConfig())

    async def send(self, sink, data=MESSAGE, recipients=(RCPT,), sender=SENDER, transfer=None,
                   chunking=True):
        return await self.deliverer(chunking).deliver(
            make_route(tls="none"), [self.hop(sink)], sender, list(recipients), data,
            transfer=transfer)

    async def test_bdat_to_a_chunking_hop(self):
        sink = self.sink(chunking=True)
        data = dot_message([0, 5000]) + b"x" * 70 + b"\r\n" * 1000
        [result] = await self.send(sink, data=data)
        self.assertOutcome(result, "delivered", 250)
        [message] = sink.messages
        self.assertEqual((message["via"], message["message"]), ("BDAT", data))
        self.assertEqual(message["chunks"], [len(data)])
        self.assertIn(b"BDAT %d LAST" % len(data), sink.commands_of(0))

    async def test_big_messages_go_in_several_chunks(self):
        sink = self.sink(chunking=True)
        data = (b"y" * 998 + b"\r\n") * 1500  # 1.5 MB
        [result] = await self.send(sink, data=data)
        self.assertOutcome(result, "delivered")
        self.assertEqual(sink.messages[0]["chunks"], [chunking.CHUNK, len(data) - chunking.CHUNK])
        self.assertEqual(sink.messages[0]["message"], data)

    async def test_chunking_off_or_not_offered_uses_data(self):
        sink = self.sink(chunking=True)
        await self.send(sink, chunking=False)
        sink2 = self.sink()
        await self.send(sink2)
        self.assertEqual([sink.messages[0]["via"], sink2.messages[0]["via"]], ["DATA", "DATA"])
        self.assertEqual(sink2.messages[0]["message"], MESSAGE)

    async def test_a_refused_chunk_is_the_messages_outcome(self):
        sink = self.sink(chunking=True, data_reply=(554, "5.7.1 Content refused"))
        [result] = await self.send(sink)
        self.assertOutcome(result, "bounced", 554, "5.7.1")
        sink = self.sink(chunking=True, data_reply=(452, "4.3.1 Full"))
        [result] = await self.send(sink)
        self.assertOutcome(result, "deferred", 452)

    async def test_eight_bit_to_eight_bit_and_seven_bit_hops(self):
        sink = self.sink()
        [result] = await self.send(sink, data=EIGHT_BIT)
        self.assertOutcome(result, "delivered")
        self.assertEqual(sink.messages[0]["mail_params"], "BODY=8BITMIME")
        old = self.sink(eightbitmime=False)
        [result] = await self.send(old, data=EIGHT_BIT)
        self.assertOutcome(result, "bounced", 554, "5.6.3")
        self.assertIn("does not offer 8BITMIME", result.text)
        self.assertEqual(old.messages, [])
        self.assertNotIn(b"DATA", old.commands_of(0))

    async def test_smtputf8_to_a_hop_that_offers_it(self):
        sink = self.sink(smtputf8=True)
        rcpt = "jörg@bücher.test"
        [result] = await self.send(sink, recipients=[rcpt], transfer=Transfer(smtputf8=True))
        self.assertOutcome(result, "delivered")
        self.assertEqual((sink.messages[0]["rcpt_to"], sink.messages[0]["mail_params"]),
                         ([rcpt], "SMTPUTF8"))

    async def test_smtputf8_to_a_hop_that_does_not(self):
        sink = self.sink()
        results = await self.send(sink, recipients=["jörg@bücher.test", "bob@bücher.test"],
                                  transfer=Transfer(smtputf8=True))
        self.assertOutcome(results[0], "bounced", 553, "5.6.7")
        self.assertOutcome(results[1], "delivered")
        self.assertEqual(sink.messages[0]["rcpt_to"], ["bob@xn--bcher-kva.test"])
        self.assertEqual(sink.messages[0]["mail_params"], "")

    async def test_dsn_passed_on(self):
        sink = self.sink(dsn=True)
        transfer = Transfer(ret="HDRS", envid="QQ314159", notify={RCPT: ("SUCCESS",)})
        [result] = await self.send(sink, transfer=transfer)
        self.assertTrue(result.dsn)
        self.assertEqual(sink.messages[0]["mail_params"], "RET=HDRS ENVID=QQ314159")
        self.assertEqual(sink.messages[0]["rcpt_params"],
                         {RCPT: "NOTIFY=SUCCESS ORCPT=rfc822;user@dest.test"})
        plain = self.sink()
        [result] = await self.send(plain, transfer=transfer)
        self.assertFalse(result.dsn)
        self.assertEqual(plain.messages[0]["rcpt_params"], {RCPT: ""})
