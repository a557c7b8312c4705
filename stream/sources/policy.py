"""Source policy: what a pull source may be, checked before anything opens it.

Every source that arrives over the network (POST /v1/sessions) passes `SourcePolicy.check`:

- Syntax: no control characters anywhere; a URL is printable ASCII without spaces, has no
  percent-encoded control characters, a scheme from the allow-list (rtsp, rtsps, http, https;
  any case), a well-formed host and port. The URL is rebuilt from its parsed parts: FFmpeg
  never sees the string the client sent.
- Destination: the host is resolved once; every address must be public unless the operator
  allowed it (`allow`), and FFmpeg connects to the checked address, so a name that resolves
  elsewhere a moment later (DNS rebinding) changes nothing. For TLS the name is kept for SNI and
  certificate verification (FFmpeg's `verifyhost`), for HTTP as the Host header.
- FFmpeg may only use the protocols of the scheme (`protocol_whitelist`): a playlist or redirect
  cannot make an rtsp:// or http:// source read `file:` or another protocol. HTTP redirects
  are not followed (`max_redirects` 0): they would lead to an unchecked destination.
- Local files only under the operator's media root; every file problem gets one answer, so a
  client cannot probe which files exist.

Clients get short generic refusals; the details (addresses, paths) go to the server log.
Operator-given sources (`livelens serve --demo`, PullSource built from a string in code) pass
`operator_target`: the same syntax and FFmpeg options, no destination or media-root limits.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import stat
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from livelens.stream.errors import SourceError
from livelens.stream.redact import mask_url

logger = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class _Scheme:
    """What FFmpeg may do for one URL scheme."""

    default_port: int
    protocols: str
    """FFmpeg's protocol_whitelist for sources of this scheme (nested opens included)."""
    tls: bool


SCHEMES: dict[str, _Scheme] = {
    "rtsp": _Scheme(554, "rtsp,tcp", tls=False),
    "rtsps": _Scheme(322, "rtsps,tls,tcp", tls=True),
    # An http:// source may be redirected to https (an upgrade), never the other way round.
    "http": _Scheme(80, "http,https,tls,tcp", tls=False),
    "https": _Scheme(443, "https,tls,tcp", tls=True),
}
"""Allowed schemes of network sources."""

# RFC 3986 scheme followed by ':'; anything else is a local path.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_LABEL = r"[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")
# What may stand in the userinfo, path and query once percent-encoding is taken into account
# (RFC 3986 unreserved, sub-delims, ':' '@' '/' '?' and '%'); no brackets, quotes or backslash.
_URL_TEXT = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*$")
_USERINFO_TEXT = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=:%]*$")

BAD_SOURCE = "bad_source"
NOT_ALLOWED = "source_not_allowed"
UNAVAILABLE = "source_unavailable"

_DESTINATION_REFUSED = (
    "the source's host cannot be resolved or is not allowed by this server's source policy"
)
_FILES_DISABLED = "local files are not enabled on this server (the operator sets --media-root)"
_FILE_UNAVAILABLE = "no readable, non-empty media file at that path under the server's media root"


class SourceRefused(SourceError):
    """A source the policy refuses: `status`/`code` for the HTTP answer, the message for the
    client, `detail` (never shown to the client) for the server log."""

    def __init__(self, status: int, code: str, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.detail = detail or message


def _bad(message: str) -> SourceRefused:
    return SourceRefused(422, BAD_SOURCE, message)


@dataclass(frozen=True)
class PullTarget:
    """A source that passed the policy: what FFmpeg opens, and what everyone else sees."""

    url: str
    """What FFmpeg opens: rebuilt from the parsed parts, the checked address in place of the
    host name, the password in clear; kept in the memory of the pull source only."""
    name: str
    """The source with its password masked (or the path as given): for records and logs."""
    is_network: bool
    options: dict[str, str] = field(default_factory=dict)
    """FFmpeg options the policy requires: protocol whitelist, TLS verification, Host."""


@dataclass(frozen=True)
class SourcePolicy:
    """Where network-given pull sources may lead; `livelens serve` flags, env vars in brackets."""

    allow: tuple[str, ...] = ()
    """Hosts and CIDRs that may be pulled although they are not public: loopback, private,
    link-local, multicast or unspecified addresses (--allow-source, $LIVELENS_ALLOW_SOURCES).
    A host name entry allows whatever that exact name resolves to."""
    media_root: Path | None = None
    """Local files may be pulled from under this folder only; None = no local files
    (--media-root, $LIVELENS_MEDIA_ROOT)."""
    ca_file: Path | None = None
    """PEM file of certificate authorities trusted for https:// and rtsps:// sources, e.g. a
    private CA; None = FFmpeg's default trust store (--source-ca-file)."""

    def __post_init__(self) -> None:
        for entry in self.allow:
            parse_allow(entry)  # ValueError for a malformed entry, at start-up
        if self.media_root is not None and not Path(self.media_root).is_dir():
            raise ValueError(f"media root {self.media_root} is not a directory")
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise ValueError(f"CA file {self.ca_file} is not a file")

    def check(self, source: str) -> PullTarget:
        """The target for a network-given source; SourceRefused otherwise. Resolves DNS (blocks)."""
        try:
            parts = parse_source(source)
        except SourceRefused as exc:
            logger.info("refused source %r: %s", mask_url(source), exc.detail)
            raise
        if parts is None:
            return self._file(source)
        return self._network(parts)

    def _network(self, parts: SplitResult) -> PullTarget:
        host = parts.hostname or ""
        name = mask_url(parts.geturl())
        addresses = resolve(host, parts.port)
        if not addresses:
            raise self._refused(name, f"cannot resolve {host!r}")
        permitted = allowed(self.allow, host)
        for address in addresses:
            if not (_public(address) or permitted(address)):
                raise self._refused(
                    name,
                    f"{host} resolves to {address}, which is not public; allow it with "
                    "--allow-source",
                )
        return _target(parts, self.ca_file, connect_to=addresses[0])

    def _refused(self, name: str, detail: str) -> SourceRefused:
        logger.warning("refused source %s: %s", name, detail)
        return SourceRefused(403, NOT_ALLOWED, _DESTINATION_REFUSED, detail)

    def _file(self, path: str) -> PullTarget:
        if self.media_root is None:
            logger.warning("refused local file %r: no media root is configured", path)
            raise SourceRefused(403, NOT_ALLOWED, _FILES_DISABLED)
        root = Path(self.media_root).resolve()
        try:
            # Symlinks are followed first: a link under the root to a file outside it is out.
            resolved = (root / path).resolve(strict=True)
            if not resolved.is_relative_to(root):
                raise PermissionError(f"{resolved} is outside the media root {root}")
            _readable_media_file(resolved)
        except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: a symlink loop
            logger.warning("refused local file %r: %s", path, exc)
            raise SourceRefused(422, UNAVAILABLE, _FILE_UNAVAILABLE, str(exc)) from None
        return _file_target(resolved, name=path)


def parse_source(source: str) -> SplitResult | None:
    """The parsed URL of a network source (scheme and host lower-cased), None for a local path.

    SourceRefused (422 bad_source) for anything not strictly well-formed. The messages never
    repeat the source, which may carry a password.
    """
    for i, char in enumerate(source):
        # Cc: C0/C1 controls (CR, LF, NUL...); Cf: invisible formatting (bidi overrides);
        # Zl/Zp: Unicode line and paragraph separators.
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            raise _bad(f"character {i} of the source is a control character")
    if not _SCHEME.match(source):
        return None  # a local path: spaces and non-ASCII letters are fine in file names
    for i, char in enumerate(source):
        if not "!" <= char <= "~":
            raise _bad(f"character {i} of the URL is a space or not ASCII; percent-encode it")
    for match in _PERCENT.finditer(source):
        byte = int(match.group()[1:], 16)
        if byte < 0x20 or byte == 0x7F:
            raise _bad(f"the URL contains a percent-encoded control character ({match.group()})")
    scheme = source.partition(":")[0].lower()
    if scheme not in SCHEMES:
        supported = ", ".join(f"{s}://" for s in SCHEMES)
        raise _bad(f"unsupported scheme {scheme}: use {supported} or a local file path")
    try:
        parts = urlsplit(source)
        port = parts.port
    except ValueError:
        raise _bad("malformed URL (host or port)") from None
    if not source[len(scheme) + 1 :].startswith("//") or not parts.hostname:
        raise _bad(f"no host in the {scheme}:// URL")
    userinfo, _, _ = parts.netloc.rpartition("@")
    if "@" in parts.netloc and not _USERINFO_TEXT.match(userinfo):
        raise _bad("the URL's user or password contains a character that must be percent-encoded")
    host = parts.hostname
    if not (_is_ip(host) or (_HOSTNAME.match(host) and len(host) <= 253)):
        raise _bad("malformed host name in the URL")
    if port == 0:
        raise _bad("port 0 in the URL")
    if not _URL_TEXT.match(parts.path + parts.query):
        raise _bad("the URL's path or query contains a character that must be percent-encoded")
    return parts._replace(scheme=scheme, fragment="")


def operator_target(source: str, ca_file: Path | None = None) -> PullTarget:
    """The target of a source the operator gave (not a network client): the same syntax check
    and FFmpeg options, any host, any local file; SourceError says exactly what is wrong."""
    parts = parse_source(source)
    if parts is not None:
        return _target(parts, ca_file, connect_to=None)
    path = Path(source)
    try:
        _readable_media_file(path)
    except FileNotFoundError:
        raise SourceError(f"file not found: {source}") from None
    except PermissionError:
        raise SourceError(f"permission denied: {source}") from None
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {source}: {exc}") from None
    return _file_target(path.resolve(), name=source)


def _file_target(path: Path, *, name: str) -> PullTarget:
    # "file:" keeps a path with a colon in it from being read as a protocol name; the whitelist
    # keeps a playlist among the files from reaching the network.
    return PullTarget(
        url=f"file:{path}", name=name, is_network=False, options={"protocol_whitelist": "file"}
    )


def _readable_media_file(path: Path) -> None:
    """OSError/ValueError unless `path` is a non-empty regular file this process can open."""
    info = path.stat()
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(f"is a directory, not a media file: {path}")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"not a regular file: {path}")
    if info.st_size == 0:
        raise ValueError(f"empty file (0 bytes): {path}")
    os.close(os.open(path, os.O_RDONLY))  # PermissionError now, not inside FFmpeg later


def _target(parts: SplitResult, ca_file: Path | None, *, connect_to: Address | None) -> PullTarget:
    """Rebuild the URL from its parts, with `connect_to` in place of the host if given."""
    scheme = SCHEMES[parts.scheme]
    host = parts.hostname or ""
    port = parts.port
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    address = host if connect_to is None else str(connect_to)
    shown_host = f"[{address}]" if ":" in address else address
    netloc = f"{userinfo}@" if userinfo else ""
    netloc += shown_host if port is None else f"{shown_host}:{port}"
    url = f"{parts.scheme}://{netloc}{parts.path or '/'}"
    if parts.query:
        url += f"?{parts.query}"
    options = {"protocol_whitelist": scheme.protocols}
    named = connect_to is not None and not _is_ip(host)
    if scheme.tls:
        options["tls_verify"] = "1"
        if ca_file is not None:
            options["ca_file"] = str(ca_file)
        if named:
            options["verifyhost"] = host  # SNI and the certificate check use the name
    if parts.scheme in ("http", "https"):
        # A redirect would lead FFmpeg to a destination nobody checked.
        options["max_redirects"] = "0"
        if named:
            options["headers"] = f"Host: {host if port is None else f'{host}:{port}'}\r\n"
    name = mask_url(f"{parts.scheme}://{parts.netloc}{parts.path}")
    if parts.query:
        name += f"?{parts.query}"
    return PullTarget(url=url, name=name, is_network=True, options=options)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return "%" not in host  # a scoped IPv6 address (fe80::1%eth0) is not accepted


def resolve(host: str, port: int | None) -> list[Address]:
    """Every address of `host`, in the resolver's order; [] if it does not resolve."""
    if _is_ip(host):
        return [_unmapped(ipaddress.ip_address(host))]
    try:
        infos = socket.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    addresses: list[Address] = []
    for info in infos:
        text = str(info[4][0]).partition("%")[0]
        address = _unmapped(ipaddress.ip_address(text))
        if address not in addresses:
            addresses.append(address)
    return addresses


def _unmapped(address: Address) -> Address:
    """::ffff:10.0.0.1 is 10.0.0.1: checked (and connected to) as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _public(address: Address) -> bool:
    """Globally routable unicast: not loopback, private, link-local, multicast, unspecified,
    reserved or shared (CGNAT) space."""
    return address.is_global and not address.is_multicast


def parse_allow(entry: str) -> Network | str:
    """An --allow-source entry: a network (an address is a /32 or /128) or a host name."""
    try:
        return ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        pass
    host = entry.strip().lower().rstrip(".")
    if not host or not _HOSTNAME.match(host):
        raise ValueError(f"--allow-source {entry!r} is neither a host name nor a CIDR")
    return host


def allowed(entries: Iterable[str], host: str) -> Callable[[Address], bool]:
    """A predicate on addresses: allowed by one of the operator's entries for this host?"""
    parsed = [parse_allow(e) for e in entries]
    if host.rstrip(".") in parsed:
        return lambda address: True
    networks = [p for p in parsed if not isinstance(p, str)]
    return lambda address: any(address.version == n.version and address in n for n in networks)


def parse_allow_list(values: Iterable[str]) -> tuple[str, ...]:
    """Flag and env values, each possibly comma-separated, as policy entries (validated)."""
    entries = tuple(e.strip() for value in values for e in value.split(",") if e.strip())
    for entry in entries:
        parse_allow(entry)
    return entries
