from __future__ import annotations

import time

from tests.helpers import ServiceHarness


async def test_card_lifecycle_and_credentials(svc: ServiceHarness) -> None:
    c = await svc.new_card()
    assert c["status"] == "active"
    r = await svc.post("/v1/card-auth", svc.card_auth_body(c["card_sn"]), as_="hospital_his")
    assert r.status == 200, r.body
    assert r.body["card"]["holder"]["name_masked"] == "张**"
    dev = await svc.new_ecard(c["card_no"])
    code = dev.next_code(int(time.time()))
    r = await svc.post("/v1/ecard-codes/verify", {"code": code, "business_type": "02"}, as_="merchant_pos")
    assert r.status == 200, r.body
    r = await svc.post("/v1/ecard-codes/verify", {"code": code, "business_type": "02"}, as_="merchant_pos")
    assert r.status == 422 and r.body["code"] == "credential_replayed", r.body
    r = await svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {})
    assert r.status == 200, r.body
    r = await svc.post("/v1/card-auth", svc.card_auth_body(c["card_sn"]), as_="transit_validator")
    assert r.status == 422 and r.body["code"] == "card_unusable", r.body
    r = await svc.get("/v1/hotlist?since=0", as_="transit_validator")
    assert r.status == 200 and r.body["entries"][0]["card_sn"] == c["card_sn"], r.body
