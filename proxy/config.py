"""Configuration: read once, validated into frozen dataclasses, secrets masked.

The YAML file (read by :mod:`proxy.configfile`) and the zero-config environment (one set
from ``BOL_*`` variables) both become one raw mapping that a single validator turns into
a :class:`Config`. Every error names the key path and the offending value (never a
secret) and becomes exit status 2; a file that cannot be read is exit status 1. A key
that is not known gets the nearest known one suggested, for typos such as ``prot``.
"""

from __future__ import annotations

import difflib
import hmac
import os
import re
import ssl
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from . import configfile
from .errors import ConfigError, ConfigFileError

MAX_SECONDS = 7 * 86400.0  # the largest duration any setting takes: a week


SET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")
DEFAULT_ALLOWED_PATHS = (
    "/retailer",
    "/retailer-demo",
    "/shared",
    "/shared-demo",
    "/advertiser",
    "/advertiser-demo",
)
GrantType = Literal["client_credentials", "refresh_token"]


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself; call only where it leaves for the token endpoint."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True)
class Upstream:
    api_url: str = "https://api.bol.com"
    token_url: str = "https://login.bol.com/token"
    connect_timeout: float = 10.0
    timeout: float = 300.0
    ca_file: str | None = None
    allowed_paths: tuple[str, ...] = DEFAULT_ALLOWED_PATHS

    @property
    def authorize_url(self) -> str:
        """bol's authorize endpoint: ``/authorize`` on the host of its token endpoint."""
        parts = urlsplit(self.token_url)
        return f"{parts.scheme}://{parts.netloc}/authorize"

    @property
    def token_host(self) -> str:
        """The token endpoint's host (and port, if the URL gives one), for messages:
        ``login.bol.com`` unless ``token_url`` points elsewhere."""
        return urlsplit(self.token_url).netloc


@dataclass(frozen=True)
class Limits:
    max_body_size: int = 52_428_800
    replay_buffer: int = 1_048_576


@dataclass(frozen=True)
class RateLimits:
    enabled: bool = True
    # A request waits for budget at most this long: with bol's answer on top, it stays
    # within the 30 s most HTTP clients allow a request.
    max_wait: float = 20.0


@dataclass(frozen=True)
class TokenPolicy:
    refresh_margin: float = 30.0
    default_ttl: float = 299.0
    idle_after: float = 900.0


DEFAULT_KEY_PREFIX = "bol-proxy:"
_KEY_PREFIX = re.compile(r"[!-~]{0,64}\Z")  # printable ASCII, no spaces: a Redis key part


@dataclass(frozen=True)
class SharedState:
    """Where replicas share tokens and refresh tokens: Redis, or nowhere (alone)."""

    redis_url: Secret | None = None  # may carry a password: shown only masked
    key_prefix: str = DEFAULT_KEY_PREFIX

    @property
    def enabled(self) -> bool:
        return self.redis_url is not None


def masked_url(url: str) -> str:
    """``url`` with its password (and user name) replaced by stars, for people to read."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = "********@" + host + (f":{port}" if port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True)
class CredentialSet:
    """One set of client credentials; equal sets keep their tokens across a reload."""

    name: str
    client_id: str
    client_secret: Secret = field(repr=False)
    grant: GrantType = "client_credentials"
    prefetch: bool = True
    port: int | None = None
    refresh_token_file: Path | None = None
    redirect_uri: str | None = None

    @cached_property
    def _hash(self) -> int:
        return hash(tuple(getattr(self, f.name) for f in fields(self)))

    def __hash__(self) -> int:
        # The token cache's key, looked up on every request: hashed once, not per lookup.
        return self._hash


@dataclass(frozen=True)
class Config:
    listen: Listen = Listen()
    upstream: Upstream = Upstream()
    limits: Limits = Limits()
    tokens: TokenPolicy = TokenPolicy()
    rate_limits: RateLimits = RateLimits()
    shutdown_timeout: float = 30.0
    credentials: Mapping[str, CredentialSet] = field(default_factory=dict)
    default_credentials: str | None = None
    source: str = "defaults"
    shared_state: SharedState = SharedState()

    def dedicated_ports(self) -> dict[int, str]:
        """Listener port -> the set every request on it uses (a set's dedicated port
        comes before every other way of naming a set)."""
        return {s.port: s.name for s in self.credentials.values() if s.port is not None}


# --------------------------------------------------------------------------- loading


def load_file(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML configuration file."""
    env = os.environ if env is None else env
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"cannot read configuration file {path}: {_reason(exc)}") from exc
    raw = configfile.parse(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    raw = configfile.interpolate(raw, env)
    # The listener variables are defaults under a file too, so that an image can set
    # BOL_PROXY_HOST=0.0.0.0 once; a file that names listen.host/port wins.
    listen = raw.get("listen")
    if listen is None or isinstance(listen, dict):
        listen = dict(listen or {})
        for variable, key in (("BOL_PROXY_HOST", "host"), ("BOL_PROXY_PORT", "port")):
            if env.get(variable) and key not in listen:
                listen[key] = env[variable]
        if listen:
            raw["listen"] = listen
    return validate(raw, source=str(path))


def load_env(env: Mapping[str, str] | None = None) -> Config:
    """Zero-config: one set named ``default`` from ``BOL_CLIENT_ID`` and
    ``BOL_CLIENT_SECRET`` (or ``BOL_CLIENT_SECRET_FILE``); ``BOL_PROXY_HOST``,
    ``BOL_PROXY_PORT``, ``BOL_API_URL`` and ``BOL_TOKEN_URL`` override the defaults."""
    env = os.environ if env is None else env
    if not env.get("BOL_CLIENT_ID"):
        raise ConfigError(
            "no configuration: pass --config PATH, set BOL_PROXY_CONFIG, or set "
            "BOL_CLIENT_ID and BOL_CLIENT_SECRET (or BOL_CLIENT_SECRET_FILE)"
        )
    cred: dict[str, Any] = {"client_id": env["BOL_CLIENT_ID"]}
    if env.get("BOL_CLIENT_SECRET_FILE"):
        cred["client_secret_file"] = env["BOL_CLIENT_SECRET_FILE"]
    elif env.get("BOL_CLIENT_SECRET"):
        cred["client_secret"] = env["BOL_CLIENT_SECRET"]
    else:
        raise ConfigError("BOL_CLIENT_ID is set but neither BOL_CLIENT_SECRET nor "
                          "BOL_CLIENT_SECRET_FILE is")
    raw: dict[str, Any] = {"credentials": {"default": cred}, "listen": {}, "upstream": {}}
    if env.get("BOL_PROXY_REDIS_URL"):
        raw["shared_state"] = {"redis_url": env["BOL_PROXY_REDIS_URL"]}
    for variable, section, key in (
        ("BOL_PROXY_HOST", "listen", "host"),
        ("BOL_PROXY_PORT", "listen", "port"),
        ("BOL_API_URL", "upstream", "api_url"),
        ("BOL_TOKEN_URL", "upstream", "token_url"),
    ):
        if env.get(variable):
            raw[section][key] = env[variable]
    try:
        return validate(raw, source="environment")
    except ConfigError as exc:
        # Name the variable the operator set, not the key it stands for.
        message = str(exc)
        for variable, key in _ENV_KEYS.items():
            message = message.replace(key + ":", variable + ":", 1)
        raise type(exc)(message) from None


_ENV_KEYS = {
    "BOL_PROXY_HOST": "listen.host",
    "BOL_PROXY_PORT": "listen.port",
    "BOL_API_URL": "upstream.api_url",
    "BOL_TOKEN_URL": "upstream.token_url",
    "BOL_CLIENT_ID": "credentials.default.client_id",
    "BOL_CLIENT_SECRET_FILE": "credentials.default.client_secret_file",
    "BOL_PROXY_REDIS_URL": "shared_state.redis_url",
}


def load(path: str | None, env: Mapping[str, str] | None = None) -> Config:
    """``--config`` wins, then ``BOL_PROXY_CONFIG``, then zero-config."""
    env = os.environ if env is None else env
    path = path or env.get("BOL_PROXY_CONFIG") or None
    return load_file(path, env) if path else load_env(env)


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__


# ------------------------------------------------------------------------ validation


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Section:
    """Reads the keys of one mapping, remembering the path for error messages.

    ``keys`` are the keys the mapping may have: any other is refused at once, before a
    value is looked at, so that a misspelt key is reported as such (``client_secert``)
    rather than as the key it should have been going missing.
    """

    def __init__(self, raw: Any, path: str, keys: Iterable[str] = ()) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            # The type only: a misplaced value here may well be a secret.
            raise ConfigError(f"{path}: must be a mapping, got {type(raw).__name__}")
        self.raw: dict[Any, Any] = dict(raw)
        self.path = path
        self.known = list(keys)
        if self.known:
            for name in self.raw:
                if name not in self.known:
                    self._unknown(name)

    def key(self, name: str) -> str:
        return _join(self.path, name)

    def take(self, name: str, default: Any = None) -> Any:
        if name not in self.known:
            self.known.append(name)
        return self.raw.pop(name, default)

    def has(self, name: str) -> bool:
        return name in self.raw

    def number(self, name: str, default: float, *, minimum: float = 0.0,
               exclusive: bool = True, maximum: float = MAX_SECONDS) -> float:
        value = self.take(name, default)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.key(name)}: expected a number, got {_show(value)}") from None
        if isinstance(value, bool) or number != number or number in (float("inf"),):
            raise ConfigError(f"{self.key(name)}: expected a number, got {_show(value)}")
        if number < minimum or (exclusive and number == minimum):
            bound = "greater than" if exclusive else "at least"
            raise ConfigError(f"{self.key(name)}: must be {bound} {minimum:g}, got {_show(value)}")
        if number > maximum:
            raise ConfigError(f"{self.key(name)}: must be at most {maximum:g}, got {_show(value)}")
        return number

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        number = self.optional_integer(name, minimum=minimum, maximum=maximum)
        return default if number is None else number

    def optional_integer(self, name: str, *, minimum: int, maximum: int) -> int | None:
        value = self.take(name)
        if value is None:
            return None
        try:
            number = int(str(value).strip())
        except ValueError:
            number = None
        if isinstance(value, bool | float) or number is None:
            raise ConfigError(f"{self.key(name)}: expected a whole number, got {_show(value)}")
        if not minimum <= number <= maximum:
            raise ConfigError(
                f"{self.key(name)}: must be between {minimum} and {maximum}, got {number}"
            )
        return number

    def string(self, name: str, default: str | None) -> str | None:
        value = self.take(name, default)
        if value is None:
            return None
        if isinstance(value, bool | dict | list):
            raise ConfigError(f"{self.key(name)}: expected text, got {_show(value)}")
        return str(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.take(name, default)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)}: expected true or false, got {_show(value)}")
        return value

    def done(self) -> None:
        """Every key should have been taken: a key left over is unknown."""
        for name in self.raw:
            self._unknown(name)

    def _unknown(self, name: Any) -> None:
        """Unknown keys are errors, not ignored: a misspelt setting would silently keep
        its default. The nearest known key is suggested (never for set names, which a
        section of sets does not check)."""
        close = difflib.get_close_matches(str(name), self.known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{self.key(str(name))}: unknown key '{name}'{hint}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# The keys each section may have (the sets under credentials have names of their own).
TOP_KEYS = ("listen", "upstream", "limits", "tokens", "rate_limits", "shared_state",
            "shutdown_timeout", "credentials", "default_credentials")
LISTEN_KEYS = ("host", "port")
UPSTREAM_KEYS = ("api_url", "token_url", "connect_timeout", "timeout", "ca_file",
                 "allowed_paths")
LIMITS_KEYS = ("max_body_size", "replay_buffer")
TOKENS_KEYS = ("refresh_margin", "default_ttl", "idle_after")
RATE_LIMITS_KEYS = ("enabled", "max_wait")
SHARED_STATE_KEYS = ("redis_url", "key_prefix")
SET_KEYS = ("client_id", "client_secret", "client_secret_file", "grant", "prefetch", "port",
            "refresh_token_file", "redirect_uri")


def validate(raw: Mapping[str, Any], source: str = "configuration") -> Config:
    """Turn a raw mapping into a :class:`Config`, or raise :class:`ConfigError`."""
    top = _Section(raw, "", TOP_KEYS)
    listen = _listen(_Section(top.take("listen"), "listen", LISTEN_KEYS))
    upstream = _upstream(_Section(top.take("upstream"), "upstream", UPSTREAM_KEYS))
    limits = _limits(_Section(top.take("limits"), "limits", LIMITS_KEYS))
    tokens = _tokens(_Section(top.take("tokens"), "tokens", TOKENS_KEYS))
    rate_limits = _rate_limits(_Section(top.take("rate_limits"), "rate_limits",
                                        RATE_LIMITS_KEYS))
    shutdown_timeout = top.number("shutdown_timeout", 30.0)
    shared_state = _shared_state(_Section(top.take("shared_state"), "shared_state",
                                          SHARED_STATE_KEYS))
    roots = {p.strip("/").split("/")[0] for p in upstream.allowed_paths}
    sets_raw = _Section(top.take("credentials"), "credentials")
    if not sets_raw.raw:
        raise ConfigError("credentials: at least one credential set is required")
    credentials = {
        name: _credential_set(name, sets_raw.take(name), roots)
        for name in list(sets_raw.raw)
    }
    default = top.string("default_credentials", None)
    top.done()
    if default is None and len(credentials) == 1:
        default = next(iter(credentials))
    if default is not None and default not in credentials:
        raise ConfigError(f"default_credentials: no credential set named '{default}'")
    check_ports(listen, credentials)
    return Config(listen, upstream, limits, tokens, rate_limits, shutdown_timeout, credentials,
                  default, source, shared_state)


def _listen(s: _Section) -> Listen:
    host = s.string("host", Listen.host) or Listen.host
    port = s.integer("port", Listen.port, minimum=0, maximum=65535)
    s.done()
    return Listen(host, port)


def _url(s: _Section, name: str, default: str) -> str:
    value = s.string(name, default) or default
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ConfigError(f"{s.key(name)}: not a valid URL") from None
    if "@" in parts.netloc:
        # Never echoed: the part before '@' is a user name and password.
        raise ConfigError(f"{s.key(name)}: credentials in the URL are not supported; "
                          "configure them as a credential set")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{s.key(name)}: expected a URL starting with https:// (or "
                          f"http://), got {_show(value)}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{s.key(name)}: expected a URL without query or fragment, got "
                          f"{_show(value)}")
    return value.rstrip("/")


def _upstream(s: _Section) -> Upstream:
    api_url = _url(s, "api_url", Upstream.api_url)
    token_url = _url(s, "token_url", Upstream.token_url)
    connect_timeout = s.number("connect_timeout", Upstream.connect_timeout)
    timeout = s.number("timeout", Upstream.timeout)
    ca_file = s.string("ca_file", None)
    if ca_file is not None:
        if not os.path.isfile(ca_file) or not os.access(ca_file, os.R_OK):
            raise ConfigFileError(f"{s.key('ca_file')}: cannot read {ca_file} (not a "
                                  "readable file)")
        try:
            ssl.create_default_context().load_verify_locations(ca_file)
        except (ssl.SSLError, OSError):
            raise ConfigError(f"{s.key('ca_file')}: {ca_file} holds no PEM certificates") \
                from None
    paths_raw = s.take("allowed_paths", list(DEFAULT_ALLOWED_PATHS))
    if not isinstance(paths_raw, list) or not paths_raw:
        raise ConfigError(f"{s.key('allowed_paths')}: expected a non-empty list of paths")
    paths = []
    for i, p in enumerate(paths_raw):
        text = str(p).rstrip("/")
        segments = text.split("/")[1:]
        if (not isinstance(p, str) or not text.startswith("/")
                or any(seg in ("", ".", "..") or not re.fullmatch(r"[A-Za-z0-9._~-]+", seg)
                       for seg in segments)):
            raise ConfigError(
                f"{s.key('allowed_paths')}[{i}]: expected a path like /retailer, got {_show(p)}"
            )
        paths.append(text)
    s.done()
    return Upstream(api_url, token_url, connect_timeout, timeout, ca_file, tuple(paths))


def _limits(s: _Section) -> Limits:
    big = 2**62
    max_body = s.integer("max_body_size", Limits.max_body_size, minimum=0, maximum=big)
    replay = s.integer("replay_buffer", Limits.replay_buffer, minimum=0, maximum=big)
    s.done()
    return Limits(max_body, replay)


def _tokens(s: _Section) -> TokenPolicy:
    margin = s.number("refresh_margin", TokenPolicy.refresh_margin, exclusive=False)
    ttl = s.number("default_ttl", TokenPolicy.default_ttl)
    idle = s.number("idle_after", TokenPolicy.idle_after)
    s.done()
    return TokenPolicy(margin, ttl, idle)


def _rate_limits(s: _Section) -> RateLimits:
    enabled = s.boolean("enabled", RateLimits.enabled)
    max_wait = s.number("max_wait", RateLimits.max_wait, exclusive=False, maximum=3600)
    s.done()
    return RateLimits(enabled, max_wait)


def _shared_state(s: _Section) -> SharedState:
    url = s.take("redis_url")
    prefix = s.string("key_prefix", DEFAULT_KEY_PREFIX)
    s.done()
    if prefix is None or not _KEY_PREFIX.match(prefix):
        raise ConfigError(f"{s.key('key_prefix')}: expected up to 64 printable characters "
                          f"without spaces, got {_show(prefix)}")
    if url is None or url == "":
        return SharedState(None, prefix)
    if not isinstance(url, str):
        raise ConfigError(f"{s.key('redis_url')}: expected a redis:// or rediss:// URL")
    # The URL is never echoed: it may carry the password of the Redis server.
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ConfigError(f"{s.key('redis_url')}: not a valid URL") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or parts.fragment:
        raise ConfigError(f"{s.key('redis_url')}: expected redis://[:password@]host[:port][/db] "
                          "or rediss://... (TLS)")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ConfigError(f"{s.key('redis_url')}: the path must be a database number")
    return SharedState(Secret(url), prefix)


def _credential_set(name: Any, raw: Any, roots: set[str]) -> CredentialSet:
    path = f"credentials.{name}"
    if not isinstance(name, str) or not SET_NAME.match(name):
        raise ConfigError(f"{path}: set names match [a-z0-9][a-z0-9_-]*, got {_show(name)}")
    if name in roots:
        raise ConfigError(f"{path}: a set may not be named like the API path /{name}")
    s = _Section(raw, path, SET_KEYS)
    grant = s.string("grant", "client_credentials")
    if grant not in ("client_credentials", "refresh_token"):
        raise ConfigError(
            f"{s.key('grant')}: expected client_credentials or refresh_token, got {_show(grant)}"
        )
    client_id = s.string("client_id", None)
    if not client_id:
        raise ConfigError(f"{s.key('client_id')}: required")
    secret = _secret(s, "client_secret")
    if secret is None:
        raise ConfigError(f"{path}: client_secret or client_secret_file is required")
    prefetch = s.boolean("prefetch", True)
    port = s.optional_integer("port", minimum=1, maximum=65535)
    refresh_file = s.string("refresh_token_file", None)
    redirect_uri = s.string("redirect_uri", None)
    if grant == "refresh_token" and not refresh_file:
        raise ConfigError(f"{s.key('refresh_token_file')}: required for grant: refresh_token")
    if grant == "client_credentials":
        for key, value in (("refresh_token_file", refresh_file), ("redirect_uri", redirect_uri)):
            if value is not None:
                raise ConfigError(f"{s.key(key)}: only for grant: refresh_token")
    s.done()
    return CredentialSet(
        name=name,
        client_id=client_id,
        client_secret=secret,
        grant=grant,  # type: ignore[arg-type]  # checked above
        prefetch=prefetch,
        port=port,
        refresh_token_file=Path(refresh_file) if refresh_file else None,
        redirect_uri=redirect_uri,
    )


def _secret(s: _Section, name: str) -> Secret | None:
    inline, file_name = s.take(name), s.string(f"{name}_file", None)
    if inline is not None and file_name is not None:
        raise ConfigError(f"{s.key(name)}: give either {name} or {name}_file, not both")
    if file_name is not None:
        return Secret(read_secret_file(file_name, s.key(f"{name}_file")))
    if inline is None:
        return None
    if isinstance(inline, bool | dict | list) or not str(inline):
        raise ConfigError(f"{s.key(name)}: expected a non-empty text value")
    return Secret(str(inline))


def read_secret_file(file_name: str | os.PathLike[str], key: str) -> str:
    """A secret kept in a file, trailing newline stripped (as editors and ``echo`` leave
    one)."""
    try:
        value = Path(file_name).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"{key}: cannot read {file_name}: {_reason(exc)}") from exc
    if not value:
        raise ConfigError(f"{key}: {file_name} is empty")
    return value


def check_ports(listen: Listen, credentials: Mapping[str, CredentialSet]) -> None:
    """Every listener port is used once (a set's port is not the main one, nor another's)."""
    seen: dict[int, str] = {}
    for cred in credentials.values():
        if cred.port is None:
            continue
        if cred.port == listen.port:
            raise ConfigError(f"credentials.{cred.name}.port: {cred.port} is also listen.port")
        if cred.port in seen:
            raise ConfigError(
                f"credentials.{cred.name}.port: {cred.port} is also the port of '{seen[cred.port]}'"
            )
        seen[cred.port] = cred.name


# --------------------------------------------------------------------------- summary


def summary(config: Config) -> Iterator[str]:
    """Lines for ``--check``: everything an operator needs, every secret masked."""
    yield f"configuration from {config.source}: valid"
    yield f"listen: {config.listen.host}:{config.listen.port}"
    up = config.upstream
    yield f"upstream: {up.api_url} (tokens from {up.token_url})"
    yield f"  timeouts: connect {up.connect_timeout:g}s, exchange {up.timeout:g}s"
    yield f"  allowed paths: {', '.join(up.allowed_paths)}"
    yield (f"limits: max_body_size {config.limits.max_body_size} bytes, "
           f"replay_buffer {config.limits.replay_buffer} bytes")
    t = config.tokens
    yield (f"tokens: refresh_margin {t.refresh_margin:g}s, default_ttl {t.default_ttl:g}s, "
           f"idle_after {t.idle_after:g}s")
    r = config.rate_limits
    yield (f"rate limits: {'kept per set and endpoint' if r.enabled else 'off'}"
           + (f", requests wait at most {r.max_wait:g}s for budget" if r.enabled else ""))
    shared = config.shared_state
    if shared.redis_url is None:
        yield "shared state: none (this replica keeps its tokens to itself)"
    else:
        yield (f"shared state: {masked_url(shared.redis_url.reveal())}, "
               f"key prefix {shared.key_prefix!r}")
    yield (f"{plural(len(config.credentials), 'credential set')} "
           f"(default: {config.default_credentials or 'none'})")
    shown: Callable[[CredentialSet], str] = lambda c: (  # noqa: E731
        f"  {c.name}: client_id {c.client_id}, client_secret ********, grant {c.grant}, "
        f"{'prefetch' if c.prefetch else 'on demand'}"
        + (f", port {c.port}" if c.port else "")
        + (f", refresh token in {c.refresh_token_file}" if c.refresh_token_file else "")
    )
    for cred in list(config.credentials.values())[:50]:
        yield shown(cred)
    if len(config.credentials) > 50:
        yield f"  ... and {len(config.credentials) - 50} more"
    for warning in warnings(config):
        yield f"warning: {warning}"
    yield from pointing_a_tool(config)


def warnings(config: Config) -> list[str]:
    """What is valid but probably not meant (for --check and the start-up log)."""
    said = []
    for key in ("api_url", "token_url"):
        parts = urlsplit(getattr(config.upstream, key))
        if parts.scheme == "http" and (parts.hostname or "") not in _LOOPBACK:
            said.append(f"upstream.{key} is plain http to a remote host: client secrets "
                        "and tokens would cross the network unencrypted")
    return said


_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def pointing_a_tool(config: Config) -> Iterator[str]:
    """How a tool reaches this configuration: its API and login URLs."""
    host = config.listen.host if config.listen.host not in ("0.0.0.0", "::") else "127.0.0.1"
    base = f"http://{host}:{config.listen.port}"
    example = config.default_credentials or next(iter(config.credentials))
    if config.default_credentials:
        yield (f"point tools at {base} instead of https://api.bol.com "
               f"(or at {base}/{example} for set {example})")
    else:  # a request must name its set
        yield (f"point tools at {base}/<set> instead of https://api.bol.com (e.g. "
               f"{base}/{example}), or send X-Bol-Credentials: <set>: there is no default set")
    yield (f"tools that log in themselves: login URL {base}/token, client id = a set's name "
           f"(e.g. {example}), any secret")


def changes(old: Config, new: Config, opened: Iterable[int] = (),
            closed: Iterable[int] = ()) -> list[str]:
    """What a reload changed, in a few words each (for the log; never a secret)."""
    said: list[str] = []
    before, after = old.credentials, new.credentials
    for verb, names in (
        ("added", [n for n in after if n not in before]),
        ("removed", [n for n in before if n not in after]),
        ("changed", [n for n in after if n in before and after[n] != before[n]]),
    ):
        if names:
            shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more"
                                             if len(names) > 10 else "")
            said.append(f"{plural(len(names), 'set')} {verb} ({shown})")
    for verb, ports in (("opened", sorted(opened)), ("closed", sorted(closed))):
        if ports:
            said.append(f"{plural(len(ports), 'listener')} {verb} "
                        f"(port{'s' if len(ports) > 1 else ''} "
                        f"{', '.join(map(str, ports))})")
    for section in ("listen", "upstream", "limits", "tokens", "rate_limits", "shared_state"):
        if getattr(old, section) != getattr(new, section):
            said.append(f"{section} settings changed")
    if old.shutdown_timeout != new.shutdown_timeout:
        said.append("shutdown_timeout changed")
    if old.default_credentials != new.default_credentials:
        said.append(f"default set now {new.default_credentials}")
    return said or ["nothing changed"]


def plural(count: int, noun: str) -> str:
    """A count and its noun in agreement: ``1 credential set``, ``2 credential sets``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
