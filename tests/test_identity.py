"""Ed25519 key pairs and peer IDs against py-libp2p vectors and the peer-ids spec."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msgnet.errors import SecurityError, UsageError
from msgnet.identity import (
    KeyPair,
    PeerID,
    decode_public_key_protobuf,
    encode_public_key_protobuf,
    verify_signature,
)

# Examples from libp2p/specs peer-ids/peer-ids.md.
SPEC_ED25519_ID = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
SPEC_SHA256_ID = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
SPEC_CID_ID = "bafzbeie5745rpv2m6tjyuugywy4d5ewrqgqqhfnf445he3omzpjbx5xqxe"


@pytest.fixture(scope="module")
def vectors(shared_dir: Path) -> list[dict[str, Any]]:
    data = json.loads((shared_dir / "vectors" / "peerid_vectors.json").read_text())
    assert data["vectors"], "peerid_vectors.json holds no vectors"
    return data["vectors"]


# --- vectors ---------------------------------------------------------------


def test_vectors_keys_and_protobufs(vectors: list[dict[str, Any]]) -> None:
    for v in vectors:
        kp = KeyPair.from_seed(bytes.fromhex(v["private_key_seed_hex"]))
        assert kp.private_seed.hex() == v["private_key_seed_hex"], v["name"]
        assert kp.public_key_bytes.hex() == v["public_key_hex"], v["name"]
        assert kp.to_protobuf().hex() == v["private_key_protobuf_hex"], v["name"]
        pub_proto = encode_public_key_protobuf(kp.public_key_bytes)
        assert pub_proto.hex() == v["public_key_protobuf_hex"], v["name"]
        assert decode_public_key_protobuf(pub_proto) == kp.public_key_bytes, v["name"]
        back = KeyPair.from_protobuf(bytes.fromhex(v["private_key_protobuf_hex"]))
        assert back.private_seed == kp.private_seed, v["name"]


def test_vectors_peer_id_forms(vectors: list[dict[str, Any]]) -> None:
    for v in vectors:
        kp = KeyPair.from_seed(bytes.fromhex(v["private_key_seed_hex"]))
        pid = kp.peer_id
        assert pid.to_bytes().hex() == v["peer_id_multihash_hex"], v["name"]
        assert pid.to_base58() == str(pid) == v["peer_id_base58"], v["name"]
        assert pid.to_cid_string() == v["peer_id_cidv1_base32_handcomputed"], v["name"]
        assert pid == PeerID.from_public_key(bytes.fromhex(v["public_key_hex"])), v["name"]
        assert pid == PeerID(bytes.fromhex(v["peer_id_multihash_hex"])), v["name"]
        assert PeerID.from_string(v["peer_id_base58"]) == pid, v["name"]
        assert PeerID.from_string(v["peer_id_cidv1_base32_handcomputed"]) == pid, v["name"]
        assert pid.extract_public_key() == kp.public_key_bytes, v["name"]
        assert pid.matches_public_key(kp.public_key_bytes), v["name"]


def test_vectors_signatures(vectors: list[dict[str, Any]]) -> None:
    for v in vectors:
        kp = KeyPair.from_seed(bytes.fromhex(v["private_key_seed_hex"]))
        msg = v["sign_message_utf8"].encode()
        sig = bytes.fromhex(v["signature_hex"])
        assert kp.sign(msg) == sig, v["name"]  # Ed25519 is deterministic
        assert verify_signature(kp.public_key_bytes, msg, sig), v["name"]
        assert not verify_signature(kp.public_key_bytes, msg + b"!", sig), v["name"]
        tampered = bytes([sig[0] ^ 1]) + sig[1:]
        assert not verify_signature(kp.public_key_bytes, msg, tampered), v["name"]


# --- signatures and keys ---------------------------------------------------


@pytest.mark.parametrize(
    ("key", "sig"),
    [
        (b"\x00" * 31, b"\x00" * 64),
        (b"\x00" * 33, b"\x00" * 64),
        (None, b""),
        (None, b"\x00" * 63),
        (None, b"\x00" * 65),
        (None, b"\xff" * 64),
    ],
)
def test_verify_signature_returns_false_on_malformed_input(key: bytes | None, sig: bytes) -> None:
    kp = KeyPair.generate()
    assert verify_signature(key if key is not None else kp.public_key_bytes, b"m", sig) is False


def test_generate_gives_distinct_working_keys() -> None:
    a, b = KeyPair.generate(), KeyPair.generate()
    assert a.peer_id != b.peer_id
    assert len(a.public_key_bytes) == 32 and len(a.private_seed) == 32
    assert verify_signature(a.public_key_bytes, b"x", a.sign(b"x"))
    assert not verify_signature(b.public_key_bytes, b"x", a.sign(b"x"))
    assert a.private_seed.hex() not in repr(a)


@pytest.mark.parametrize("seed", [b"", b"\x00" * 31, b"\x00" * 33])
def test_from_seed_rejects_wrong_length(seed: bytes) -> None:
    with pytest.raises(UsageError, match="32 bytes"):
        KeyPair.from_seed(seed)


def test_public_key_protobuf_encode_rejects_wrong_length() -> None:
    with pytest.raises(UsageError, match="32 bytes"):
        encode_public_key_protobuf(b"\x01" * 31)


_PUB = bytes(range(32))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "type field"),
        (b"\x10\x01\x12\x20" + _PUB, "type field"),
        (b"\x08\x00\x12\x20" + _PUB, "key type 0"),  # RSA
        (b"\x08\x02\x12\x21" + b"\x02" + _PUB, "key type 2"),  # secp256k1
        (b"\x08\x01\x12\x1f" + _PUB[:31], "32-byte data field"),
        (b"\x08\x01\x1a\x20" + _PUB, "32-byte data field"),
        (b"\x08\x01\x12\x20" + _PUB[:31], "36 bytes"),
        (b"\x08\x01\x12\x20" + _PUB + b"\x00", "36 bytes"),
    ],
)
def test_public_key_protobuf_decode_is_strict(data: bytes, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        decode_public_key_protobuf(data)


def test_private_key_protobuf_accepts_go_libp2p_64_byte_form() -> None:
    kp = KeyPair.generate()
    go_form = b"\x08\x01\x12\x40" + kp.private_seed + kp.public_key_bytes
    assert KeyPair.from_protobuf(go_form).peer_id == kp.peer_id
    wrong_pub = KeyPair.generate().public_key_bytes
    with pytest.raises(UsageError, match="does not match"):
        KeyPair.from_protobuf(b"\x08\x01\x12\x40" + kp.private_seed + wrong_pub)


# --- key files -------------------------------------------------------------


def test_save_load_round_trip_with_mode_0600(tmp_path: Path) -> None:
    kp = KeyPair.generate()
    path = tmp_path / "node.key"
    old_umask = os.umask(0)  # prove the mode does not depend on the umask
    try:
        kp.save(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == kp.to_protobuf()
    loaded = KeyPair.load(path)
    assert loaded.private_seed == kp.private_seed
    assert loaded.peer_id == kp.peer_id
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]  # no temp file left


def test_save_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first, second = KeyPair.generate(), KeyPair.generate()
    first.save(str(path))
    second.save(str(path))
    assert KeyPair.load(str(path)).peer_id == second.peer_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


_SEED = bytes(range(32))


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x08\x01\x12\x20" + _SEED[:31],  # truncated
        b"\x08\x01\x12\x20" + _SEED + b"\n",  # trailing byte
        b"\x08\x02\x12\x20" + _SEED,  # secp256k1 key type
        b"\x08\x01\x12\x21" + _SEED + b"\x00",  # 33-byte data
        b"\x08\x01\x12\x40" + _SEED + b"\x00" * 32,  # 64-byte form, wrong public half
        _SEED.hex().encode(),  # hex text instead of protobuf
        b"\x00" * 10_000,  # far too large
    ],
)
def test_load_rejects_corrupt_key_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(UsageError, match="bad.key"):
        KeyPair.load(path)


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX-only")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o700 | 0o007])
def test_load_rejects_key_file_readable_by_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "open.key"
    KeyPair.generate().save(path)
    path.chmod(mode)
    with pytest.raises(SecurityError, match="chmod 600"):
        KeyPair.load(path)


def test_load_missing_file_raises_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        KeyPair.load(tmp_path / "absent.key")


# --- spec examples ---------------------------------------------------------


def test_spec_ed25519_peer_id() -> None:
    pid = PeerID.from_string(SPEC_ED25519_ID)
    key = pid.extract_public_key()
    assert key is not None and len(key) == 32
    assert pid == PeerID.from_public_key(key)
    assert pid.matches_public_key(key)
    assert str(pid) == SPEC_ED25519_ID
    assert PeerID.from_string(pid.to_cid_string()) == pid


def test_spec_sha256_peer_id_has_no_public_key() -> None:
    pid = PeerID.from_string(SPEC_SHA256_ID)
    assert pid.to_bytes()[:2] == b"\x12\x20"
    assert pid.extract_public_key() is None
    assert str(pid) == SPEC_SHA256_ID


def test_spec_cidv1_equals_base58_form() -> None:
    from_cid = PeerID.from_string(SPEC_CID_ID)
    assert from_cid == PeerID.from_string(SPEC_SHA256_ID)
    assert from_cid.to_cid_string() == SPEC_CID_ID
    assert str(from_cid) == SPEC_SHA256_ID


def test_cidv1_base58_multibase_accepted() -> None:
    pid = PeerID.from_string(SPEC_ED25519_ID)
    z_text = "z" + _b58(b"\x01\x72" + pid.to_bytes())
    assert PeerID.from_string(z_text) == pid


def _b58(data: bytes) -> str:
    """Independent base58btc encoder for building test inputs."""
    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    n, out = int.from_bytes(data, "big"), ""
    while n:
        n, r = divmod(n, 58)
        out = alphabet[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


def test_sha256_peer_id_matches_public_key() -> None:
    kp = KeyPair.generate()
    proto = encode_public_key_protobuf(kp.public_key_bytes)
    legacy = PeerID(b"\x12\x20" + hashlib.sha256(proto).digest())
    assert legacy.matches_public_key(kp.public_key_bytes)
    assert not legacy.matches_public_key(KeyPair.generate().public_key_bytes)
    assert legacy != kp.peer_id


# --- invalid input ---------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1",
        "Qm",
        "Qm0000",  # '0' is not in the base58 alphabet
        SPEC_ED25519_ID[:-1],  # truncated key
        SPEC_ED25519_ID + "1",  # trailing byte
        SPEC_SHA256_ID[:-1],
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N ",
        SPEC_CID_ID.upper(),  # 'B' multibase prefix is not supported
        "b" + SPEC_CID_ID[1:].upper(),  # base32 must be lowercase
        SPEC_CID_ID[:-1] + "f",  # non-zero trailing bits: non-canonical
        SPEC_CID_ID[:-1],  # truncated
        "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi",  # dag-pb CID, not libp2p-key
        "f01720024080112200000",  # hex multibase
        "uAXIAJAgBEiA",  # base64url multibase
        "peer",
        "Qm" + "z" * 10_000,  # too long
    ],
)
def test_from_string_rejects_bad_text(text: str) -> None:
    with pytest.raises(UsageError, match="peer ID"):
        PeerID.from_string(text)


def test_from_string_rejects_non_str() -> None:
    with pytest.raises(UsageError, match="must be str"):
        PeerID.from_string(SPEC_SHA256_ID.encode())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mh", "match"),
    [
        (b"", "truncated"),
        (b"\x00", "truncated"),
        (b"\x00\x24" + b"\x08\x01\x12\x20" + _PUB[:31], "declares 36"),
        (b"\x00\x25" + b"\x08\x02\x12\x21\x02" + _PUB, "key type 2"),  # inline secp256k1
        (b"\x12\x20" + b"\x00" * 31, "exactly 32"),
        (b"\x12\x1f" + b"\x00" * 31, "exactly 32"),
        (b"\x12\x20" + b"\x00" * 33, "exactly 32"),
        (b"\x13\x40" + b"\x00" * 64, "unsupported multihash code 0x13"),
    ],
)
def test_peer_id_rejects_bad_multihash(mh: bytes, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        PeerID(mh)


def test_peer_id_rejects_non_bytes() -> None:
    with pytest.raises(UsageError, match="multihash bytes"):
        PeerID(SPEC_SHA256_ID)  # type: ignore[arg-type]


# --- PeerID object behaviour -----------------------------------------------


def test_peer_id_value_semantics() -> None:
    a = PeerID.from_string(SPEC_ED25519_ID)
    b = PeerID.from_string(SPEC_SHA256_ID)
    assert a == PeerID(a.to_bytes()) and hash(a) == hash(PeerID(a.to_bytes()))
    assert len({a, b, PeerID(bytes(a.to_bytes()))}) == 2
    assert (a < b) == (a.to_bytes() < b.to_bytes())
    assert sorted([b, a]) == sorted([a, b])
    assert a != a.to_bytes() and a.to_bytes() != a  # never equal to plain bytes, either side
    assert not a == bytearray(a.to_bytes()) and type(a.to_bytes()) is bytes
    assert hash(a) == hash(a.to_bytes())  # bytes' own hash: computed in C
    assert repr(a) == f"PeerID('{SPEC_ED25519_ID}')"
    with pytest.raises(AttributeError):
        a._mh = b""  # type: ignore[misc]
    with pytest.raises(AttributeError):
        a.extra = 1  # type: ignore[attr-defined]
    assert not hasattr(a, "__dict__")
    assert pickle.loads(pickle.dumps(a)) == a
    assert copy.deepcopy(a) == a


def test_peer_ids_of_the_same_bytes_are_one_object() -> None:
    """Interned (bounded): dicts of peers then find them by identity, not by a Python
    __eq__, whichever part of the stack (handshake, DHT replies) made them."""
    from msgnet import identity

    a = PeerID.from_string(SPEC_ED25519_ID)
    assert PeerID(a.to_bytes()) is a and PeerID(a) is a
    assert PeerID.from_public_key(a.extract_public_key() or b"") is a
    assert pickle.loads(pickle.dumps(a)) is a
    identity._INTERNED.clear()  # past the bound: equal, hashed alike, just not the same object
    b = PeerID(a.to_bytes())
    assert b is not a and b == a and hash(b) == hash(a) and len({a, b}) == 1

    class Sub(PeerID):
        __slots__ = ()

    assert type(Sub(a.to_bytes())) is Sub and type(Sub(a)) is Sub  # subclasses: not interned


# --- properties ------------------------------------------------------------

_KEYS = st.binary(min_size=32, max_size=32)
_PEER_IDS = st.one_of(
    _KEYS.map(PeerID.from_public_key),
    _KEYS.map(lambda digest: PeerID(b"\x12\x20" + digest)),
)


@given(_PEER_IDS)
def test_text_forms_round_trip(pid: PeerID) -> None:
    assert PeerID.from_string(str(pid)) == pid
    assert PeerID.from_string(pid.to_cid_string()) == pid
    assert PeerID(pid.to_bytes()) == pid


@given(_KEYS)
def test_inline_peer_id_yields_its_key(key: bytes) -> None:
    pid = PeerID.from_public_key(key)
    assert pid.extract_public_key() == key
    assert pid.matches_public_key(key)
    assert str(pid).startswith("12D3KooW")
