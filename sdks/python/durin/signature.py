"""Checking that a request comes from Durin: version 3 of `Durin-Signature`.

v3 is Ed25519, under Durin's key (GET /v1/signing-key on the admin listener), over

    durin-signature-v3\\n{t}\\n{path}\\n
    {name}:{value}\\n   for every `durin-*` header but durin-signature, by lower-cased name
    {body}

Needs the `cryptography` package (pip install 'durin-sdk[signatures]').
"""
import base64
import binascii
import time
from typing import Iterable, Tuple, Union

MAX_SKEW_MS = 5 * 60 * 1000


class SignatureError(Exception):
    """The request is not signed by Durin (the endpoint answers 401)."""


def _b64(text: str) -> bytes:
    text = text.strip()
    return base64.urlsafe_b64decode(text.replace("+", "-").replace("/", "_") + "=" * (-len(text) % 4))


def raw_key(key: Union[dict, bytes, str]) -> bytes:
    """The 32 raw bytes of Durin's public key, from the JWK of /v1/signing-key (a dict with
    "x"), its `public_key` (base64, maybe prefixed `ed25519:`), or the raw bytes."""
    if isinstance(key, dict):
        if key.get("jwk"):  # the whole /v1/signing-key answer
            key = key["jwk"]
        if key.get("kty") not in (None, "OKP") or key.get("crv") not in (None, "Ed25519"):
            raise ValueError("not an Ed25519 JWK")
        key = key.get("x") or key.get("public_key") or ""
    if isinstance(key, str):
        try:
            key = _b64(key.removeprefix("ed25519:"))
        except (binascii.Error, ValueError) as error:
            raise ValueError(f"not a base64 key: {error}") from None
    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return bytes(key)


class Verifier:
    """Checks v3 of Durin-Signature with one public key."""

    def __init__(self, key: Union[dict, bytes, str]):
        try:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
            from cryptography.exceptions import InvalidSignature
        except ImportError:
            raise RuntimeError("checking Durin's signature needs the `cryptography` package: "
                               "pip install 'durin-sdk[signatures]' (or cryptography)") from None
        self._key = Ed25519PublicKey.from_public_bytes(raw_key(key))
        self._invalid = InvalidSignature

    def verify(self, path: str, headers: Iterable[Tuple[str, str]], body: bytes,
               now_ms: int = None) -> None:
        """Raise SignatureError unless the request (its path without the query, every
        header as (name, value) pairs, the body) carries a good v3 signature."""
        durin, seen = [], set()
        for name, value in headers:
            name = name.lower()
            if not name.startswith("durin-"):
                continue
            if name in seen:
                raise SignatureError(f"header {name} given twice")
            seen.add(name)
            durin.append((name, value))
        fields = {}
        for part in dict(durin).get("durin-signature", "").split(","):
            k, _, v = part.strip().partition("=")
            fields[k] = v
        if not fields.get("v3"):
            raise SignatureError("no v3 signature")
        try:
            t = int(fields.get("t", ""))
            signature = _b64(fields["v3"])
        except (ValueError, binascii.Error):
            raise SignatureError("malformed Durin-Signature") from None
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if abs(now_ms - t) > MAX_SKEW_MS:
            raise SignatureError("signed more than 5 minutes away from now")
        lines = [f"durin-signature-v3\n{t}\n{path.split('?', 1)[0]}\n"]
        lines += [f"{n}:{v}\n" for n, v in sorted(durin) if n != "durin-signature"]
        try:  # http.server decodes header bytes as latin-1: encode them back the same way
            message = "".join(lines).encode("latin-1")
        except UnicodeEncodeError:
            message = "".join(lines).encode()
        try:
            self._key.verify(signature, message + body)
        except self._invalid:
            raise SignatureError("bad signature") from None
