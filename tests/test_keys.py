"""Ed25519 keys, addresses, and the header and transaction signatures (PROTOCOL.md §1)."""

import hashlib
from dataclasses import replace

import pytest

from consensus.blocks import (
    BLOCK_VERSION,
    BlockHeader,
    compute_block_id,
    sign_header,
    validate_header_signature,
)
from consensus.encoding import ZERO_HASH
from consensus.errors import ConsensusError
from consensus.keys import SMALL_ORDER_KEYS, PrivateKey, check_signature, compute_address
from consensus.merkle import EMPTY_ROOT
from consensus.params import COIN, DEV
from consensus.proofs import Proof
from consensus.tasks import compute_task_id
from consensus.transactions import (
    ModelTx,
    TaskTx,
    Transaction,
    Transfer,
    compute_tx_id,
    sign_tx,
    signer_address,
    validate_tx_signature,
)

KEY = PrivateKey(seed=bytes(range(32)))
OTHER = PrivateKey(seed=b"\x42" * 32)
ED25519_L = 2**252 + 27742317777372353535851937790883648493

# RFC 8032 §7.1, tests 1 and 2: (secret, public, message, signature).
RFC8032 = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
     "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),  # noqa: E501
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
     "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),  # noqa: E501
]


@pytest.mark.parametrize(("secret", "public", "message", "signature"), RFC8032,
                         ids=["rfc8032-1", "rfc8032-2"])
def test_rfc8032_vectors(secret: str, public: str, message: str, signature: str) -> None:
    key = PrivateKey(bytes.fromhex(secret))
    assert key.pubkey.hex() == public
    assert key.sign(bytes.fromhex(message)).hex() == signature
    assert check_signature(bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature))


@pytest.mark.parametrize(("seed", "address"), [
    (bytes(range(32)), "851e114b1bd2dc0258aadc6a6cc741f35869bc38"),
    (bytes.fromhex(RFC8032[0][0]), None),
])
def test_address_derivation(seed: bytes, address: str | None) -> None:
    key = PrivateKey(seed)
    # H("addr", pubkey) hashes the msgpack array ["addr", pubkey], written out here.
    expected = hashlib.sha256(b"\x92\xa4addr\xc4\x20" + key.pubkey).digest()[:20]
    assert key.address == compute_address(key.pubkey) == expected
    if address is not None:
        assert key.address.hex() == address


def test_sign_verify() -> None:
    sig = KEY.sign(b"message")
    assert len(sig) == 64
    assert check_signature(KEY.pubkey, b"message", sig)
    assert KEY.sign(b"message") == sig  # Ed25519 is deterministic


@pytest.mark.parametrize("case", [
    "wrong-key", "wrong-message", "flipped-r", "flipped-s", "zero-sig", "short-sig", "long-sig",
    "empty-sig", "short-pubkey", "zero-pubkey", "s-plus-l",
])
def test_bad_signature_rejected(case: str) -> None:
    message, pubkey, sig = b"message", KEY.pubkey, KEY.sign(b"message")
    if case == "wrong-key":
        pubkey = OTHER.pubkey
    elif case == "wrong-message":
        message = b"messagf"
    elif case == "flipped-r":
        sig = bytes([sig[0] ^ 1]) + sig[1:]
    elif case == "flipped-s":
        sig = sig[:40] + bytes([sig[40] ^ 1]) + sig[41:]
    elif case == "zero-sig":
        sig = bytes(64)
    elif case == "short-sig":
        sig = sig[:63]
    elif case == "long-sig":
        sig = sig + b"\x00"
    elif case == "empty-sig":
        sig = b""
    elif case == "short-pubkey":
        pubkey = pubkey[:31]
    elif case == "zero-pubkey":
        pubkey = bytes(32)
    elif case == "s-plus-l":  # malleated S: only S < L is canonical
        s = int.from_bytes(sig[32:], "little") + ED25519_L
        assert s < 2**256
        sig = sig[:32] + s.to_bytes(32, "little")
    assert not check_signature(pubkey, message, sig)


def test_repr_never_shows_the_seed() -> None:
    key = PrivateKey(seed=bytes(range(32)))
    for text in (repr(key), str(key), f"{key}", f"{key!r}", repr([key]), repr({"k": key})):
        assert key.seed.hex() not in text
        assert repr(key.seed) not in text
        assert key.address.hex() in text


def test_generate_gives_distinct_working_keys() -> None:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    assert a.seed != b.seed and len(a.seed) == 32
    assert check_signature(a.pubkey, b"x", a.sign(b"x"))
    assert not check_signature(b.pubkey, b"x", a.sign(b"x"))


# ---------------------------------------------------------------------------------------
# Header and transaction signatures
# ---------------------------------------------------------------------------------------

TASK_ID = compute_task_id(DEV.genesis_task)


def make_proof(miner: PrivateKey) -> Proof:
    return Proof(task_id=TASK_ID, ref_model=b"", miner=miner.pubkey, nonce=1, steps=40,
                 n_correct=230, model_id=hashlib.sha256(b"m").digest(), ckpt_root=bytes(32))


def make_header(miner: PrivateKey = KEY) -> BlockHeader:
    return BlockHeader(version=BLOCK_VERSION, height=1, prev_id=ZERO_HASH,
                       timestamp=DEV.genesis_time + 5, target=DEV.t2_genesis,
                       tx_root=EMPTY_ROOT, proof=make_proof(miner))


def test_header_signature() -> None:
    header = sign_header(make_header(), KEY)
    validate_header_signature(header)
    assert check_signature(KEY.pubkey, compute_block_id(header), header.signature)
    # the signature is not part of the id it signs
    assert compute_block_id(header) == compute_block_id(make_header())


def test_sign_header_refuses_other_key() -> None:
    with pytest.raises(ValueError):
        sign_header(make_header(KEY), OTHER)


@pytest.mark.parametrize("case", [
    "unsigned", "height", "timestamp", "target", "nonce", "n_correct", "model_id",
    "miner-swapped", "flipped-sig",
])
def test_bad_header_signature(case: str) -> None:
    header = sign_header(make_header(), KEY)
    proof = header.proof
    if case == "unsigned":
        header = make_header()
    elif case == "height":
        header = replace(header, height=2)
    elif case == "timestamp":
        header = replace(header, timestamp=header.timestamp + 1)
    elif case == "target":
        header = replace(header, target=header.target - 1)
    elif case == "nonce":
        header = replace(header, proof=replace(proof, nonce=2))
    elif case == "n_correct":
        header = replace(header, proof=replace(proof, n_correct=231))
    elif case == "model_id":
        header = replace(header, proof=replace(proof, model_id=bytes(32)))
    elif case == "miner-swapped":  # a stolen proof re-signed by a thief still names KEY
        header = replace(header, proof=replace(proof, miner=OTHER.pubkey))
    elif case == "flipped-sig":
        header = replace(header, signature=bytes([header.signature[0] ^ 1]) + header.signature[1:])
    with pytest.raises(ConsensusError) as exc:
        validate_header_signature(header)
    assert exc.value.reason == "bad-blk-sig"


def make_txs(signer: PrivateKey) -> list[Transaction]:
    task = replace(DEV.genesis_task, publisher=signer.address, bounty=COIN)
    return [
        Transfer(pubkey=signer.pubkey, to=OTHER.address, amount=5, fee=1, nonce=0),
        TaskTx(pubkey=signer.pubkey, task=task, fee=1, nonce=1),
        ModelTx(prev_id=ZERO_HASH, proof=make_proof(signer), fee=1),
    ]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["transfer", "task-tx", "model-tx"])
def test_tx_signature(index: int) -> None:
    tx = make_txs(KEY)[index]
    signed = sign_tx(tx, KEY)
    validate_tx_signature(signed)
    assert signer_address(signed) == KEY.address
    assert compute_tx_id(signed) == compute_tx_id(tx)  # the id leaves the signature out
    with pytest.raises(ValueError):
        sign_tx(tx, OTHER)


def _tamper(tx: Transaction) -> Transaction:
    if isinstance(tx, Transfer):
        return replace(tx, amount=tx.amount + 1)
    if isinstance(tx, TaskTx):
        return replace(tx, task=replace(tx.task, bounty=tx.task.bounty + 1))
    return replace(tx, proof=replace(tx.proof, steps=tx.proof.steps + 20))


@pytest.mark.parametrize("index", [0, 1, 2], ids=["transfer", "task-tx", "model-tx"])
@pytest.mark.parametrize("case", ["unsigned", "tampered", "fee", "other-signer", "flipped-sig"])
def test_bad_tx_signature(index: int, case: str) -> None:
    tx = sign_tx(make_txs(KEY)[index], KEY)
    if case == "unsigned":
        tx = make_txs(KEY)[index]
    elif case == "tampered":
        tx = _tamper(tx)
    elif case == "fee":
        tx = replace(tx, fee=tx.fee + 1)
    elif case == "other-signer":  # OTHER's valid signature on OTHER's tx, grafted onto KEY's
        tx = replace(tx, signature=sign_tx(make_txs(OTHER)[index], OTHER).signature)
    elif case == "flipped-sig":
        tx = replace(tx, signature=tx.signature[:-1] + bytes([tx.signature[-1] ^ 0x80]))
    with pytest.raises(ConsensusError) as exc:
        validate_tx_signature(tx)
    assert exc.value.reason == "bad-txn-sig"


def _torsion_encodings() -> set[bytes]:
    """Every encoding of an Ed25519 point of order dividing 8, from the curve equation."""
    p = 2**255 - 19
    d = -121665 * pow(121666, p - 2, p) % p

    def sqrt(a: int) -> int:
        x = pow(a % p, (p + 3) // 8, p)
        if (x * x - a) % p:
            x = x * pow(2, (p - 1) // 4, p) % p
        assert (x * x - a) % p == 0
        return x

    i = sqrt(-1)
    points = [(0, 1), (0, p - 1), (i, 0), (p - i, 0)]
    x2 = (1 + sqrt(1 + d)) * pow(d, p - 2, p) % p  # order 8: y^2 = -x^2 on the curve
    x, y = sqrt(x2), sqrt(-x2)
    points += [(xx, yy) for xx in (x, p - x) for yy in (y, p - y)]
    encodings = set()
    for px, py in points:
        assert (-px * px + py * py - 1 - d * px * px * py * py) % p == 0
        for ybits in {py, py + p} if py + p < 2**255 else {py}:
            signs = (0, 1) if px == 0 else (px & 1,)
            encodings |= {(ybits | s << 255).to_bytes(32, "little") for s in signs}
    return encodings


def test_small_order_keys_are_exactly_the_torsion_encodings() -> None:
    assert _torsion_encodings() == SMALL_ORDER_KEYS


def test_small_order_key_cannot_authorise_anything() -> None:
    identity = bytes([1]) + bytes(31)
    forged = identity + bytes(32)  # R = identity, S = 0: OpenSSL accepts it for any message
    for key in SMALL_ORDER_KEYS:
        assert not check_signature(key, b"any message", forged)
    tx = Transfer(pubkey=identity, to=bytes(20), amount=1, fee=0, nonce=0, signature=forged)
    with pytest.raises(ConsensusError) as err:
        validate_tx_signature(tx)
    assert err.value.reason == "bad-txn-sig"
