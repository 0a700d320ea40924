#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target: fuzz/corpus/<target>/<name>.

A handful of valid and invalid inputs per target, so that a short run starts where the
checks are. Run it again after changing a target's input format or the token format (the
token seeds are signed with the secrets in fuzz_targets/token_verify.rs); files it does not
name are left alone.
"""

import base64
import hashlib
import hmac
import json
import pathlib
import struct

CORPUS = pathlib.Path(__file__).resolve().parent / "corpus"
U64_MAX = 2**64 - 1


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def headers(**fields):
    names = {
        "id": "X-File-ID",
        "index": "X-Chunk-Index",
        "total": "X-Total-Chunks",
        "range": "Content-Range",
        "name": "X-File-Name",
        "file_md5": "X-File-MD5",
        "content_md5": "Content-MD5",
        "chunk_md5": "X-Chunk-MD5",
        "length": "Content-Length",
    }
    lines = []
    for key, value in fields.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"{names[key]}: {v}")
    return "\n".join(lines) + "\n"


def chunk_headers():
    base = dict(id="7f3c1b2e-demo", index="1", total="2", range="bytes 6-10/11")
    write("chunk_headers", "valid-last-chunk", headers(**base))
    write("chunk_headers", "valid-all-headers", headers(
        id="upload_42", index="0", total="3", range="bytes 0-9/25",
        name="r%C3%A9sum%C3%A9%20final.pdf", file_md5="9e107d9d372bb6826bd81d3542a419d6",
        content_md5="nhB9nTcrtoJr2B01QqQZ1g==", chunk_md5="9e107d9d372bb6826bd81d3542a419d6",
        length="10"))
    write("chunk_headers", "valid-huge-upload", headers(
        id="big", index="1279", total="1280",
        range="bytes 10729029632-10737418239/10737418240"))
    write("chunk_headers", "valid-near-u64-max", headers(
        id="edge", index="0", total="1",
        range=f"bytes 0-{U64_MAX - 1}/{U64_MAX}"))
    write("chunk_headers", "regression-2-pow-64-bytes", headers(
        id="edge", index="0", total="1", range=f"bytes 0-{U64_MAX}/{U64_MAX}"))
    write("chunk_headers", "invalid-duplicate-id", headers(**{**base, "id": ["a", "b"]}))
    write("chunk_headers", "invalid-id-path", headers(**{**base, "id": "../etc"}))
    write("chunk_headers", "invalid-md5-disagree", headers(
        **base, content_md5="nhB9nTcrtoJr2B01QqQZ1g==",
        chunk_md5="00000000000000000000000000000000"))
    write("chunk_headers", "invalid-range-unknown-total", headers(**{**base, "range": "bytes 6-10/*"}))
    write("chunk_headers", "invalid-filename-control", headers(**base, name="a%0Ab"))
    write("chunk_headers", "invalid-index-sign", headers(**{**base, "index": "+1"}))


def content_range():
    for name, value in [
        ("valid", "bytes 0-9/10"),
        ("valid-upper-unit", "BYTES 5-5/6"),
        ("valid-leading-zeros", "bytes 007-0010/00011"),
        ("valid-largest", f"bytes 0-{U64_MAX - 1}/{U64_MAX}"),
        ("valid-last-byte-of-largest", f"bytes {U64_MAX - 1}-{U64_MAX - 1}/{U64_MAX}"),
        ("regression-2-pow-64-bytes", f"bytes 0-{U64_MAX}/{U64_MAX}"),
        ("invalid-unknown-total", "bytes 0-9/*"),
        ("invalid-inverted", "bytes 9-0/10"),
        ("invalid-two-spaces", "bytes  0-9/10"),
        ("invalid-overflow", f"bytes 0-9/{U64_MAX}0"),
        ("invalid-unit", "items 0-9/10"),
        ("invalid-sign", "bytes +0-9/10"),
    ]:
        write("content_range", name, value)


def geometry():
    raw = lambda *n: b"\x00" + struct.pack("<5Q", *n)
    near = lambda total, chunk, pick, shift=0, grow=0, more=0: b"\x01" + struct.pack(
        "<3Q3b", total, chunk, pick, shift, grow, more)
    write("geometry", "valid-raw-middle-chunk", raw(1, 3, 10, 19, 25))
    write("geometry", "valid-raw-single-chunk", raw(0, 1, 0, 6, 7))
    write("geometry", "invalid-raw-misplaced", raw(2, 3, 21, 24, 25))
    write("geometry", "invalid-raw-beyond-total", raw(0, 3, 0, 25, 25))
    write("geometry", "invalid-raw-huge", raw(U64_MAX, U64_MAX, U64_MAX - 1, U64_MAX, U64_MAX))
    write("geometry", "near-last-chunk", near(25, 10, 2))
    write("geometry", "near-huge-chunks", near(U64_MAX, 2**63, 1))
    write("geometry", "near-shifted", near(10737418240, 8388608, 7, shift=1))
    write("geometry", "near-grown", near(11, 6, 0, grow=1))
    write("geometry", "near-more-chunks", near(11, 6, 1, more=1))


def upload_id():
    for name, value in [
        ("valid-name", "7f3c1b2e-demo"),
        ("valid-tenant-and-name", "acme\nreport_2024"),
        ("valid-default-tenant", "default\nreport"),
        ("valid-key", "acme~report"),
        ("invalid-dots", "acme\n.."),
        ("invalid-slash", "acme\na/b"),
        ("invalid-hash-tag", "acme\n{x}"),
        ("invalid-prefixed-default-key", "default~x"),
        ("invalid-double-separator", "a~b~c"),
        ("invalid-too-long", "acme\n" + "a" * 129),
    ]:
        write("upload_id", name, value)


# The secrets and "now" of fuzz_targets/token_verify.rs.
CURRENT = b"stitch-fuzz-current-token-secret-0001"
PREVIOUS = b"stitch-fuzz-previous-token-secret-0001"
NOW = 1_700_000_000


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(secret, tenant, upload, scopes, expires, max_bytes=None):
    """As TokenSigner::sign: `st1.<b64url(json)>.<b64url(hmac-sha256)>`."""
    payload = {"v": 1, "t": tenant, "u": upload, "s": scopes, "e": expires}
    if max_bytes is not None:
        payload["m"] = max_bytes
    signed = "st1." + b64(json.dumps(payload, separators=(",", ":")).encode())
    return signed + "." + b64(hmac.new(secret, signed.encode(), hashlib.sha256).digest())


def token_verify():
    later = NOW + 600
    good = token(CURRENT, "acme", "u1", ["upload", "read"], later, 5 << 20)
    write("token_verify", "valid", good)
    write("token_verify", "valid-previous-secret", token(PREVIOUS, "acme", "u1", ["read"], later))
    write("token_verify", "valid-default-tenant", token(CURRENT, "default", "x", [], later))
    write("token_verify", "expired", token(CURRENT, "acme", "u1", ["read"], NOW))
    write("token_verify", "invalid-other-secret", token(b"x" * 32, "acme", "u1", ["read"], later))
    write("token_verify", "invalid-bad-upload", token(CURRENT, "acme", "a/b", ["read"], later))
    write("token_verify", "invalid-unknown-scope", token(CURRENT, "acme", "u1", ["root"], later))
    write("token_verify", "invalid-truncated", good[:-1])
    write("token_verify", "invalid-no-prefix", good[4:])
    write("token_verify", "invalid-empty-parts", "st1..")


def token_tamper():
    def claims(tenant, upload, scopes, expires, now, max_bytes, edits=b""):
        text = "\n".join([tenant, upload, scopes, str(expires), str(now), str(max_bytes)])
        return text.encode() + b"\n" + edits

    edit = lambda op, at, byte: struct.pack("<BHB", op, at, byte)
    write("token_tamper", "unchanged", claims("acme", "u1", "upload,read", 2000, 1000, 5))
    write("token_tamper", "expired", claims("acme", "u1", "read", 1000, 1000, "-"))
    write("token_tamper", "invalid-upload", claims("acme", "a.b", "read", 2000, 1000, "-"))
    write("token_tamper", "flip-payload", claims(
        "acme", "u1", "read", 2000, 1000, 5, edit(0, 10, 0x01)))
    write("token_tamper", "flip-signature", claims(
        "acme", "u1", "read", 2000, 1000, 5, edit(0, 150, 0x20)))
    write("token_tamper", "insert-dot", claims(
        "globex", "report", "delete", 2000, 1000, "-", edit(1, 60, ord("."))))
    write("token_tamper", "truncate-and-append", claims(
        "acme", "u1", "upload", 2000, 1000, "-", edit(3, 180, 0) + edit(1, 180, ord("A"))))


def tus_headers():
    b64 = lambda t: base64.b64encode(t.encode()).decode()
    write("tus_headers", "valid-metadata", f"Upload-Metadata: filename {b64('a b.txt')},filetype {b64('text/plain')},flag\n")
    write("tus_headers", "valid-checksum", f"Upload-Checksum: sha1 {base64.b64encode(bytes(20)).decode()}\n")
    write("tus_headers", "valid-concat", "Upload-Concat: final;http://h/files/a1 /files/b2\n")
    write("tus_headers", "valid-partial", "Upload-Concat: partial\n")
    write("tus_headers", "invalid-metadata-repeat", f"Upload-Metadata: a {b64('x')},a {b64('y')}\n")
    write("tus_headers", "invalid-concat-path", "Upload-Concat: final;/files/../etc\n")
    write("tus_headers", "invalid-checksum-length", "Upload-Checksum: md5 AAAA\n")


for make in [tus_headers, chunk_headers, content_range, geometry, upload_id, token_verify, token_tamper]:
    make()

for name, value in [("valid", "bytes=0-99"), ("valid-open", "bytes=100-"),
                    ("valid-suffix", "bytes=-500"), ("valid-past-end", "bytes=900-5000"),
                    ("several", "bytes=0-1,5-6"), ("unsatisfiable", "bytes=1000-"),
                    ("empty-file", "0\nbytes=0-0"), ("spaces", "bytes= 1 - 2 "),
                    ("other-unit", "items=0-1"), ("inverted", "bytes=5-1")]:
    write("range_header", name, value if value.startswith("0\n") else "1000\n" + value)

for name, value in [("valid-hex", "9e107d9d372bb6826bd81d3542a419d6"),
                    ("valid-hex-upper", "9E107D9D372BB6826BD81D3542A419D6"),
                    ("valid-base64", "nhB9nTcrtoJr2B01QqQZ1g=="),
                    ("invalid-base64-18-bytes", "nhB9nTcrtoJr2B01QqQZ1gAA"),
                    ("invalid-base64-trailing-bits", "nhB9nTcrtoJr2B01QqQZ1h=="),
                    ("invalid-short", "9e107d9d"), ("invalid-hex-digit", "zz107d9d372bb6826bd81d3542a419d6"),
                    ("invalid-url-safe", "nhB9nTcrtoJr2B01QqQZ1g-_")]:
    write("md5", name, value)
