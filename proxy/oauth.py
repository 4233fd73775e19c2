"""Talking to login.bol.com: the three token requests and how their answers are read.

Every grant is a form-encoded POST with HTTP Basic client authentication; nothing secret
ever goes into a URL (bol rejects token parameters in query strings since late 2024).
Token responses are never logged: only their outcome and the OAuth ``error`` code leave
this module, inside :class:`TokenEndpointError`, whose message is written here. So is the
wording of a failed connection (a name that does not resolve, a refused connection, a
certificate that is not trusted): the operator's next step depends on which it was.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

import aiohttp

from .config import CredentialSet, Secret

# OAuth error codes (RFC 6749 §5.2) that mean the credentials themselves are refused;
# retrying them fast only gets an IP address blocked by login.bol.com.
REJECTIONS = frozenset({"invalid_client", "unauthorized_client", "invalid_grant"})
# Failures no quick retry can cure: an operator has to act. Retried once a minute too.
NO_REFRESH_TOKEN = "no_refresh_token"


@dataclass(frozen=True)
class Grant:
    """A successful token response, secrets wrapped."""

    access_token: Secret
    expires_in: float | None
    refresh_token: Secret | None = None


class TokenEndpointError(Exception):
    """A failed token request; ``code`` is the OAuth error code or a short reason."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail

    @property
    def rejected(self) -> bool:
        """True when bol refused the credentials rather than failing to answer."""
        return self.code in REJECTIONS

    @property
    def needs_operator(self) -> bool:
        """Retrying soon cannot help: credentials refused, or no refresh token yet."""
        return self.rejected or self.code == NO_REFRESH_TOKEN


def basic_auth(cred: CredentialSet) -> str:
    """RFC 6749 §2.3.1 client authentication header value."""
    raw = f"{cred.client_id}:{cred.client_secret.reveal()}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def client_credentials_form() -> dict[str, str]:
    return {"grant_type": "client_credentials"}


def refresh_form(refresh_token: Secret) -> dict[str, str]:
    return {"grant_type": "refresh_token", "refresh_token": refresh_token.reveal()}


def code_form(code: str, redirect_uri: str) -> dict[str, str]:
    return {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}


def authorize_url(base: str, cred: CredentialSet, state: str | None = None) -> tuple[str, str]:
    """bol's authorize URL for ``cred`` (code flow, ``offline_access``) and the fresh
    ``state`` it carries, which bol sends back with the code."""
    state = state or secrets.token_urlsafe(24)
    query = {"response_type": "code", "client_id": cred.client_id, "scope": "offline_access",
             "state": state}
    if cred.redirect_uri:
        query["redirect_uri"] = cred.redirect_uri
    return f"{base}?{urlencode(query)}", state


def parse_token_response(status: int, body: bytes) -> Grant:
    """Read a token endpoint answer (pure); raise :class:`TokenEndpointError` if unusable."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise TokenEndpointError(f"http_{status}" if status != 200 else "malformed",
                                 f"HTTP {status}, body is not a JSON object")
    if status != 200 or "error" in data:
        error = data.get("error")
        code = error if isinstance(error, str) and error.isascii() and len(error) < 64 else None
        raise TokenEndpointError(code or f"http_{status}", f"HTTP {status}")
    token = data.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenEndpointError("malformed", "no access_token in the answer")
    token_type = data.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenEndpointError("malformed", "token_type is not Bearer")
    expires_in = data.get("expires_in")
    if expires_in is not None:
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float | str):
            raise TokenEndpointError("malformed", "expires_in is not a number")
        try:
            expires_in = float(expires_in)
        except ValueError:
            raise TokenEndpointError("malformed", "expires_in is not a number") from None
        if not 0 < expires_in < 10**7:
            raise TokenEndpointError("malformed", "expires_in is out of range")
    refresh = data.get("refresh_token")
    return Grant(
        access_token=Secret(token),
        expires_in=expires_in,
        refresh_token=Secret(refresh) if isinstance(refresh, str) and refresh else None,
    )


TOKEN_ANSWER_TIMEOUT = 20.0  # seconds for login.bol.com to answer, after connecting


class TokenClient:
    """POSTs grants to the token endpoint over the proxy's one client session."""

    def __init__(self, session: aiohttp.ClientSession, token_url: str,
                 connect_timeout: float, answer_timeout: float = TOKEN_ANSWER_TIMEOUT) -> None:
        self._session = session
        self.url = token_url
        self._timeout = aiohttp.ClientTimeout(total=connect_timeout + answer_timeout,
                                              sock_connect=connect_timeout)

    async def request(self, cred: CredentialSet, form: dict[str, str]) -> Grant:
        """One token request; the single boundary where client errors are translated."""
        headers = {
            "Authorization": basic_auth(cred),
            "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded",
        }
        try:
            async with self._session.post(
                self.url, data=urlencode(form).encode(), headers=headers,
                timeout=self._timeout, allow_redirects=False,
            ) as response:
                body = await response.read()
                status = response.status
        except TimeoutError:
            raise TokenEndpointError("timeout", "the token endpoint did not answer") from None
        except aiohttp.ClientError as exc:
            raise connection_failure(exc, self.url) from None
        return parse_token_response(status, body)


def connection_failure(exc: aiohttp.ClientError, url: str) -> TokenEndpointError:
    """An ``unreachable`` error saying in words what failed on the way to ``url``.

    Written from the exception's type and the configured URL, never from ``str(exc)``:
    aiohttp's response errors carry the request's headers, ``Authorization`` included.
    """
    parts = urlsplit(url)
    host = parts.hostname or url
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        detail = f"cannot resolve {host} (DNS)"
    elif isinstance(exc, aiohttp.ClientConnectorCertificateError):
        # OpenSSL's reason: "self-signed certificate", "certificate has expired", ...
        reason = getattr(exc.certificate_error, "verify_message", None) or "not trusted"
        detail = f"TLS handshake with {host} failed (certificate: {str(reason)[:100]})"
    elif isinstance(exc, aiohttp.ClientSSLError):
        reason = getattr(exc.os_error, "reason", None)  # an OpenSSL code: WRONG_VERSION_NUMBER
        detail = f"TLS handshake with {host} failed" + (f" ({reason})" if reason else "")
    elif isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            detail = f"connection refused by {host}:{port}"
        else:  # no route, network unreachable, ...
            why = exc.os_error.strerror or type(exc.os_error).__name__
            detail = f"cannot connect to {host}:{port} ({why})"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        detail = f"{host} closed the connection without answering"
    else:
        detail = f"token endpoint: {type(exc).__name__}"
    return TokenEndpointError("unreachable", detail)
