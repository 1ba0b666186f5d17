import pytest

from .conftest import Couple
from .wsclient import Client

pytestmark = pytest.mark.anyio


async def test_send_reaches_partner_on_another_process(processes, couple: Couple, api=None):
    p1, p2 = await processes(2)
    b = await Client.open(p2.ws_url, couple.id, couple.b_token)
    await b.expect("presence")
    a = await Client.open(p1.ws_url, couple.id, couple.a_token)
    await a.send(type="gesture", gesture_type="hug", request_id="r1")
    sent = await a.expect("gesture_sent", request_id="r1")
    received = await b.expect("gesture_received")
    assert received["gesture"]["id"] == sent["gesture"]["id"]
    await a.close()
    await b.close()


async def test_in_process_server_answers(api, couple: Couple):
    r = await api.get(
        "/api/gestures/pending",
        params={"relationship_id": str(couple.id), "partner_id": "partner_b"},
        headers=couple.b_headers,
    )
    assert r.status_code == 200
    assert r.json() == {"gestures": [], "count": 0}
