"""The reply timeouts of a transaction share one timer: a wait with a longer limit than the one
before it is not cut short by the earlier deadline, and a shorter one still fires on time
(``test_slow_upstream_times_out_and_defers``)."""

from __future__ import annotations

from typing import Any

from tests.relay.test_delivery_flows import SinkFactory, make_config, smarthost


async def test_a_slow_final_reply_within_its_own_limit_is_waited_for(
        relay: Any, smtp_sink: SinkFactory) -> None:
    # MAIL is answered at once and may take at most 2 s; the final dot is answered after 3 s,
    # within its 60 s: the timer set for the MAIL reply must not end the transaction.
    sink = await smtp_sink(data_delay=3.0)
    delivery = smarthost(sink) | {"mailTimeout": 2.0, "dataDoneTimeout": 60}
    r = await relay(make_config(delivery, queue={"retryInitial": 30, "retryMax": 30}))
    msg = await r.send(["user@example.net"])
    await r.done(msg, 30)
    assert [m.rcpt_tos for m in sink.messages] == [["user@example.net"]]
    assert r.count("delivered") == 1 and r.count("deferred") == 0
