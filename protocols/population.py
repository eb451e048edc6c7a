"""A deterministic synthetic population: cardholder i's identity, card and e-card from (seed, i).

The demo data, the seeder and the load generators all derive the same people from an index, so a load
test can present valid credentials for any of 40 million cards without reading the database. Every
value is synthetic (valid formats and check characters, no real person).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib

from . import idnumber, sm

__all__ = [
    "DISABLED_FREE",
    "DISABLED_HALF",
    "DISABLED_PER_65536",
    "ECARD_KEY_POOL_DEFAULT",
    "ELDERLY",
    "ELDERLY_MIN_AGE",
    "ELDERLY_REGISTERED_PER_256",
    "POPULATION_MAX",
    "Person",
    "birth_date",
    "concession",
    "concession_kind",
    "ecard_device_seed",
    "ecard_pool_seed",
    "person",
]

# 11 Chongqing district codes x 30,000 birth dates x 1,000 sequence numbers.
_AREAS = (
    "500101",
    "500102",
    "500103",
    "500104",
    "500105",
    "500106",
    "500107",
    "500108",
    "500109",
    "500112",
    "500113",
)
_DAYS = 30_000
_BIRTH_START = dt.date(1940, 1, 1)
POPULATION_MAX = len(_AREAS) * _DAYS * 1000
CARD_AREA = "500100"  # issuing area of the city's cards
# `cardsvc seed` gives e-card i the device key (i mod pool) of a pool of precomputed keys: deriving an
# SM2 public key costs ~0.3 ms, too slow for 32 million e-cards (docs/schema.md).
ECARD_KEY_POOL_DEFAULT = 4096

# Transit concessions `cardsvc seed` registers (docs/transit.md "Concessions"). Birth dates are spread
# evenly over 1940-2022, so ~27 % of the people are 65 or older in 2026 (Chongqing's census: ~17 %).
ELDERLY, DISABLED_FREE, DISABLED_HALF = "elderly", "disabled_free", "disabled_half"
ELDERLY_MIN_AGE = 65  # the fare table's elderly_min_age by default
ELDERLY_REGISTERED_PER_256 = 205  # ~80 % of those old enough have registered with the card office
DISABLED_PER_65536 = 1_704  # ~2.6 % hold a disability certificate (China: ~37 of 1,410 million)

_SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈"
)
_GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉兰萍红建文辉力永健世广志义兴良海山仁波宁贵福生龙元全国胜学祥才发"
_B36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclasses.dataclass(frozen=True, slots=True)
class Person:
    index: int
    id_number: str
    name: str
    card_no: str
    card_sn: str
    has_ecard: bool
    ecard_seed: bytes  # 32 bytes: the e-card device's private key seed
    ecard_alg: int


def _b36(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 36)
        out.append(_B36[r])
    assert n == 0, "index too large"
    return "".join(reversed(out))


def person(i: int, seed: bytes = b"cardsvc-demo", ecard_alg: int = sm.ALG_SM2_SM3) -> Person:
    """Cardholder number i (0 <= i < POPULATION_MAX)."""
    assert 0 <= i < POPULATION_MAX
    area = _AREAS[i % len(_AREAS)]
    birth = birth_date(i)
    seq = i // (len(_AREAS) * _DAYS)
    digest = hashlib.new("sm3", seed + i.to_bytes(8, "big")).digest()
    name = _SURNAMES[digest[0] % len(_SURNAMES)] + _GIVEN[digest[1] % len(_GIVEN)]
    if digest[2] % 2:
        name += _GIVEN[digest[3] % len(_GIVEN)]
    return Person(
        index=i,
        id_number=idnumber.make_id_number(area, birth, seq),
        name=name,
        card_no="A" + _b36(i, 8),
        card_sn=f"{CARD_AREA}D156000005{i:08X}{digest[4:8].hex().upper()}",
        has_ecard=i % 5 != 0,
        ecard_seed=hashlib.new("sm3", b"ecard" + seed + i.to_bytes(8, "big")).digest(),
        ecard_alg=ecard_alg,
    )


def birth_date(i: int) -> dt.date:
    """Cardholder i's birth date (the one in their ID number)."""
    return _BIRTH_START + dt.timedelta(days=(i // len(_AREAS)) % _DAYS)


def concession_kind(digest: bytes, aged: bool) -> str | None:
    """The concession of the person whose SM3 digest (as in person()) is `digest`; `aged`: 65 or older
    on the day it is registered. A disability comes first (its fare is never above the elderly one)."""
    if (digest[8] << 8 | digest[9]) < DISABLED_PER_65536:
        return DISABLED_FREE if digest[10] & 1 else DISABLED_HALF
    if aged and digest[11] < ELDERLY_REGISTERED_PER_256:
        return ELDERLY
    return None


def concession(
    i: int, on: dt.date, seed: bytes = b"cardsvc-demo", elderly_min_age: int = ELDERLY_MIN_AGE
) -> str | None:
    """The concession `cardsvc seed` registers for cardholder i when it seeds on the local date `on`
    (None: pays the card fare)."""
    assert 0 <= i < POPULATION_MAX
    digest = hashlib.new("sm3", seed + i.to_bytes(8, "big")).digest()
    return concession_kind(digest, idnumber.age_on(birth_date(i), on) >= elderly_min_age)


def ecard_pool_seed(j: int, seed: bytes = b"cardsvc-demo") -> bytes:
    """Private key seed (32 bytes) of device key j of a seeded database's e-card key pool."""
    assert j >= 0
    return hashlib.new("sm3", b"ecard-pool" + seed + j.to_bytes(8, "big")).digest()


def ecard_device_seed(i: int, seed: bytes = b"cardsvc-demo", pool: int = ECARD_KEY_POOL_DEFAULT) -> bytes:
    """Device key seed of cardholder i's e-card in a database made by `cardsvc seed --ecard-key-pool
    pool` (e-card id i + 1): key (i mod pool) of the pool. `cardsvc demo-data` gives every e-card its own
    key instead (Person.ecard_seed)."""
    assert 0 <= i < POPULATION_MAX and pool >= 1
    return ecard_pool_seed(i % pool, seed)
