"""API tokens: scoped, namespace-limited, stored as hashes, shown once.

Format: ``loreg_<id>_<secret><checksum>``: a fixed prefix that secret scanners can match, a public
id to look the row up by, 32 random base62 characters, and a 6-character CRC32 checksum that lets
a client (or a scanner) tell a typo from a real token without asking the server.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import secrets
import string
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import bindparam, select, update

from loreg.registry.db.models import Token
from loreg.registry.errors import DeniedError, RequestInvalidError, TokenNotFoundError, UnauthorizedError
from loreg.registry.services.context import AppContext

# what every request's token check reads, built once: a Core row by primary key (no ORM identity map)
_CHECK = select(
    Token.id, Token.secret_hash, Token.scope, Token.namespaces, Token.expires_at, Token.revoked_at, Token.last_used_at
).where(Token.id == bindparam("id"))

PREFIX = "loreg_"
ALPHABET = string.ascii_letters + string.digits
TOKEN_RE = re.compile(r"loreg_([a-z0-9]{12})_([A-Za-z0-9]{32})([A-Za-z0-9]{6})")
SCOPES = ("read", "write", "admin")
NAMESPACE_GLOB = re.compile(r"(\*|[a-z0-9*]+(?:[._-][a-z0-9*]+)*(?:/(\*|[a-z0-9*]+(?:[._-][a-z0-9*]+)*))?)")


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(ALPHABET[r])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), 6)


def _hash(secret: str) -> str:
    # the secret has 190 bits of entropy: a fast hash is enough (no dictionary to guess from)
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_token(token: str) -> tuple[str, str] | None:
    """(id, secret) if ``token`` has the loreg form and a valid checksum, else None."""
    m = TOKEN_RE.fullmatch(token or "")
    if m is None:
        return None
    body = f"{PREFIX}{m.group(1)}_{m.group(2)}"
    if not hmac.compare_digest(_checksum(body), m.group(3)):
        return None
    return m.group(1), m.group(2)


def _utc(when: datetime | None) -> datetime | None:
    """``when`` in UTC (naive: taken as UTC); an instant past datetime's range is refused, not a 500."""
    if when is None:
        return None
    if when.tzinfo is None or when.utcoffset() is None:
        return when.replace(tzinfo=UTC)
    try:
        return when.astimezone(UTC)
    except OverflowError:
        raise RequestInvalidError(
            f"expires_at {when.isoformat()} is outside the dates UTC can express (years 1 to 9999)",
            detail={"field": "expires_at"}, hint="give a date within years 1 to 9999 in UTC, e.g. 2030-01-01T00:00:00Z",
        ) from None


@dataclass(frozen=True)
class Principal:
    token_id: str
    scope: str
    namespaces: tuple[str, ...]

    def has_scope(self, scope: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(scope)

    def covers(self, namespace: str, name: str | None = None) -> bool:
        if not self.namespaces:
            return True
        target = f"{namespace}/{name}" if name else f"{namespace}/"
        for pattern in self.namespaces:
            if "/" not in pattern:
                pattern = f"{pattern}/*"
            if fnmatch.fnmatchcase(target, pattern) or (name is None and fnmatch.fnmatchcase(namespace, pattern.split("/")[0])):
                return True
        return False

    def require(self, scope: str, namespace: str | None = None, name: str | None = None) -> None:
        if not self.has_scope(scope):
            raise DeniedError(f"this token has scope {self.scope!r}; {scope!r} is needed", detail={"needed": scope})
        if namespace is not None and not self.covers(namespace, name):
            label = f"{namespace}/{name}" if name else namespace
            raise DeniedError(f"this token does not cover {label}", detail={"name": label})


ANONYMOUS = Principal(token_id="anonymous", scope="read", namespaces=())


class TokenService:
    def __init__(self, registry: AppContext):
        self.registry = registry

    def create(
        self,
        scope: str,
        namespaces: list[str] | None = None,
        *,
        expires_at: datetime | None = None,
        description: str | None = None,
    ) -> tuple[Token, str]:
        """Create a token. Returns (row, plaintext); the plaintext is never stored or shown again.

        Raises:
            RequestInvalidError: unknown scope, bad namespace pattern, or an expiry with no UTC
                equivalent (year 1 at +14:00 is still year 0 in UTC).
        """
        expires_at = _utc(expires_at)
        if scope not in SCOPES:
            raise RequestInvalidError(f"scope must be one of {', '.join(SCOPES)}", detail={"scope": scope})
        globs = list(namespaces or [])
        for g in globs:
            if not isinstance(g, str) or NAMESPACE_GLOB.fullmatch(g) is None:
                raise RequestInvalidError(f"invalid namespace pattern {str(g)[:80]!r}", hint="e.g. team-a/* or team-a")
        token_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))
        secret = "".join(secrets.choice(ALPHABET) for _ in range(32))
        body = f"{PREFIX}{token_id}_{secret}"
        row = Token(
            id=token_id,
            secret_hash=_hash(secret),
            scope=scope,
            namespaces=globs,
            description=description,
            expires_at=expires_at,
        )
        with self.registry.sessions.begin() as session:
            session.add(row)
        return row, body + _checksum(body)

    def authenticate(self, token: str, *, now: datetime | None = None) -> Principal:
        parsed = parse_token(token)
        if parsed is None:
            raise UnauthorizedError("malformed token", hint="tokens look like loreg_…; run loreg login")
        token_id, secret = parsed
        now = now or datetime.now(UTC)
        # every request checks its token: a read (one primary-key statement), a write only when used
        with self.registry.reading() as session:
            row = session.execute(_CHECK, {"id": token_id}).first()
            if row is None or not hmac.compare_digest(row.secret_hash, _hash(secret)):
                raise UnauthorizedError("invalid token")
            if row.revoked_at is not None:
                raise UnauthorizedError("token revoked")
            if row.expires_at is not None and row.expires_at <= now:
                raise UnauthorizedError("token expired")
            principal = Principal(token_id=row.id, scope=row.scope, namespaces=tuple(row.namespaces))
            stale = row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60
        # one write per minute at most: authentication must not turn every read into a write
        if stale:
            with self.registry.sessions.begin() as session:
                session.execute(update(Token).where(Token.id == token_id).values(last_used_at=now))
        return principal

    def list(self) -> list[Token]:
        with self.registry.sessions.begin() as session:
            return list(session.scalars(select(Token).order_by(Token.created_at)))

    def revoke(self, token_id: str) -> Token:
        with self.registry.sessions.begin() as session:
            row = session.get(Token, token_id)
            if row is None:
                raise TokenNotFoundError(f"no token {token_id[:40]!r}")
            if row.revoked_at is None:
                row.revoked_at = datetime.now(UTC)
            return row
