"""An e-card code as the phone shows it: a real QR image (segno, error correction M, alphanumeric mode),
saved as PNG, loaded and decoded the way a scanner does (zxing-cpp)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import segno
import zxingcpp
from PIL import Image, ImageDraw

from protocols import ecard, sm
from protocols.errors import CodecError

SCALE = 6
BORDER = 4
ALGS = [pytest.param(sm.ALG_SM2_SM3, id="sm2"), pytest.param(sm.ALG_ED25519, id="ed25519")]


def make_qr(code: str) -> segno.QRCode:
    qr = segno.make_qr(code, error="m", mode="alphanumeric", boost_error=False)
    assert qr.error == "M" and qr.mode == "alphanumeric"
    return qr


def scan(img: Image.Image) -> list[str]:
    return [r.text for r in zxingcpp.read_barcodes(img) if r.format == zxingcpp.BarcodeFormat.QRCode]


def accepted_code(text: str, device: ecard.EcardDevice) -> bool:
    try:
        decoded = ecard.decode_code(text)
    except CodecError:
        return False
    return decoded.ecard_id == device.ecard_id and ecard.verify_code(decoded, device.public_key_bytes)


def render(matrix: list[list[int]]) -> Image.Image:
    n = len(matrix)
    size = (n + 2 * BORDER) * SCALE
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    for y, row in enumerate(matrix):
        for x, dark in enumerate(row):
            if dark:
                x0, y0 = (x + BORDER) * SCALE, (y + BORDER) * SCALE
                draw.rectangle((x0, y0, x0 + SCALE - 1, y0 + SCALE - 1), fill=0)
    return img


def in_finder(x: int, y: int, n: int) -> bool:
    near = 9
    return (x < near and y < near) or (x >= n - near and y < near) or (x < near and y >= n - near)


@pytest.mark.parametrize("alg", ALGS)
def test_code_survives_a_round_trip_through_a_qr_image(tmp_path: Path, alg: int) -> None:
    device = ecard.EcardDevice.generate(123456, alg)
    code = device.next_code(int(time.time()))
    assert set(code) <= set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:")
    qr = make_qr(code)
    path = tmp_path / "code.png"
    qr.save(path, kind="png", scale=SCALE, border=BORDER)

    with Image.open(path) as img:
        texts = scan(img.convert("L"))
    assert texts == [code]
    decoded = ecard.decode_code(texts[0])
    assert (decoded.ecard_id, decoded.counter, decoded.alg) == (123456, 1, alg)
    assert ecard.verify_code(decoded, device.public_key_bytes)
    assert ecard.encode_code(decoded) == code


def test_light_damage_is_corrected(tmp_path: Path) -> None:
    device = ecard.EcardDevice.generate(7, sm.ALG_SM2_SM3)
    code = device.next_code(int(time.time()))
    qr = make_qr(code)
    matrix = [list(row) for row in qr.matrix]
    n = len(matrix)
    rng = random.Random(5)
    cells = [(x, y) for y in range(n) for x in range(n) if not in_finder(x, y, n)]
    for x, y in rng.sample(cells, 12):
        matrix[y][x] ^= 1
    path = tmp_path / "light.png"
    render(matrix).save(path)
    with Image.open(path) as img:
        texts = scan(img)
    assert texts == [code]
    assert accepted_code(texts[0], device)


def test_damage_beyond_error_correction_never_yields_another_valid_code(tmp_path: Path) -> None:
    device = ecard.EcardDevice.generate(42, sm.ALG_ED25519)
    code = device.next_code(int(time.time()))
    qr = make_qr(code)
    base = [list(row) for row in qr.matrix]
    n = len(base)
    cells = [(x, y) for y in range(n) for x in range(n) if not in_finder(x, y, n)]
    unreadable = 0
    trials = 0
    for seed in range(12):
        rng = random.Random(seed)
        matrix = [row[:] for row in base]
        if seed % 2:
            # A blot over a large part of the symbol's centre (a scratch, a finger, a glare).
            size = n // 2 + seed % 5
            x0 = y0 = (n - size) // 2
            for y in range(y0, y0 + size):
                for x in range(x0, x0 + size):
                    matrix[y][x] = seed % 4 == 1
        else:
            # Scattered damage over a quarter or more of the modules (dirt, a cracked screen).
            for x, y in rng.sample(cells, len(cells) // 4 + seed * 10):
                matrix[y][x] ^= 1
        path = tmp_path / f"damaged-{seed}.png"
        render(matrix).save(path)
        with Image.open(path) as img:
            texts = scan(img)
        trials += 1
        if not texts:
            unreadable += 1
        for text in texts:
            # Either the scanner recovered the genuine code, or whatever it read is refused.
            assert text == code or not accepted_code(text, device), text
    # The damage really is beyond what error correction level M can repair.
    assert unreadable >= trials // 2, (unreadable, trials)
