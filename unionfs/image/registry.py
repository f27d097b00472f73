"""A registry as a pull source and a push destination: the distribution HTTP API v2 over ``http.client``.

``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]``.  HTTPS (with certificate checks) by default; plain HTTP only
for loopback hosts or with ``insecure=True``.  Authentication is optional: a ``401`` with a ``Bearer``
challenge gets a token from the realm it names (anonymous, or with ``$UNIONFS_REGISTRY_AUTH`` =
``USER:PASSWORD`` as basic credentials), a ``Basic`` challenge gets those credentials.

Calls used: ``GET/HEAD /v2/REPO/manifests/REF`` and ``/blobs/DIGEST`` (redirects followed), ``POST
/v2/REPO/blobs/uploads/`` then one ``PUT LOCATION?digest=…`` with the whole blob streamed from its file (a
monolithic upload), ``PUT /v2/REPO/manifests/TAG``.  Blobs stream in 1 MiB reads; nothing is held whole in
memory but manifests and configs.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import re
import ssl
import urllib.parse
from collections.abc import Iterator
from typing import Any, BinaryIO

from unionfs.image.oci import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_DOCUMENT,
    MT_OCI_MANIFEST,
    Descriptor,
    Manifest,
    Platform,
    digest_of,
)
from unionfs.image.transfer import LayerRef, Resolved, TransferError, checked, resolve_manifest
from unionfs.image.transport import Reference, is_loopback

AUTH_ENV = "UNIONFS_REGISTRY_AUTH"
TIMEOUT = 120.0
_BLOCK = 1 << 20
_ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


class _Response:
    """A response whose connection is closed with it."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        self.conn = conn
        self.resp = resp
        self.status = resp.status

    def header(self, name: str) -> str:
        return self.resp.getheader(name) or ""

    def read(self, n: int = -1) -> bytes:
        return self.resp.read(n) if n >= 0 else self.resp.read()

    def close(self) -> None:
        self.resp.close()
        self.conn.close()


class Client:
    """One repository of one registry."""

    def __init__(self, ref: Reference, *, insecure: bool = False) -> None:
        self.host = ref.host
        self.repo = ref.repo
        self.scheme = "http" if insecure or is_loopback(ref.host) else "https"
        self.auth: str | None = None
        creds = os.environ.get(AUTH_ENV, "")
        self.basic = "Basic " + base64.b64encode(creds.encode()).decode() if ":" in creds else None

    def _connect(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        if scheme == "https":
            return http.client.HTTPSConnection(netloc, timeout=TIMEOUT, context=ssl.create_default_context(),
                                               blocksize=_BLOCK)
        return http.client.HTTPConnection(netloc, timeout=TIMEOUT, blocksize=_BLOCK)

    def _send(self, method: str, url: str, headers: dict[str, str], body: BinaryIO | bytes | None) -> _Response:
        parts = urllib.parse.urlsplit(url)
        conn = self._connect(parts.scheme or self.scheme, parts.netloc or self.host)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(method, target, body=body, headers=headers)
            return _Response(conn, conn.getresponse())
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise TransferError(f"{self.host}: {method} {parts.path}: {exc}") from None

    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                body: BinaryIO | bytes | None = None, ok: tuple[int, ...] = (200,)) -> _Response:
        """Send a request (``path`` absolute on the registry, or a full URL), authenticating on a 401 and
        following redirects; TransferError unless the final status is in ``ok``."""
        url = path if "://" in path else f"{self.scheme}://{self.host}{path}"
        for _attempt in range(6):
            hdrs = dict(headers or {})
            same_host = urllib.parse.urlsplit(url).netloc == self.host
            if self.auth and same_host:
                hdrs["Authorization"] = self.auth
            if isinstance(body, io.IOBase) or hasattr(body, "seek"):
                body.seek(0)  # type: ignore[union-attr]
            resp = self._send(method, url, hdrs, body)
            if resp.status == 401 and same_host and self._authenticate(resp.header("WWW-Authenticate")):
                resp.close()
                continue
            if resp.status in (301, 302, 303, 307, 308) and resp.header("Location"):
                url = urllib.parse.urljoin(url, resp.header("Location"))
                resp.close()
                if resp.status == 303:
                    method, body = "GET", None
                continue
            if resp.status not in ok:
                detail = _error_detail(resp)
                resp.close()
                raise TransferError(f"{self.host}/{self.repo}: {method} {urllib.parse.urlsplit(url).path}: "
                                    f"HTTP {resp.status}{detail}")
            return resp
        raise TransferError(f"{self.host}: too many redirects or authentication rounds")

    def _authenticate(self, challenge: str) -> bool:
        """Set ``self.auth`` from a WWW-Authenticate challenge; False when there is nothing (new) to try."""
        scheme, _, params_text = challenge.partition(" ")
        params = dict(_CHALLENGE_RE.findall(params_text))
        if scheme.lower() == "basic":
            if self.basic is None or self.auth == self.basic:
                return False
            self.auth = self.basic
            return True
        if scheme.lower() != "bearer" or "realm" not in params or (self.auth or "").startswith("Bearer "):
            return False
        query = urllib.parse.urlencode({k: v for k, v in params.items() if k in ("service", "scope")})
        realm = params["realm"]
        if urllib.parse.urlsplit(realm).scheme == "http" and not is_loopback(urllib.parse.urlsplit(realm).netloc) \
                and self.scheme == "https":
            raise TransferError(f"{self.host}: refusing a token realm over plain HTTP ({realm})")
        headers = {"Authorization": self.basic} if self.basic else {}
        resp = self._send("GET", f"{realm}?{query}" if query else realm, headers, None)
        try:
            if resp.status != 200:
                raise TransferError(f"{self.host}: token request failed: HTTP {resp.status}")
            data = json.loads(resp.read(MAX_DOCUMENT))
        except ValueError:
            raise TransferError(f"{self.host}: token answer is not JSON") from None
        finally:
            resp.close()
        token = data.get("token") or data.get("access_token")
        if not isinstance(token, str):
            raise TransferError(f"{self.host}: token answer without a token")
        self.auth = f"Bearer {token}"
        return True

    # -- API ---------------------------------------------------------------------------------------------
    def get_manifest(self, ref: str) -> tuple[bytes, str]:
        resp = self.request("GET", f"/v2/{self.repo}/manifests/{ref}", headers={"Accept": _ACCEPT})
        try:
            data = resp.read(MAX_DOCUMENT + 1)
            if len(data) > MAX_DOCUMENT:
                raise TransferError(f"{self.host}/{self.repo}:{ref}: manifest larger than {MAX_DOCUMENT} bytes")
            return data, resp.header("Docker-Content-Digest")
        finally:
            resp.close()

    def has_blob(self, digest: str) -> bool:
        resp = self.request("HEAD", f"/v2/{self.repo}/blobs/{digest}", ok=(200, 404))
        resp.close()
        return resp.status == 200

    @contextlib.contextmanager
    def blob(self, digest: str) -> Iterator[BinaryIO]:
        resp = self.request("GET", f"/v2/{self.repo}/blobs/{digest}")
        try:
            yield resp  # type: ignore[misc]
        finally:
            resp.close()

    def upload(self, body: BinaryIO, digest: str, size: int) -> None:
        resp = self.request("POST", f"/v2/{self.repo}/blobs/uploads/", headers={"Content-Length": "0"},
                            ok=(202,))
        location = resp.header("Location")
        resp.close()
        if not location:
            raise TransferError(f"{self.host}: upload started without a Location")
        sep = "&" if "?" in location else "?"
        url = urllib.parse.urljoin(f"{self.scheme}://{self.host}/", location) + \
            f"{sep}digest={urllib.parse.quote(digest)}"
        resp = self.request("PUT", url, body=body, ok=(201, 202, 204),
                            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})
        resp.close()

    def put_manifest(self, tag: str, data: bytes, media_type: str) -> None:
        resp = self.request("PUT", f"/v2/{self.repo}/manifests/{tag}", body=data, ok=(200, 201, 202),
                            headers={"Content-Type": media_type, "Content-Length": str(len(data))})
        resp.close()


def _error_detail(resp: _Response) -> str:
    """The first error of a registry's JSON error body (``: CODE: message``), or nothing."""
    try:
        data: Any = json.loads(resp.read(65536))
        first = data["errors"][0]
        return f": {first.get('code', '')}: {first.get('message', '')}"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, OSError, http.client.HTTPException):
        return ""


class RegistrySource:
    def __init__(self, ref: Reference, *, insecure: bool = False) -> None:
        self.ref = ref
        self.client = Client(ref, insecure=insecure)

    def close(self) -> None:
        pass

    def _fetch(self, desc: Descriptor, what: str) -> bytes:
        if desc.media_type in (*MANIFEST_TYPES, *INDEX_TYPES):
            data, _ = self.client.get_manifest(desc.digest)
            return checked(data, desc, what)
        if desc.size > MAX_DOCUMENT:
            raise TransferError(f"{what} is larger than {MAX_DOCUMENT} bytes")
        with self.client.blob(desc.digest) as f:
            return checked(f.read(desc.size + 1), desc, what)

    def resolve(self, platform: Platform) -> Resolved:
        ref = self.ref.digest or self.ref.tag
        data, header_digest = self.client.get_manifest(ref)
        digest = digest_of(data)
        expected = self.ref.digest or header_digest
        if expected and expected != digest:
            raise TransferError(f"{self.ref}: manifest digest mismatch: expected {expected}, got {digest}")
        return resolve_manifest(data, self._fetch, platform, f"{self.ref}: manifest", digest)

    def has_layer(self, layer: LayerRef) -> bool:
        return self.client.has_blob(layer.digest or "")

    def open_layer(self, layer: LayerRef) -> contextlib.AbstractContextManager[BinaryIO]:
        return self.client.blob(layer.digest or "")


class RegistryDestination:
    def __init__(self, ref: Reference, *, insecure: bool = False) -> None:
        if ref.digest:
            raise TransferError(f"{ref}: push to a tag, not a digest")
        self.ref = ref
        self.client = Client(ref, insecure=insecure)

    def has_blob(self, digest: str) -> bool:
        return self.client.has_blob(digest)

    def put_blob(self, path: str, digest: str, size: int, *, movable: bool = False) -> None:
        with open(path, "rb") as f:  # a file of the store (kept blob or staged export)
            self.client.upload(f, digest, size)

    def put_bytes(self, data: bytes, digest: str) -> None:
        if not self.client.has_blob(digest):
            self.client.upload(io.BytesIO(data), digest, len(data))

    def put_manifest(self, data: bytes, digest: str, manifest: Manifest) -> None:
        self.client.put_manifest(self.ref.tag, data, MT_OCI_MANIFEST)

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass
