"""``bol-proxy authorize SET``: connect a seller's shop to a refresh-token set.

Without ``--code`` it prints bol's authorize URL; the seller opens it, approves, and bol
redirects to the set's ``redirect_uri`` with ``?code=…&state=…``. With ``--code`` the
code is exchanged for a refresh token, which is written to ``refresh_token_file`` the
same atomic way the proxy writes rotated tokens. With ``shared_state`` configured the
new token goes to Redis first, as a new version whatever was there (replicas switch to
the new authorisation at their next refresh), then to the file. If Redis does not answer,
the code is not exchanged at all: replicas would go on refreshing the old chain.
"""

from __future__ import annotations

import asyncio
import sys

from .app import client_session
from .config import Config, CredentialSet, Secret
from .errors import ConfigError
from .oauth import TokenClient, TokenEndpointError, authorize_url, code_form
from .refresh import RefreshTokenFile
from .tokens import Clock


class SharedStateUnreachable(Exception):
    """Redis is configured but did not answer; ``exchanged`` says whether the code was
    already spent (then the token is in the file only)."""

    def __init__(self, reason: str, exchanged: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exchanged = exchanged


def _refresh_set(config: Config, name: str) -> CredentialSet:
    cred = config.credentials.get(name)
    if cred is None:
        raise ConfigError(f"credentials: no credential set named '{name}'")
    if cred.grant != "refresh_token" or cred.refresh_token_file is None:
        raise ConfigError(f"credentials.{name}.grant: authorize needs grant: refresh_token")
    if not cred.redirect_uri:
        raise ConfigError(f"credentials.{name}.redirect_uri: required to authorize")
    return cred


def authorize(config: Config, name: str, code: str | None) -> int:
    """Print the authorize URL, or exchange ``code`` and save the refresh token."""
    cred = _refresh_set(config, name)
    if code is None:
        url, state = authorize_url(config.upstream.authorize_url, cred)
        print(f"Open this URL as the seller and approve access for '{name}':\n\n  {url}\n")
        print(f"bol then redirects to {cred.redirect_uri}?code=...&state={state}")
        where = "" if config.source == "environment" else f" --config {config.source}"
        print(f"Check that state matches, then run:\n\n  bol-proxy authorize {name}{where} "
              "--code=CODE")
        return 0
    try:
        version = asyncio.run(_exchange(config, cred, code))
    except SharedStateUnreachable as exc:
        if exc.exchanged:
            print(f"bol-proxy: the shared state (Redis) stopped answering ({exc.reason}); the "
                  f"refresh token is saved to {cred.refresh_token_file} only: run authorize "
                  "again once Redis answers", file=sys.stderr)
        else:
            print(f"bol-proxy: the shared state (Redis) is unreachable ({exc.reason}); the "
                  "code was not exchanged: run this again once Redis answers", file=sys.stderr)
        return 1
    except TokenEndpointError as exc:
        print(f"bol-proxy: exchanging the code failed ({exc.code}); codes are single-use "
              "and short-lived: authorise again", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"bol-proxy: cannot write {cred.refresh_token_file}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    shared = "" if version is None else f" and to the shared state (version {version})"
    print(f"refresh token for '{name}' saved to {cred.refresh_token_file}{shared}")
    return 0


async def _exchange(config: Config, cred: CredentialSet, code: str) -> int | None:
    """Exchange ``code`` and store the refresh token; its shared version, if shared."""
    if not config.shared_state.enabled:
        await _save(cred, await _refresh_token(config, cred, code))
        return None
    from .shared import SharedStateDown, SharedStore
    from .shared_tokens import TokenGroup

    store = SharedStore(config.shared_state)
    exchanged = False
    try:
        await store.check()  # before the single-use code is spent
        token = await _refresh_token(config, cred, code)
        exchanged = True
        try:
            return await TokenGroup(store, cred, Clock()).authorise(token)
        finally:
            await _save(cred, token)  # the file in any case: the token must not be lost
    except SharedStateDown as exc:
        raise SharedStateUnreachable(exc.reason, exchanged) from None
    finally:
        await store.close()


async def _refresh_token(config: Config, cred: CredentialSet, code: str) -> Secret:
    assert cred.redirect_uri is not None
    async with client_session(config) as session:
        client = TokenClient(session, config.upstream.token_url,
                             config.upstream.connect_timeout)
        grant = await client.request(cred, code_form(code, cred.redirect_uri))
    if grant.refresh_token is None:
        raise TokenEndpointError("malformed", "the answer holds no refresh_token")
    return grant.refresh_token


async def _save(cred: CredentialSet, token: Secret) -> None:
    assert cred.refresh_token_file is not None
    store = RefreshTokenFile(cred.refresh_token_file)
    async with store.locked():  # not in the middle of a running proxy's rotation
        store.save(token, new_authorisation=True)
