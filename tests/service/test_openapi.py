"""protocols/openapi.yaml is the API the service really serves.

(a) it is a valid OpenAPI 3.1 document; (b) its operations are exactly the app's routes; (c) its request
bodies are exactly protocols.api's messages, and the two upload bodies (decoded by protocols.transit and
protocols.ridecode instead) accept what their decoders accept and refuse what they refuse, wherever JSON
Schema can say it; (d) every endpoint, driven through the live app on a real
database, answers bodies the spec's schemas accept (success and problem+json), with only the error codes
the spec lists, and each operation needs exactly the terminal operation the spec names.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import hypothesis
import jsonschema
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import given
from hypothesis import strategies as st
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry
from referencing.jsonschema import DRAFT202012

import protocols
from cardsvc.app import create_app
from cardsvc.config import Settings
from cardsvc.http.keys import SERVICES
from cardsvc.security import terminals
from cardsvc.security.keys import KeyRing
from cardsvc.transit import clearing, fares, flow, offline, rides, taps
from protocols import api, ecard, hotlist, ridecode, sm, transit
from protocols.errors import CodecError
from tests.helpers import Response, ServiceHarness, new_card_numbers, new_id_number
from tests.transit.test_rides import backdated_phone

SPEC_PATH = Path(protocols.__file__).parent / "openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
SPEC_URI = "urn:cardsvc:openapi"
REGISTRY: Registry[Any] = Registry().with_resource(SPEC_URI, DRAFT202012.create_resource(SPEC))
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
CARD_OP_PATH = "/v1/cards/{card_no}/{op}"

# The body each operation parses (routes.py `_parse(api.X, ...)`); the card operation path is checked
# against api.CARD_OPERATIONS instead.
BODIES: dict[tuple[str, str], api.Message] = {
    ("post", "/v1/holders"): api.HOLDER_CREATE,
    ("post", "/v1/holders/lookup"): api.HOLDER_LOOKUP,
    ("post", "/v1/cards"): api.CARD_ISSUE,
    ("post", "/v1/ecards"): api.ECARD_ISSUE,
    ("post", "/v1/ecards/{ecard_id}/revoke"): api.LIFECYCLE,
    ("post", "/v1/card-auth"): api.CARD_AUTH,
    ("post", "/v1/ecard-codes/verify"): api.ECARD_VERIFY,
    ("post", "/v1/transit/taps"): api.TAP,
    ("post", "/v1/purses/{card_no}/top-ups"): api.TOPUP,
    ("post", "/v1/purses/{card_no}/fare-corrections"): api.FARE_CORRECTION,
    ("post", "/v1/purses/{card_no}/quota-ride-returns"): api.QUOTA_RIDE_RETURN,
    ("post", "/v1/ride-certs"): api.RIDE_CERT_ISSUE,
    ("put", "/v1/holders/{holder_id}/concession"): api.CONCESSION_SET,
    ("post", "/v1/holders/{holder_id}/concession/extra-quota"): api.CONCESSION_ACTION,
    ("post", "/v1/holders/{holder_id}/concession/end"): api.CONCESSION_ACTION,
}
# The upload bodies are decoded by the wire codecs (transit_routes.py), not protocols.api messages: the
# schema each one documents and the decoder the server runs.
DECODED: dict[tuple[str, str], tuple[str, Callable[[Any], object]]] = {
    ("post", "/v1/transit/offline-batches"): ("OfflineBatch", transit.batch_from_dict),
    ("post", "/v1/transit/ride-batches"): ("RideBatch", ridecode.ride_batch_from_dict),
}
TABLE = fares.load_demo_table()


def spec_operations() -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): op
        for path, item in SPEC["paths"].items()
        for method, op in item.items()
        if method in METHODS
    }


def escape(segment: str) -> str:
    return segment.replace("~", "~0").replace("/", "~1")


def deref(obj: dict[str, Any], pointer: str) -> tuple[dict[str, Any], str]:
    """Follow an OpenAPI (non-schema) $ref; return the object and its JSON pointer in the spec."""
    while "$ref" in obj:
        ref = obj["$ref"]
        assert ref.startswith("#/"), ref
        pointer = ref[1:]
        obj = SPEC
        for part in pointer[1:].split("/"):
            obj = obj[part.replace("~1", "/").replace("~0", "~")]
    return obj, pointer


@functools.cache
def _validator(pointer: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        {"$ref": f"{SPEC_URI}#{pointer}"},
        registry=REGISTRY,
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )


def validate(instance: Any, pointer: str) -> None:
    """Validate against the JSON Schema at `pointer` in the spec (Draft 2020-12, $refs resolved in it)."""
    _validator(pointer).validate(instance)


def schema_at(pointer: str) -> dict[str, Any]:
    obj: Any = SPEC
    for part in pointer[1:].split("/"):
        obj = obj[part.replace("~1", "/").replace("~0", "~")]
    assert isinstance(obj, dict)
    return obj


def app_routes(app: web.Application) -> set[tuple[str, str]]:
    routes = set()
    for route in app.router.routes():
        if route.method == "HEAD":  # aiohttp adds HEAD to every GET
            continue
        assert route.resource is not None
        routes.add((route.method.lower(), route.resource.canonical))
    return routes


def app_handlers(app: web.Application) -> dict[tuple[str, str], Any]:
    return {
        (route.method.lower(), route.resource.canonical): route.handler
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def offline_app(keys: KeyRing, settings: Settings) -> web.Application:
    # Never started: the router is built by create_app, the database is touched only at start-up.
    return create_app(settings, "postgresql://unused@127.0.0.1:1/unused", keys, maintenance=False)


# ------------------------------------------------------------------ (a) (b) (c): the document itself


def test_spec_is_a_valid_openapi_3_1_document() -> None:
    assert SPEC["openapi"].startswith("3.1.")
    validate_openapi(SPEC)


def test_spec_operations_are_exactly_the_app_routes(keys: KeyRing, settings: Settings) -> None:
    served, described = app_routes(offline_app(keys, settings)), set(spec_operations())
    assert served - described == set(), "served but not described in protocols/openapi.yaml"
    assert described - served == set(), "described in protocols/openapi.yaml but not served"


def test_request_bodies_are_exactly_the_api_messages() -> None:
    schemas = SPEC["components"]["schemas"]
    ops = spec_operations()
    with_body = {key for key, op in ops.items() if "requestBody" in op}
    assert with_body == set(BODIES) | set(DECODED) | {("post", CARD_OP_PATH)}
    for key, (name, _) in DECODED.items():
        assert ops[key]["requestBody"]["required"] is True, key
        content = ops[key]["requestBody"]["content"]
        assert content == {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}, key
    for key, message in BODIES.items():
        content = ops[key]["requestBody"]["content"]
        assert set(content) == {"application/json"}, key
        assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{message.name}"}, key
        assert schemas[message.name] == message.json_schema(), message.name
        # A message whose fields are all optional may be sent without a body (it parses as {}).
        assert ops[key]["requestBody"]["required"] == bool(message.json_schema()["required"]), key

    card_op = ops[("post", CARD_OP_PATH)]
    op_param = next(p for p in card_op["parameters"] if p.get("name") == "op")
    assert op_param["schema"]["enum"] == list(api.CARD_OPERATIONS)
    assert card_op["x-cardsvc-body-by-op"] == {op: m.name for op, m in api.CARD_OPERATIONS.items()}
    messages = {m.name: m for m in api.CARD_OPERATIONS.values()}
    body = card_op["requestBody"]["content"]["application/json"]["schema"]
    assert sorted(s["$ref"] for s in body["oneOf"]) == sorted(f"#/components/schemas/{n}" for n in messages)
    for name, message in messages.items():
        assert schemas[name] == message.json_schema(), name


# ------------------------------------------------------------------ (c) the upload bodies against their decoders

CARD_SN = "500101D1560000050123456789ABCDEF"
T0 = 1_767_225_600


def schema_accepts(body: Any, name: str) -> bool:
    try:
        validate(body, f"/components/schemas/{name}")
    except jsonschema.ValidationError:
        return False
    return True


def decoder_accepts(decode: Callable[[Any], object], body: Any) -> bool:
    """Only CodecError counts as a refusal: anything else would be a 500 from the server."""
    try:
        decode(body)
    except CodecError:
        return False
    return True


def offline_body(terminal_id: str = "T-0001.bus_7", n: int = 3) -> dict[str, Any]:
    """A valid upload made by the card simulator: bus, metro entry (amount 0) and exit, in turn."""
    chip = transit.PurseCard(CARD_SN, tac_key=bytes(range(16)), balance_fen=100_000)
    places: list[dict[str, Any]] = [
        {"line_id": "bus-105", "station_id": "", "direction": "single"},
        {"line_id": "L1", "station_id": "l1-chaotianmen", "direction": "in"},
        {"line_id": "L1", "station_id": "l1-daping", "direction": "out"},
    ]
    records = []
    for i in range(n):
        place = places[i % 3]
        amount = 0 if place["direction"] == "in" else 1 + i % 300
        records.append(chip.debit(amount, terminal_id, 10 + i, T0 + 60 * i, **place))
    return transit.batch_to_dict(transit.OfflineBatch(terminal_id, 7, records))


def offline_extremes() -> list[dict[str, Any]]:
    """Valid uploads at every field's limits (the decoder does not check the TAC: any 4 bytes)."""
    low = transit.OfflineRecord("1", 0, CARD_SN, 0, 0, 0, 0, transit.TxnType.PURSE_DEBIT, "1", "",
                                "single", 0, bytes(4))  # fmt: skip
    t32 = "T" * 32
    high = transit.OfflineRecord(
        t32, transit.TERMINAL_SEQ_MAX, "999999D156000005FFFFFFFFFFFFFFFF", transit.PURSE_SEQ_MODULUS - 1,
        transit.AMOUNT_FEN_MAX, transit.BALANCE_FEN_MAX, transit.TXN_TIME_S_MAX, transit.TxnType.COMPOSITE,
        "L" * 16, "S" * 16, "out", transit.HOTLIST_VERSION_MAX, b"\xff" * 4,
    )  # fmt: skip
    return [
        transit.batch_to_dict(transit.OfflineBatch("1", 1, [low])),
        transit.batch_to_dict(transit.OfflineBatch(t32, transit.BATCH_ID_MAX, [high])),
        offline_body(n=transit.OFFLINE_BATCH_RECORDS_MAX),
    ]


@functools.cache
def ride_codes() -> tuple[str, ...]:
    """A valid ride code for each user-key algorithm (SM2: 381 characters, Ed25519: 328)."""
    issuer = sm.sm2_generate()
    codes = []
    for alg in (sm.ALG_SM2_SM3, sm.ALG_ED25519):
        user = sm.private_key_from_seed(alg, bytes(range(32)))
        cert = ridecode.issue_cert(
            issuer, issuer_key_id=1, cert_serial=1, account_id=1, alg=alg, user_public_key=sm.public_key_bytes(user),
            valid_from=T0, valid_to=T0 + 86400, max_fare_fen=1000, credit_limit_fen=2000,
        )  # fmt: skip
        codes.append(ridecode.RidePhone(cert, user).next_code(T0 + 60))
    return tuple(codes)


def ride_body(gate_id: str = "G-7", n: int = 2) -> dict[str, Any]:
    codes = ride_codes()
    records = [
        ridecode.RideRecord(codes[i % 2], gate_id, 100 + i, "bus-105", "", "single", T0 + 60 + i, i)
        if i % 2 == 0
        else ridecode.RideRecord(codes[i % 2], gate_id, 100 + i, "L1", "l1-daping", "out", T0 + 60 + i, i)
        for i in range(n)
    ]
    return ridecode.ride_batch_to_dict(ridecode.RideBatch(gate_id, 3, records))


def ride_extremes() -> list[dict[str, Any]]:
    low = ridecode.RideRecord(ride_codes()[1], "1", 0, "1", "", "in", 0, 0)
    high = ridecode.RideRecord(ride_codes()[0], "G" * 32, ridecode.GATE_SEQ_MAX, "L" * 16, "S" * 16, "out",
                               ridecode.TIME_S_MAX, ridecode.DENY_LIST_VERSION_MAX)  # fmt: skip
    return [
        ridecode.ride_batch_to_dict(ridecode.RideBatch("1", 1, [low])),
        ridecode.ride_batch_to_dict(ridecode.RideBatch("G" * 32, ridecode.BATCH_ID_MAX, [high])),
        ride_body(n=ridecode.RIDE_BATCH_RECORDS_MAX),
    ]


Mutation = Callable[[dict[str, Any]], None]


def _set(key: str, value: Any) -> Mutation:
    return lambda b: b.__setitem__(key, value)


def _rec(key: str, value: Any, i: int = 0) -> Mutation:
    return lambda b: b["records"][i].__setitem__(key, value)


def _drop(key: str) -> Mutation:
    return lambda b: b.pop(key)


def _drop_rec(key: str) -> Mutation:
    return lambda b: b["records"][0].pop(key)


def _refusals(
    record_keys: tuple[str, ...],
    int_limits: dict[str, tuple[int, int]],
    str_keys: tuple[str, ...],
    id_key: str,
) -> list[tuple[str, Mutation]]:
    """Bodies every decoder of a batch refuses and JSON Schema can refuse too."""
    cases: list[tuple[str, Mutation]] = [
        ("unknown key", _set("extra", 1)),
        ("unknown record key", _rec("extra", 1)),
        ("no records", _set("records", [])),
        ("records not a list", _set("records", {"0": {}})),
        ("a record not an object", lambda b: b["records"].append([1])),
        ("501 records", lambda b: b["records"].extend([b["records"][-1]] * (501 - len(b["records"])))),
        ("batch_id 0", _set("batch_id", 0)),
        ("batch_id too big", _set("batch_id", 2**63)),
        ("batch_id a string", _set("batch_id", "7")),
        ("batch_id a boolean", _set("batch_id", True)),
        (f"{id_key} too long", _set(id_key, "T" * 33)),
        (f"{id_key} with a space", _set(id_key, "T 1")),
        (f"{id_key} a number", _set(id_key, 7)),
        ("line_id empty", _rec("line_id", "")),
        ("line_id too long", _rec("line_id", "L" * 17)),
        ("station_id too long", _rec("station_id", "S" * 17)),
        ("station_id not ASCII", _rec("station_id", "站")),
        ("direction up", _rec("direction", "up")),
    ]
    cases += [(f"no {k}", _drop(k)) for k in (id_key, "batch_id", "records")]
    cases += [(f"record without {k}", _drop_rec(k)) for k in record_keys]
    for k, (lo, hi) in int_limits.items():
        cases += [(f"{k} {lo - 1}", _rec(k, lo - 1)), (f"{k} {hi + 1}", _rec(k, hi + 1))]
        cases += [
            (f"{k} a string", _rec(k, str(lo))),
            (f"{k} a boolean", _rec(k, False)),
            (f"{k} null", _rec(k, None)),
        ]
    for k in str_keys:
        cases += [(f"{k} a number", _rec(k, 1)), (f"{k} null", _rec(k, None))]
    return cases


OFFLINE_INTS = {
    "terminal_seq": (0, transit.TERMINAL_SEQ_MAX),
    "purse_seq": (0, transit.PURSE_SEQ_MODULUS - 1),
    "amount_fen": (0, transit.AMOUNT_FEN_MAX),
    "balance_before_fen": (0, transit.BALANCE_FEN_MAX),
    "txn_time": (0, transit.TXN_TIME_S_MAX),
    "hotlist_version": (0, transit.HOTLIST_VERSION_MAX),
}
OFFLINE_STRS = ("terminal_id", "card_sn", "line_id", "station_id", "direction", "tac")
OFFLINE_REFUSED = [
    *_refusals(transit.RECORD_KEYS, OFFLINE_INTS, OFFLINE_STRS, "terminal_id"),
    ("card_sn lowercase", _rec("card_sn", CARD_SN.lower())),
    ("card_sn of another scheme", _rec("card_sn", CARD_SN.replace("D156", "D157"))),
    ("card_sn short", _rec("card_sn", CARD_SN[:-1])),
    ("tac 7 hex", _rec("tac", "0a1b2c3")),
    ("tac not hex", _rec("tac", "0a1b2c3g")),
    ("txn_type 7", _rec("txn_type", 7)),
    ("txn_type 9 with single", _rec("txn_type", 9)),
    ("txn_type 6 with out", lambda b: b["records"][2].__setitem__("txn_type", 6)),
    ("a tap-in with an amount", lambda b: b["records"][1].__setitem__("amount_fen", 5)),
]
RIDE_INTS = {
    "gate_seq": (0, ridecode.GATE_SEQ_MAX),
    "time": (0, ridecode.TIME_S_MAX),
    "deny_list_version": (0, ridecode.DENY_LIST_VERSION_MAX),
}
RIDE_STRS = ("code_text", "gate_id", "line_id", "station_id", "direction")


def _code(change: Callable[[str], str]) -> Mutation:
    return lambda b: b["records"][0].__setitem__("code_text", change(b["records"][0]["code_text"]))


RIDE_REFUSED = [
    *_refusals(ridecode.RIDE_RECORD_KEYS, RIDE_INTS, RIDE_STRS, "gate_id"),
    ("code_text one short", _code(lambda c: c[:-1])),
    ("code_text one long", _code(lambda c: c + "A")),
    ("code_text lowercase", _code(str.lower)),
    ("code_text another prefix", _code(lambda c: "RC2" + c[3:])),
    ("code_text an e-card code", _rec("code_text", "EC1AAAA")),
]


def _cross_terminal(id_key: str) -> Mutation:
    return lambda b: b["records"][1].__setitem__(id_key, "another")


def _seq_back(seq_key: str) -> Mutation:
    return lambda b: b["records"][1].__setitem__(seq_key, b["records"][0][seq_key])


# What only the decoder can refuse (JSON Schema cannot compare two values of one document, and counts
# 180.0 as an integer): documented in the operations' descriptions.
OFFLINE_ONLY_DECODER = [
    ("terminal_seq not ascending", _seq_back("terminal_seq")),
    ("a record of another terminal", _cross_terminal("terminal_id")),
    ("an amount with a fraction", _rec("amount_fen", 180.0)),
]
RIDE_ONLY_DECODER = [
    ("gate_seq not ascending", _seq_back("gate_seq")),
    ("a record of another gate", _cross_terminal("gate_id")),
    ("a time with a fraction", _rec("time", float(T0))),
    ("code_text of the right shape that does not decode", _code(lambda c: "RC1" + "A" * (len(c) - 3))),
]
UPLOADS = {
    "OfflineBatch": (
        transit.batch_from_dict,
        offline_body,
        offline_extremes,
        OFFLINE_REFUSED,
        OFFLINE_ONLY_DECODER,
    ),
    "RideBatch": (ridecode.ride_batch_from_dict, ride_body, ride_extremes, RIDE_REFUSED, RIDE_ONLY_DECODER),
}


def test_the_upload_schemas_have_exactly_the_decoders_keys_and_limits() -> None:
    schemas = SPEC["components"]["schemas"]
    for batch, record, id_key, keys, most in (
        (
            "OfflineBatch",
            "OfflineRecord",
            "terminal_id",
            transit.RECORD_KEYS,
            transit.OFFLINE_BATCH_RECORDS_MAX,
        ),
        ("RideBatch", "RideRecord", "gate_id", ridecode.RIDE_RECORD_KEYS, ridecode.RIDE_BATCH_RECORDS_MAX),
    ):
        assert (
            schemas[batch]["additionalProperties"] is False
            and schemas[record]["additionalProperties"] is False
        )
        assert (
            schemas[batch]["required"]
            == list(schemas[batch]["properties"])
            == [id_key, "batch_id", "records"]
        )
        assert schemas[record]["required"] == list(schemas[record]["properties"]) == list(keys)
        assert (
            schemas[batch]["properties"]["records"]["minItems"],
            schemas[batch]["properties"]["records"]["maxItems"],
        ) == (1, most)
    assert DECODED[("post", "/v1/transit/offline-batches")][0] == "OfflineBatch"
    assert DECODED[("post", "/v1/transit/ride-batches")][0] == "RideBatch"


@pytest.mark.parametrize("name", list(UPLOADS))
def test_the_upload_schemas_accept_what_the_encoders_make(name: str) -> None:
    decode, body, extremes, _, _ = UPLOADS[name]
    for valid in [body(), *extremes()]:
        assert decoder_accepts(decode, valid)
        validate(valid, f"/components/schemas/{name}")


@pytest.mark.parametrize("name", list(UPLOADS))
def test_the_upload_schemas_refuse_what_the_decoders_refuse(name: str) -> None:
    decode, body, _, refused, only_decoder = UPLOADS[name]
    for what, mutate in refused:
        b = body()
        mutate(b)
        assert not decoder_accepts(decode, b), what
        assert not schema_accepts(b, name), f"the schema accepts a body the decoder refuses: {what}"
    for what, mutate in only_decoder:
        b = body()
        mutate(b)
        assert not decoder_accepts(decode, b), what
        assert schema_accepts(b, name), f"{what}: the schema refuses it now; move it to the refused cases"


def _ints(lo: int, hi: int) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from([lo, hi, lo - 1, hi + 1, (lo + hi) // 2]),
        st.integers(min_value=lo - 3, max_value=hi + 3),
        st.sampled_from([True, None, "1", [1]]),
    )


# Any text but a line break: the validator library's `$` (Python's) also matches before a final "\n",
# where the ECMA regex the JSON Schema pattern means does not.
_TEXT = st.text(st.characters(blacklist_characters="\n", max_codepoint=0x7FF), max_size=34)


def _strs(*examples: str) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(examples), st.sampled_from(examples), _TEXT, st.sampled_from([7, None, True])
    )


_PLACES = _strs("", "L1", "bus-105", "l1-daping", "S" * 16, "S" * 17, "a b", "站")
_DIRECTIONS = _strs("single", "in", "out", "IN", "")
_TERMINALS = _strs("T-1", "T" * 32, "T" * 33, "T.1_x-", "T 1")
OFFLINE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "terminal_id": _TERMINALS,
    **{k: _ints(*lim) for k, lim in OFFLINE_INTS.items()},
    "card_sn": _strs(CARD_SN, CARD_SN.lower(), CARD_SN[:-1], CARD_SN + "0", CARD_SN.replace("D1", "E1")),
    "txn_type": st.one_of(st.sampled_from([6, 9, 0, 7, 255, 256]), _ints(0, 9)),
    "line_id": _PLACES,
    "station_id": _PLACES,
    "direction": _DIRECTIONS,
    "tac": _strs("0a1B2c3D", "0a1b2c3", "0a1b2c3d4", "0a1b2c3g"),
}
RIDE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "code_text": st.one_of(
        st.sampled_from(ride_codes()),
        st.sampled_from(ride_codes()).map(lambda c: c[:-1]),
        st.sampled_from(ride_codes()).map(str.lower),
        _strs("RC1", "EC1AAAA"),
    ),
    "gate_id": _TERMINALS,
    **{k: _ints(*lim) for k, lim in RIDE_INTS.items()},
    "line_id": _PLACES,
    "station_id": _PLACES,
    "direction": _DIRECTIONS,
}
ONE_RECORD = {
    "OfflineBatch": ("terminal_id", transit.batch_from_dict, offline_body, offline_extremes, OFFLINE_FIELDS),
    "RideBatch": ("gate_id", ridecode.ride_batch_from_dict, ride_body, ride_extremes, RIDE_FIELDS),
}


@functools.cache
def valid_records(name: str) -> list[dict[str, Any]]:
    """The records of a valid upload and of the two one-record extremes."""
    _, _, body, extremes, _ = ONE_RECORD[name]
    return [r for b in (body(), *extremes()[:2]) for r in b["records"]]


@pytest.mark.parametrize("name", list(ONE_RECORD))
@hypothesis.settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_one_record_uploads_are_refused_by_the_schema_exactly_when_the_decoder_refuses_them(
    name: str, data: st.DataObject
) -> None:
    """A valid record with one to three fields replaced (by valid or invalid values), sometimes an unknown
    key or a missing one, alone in its batch (nothing to compare between records): schema and decoder agree."""
    id_key, decode, _, _, fields = ONE_RECORD[name]
    record = dict(data.draw(st.sampled_from(valid_records(name)), label="base"))
    for key in data.draw(st.sets(st.sampled_from(sorted(fields)), min_size=1, max_size=3), label="replaced"):
        record[key] = data.draw(fields[key], label=key)
    keys = data.draw(st.sampled_from(["as is", "as is", "as is", "unknown key", "missing key"]), label="keys")
    if keys == "unknown key":
        record["extra"] = 1
    elif keys == "missing key":
        record.pop(data.draw(st.sampled_from(sorted(record)), label="dropped"))
    batch_id = data.draw(st.one_of(st.just(1), _ints(1, transit.BATCH_ID_MAX)), label="batch_id")
    batch = {id_key: record.get(id_key, "T-1"), "batch_id": batch_id, "records": [record]}
    assert schema_accepts(batch, name) == decoder_accepts(decode, batch), batch


def test_every_answer_reason_and_verdict_is_documented() -> None:
    """The reasons the tap engine, the credential checks, the ride uploads and the offline judge can
    answer are exactly the documented ones (TapAnswerFields, OfflineRecordResult)."""
    schemas = SPEC["components"]["schemas"]

    def found(pattern: str, *modules: Any) -> set[str]:
        return {
            m for mod in modules for m in re.findall(pattern, Path(mod.__file__).read_text(encoding="utf-8"))
        }

    tap_reasons = found(r'declined="([a-z_]+)"', flow, taps, rides) | found(r'_decline\("([a-z_]+)"', taps)
    tap_reasons |= found(r'TapOutcome\("conflict", "([a-z_]+)"', taps) | found(
        r'reason = "([a-z_]+)" if', taps
    )
    tap_reasons |= set(flow._GATE_DECLINES.values()) | {rides.DECLINE_RIDE_TIME}
    assert {"tap_time_out_of_window", "insufficient_balance", "idempotency_conflict"} <= tap_reasons
    assert set(schemas["TapAnswerFields"]["properties"]["reason"]["enum"]) == tap_reasons | {None}

    verdicts = schemas["OfflineRecordResult"]["properties"]
    assert verdicts["result"]["enum"] == [r.value for r in transit.RecordResult]
    reasons = set(offline.REASONS.values()) | {offline.REASON_LATE_FILL, offline.REASON_TERMINAL_SEQ_REUSED}
    reasons |= found(r'RecordResult\.MALFORMED, "([a-z_]+)"', offline) | found(r'None, "([a-z_]+)"', offline)
    assert {"txn_time_in_future", "unknown_line", "unknown_station"} <= reasons
    assert set(verdicts["reason"]["enum"]) == reasons


def test_error_model_matches_the_stable_codes() -> None:
    problem = SPEC["components"]["schemas"]["Problem"]
    assert sorted(problem["properties"]["code"]["enum"]) == sorted(api.ERRORS)
    listed = set(SPEC["x-cardsvc-auth-errors"]) | set(SPEC["x-cardsvc-server-errors"])
    listed |= set(SPEC["x-cardsvc-router-errors"])
    for (method, path), op in spec_operations().items():
        specific = op["x-cardsvc-errors"]
        listed |= set(specific)
        signed = op.get("security") != []
        codes = set(specific) | set(SPEC["x-cardsvc-server-errors"])
        if signed:
            codes |= set(SPEC["x-cardsvc-auth-errors"])
        assert codes <= set(api.ERRORS), (method, path, codes - set(api.ERRORS))
        for code in specific:  # the description a reader sees names them too
            assert f"`{code}`" in op["description"], (method, path, code)
        # Every documented error status has a response, and every error response is some code's status.
        statuses = {str(api.ERRORS[c][0]) for c in codes}
        assert {s for s in op["responses"] if s >= "400"} == statuses, (method, path)
    assert listed == set(api.ERRORS)


def test_terminal_kinds_and_operations_match_the_registry() -> None:
    assert {k: set(v) for k, v in SPEC["x-cardsvc-terminal-kinds"].items()} == {
        k: set(v) for k, v in terminals.KINDS.items()
    }
    for op in spec_operations().values():
        names = [op["x-cardsvc-operation"]] if "x-cardsvc-operation" in op else []
        names += list(op.get("x-cardsvc-operation-by-op", {}).values())
        assert set(names) <= set(terminals.OPERATIONS)


def test_operation_names_are_the_handlers_operations(keys: KeyRing, settings: Settings) -> None:
    ops = spec_operations()
    for key, handler in app_handlers(offline_app(keys, settings)).items():
        assert key in ops, f"{key} is served but not described in protocols/openapi.yaml"
        op = ops[key]
        spec_attr = getattr(handler, "cardsvc_operation", None)
        if spec_attr is None:
            assert op["security"] == [] and "x-cardsvc-operation" not in op, key
            continue
        assert "security" not in op, key  # the document's default: all five signing headers
        if isinstance(spec_attr, str):
            assert op["x-cardsvc-operation"] == spec_attr, key
            assert "x-cardsvc-operation-by-op" not in op, key
            continue
        by_op = op["x-cardsvc-operation-by-op"]
        assert list(by_op) == list(api.CARD_OPERATIONS), key
        for name, expected in by_op.items():
            request = make_mocked_request("POST", f"/v1/cards/A00000001/{name}", match_info={"op": name})
            assert spec_attr(request) == expected, (key, name)
        assert op["x-cardsvc-operation"] == by_op["activate"], key


def test_the_api_guide_lists_every_code_endpoint_and_terminal_right() -> None:
    """docs/api.md, the newcomer's guide, keeps up with the stable codes, the paths and KINDS."""
    guide = (Path(__file__).parents[2] / "docs" / "api.md").read_text(encoding="utf-8")
    codes = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", guide, re.M))
    assert codes == {code: str(status) for code, (status, _) in api.ERRORS.items()}
    for method, path in spec_operations():
        assert f"{method.upper()} {path}" in guide, (method, path)
    rights = {
        op: {k.strip() for k in kinds.split(",")}
        for op, kinds in re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \| [^|]+ \| ([a-z_, ]+?) \|$", guide, re.M)
    }
    rights["ecard.verify"] = rights["card.authenticate"]  # written as "same as card.authenticate"
    used = set()
    for op in spec_operations().values():
        used |= {op["x-cardsvc-operation"]} if "x-cardsvc-operation" in op else set()
        used |= set(op.get("x-cardsvc-operation-by-op", {}).values())
    assert set(rights) == used, set(rights) ^ used
    for name, kinds in rights.items():
        assert kinds == {k for k, ops in terminals.KINDS.items() if name in ops}, name


# ------------------------------------------------------------------ (d) the live app against the spec

_PARAM = re.compile(r"\\\{[^}]+\\\}")


def match_template(method: str, path: str) -> str | None:
    """The spec path template a concrete path falls under (literal segments win over parameters)."""
    path = path.partition("?")[0]
    candidates = []
    for template, item in SPEC["paths"].items():
        if method.lower() in item and re.fullmatch(_PARAM.sub("[^/]+", re.escape(template)), path):
            candidates.append((template.count("{"), template))
    return min(candidates)[1] if candidates else None


def request_schema_pointer(template: str, path: str, method: str = "post") -> str:
    if template == CARD_OP_PATH:
        op = path.partition("?")[0].rsplit("/", 1)[1]
        return f"/components/schemas/{SPEC['paths'][template]['post']['x-cardsvc-body-by-op'][op]}"
    return f"/paths/{escape(template)}/{method.lower()}/requestBody/content/application~1json/schema"


def allowed_codes(op: dict[str, Any]) -> set[str]:
    codes = set(op["x-cardsvc-errors"]) | set(SPEC["x-cardsvc-server-errors"])
    if op.get("security") != []:
        codes |= set(SPEC["x-cardsvc-auth-errors"])
    return codes


@dataclasses.dataclass
class SpecClient:
    """Calls the live app and checks every answer against the spec; records what it has covered."""

    svc: ServiceHarness
    succeeded: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    failed: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    codes: set[str] = dataclasses.field(default_factory=set)

    async def ok(self, method: str, path: str, body: Any = None, status: int = 200, **kw: Any) -> Response:
        """A request the spec says is valid, answered `status`."""
        template = match_template(method, path)
        assert template is not None, path
        if body is not None and "requestBody" in SPEC["paths"][template][method.lower()]:
            validate(body, request_schema_pointer(template, path, method))
            validate(body, f"/paths/{escape(template)}/{method.lower()}/requestBody/content/application~1json/schema")
        return await self.call(method, path, body, status, None, **kw)

    async def err(self, method: str, path: str, body: Any = None, *, code: str, **kw: Any) -> Response:
        return await self.call(method, path, body, api.ERRORS[code][0], code, **kw)

    async def call(
        self, method: str, path: str, body: Any, status: int, code: str | None, **kw: Any
    ) -> Response:
        r = await self.svc.request(method, path, body, **kw)
        assert r.status == status, (method, path, r.status, r.body)
        self.check(method, path, r)
        if code is not None:
            assert r.body["code"] == code, (method, path, r.body)
        return r

    def check(self, method: str, path: str, r: Response) -> None:
        rid = r.headers.get("X-Request-Id", "")
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", rid), r.headers
        ctype = r.headers.get("Content-Type", "").partition(";")[0].strip()
        template = match_template(method, path)
        if template is None:  # not an operation of the document: the router answers
            assert r.status in (404, 405) and ctype == "application/problem+json", (method, path, r.status)
            validate(r.body, "/components/schemas/Problem")
            assert r.body["code"] in SPEC["x-cardsvc-router-errors"], r.body
            self.check_problem(r)
            return
        op = SPEC["paths"][template][method.lower()]
        assert str(r.status) in op["responses"], (method, path, r.status, r.body)
        response, pointer = deref(
            op["responses"][str(r.status)], f"/paths/{escape(template)}/{method.lower()}/responses/{r.status}"
        )
        assert ctype in response["content"], (method, path, r.status, ctype)
        if ctype == "text/plain":
            assert isinstance(r.body, str) and r.body.strip()
        else:
            validate(r.body, f"{pointer}/content/{escape(ctype)}/schema")
        (self.failed if r.status >= 400 else self.succeeded).add((method.lower(), template))
        if ctype == "application/problem+json":
            self.check_problem(r)
            assert r.body["code"] in allowed_codes(op), (method, template, r.body)

    def check_problem(self, r: Response) -> None:
        code = r.body["code"]
        assert (r.body["status"], r.body["title"]) == api.ERRORS[code] == (r.status, r.body["title"]), r.body
        assert r.body["type"] == f"https://cardsvc.example/problems/{code}"
        assert r.body["request_id"] == r.headers["X-Request-Id"]
        self.codes.add(code)


def local_year() -> int:
    """The fare table's local year now."""
    return fares.local_day(TABLE, int(time.time())).year


def future(days: int = 3650) -> str:
    return (dt.date.today() + dt.timedelta(days=days)).isoformat()


def concrete(template: str) -> str:
    """A path for a template, naming things that do not exist."""
    return (
        template.replace("{card_no}", "ZZZZZZZZ9")
        .replace("{ecard_id}", "2147483647")
        .replace("{op}", "activate")
        .replace("{operator_id}", "nobody")
        .replace("{date}", "2000-01-01")
        .replace("{holder_id}", "999999999")
    )


def tap_fields() -> set[str]:
    """Every field TapResult and RideResult document (but gate_seq)."""
    return set(SPEC["components"]["schemas"]["TapAnswerFields"]["properties"]) | {"result"}


async def test_every_endpoint_answers_what_the_spec_says(svc: ServiceHarness, tmp_path: Path) -> None:
    c = SpecClient(svc)

    # ---- operations (unsigned); the router's own answers
    await c.ok("GET", "/healthz", sign=False)
    assert (await c.ok("GET", "/readyz", sign=False)).body["terminals"] == len(terminals.KINDS)
    assert "cardsvc_" in (await c.ok("GET", "/metrics", sign=False)).body
    for path in ("/healthz", "/readyz", "/metrics"):
        await c.err("POST", path, {}, code="method_not_allowed", sign=False)
    await c.err("GET", "/v1/nothing-here", code="not_found")
    await c.err("GET", "/v1/card-auth", code="method_not_allowed")

    # ---- cardholders
    id_number = new_id_number()
    holder = (
        await c.ok("POST", "/v1/holders", {"id_number": id_number, "name": "李四", "operator": "s-1"}, 201)
    ).body
    assert holder["name_masked"] == "李*" and id_number not in str(holder)
    dup = await c.err("POST", "/v1/holders", {"id_number": id_number, "name": "李四"}, code="holder_exists")
    assert dup.body["holder_id"] == holder["holder_id"] and dup.body["field"] == "id_number"
    await c.err("POST", "/v1/holders", {"id_number": "123", "name": "李四"}, code="invalid_field")
    await c.err("POST", "/v1/holders", {"id_number": id_number, "name": "x", "age": 3}, code="unknown_field")
    await c.err("POST", "/v1/holders", raw=b"{", code="bad_json")
    await c.err(
        "POST", "/v1/holders", raw=b"{}", headers={"Content-Type": "text/plain"}, code="bad_content_type"
    )

    looked = (await c.ok("POST", "/v1/holders/lookup", {"id_number": id_number})).body
    assert looked == holder | {"cards": []}
    await c.err("POST", "/v1/holders/lookup", {"id_number": new_id_number()}, code="not_found")
    await c.err("POST", "/v1/holders/lookup", {}, code="missing_field")

    # ---- cards
    card_no, card_sn = new_card_numbers()
    issue = {
        "holder_id": holder["holder_id"],
        "card_no": card_no,
        "card_sn": card_sn,
        "expires_on": future(),
        "generation": 3,
        "bank_code": "ICBC",
        "has_purse": True,
        "operator": "s-1",
    }
    issued = (await c.ok("POST", "/v1/cards", issue, 201)).body
    assert issued["status"] == "issued" and issued["usable"] is False and issued["ecard"] is None
    await c.err("POST", "/v1/cards", issue | {"holder_id": await svc.new_holder()}, code="card_exists")
    no2, sn2 = new_card_numbers()
    await c.err("POST", "/v1/cards", issue | {"card_no": no2, "card_sn": sn2}, code="holder_has_live_card")
    await c.err(
        "POST", "/v1/cards", issue | {"holder_id": 2**40, "card_no": no2, "card_sn": sn2}, code="not_found"
    )
    await c.err("POST", "/v1/cards", issue | {"expires_on": "2001-01-01"}, code="invalid_field")
    looked = (await c.ok("POST", "/v1/holders/lookup", {"id_number": id_number})).body
    assert [x["card_no"] for x in looked["cards"]] == [card_no]

    await c.ok("GET", f"/v1/cards/{card_no}")
    assert (await c.ok("GET", f"/v1/cards/{card_no.lower()}")).body["card_no"] == card_no
    await c.err("GET", "/v1/cards/short", code="invalid_parameter")
    await c.err("GET", "/v1/cards/ZZZZZZZZ9", code="not_found")

    # every lifecycle operation; the card's answer is checked against the spec each time
    base = f"/v1/cards/{card_no}"
    assert (await c.ok("POST", f"{base}/activate", {"operator": "s-1"})).body["status"] == "active"
    again = await c.err("POST", f"{base}/activate", {}, code="illegal_transition")
    assert again.body["card_status"] == "active"
    for op in ("lock-pin", "unlock-pin", "lock-app", "unlock-app"):
        await c.ok("POST", f"{base}/{op}", {})
    lost = (await c.ok("POST", f"{base}/temporary-loss", {}, as_="ecard_channel")).body
    assert lost["status"] == "temporary_loss" and lost["temp_loss_until"] is not None
    await c.ok("POST", f"{base}/lift-loss")  # no body at all is the same as {}
    await c.ok("POST", f"{base}/formal-loss", {})
    await c.err("POST", f"{base}/replace", {}, code="missing_field")
    await c.err("POST", f"{base}/activate", {"new_card_no": "A00000001"}, code="unknown_field")
    await c.err("POST", f"{base}/explode", {}, code="not_found")
    await c.err("POST", "/v1/cards/short/activate", {}, code="invalid_parameter")
    taken = await svc.new_card()
    replace = {"new_card_no": taken["card_no"], "new_card_sn": new_card_numbers()[1], "expires_on": future()}
    await c.err("POST", f"{base}/replace", replace, code="card_exists")
    new_no, new_sn = new_card_numbers()
    replace = {"new_card_no": new_no, "new_card_sn": new_sn, "expires_on": future(), "operator": "s-1"}
    replaced = (await c.ok("POST", f"{base}/replace", replace)).body
    assert replaced["card_no"] == new_no and replaced["status"] == "active"
    assert (await c.ok("GET", base)).body["status"] == "replaced"
    assert (await c.ok("POST", f"/v1/cards/{new_no}/cancel", {})).body["status"] == "cancelled"

    events = (await c.ok("GET", f"{base}/events?limit=500")).body["events"]
    ops = [e["op"] for e in events]
    assert ops[:2] == ["issue", "activate"] and ops[-1] == "replace", ops
    assert [e["op"] for e in (await c.ok("GET", f"/v1/cards/{new_no}/events")).body["events"]] == [
        "issue-replacement",
        "cancel",
    ]
    await c.err("GET", f"{base}/events?limit=0", code="invalid_parameter")
    await c.err("GET", f"{base}/events?limit=%C2%B2", code="invalid_parameter")  # a Unicode digit
    await c.err("GET", "/v1/cards/ZZZZZZZZ9/events", code="not_found")

    # ---- electronic cards
    active = await svc.new_card()
    device = ecard.EcardDevice.generate(1, sm.ALG_SM2_SM3)
    body = {
        "card_no": active["card_no"],
        "channel": "gov_app",
        "alg": sm.ALG_SM2_SM3,
        "device_public_key": device.public_key_bytes.hex(),
        "operator": "s-1",
    }
    e = (await c.ok("POST", "/v1/ecards", body, 201, as_="ecard_channel")).body
    assert e["status"] == "active" and e["usable"] is True and e["card"]["card_no"] == active["card_no"]
    await c.err("POST", "/v1/ecards", body, code="ecard_exists", as_="ecard_channel")
    await c.err("POST", "/v1/ecards", body | {"alg": 2}, code="invalid_field", as_="ecard_channel")
    not_active = await svc.new_card(activate=False)
    await c.err(
        "POST",
        "/v1/ecards",
        body | {"card_no": not_active["card_no"]},
        code="card_not_active",
        as_="ecard_channel",
    )
    await c.err("POST", "/v1/ecards", body | {"card_no": "ZZZZZZZZ9"}, code="not_found", as_="ecard_channel")
    assert (await c.ok("GET", f"/v1/cards/{active['card_no']}")).body["ecard"]["ecard_id"] == e["ecard_id"]

    await c.ok("GET", f"/v1/ecards/{e['ecard_id']}", as_="ops")
    await c.err("GET", "/v1/ecards/0", code="invalid_parameter", as_="ops")
    await c.err("GET", "/v1/ecards/%C2%B2", code="invalid_parameter", as_="ops")  # a Unicode digit
    await c.err("GET", "/v1/ecards/2147483647", code="not_found", as_="ops")

    # ---- acceptance: electronic card codes
    phone = ecard.EcardDevice(sm.ALG_SM2_SM3, device.private_key, e["ecard_id"])
    code = phone.next_code(int(time.time()))
    verify = {"code": code, "business_type": "02"}
    verified = (await c.ok("POST", "/v1/ecard-codes/verify", verify, as_="merchant_pos")).body
    assert verified["ecard_id"] == e["ecard_id"] and verified["card"]["card_no"] == active["card_no"]
    await c.err("POST", "/v1/ecard-codes/verify", verify, code="credential_replayed", as_="merchant_pos")
    await c.err(
        "POST",
        "/v1/ecard-codes/verify",
        verify | {"code": "EC1AAAA"},
        code="credential_malformed",
        as_="merchant_pos",
    )
    await c.err(
        "POST",
        "/v1/ecard-codes/verify",
        verify | {"business_type": "09"},
        code="invalid_field",
        as_="merchant_pos",
    )
    old = phone.next_code(int(time.time()) - 3600)
    await c.err(
        "POST",
        "/v1/ecard-codes/verify",
        verify | {"code": old},
        code="credential_expired",
        as_="merchant_pos",
    )

    # ---- acceptance: physical cards
    await c.ok("POST", "/v1/card-auth", svc.card_auth_body(active["card_sn"]), as_="transit_validator")
    replay = svc.card_auth_body(active["card_sn"])
    await c.ok("POST", "/v1/card-auth", replay, as_="hospital_his")
    await c.err("POST", "/v1/card-auth", replay, code="credential_replayed", as_="hospital_his")
    forged = svc.card_auth_body(active["card_sn"])
    forged["cryptogram"] = ("0" if forged["cryptogram"][0] != "0" else "1") + forged["cryptogram"][1:]
    await c.err("POST", "/v1/card-auth", forged, code="credential_forged", as_="transit_validator")
    await c.err(
        "POST",
        "/v1/card-auth",
        svc.card_auth_body(new_card_numbers()[1]),
        code="unknown_card",
        as_="transit_validator",
    )
    stale = svc.card_auth_body(active["card_sn"], now_s=int(time.time()) - 3600)
    await c.err("POST", "/v1/card-auth", stale, code="credential_expired", as_="transit_validator")
    await c.ok("POST", f"/v1/cards/{active['card_no']}/temporary-loss", {})
    unusable = await c.err(
        "POST",
        "/v1/card-auth",
        svc.card_auth_body(active["card_sn"]),
        code="card_unusable",
        as_="transit_validator",
    )
    assert unusable.body["card_status"] == "temporary_loss"
    await c.ok("POST", f"/v1/cards/{active['card_no']}/lift-loss", {})

    # ---- revocation
    revoke = f"/v1/ecards/{e['ecard_id']}/revoke"
    revoked = (await c.ok("POST", revoke, {"operator": "s-1"}, as_="ecard_channel")).body
    assert revoked["status"] == "revoked" and revoked["usable"] is False and revoked["revoked_at"]
    await c.err("POST", revoke, {}, code="ecard_revoked", as_="ecard_channel")
    await c.err("POST", "/v1/ecards/2147483647/revoke", {}, code="not_found", as_="ecard_channel")
    after = await c.err(
        "POST",
        "/v1/ecard-codes/verify",
        {"code": phone.next_code(int(time.time())), "business_type": "01"},
        code="card_unusable",
        as_="merchant_pos",
    )
    assert after.body["card_status"] == "revoked"

    # ---- hotlist: the changes this test made, in a block whose digest verifies
    block = (await c.ok("GET", "/v1/hotlist?since=0&limit=10000", as_="transit_validator")).body
    decoded = hotlist.decode_block(block)
    assert card_sn in {x.card_sn for x in decoded.entries} and decoded.more is False
    first = (await c.ok("GET", "/v1/hotlist?limit=1", as_="transit_validator")).body
    assert first["more"] is True and len(first["entries"]) == 1
    too_new = f"/v1/hotlist?since={block['latest_version'] + 1}"
    await c.err("GET", too_new, code="invalid_parameter", as_="transit_validator")
    await c.err("GET", "/v1/hotlist?limit=0", code="invalid_parameter", as_="transit_validator")
    await c.err("GET", "/v1/hotlist?since=-1", code="invalid_parameter", as_="transit_validator")

    # ---- transit: purses, top-ups, taps, ride-code certificates
    pc = await svc.new_card(has_purse=True)
    purse = f"/v1/purses/{pc['card_no']}"
    assert (await c.ok("GET", purse, as_="bank_channel")).body["balance_fen"] == 0
    await c.err("GET", f"/v1/purses/{active['card_no']}", code="no_transit_purse", as_="bank_channel")
    await c.err("GET", "/v1/purses/ZZZZZZZZ9", code="not_found", as_="bank_channel")
    await c.err("GET", "/v1/purses/short", code="invalid_parameter", as_="bank_channel")
    top = {"terminal_seq": 1, "amount_fen": 2000, "channel": "cash", "operator": "s-1"}
    topped = (await c.ok("POST", f"{purse}/top-ups", top, as_="bank_channel")).body
    assert topped["balance_fen"] == 2000 and topped["replayed_answer"] is False
    retried = (await c.ok("POST", f"{purse}/top-ups", top, as_="bank_channel")).body
    assert retried == topped | {"replayed_answer": True}
    await c.err(
        "POST", f"{purse}/top-ups", top | {"amount_fen": 1}, code="idempotency_conflict", as_="bank_channel"
    )
    refund = {"terminal_seq": 2, "amount_fen": 5000, "channel": "refund"}
    await c.err("POST", f"{purse}/top-ups", refund, code="invalid_field", as_="bank_channel")
    cap = {"terminal_seq": 3, "amount_fen": svc.settings.purse_balance_max_fen, "channel": "bank"}
    await c.err("POST", f"{purse}/top-ups", cap, code="purse_balance_cap", as_="bank_channel")
    no_purse = f"/v1/purses/{active['card_no']}/top-ups"
    await c.err("POST", no_purse, top | {"terminal_seq": 4}, code="no_transit_purse", as_="bank_channel")

    # ---- concessions (card office; read by ops)
    young = await svc.new_holder(dt.date(dt.date.today().year - 30, 1, 1))
    elder = await svc.new_holder(dt.date(dt.date.today().year - 70, 1, 1))
    cy, ce = f"/v1/holders/{young}/concession", f"/v1/holders/{elder}/concession"
    await c.err("PUT", cy, {"kind": "elderly"}, code="concession_not_eligible")
    await c.err("PUT", "/v1/holders/999999999/concession", {"kind": "elderly"}, code="not_found")
    await c.err("PUT", "/v1/holders/x/concession", {"kind": "elderly"}, code="invalid_parameter")
    await c.err("GET", ce, code="not_found", as_="ops")
    granted = (await c.ok("PUT", ce, {"kind": "elderly", "operator": "s-1"})).body
    assert granted["elderly_rides_left"] == TABLE.rules.elderly_annual_quota
    # Each request reads the service's clock: the year shown is the next one only if local New Year passed.
    shown = (await c.ok("GET", ce, as_="ops")).body
    assert shown == granted or (shown == granted | {"year": granted["year"] + 1} and shown["year"] == local_year()), (
        granted, shown
    )
    more = (await c.ok("POST", f"{ce}/extra-quota", {"operator": "s-1"})).body
    assert more["elderly_rides_left"] == TABLE.rules.elderly_annual_quota + TABLE.rules.elderly_extra_quota
    # Asked again the same year: refused. (A second grant is made only if local New Year passed since the
    # first, for the new year, as its answer says: then asked again in that year.)
    again = await svc.request("POST", f"{ce}/extra-quota", {})
    if again.status == 200:
        c.check("POST", f"{ce}/extra-quota", again)
        assert again.body["year"] == more["year"] + 1 == local_year(), (more, again.body)
        again = await svc.request("POST", f"{ce}/extra-quota", {})
    assert again.status == 409, again.body
    c.check("POST", f"{ce}/extra-quota", again)
    assert again.body["code"] == "extra_quota_granted", again.body
    assert (await c.ok("PUT", cy, {"kind": "disabled_half"})).body["elderly_rides_left"] is None
    await c.err("POST", f"{cy}/extra-quota", {}, code="no_elderly_concession")
    assert (await c.ok("POST", f"{cy}/end", {"operator": "s-1"})).body["kind"] == "disabled_half"
    await c.err("POST", f"{cy}/end", {}, code="not_found")

    def tap(seq: int, card: dict[str, Any] = pc, **kw: Any) -> dict[str, Any]:
        return {
            "terminal_seq": seq,
            "time": int(time.time()),
            "mode": "bus",
            "line_id": "bus-105",
            "direction": "single",
            "credential": "card",
            **svc.card_auth_body(card["card_sn"]),
        } | kw

    def metro(station: str, direction: str) -> dict[str, Any]:
        return {
            "mode": "metro",
            "line_id": TABLE.stations[station].line,
            "station_id": station,
            "direction": direction,
        }

    fields_seen: set[str] = set()  # every field of a tap answer (online or uploaded ride) seen below

    first_tap = tap(1)
    paid = (await c.ok("POST", "/v1/transit/taps", first_tap, as_="transit_validator")).body
    fields_seen |= set(paid)
    assert paid["result"] == "approved" and paid["balance_fen"] == 2000 - paid["fare_fen"], paid
    again_tap = (await c.ok("POST", "/v1/transit/taps", first_tap, as_="transit_validator")).body
    assert again_tap["replayed_answer"] is True and again_tap["txn_id"] == paid["txn_id"]
    reused = first_tap | {"terminal_seq": 2}
    declined = (await c.ok("POST", "/v1/transit/taps", reused, as_="transit_validator")).body
    assert declined["result"] == "declined" and declined["reason"] == "credential_replayed", declined
    await c.err("POST", "/v1/transit/taps", tap(1), code="idempotency_conflict", as_="transit_validator")
    await c.err(
        "POST", "/v1/transit/taps", tap(3, line_id="nowhere"), code="invalid_field", as_="transit_validator"
    )
    no_sn = {k: v for k, v in tap(4).items() if k != "card_sn"}
    await c.err("POST", "/v1/transit/taps", no_sn, code="missing_field", as_="transit_validator")
    # A tap stamped outside the clock window is a declined answer, stored like any other.
    late_tap = tap(5, time=int(time.time()) - 3600)
    late = (await c.ok("POST", "/v1/transit/taps", late_tap, as_="transit_validator")).body
    assert (late["result"], late["reason"], late["fare_fen"]) == ("declined", "tap_time_out_of_window", 0), (
        late
    )
    late_again = (await c.ok("POST", "/v1/transit/taps", late_tap, as_="transit_validator")).body
    assert late_again == late | {"replayed_answer": True}
    # A short balance: the answer says what could not be paid.
    poor = await svc.new_card(has_purse=True)
    top = {"terminal_seq": 10, "amount_fen": 100, "channel": "cash"}
    await c.ok("POST", f"/v1/purses/{poor['card_no']}/top-ups", top, as_="bank_channel")
    short = (await c.ok("POST", "/v1/transit/taps", tap(6, poor), as_="transit_validator")).body
    assert (short["result"], short["reason"], short["balance_fen"]) == (
        "declined",
        "insufficient_balance",
        100,
    )
    assert short["fare_due_fen"] > 100, short
    await c.ok("POST", f"/v1/cards/{poor['card_no']}/temporary-loss", {})
    lost = (await c.ok("POST", "/v1/transit/taps", tap(7, poor), as_="transit_validator")).body
    assert (lost["reason"], lost["card_status"]) == ("card_unusable", "temporary_loss"), lost
    fields_seen |= set(late) | set(short) | set(lost)
    # A journey: bus, then metro in and out (transfer discount, distance), then two entries (penalty).
    rider = await svc.new_card(has_purse=True)
    top = {"terminal_seq": 11, "amount_fen": 5000, "channel": "cash"}
    await c.ok("POST", f"/v1/purses/{rider['card_no']}/top-ups", top, as_="bank_channel")
    now = int(time.time())
    journey = [
        tap(20, rider, time=now - 200),
        tap(21, rider, time=now - 100, **metro("l1-chaotianmen", "in")),
        tap(22, rider, time=now - 50, **metro("l1-shapingba", "out")),
        tap(23, rider, time=now - 40, **metro("l1-shapingba", "in")),
        tap(24, rider, time=now - 30, **metro("l2-daping", "in")),
    ]
    for body in journey:
        answer = (await c.ok("POST", "/v1/transit/taps", body, as_="transit_validator")).body
        assert answer["result"] == "approved", answer
        fields_seen |= set(answer)

    phone_device = ecard.EcardDevice.generate(1, sm.ALG_ED25519)
    phone_key = phone_device.public_key_bytes.hex()
    cert_body = {"card_no": pc["card_no"], "alg": sm.ALG_ED25519, "user_public_key": phone_key}
    cert = (await c.ok("POST", "/v1/ride-certs", cert_body, 201, as_="ecard_channel")).body
    assert cert["valid_to"] > time.time()
    no_purse_cert = cert_body | {"card_no": active["card_no"]}
    await c.err("POST", "/v1/ride-certs", no_purse_cert, code="no_transit_purse", as_="ecard_channel")
    await c.err(
        "POST", "/v1/ride-certs", cert_body | {"card_no": "ZZZZZZZZ9"}, code="not_found", as_="ecard_channel"
    )
    await c.err(
        "POST",
        "/v1/ride-certs",
        cert_body | {"card_no": not_active["card_no"]},
        code="card_not_active",
        as_="ecard_channel",
    )

    # ---- uploads: ride-code rides, offline purse records; clearing
    validator = svc.terminals["transit_validator"].terminal_id
    office = svc.terminals["card_office"].terminal_id
    ride_phone = ridecode.RidePhone(
        ridecode.decode_cert(bytes.fromhex(cert["cert"])), phone_device.private_key
    )
    at = int(time.time()) - 30

    def ride(seq: int, **kw: Any) -> ridecode.RideRecord:
        place = {"gate_id": validator, "line_id": "bus-105", "station_id": "", "direction": "single"} | kw
        return ridecode.RideRecord(
            ride_phone.next_code(at), gate_seq=seq, time=at, deny_list_version=0, **place
        )

    rides_body = ridecode.ride_batch_to_dict(
        ridecode.RideBatch(
            validator, 1, [ride(2001), ride(2002, line_id="L1", station_id="nowhere", direction="in")]
        )
    )
    answers = (await c.ok("POST", "/v1/transit/ride-batches", rides_body, as_="transit_validator")).body
    assert answers["gate_id"] == validator and [a["gate_seq"] for a in answers["records"]] == [2001, 2002]
    charged, unpriced = answers["records"]
    assert charged["result"] == "approved" and charged["operator"] == "cq-bus", charged
    assert (unpriced["result"], unpriced["reason"]) == ("declined", "fare_input_invalid") and unpriced[
        "detail"
    ]
    other = ridecode.ride_batch_to_dict(ridecode.RideBatch(validator, 2, [ride(2001)]))
    [clash] = (await c.ok("POST", "/v1/transit/ride-batches", other, as_="transit_validator")).body["records"]
    assert (clash["result"], clash["reason"]) == ("conflict", "idempotency_conflict"), clash
    fields_seen |= (set(charged) | set(unpriced) | set(clash)) - {"gate_seq"}
    # A ride-code exit uploaded without its entry is held; a ride in order 5 hours on charges it the maximum
    # fare (held_exits_charged); its entry, uploaded at last, gives that back (refund).
    late_phone = await backdated_phone(svc, rider["card_no"], at - 6 * 3600)

    def late_ride(seq: int, t: int, **place: Any) -> ridecode.RideRecord:
        return ridecode.RideRecord(
            late_phone.next_code(t), gate_seq=seq, time=t, deny_list_version=0, gate_id=validator, **place
        )

    exit_at = at - 5 * 3600
    held = ridecode.RideBatch(
        validator, 4, [late_ride(2101, exit_at, line_id="L1", station_id="l1-daping", direction="out"),
                       late_ride(2102, at, line_id="bus-105", station_id="", direction="single")],
    )  # fmt: skip
    exit_, bus = (await c.ok("POST", "/v1/transit/ride-batches", ridecode.ride_batch_to_dict(held),
                             as_="transit_validator")).body["records"]  # fmt: skip
    assert exit_["rules"][0] == "exit_held" and bus["held_exits_charged"][0]["amount_fen"] == 700, (exit_, bus)
    entry = ridecode.RideBatch(
        validator, 5, [late_ride(2103, exit_at - 600, line_id="L1", station_id="l1-chaotianmen", direction="in")]
    )
    [given] = (await c.ok("POST", "/v1/transit/ride-batches", ridecode.ride_batch_to_dict(entry),
                          as_="transit_validator")).body["records"]  # fmt: skip
    assert given["refund"]["amount_fen"] == 700 and given["fare_fen"] < 700, given
    fields_seen |= (set(bus) | set(given)) - {"gate_seq"}
    r = await c.err(
        "POST",
        "/v1/transit/ride-batches",
        rides_body | {"records": []},
        code="invalid_field",
        as_="transit_validator",
    )
    assert r.body["field"] == "records"
    theirs = ridecode.ride_batch_to_dict(ridecode.RideBatch(office, 3, [ride(1, gate_id=office)]))
    r = await c.err(
        "POST", "/v1/transit/ride-batches", theirs, code="forbidden_operation", as_="transit_validator"
    )
    assert r.body["field"] == "gate_id"
    assert fields_seen == tap_fields(), fields_seen ^ tap_fields()  # every documented field is answered

    # ---- fare corrections (card office): part of the first tap's fare given back
    fix = f"{purse}/fare-corrections"
    assert paid["fare_fen"] > 1
    corr = {"terminal_seq": 20, "txn_id": paid["txn_id"], "amount_fen": 1, "reason": "fare_error", "operator": "s-1"}
    before = (await c.ok("GET", purse)).body["balance_fen"]
    given = (await c.ok("POST", fix, corr)).body
    assert given["corrects_txn_id"] == paid["txn_id"] and given["replayed_answer"] is False
    assert given["balance_fen"] == before + 1
    assert (await c.ok("POST", fix, corr)).body == given | {"replayed_answer": True}
    await c.err("POST", fix, corr | {"amount_fen": 2}, code="idempotency_conflict")
    over = await c.err("POST", fix, corr | {"terminal_seq": 21, "amount_fen": paid["fare_fen"]},
                       code="correction_exceeds_fare")  # fmt: skip
    assert (over.body["fare_fen"], over.body["given_back_fen"], over.body["left_fen"]) == (
        paid["fare_fen"], 1, paid["fare_fen"] - 1,
    )  # fmt: skip
    await c.err("POST", fix, corr | {"terminal_seq": 22, "txn_id": topped["txn_id"]}, code="fare_not_correctable")
    await c.err("POST", fix, corr | {"terminal_seq": 23, "txn_id": 2**62}, code="not_found")
    # ---- an elderly quota ride given back (card office): the ride is marked in the purse's history
    senior_holder = await svc.new_holder(dt.date(dt.date.today().year - 70, 1, 1))
    senior = await svc.new_card(has_purse=True, holder_id=senior_holder)
    senior_purse = f"/v1/purses/{senior['card_no']}"
    senior_top = {"terminal_seq": 40, "amount_fen": 500, "channel": "cash", "operator": "s-1"}
    await c.ok("POST", f"{senior_purse}/top-ups", senior_top)
    await c.ok("PUT", f"/v1/holders/{senior_holder}/concession", {"kind": "elderly", "operator": "s-1"})
    free = (await c.ok("POST", "/v1/transit/taps", tap(901, senior), as_="transit_validator")).body
    assert free["fare_fen"] == 0 and "elderly_free" in free["rules"], free
    marked = (await c.ok("GET", senior_purse)).body["history"]
    assert [h.get("quota_ride") for h in marked if h["txn_id"] == free["txn_id"]] == [True], marked
    ret = {"terminal_seq": 41, "txn_id": free["txn_id"], "reason": "terminal_fault", "operator": "s-1"}
    back = (await c.ok("POST", f"{senior_purse}/quota-ride-returns", ret)).body
    assert back["corrects_txn_id"] == free["txn_id"] and back["replayed_answer"] is False, back
    assert (await c.ok("POST", f"{senior_purse}/quota-ride-returns", ret)).body == back | {"replayed_answer": True}
    await c.err("POST", f"{senior_purse}/quota-ride-returns", ret | {"reason": "goodwill"}, code="idempotency_conflict")
    await c.err("POST", f"{senior_purse}/quota-ride-returns", ret | {"terminal_seq": 42}, code="quota_ride_returned")
    await c.err("POST", f"{purse}/quota-ride-returns", ret | {"terminal_seq": 43, "txn_id": paid["txn_id"]},
                code="no_quota_ride")  # fmt: skip
    await c.err("POST", f"{purse}/quota-ride-returns", ret | {"terminal_seq": 44}, code="not_found")
    free = (await c.ok("POST", "/v1/transit/taps", tap(902, senior), as_="transit_validator")).body
    conn = await asyncpg.connect(svc.dsn)
    try:  # local New Year as the holder's next ride would start it: the ride's year's quota is closed
        await conn.execute("UPDATE concession SET quota_year = quota_year + 1 WHERE holder_id = $1", senior_holder)
    finally:
        await conn.close()
    await c.err("POST", f"{senior_purse}/quota-ride-returns", ret | {"terminal_seq": 45, "txn_id": free["txn_id"]},
                code="quota_year_ended")  # fmt: skip

    page = (await c.ok("GET", f"{purse}?limit=2")).body  # the correction is the newest row: kind 8
    assert [h["kind"] for h in page["history"]][:1] == [8] and page["next_before"] is not None
    older = (await c.ok("GET", f"{purse}?limit=2&before={page['next_before']}")).body
    assert older["history"] and older["history"][0]["txn_id"] not in {h["txn_id"] for h in page["history"]}
    await c.err("GET", f"{purse}?before=yesterday", code="invalid_parameter")
    await c.err("GET", f"{purse}?limit=201", code="invalid_parameter")

    # A funded card whose chip debits offline: one record two days ago (to clear), one now.
    oc = await svc.new_card(has_purse=True)
    top = {"terminal_seq": 12, "amount_fen": 1000, "channel": "cash", "operator": "s-1"}
    await c.ok("POST", f"/v1/purses/{oc['card_no']}/top-ups", top)
    chip = transit.PurseCard(oc["card_sn"], master_key=svc.keys.card_tac_master, balance_fen=1000)
    stranger = transit.PurseCard(new_card_numbers()[1], master_key=svc.keys.card_tac_master, balance_fen=500)
    two_days_ago = int(time.time()) - 2 * 86400
    bus: dict[str, Any] = {"line_id": "bus-105", "station_id": "", "direction": "single"}
    records = [
        chip.debit(180, validator, 3001, two_days_ago, **bus),
        chip.debit(180, validator, 3002, int(time.time()) - 60, **bus),
        stranger.debit(180, validator, 3003, int(time.time()) - 60, **bus),
    ]
    upload = transit.batch_to_dict(transit.OfflineBatch(validator, 1, records))
    verdicts = (await c.ok("POST", "/v1/transit/offline-batches", upload, as_="transit_validator")).body
    assert verdicts["terminal_id"] == validator and verdicts["batch_id"] == 1
    assert [
        (v["terminal_seq"], v["result"], v["reason"], v["replayed_answer"]) for v in verdicts["records"]
    ] == [
        (3001, "accepted", None, False),
        (3002, "accepted", None, False),
        (3003, "card_unknown", "card_not_known", False),
    ]
    again = (await c.ok("POST", "/v1/transit/offline-batches", upload, as_="transit_validator")).body
    assert again["records"] == [v | {"replayed_answer": True} for v in verdicts["records"]]
    assert (await c.ok("GET", f"/v1/purses/{oc['card_no']}", as_="ops")).body["balance_fen"] == 1000 - 360
    r = await c.err(
        "POST",
        "/v1/transit/offline-batches",
        upload | {"extra": 1},
        code="invalid_field",
        as_="transit_validator",
    )
    assert r.body["field"] == "extra"
    crowd = upload | {"records": upload["records"] * 167}  # 501
    r = await c.err(
        "POST", "/v1/transit/offline-batches", crowd, code="invalid_field", as_="transit_validator"
    )
    assert r.body["field"] == "records"
    theirs = {
        "terminal_id": office,
        "batch_id": 2,
        "records": [x | {"terminal_id": office} for x in upload["records"]],
    }
    r = await c.err(
        "POST", "/v1/transit/offline-batches", theirs, code="forbidden_operation", as_="transit_validator"
    )
    assert r.body["field"] == "terminal_id"

    # Both records arrived today: today's clearing pays them (the first under its ride time two days ago).
    # Today is the day of their upload as the database wrote it: local midnight may have passed since.
    conn = await asyncpg.connect(svc.dsn)
    try:
        posted = await conn.fetchval(
            "SELECT max(posted_at) FROM txn_journal WHERE terminal_id = $1 AND terminal_seq = 3001", validator
        )
        day = fares.local_day(TABLE, int(posted.timestamp()))
        cleared = await clearing.clear_day(conn, TABLE, day, tmp_path, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    finally:
        await conn.close()
    bus_day = next(x for x in cleared if x.operator_id == "cq-bus")
    assert bus_day.path is not None
    _, lines = clearing.read_back(bus_day.path)
    assert [(ln.txn_time, ln.amount_fen) for ln in lines if ln.txn_time == two_days_ago] == [(two_days_ago, 180)]
    report = (await c.ok("GET", f"/v1/clearing/cq-bus/{day.isoformat()}", as_="ops")).body
    assert report == {
        "operator_id": "cq-bus",
        "business_date": day.isoformat(),
        "txn_count": bus_day.txn_count,
        "total_fen": bus_day.total_fen,
        "correction_count": bus_day.correction_count,  # the fare corrected above, if written the same day
        "correction_fen": bus_day.correction_fen,
        "net_fen": bus_day.total_fen - bus_day.correction_fen,
        "digest": bus_day.digest,
        "created_at": report["created_at"],
        "file": clearing.clearing_file_name("cq-bus", day),
    }
    await c.err("GET", f"/v1/clearing/cq-bus/{day - dt.timedelta(days=1)}", code="not_found", as_="ops")
    await c.err("GET", "/v1/clearing/cq-bus/2026-13-01", code="invalid_parameter", as_="ops")
    await c.err("GET", f"/v1/clearing/cq%20bus/{day}", code="invalid_parameter", as_="ops")

    # ---- the signature: every signed operation refuses an unsigned call, and the other auth problems
    for (method, template), op in spec_operations().items():
        if op.get("security") != []:
            await c.err(
                method.upper(),
                concrete(template),
                {} if method == "post" else None,
                code="auth_missing",
                sign=False,
            )
    await c.err("GET", "/v1/hotlist", code="auth_expired", as_="ops", now_s=int(time.time()) - 3600)
    await c.err("GET", "/v1/hotlist", code="auth_malformed", as_="ops", nonce="short")
    await c.err(
        "GET", "/v1/hotlist", code="auth_bad_signature", as_="ops", headers={"X-Cardsvc-Signature": "0" * 64}
    )
    await c.err(
        "GET",
        "/v1/hotlist",
        code="auth_unknown_terminal",
        as_="ops",
        headers={"X-Cardsvc-Terminal": "nobody"},
    )
    nonce = "once-only-nonce-0001"
    await c.ok("GET", "/v1/hotlist", as_="ops", nonce=nonce)
    await c.err("GET", "/v1/hotlist", code="auth_replayed", as_="ops", nonce=nonce)
    await c.err("POST", "/v1/holders", raw=b" " * (svc.settings.body_bytes_max + 1), code="body_too_large")

    everything = set(spec_operations())
    unsigned = {k for k, op in spec_operations().items() if op.get("security") == []}
    assert c.succeeded == everything
    assert c.failed == everything - unsigned
    # Every stable code this test can provoke without breaking the service was seen and matched the spec.
    assert set(api.ERRORS) - c.codes == {"internal", "timeout", "overloaded", "db_unavailable"}


async def test_missing_and_unknown_fields_follow_the_documented_bodies(svc: ServiceHarness) -> None:
    """The server parses exactly the body the spec documents: it asks for the first required field and
    refuses a field the schema does not have (for every card operation too). An upload's decoder answers
    both with `invalid_field` naming the key, as the operation's description says."""
    c = SpecClient(svc)
    paths = [(m, concrete(t)) for (m, t), op in spec_operations().items() if "requestBody" in op]
    paths += [("post", f"/v1/cards/ZZZZZZZZ9/{name}") for name in api.CARD_OPERATIONS]
    for method, path in paths:
        template = match_template(method, path)
        assert template is not None
        if (method, template) in DECODED:
            name, decode = DECODED[(method, template)]
            schema = schema_at(f"/components/schemas/{name}")
            for body, field in (({}, "records"), ({"not_a_field": 1}, "not_a_field")):
                assert not schema_accepts(body, name)
                with pytest.raises(CodecError) as refused:
                    decode(body)
                assert refused.value.field == field
                r = await c.err("POST", path, body, code="invalid_field")
                assert r.body["field"] == field, (path, r.body)
            assert "records" in schema["required"]
            continue
        pointer = request_schema_pointer(template, path, method)
        schema, _ = deref(schema_at(pointer), pointer)
        if schema["required"]:
            r = await c.err(method.upper(), path, {}, code="missing_field")
            assert r.body["field"] == schema["required"][0], (path, r.body)
        else:  # an empty body is complete: the thing named in the path does not exist
            await c.err(method.upper(), path, {}, code="not_found")
        r = await c.err(method.upper(), path, {"not_a_field": 1}, code="unknown_field")
        assert r.body["field"] == "not_a_field"


async def test_each_operation_needs_exactly_the_terminal_operation_it_names(svc: ServiceHarness) -> None:
    """A terminal given only the named operation gets past the check; one given every other does not."""
    every = set(terminals.OPERATIONS)
    conn = await asyncpg.connect(svc.dsn)
    try:
        for name in sorted(every):
            await svc.add_terminal(conn, f"only-{name}", "card_office", [name])
            await svc.add_terminal(conn, f"not-{name}", "card_office", sorted(every - {name}))
        await svc.app[SERVICES].terminals.load(conn)  # not waiting for the change notification
    finally:
        await conn.close()
    c = SpecClient(svc)
    calls: list[tuple[str, str, str]] = []
    for (method, template), op in spec_operations().items():
        if op.get("security") == []:
            continue
        if template == CARD_OP_PATH:
            for op_name, needed in op["x-cardsvc-operation-by-op"].items():
                calls.append((method, f"/v1/cards/ZZZZZZZZ9/{op_name}", needed))
        else:
            calls.append((method, concrete(template), op["x-cardsvc-operation"]))
    for method, path, needed in calls:
        body = {} if method == "post" else None
        r = await c.call(method.upper(), path, body, 403, "forbidden_operation", as_=f"not-{needed}")
        r = await svc.request(method.upper(), path, body, as_=f"only-{needed}")
        c.check(method.upper(), path, r)
        assert r.status not in (401, 403), (path, needed, r.body)
