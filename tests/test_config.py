"""Configuration loading and validation, driven through files in tmp_path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import configfile
from proxy.config import (
    DEFAULT_ALLOWED_PATHS,
    Config,
    CredentialSet,
    Secret,
    load,
    load_env,
    load_file,
    plural,
    summary,
    validate,
    warnings,
)
from proxy.errors import ConfigError, ConfigFileError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "example.yaml"
SECRET = "acme-secret-0123456789abcdef"
SECRET_2 = "partner-secret-fedcba9876543210"

BASE: dict[str, Any] = {
    "credentials": {"acme": {"client_id": "acme-id", "client_secret": SECRET}},
}


def write(tmp_path: Path, content: dict[str, Any] | str, name: str = "proxy.yaml") -> Path:
    """Write a configuration file; a dict is dumped as YAML, a str written as is."""
    path = tmp_path / name
    text = content if isinstance(content, str) else yaml.safe_dump(content)
    path.write_text(text, encoding="utf-8")
    return path


def with_(**changes: Any) -> dict[str, Any]:
    """BASE with top-level keys replaced (``None`` removes the key)."""
    raw = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


def acme(**changes: Any) -> dict[str, Any]:
    """BASE with keys of the ``acme`` set replaced (``None`` removes the key)."""
    raw = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            raw["credentials"]["acme"].pop(key, None)
        else:
            raw["credentials"]["acme"][key] = value
    return raw


def error_of(tmp_path: Path, content: dict[str, Any] | str,
             env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_file(write(tmp_path, content), env={} if env is None else env)
    return str(info.value)


# ------------------------------------------------------------------------ defaults


def test_minimal_file_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_file(write(tmp_path, BASE), env={})
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8080)
    assert config.upstream.api_url == "https://api.bol.com"
    assert config.upstream.token_url == "https://login.bol.com/token"
    assert (config.upstream.connect_timeout, config.upstream.timeout) == (10, 300)
    assert config.upstream.ca_file is None
    assert config.upstream.allowed_paths == DEFAULT_ALLOWED_PATHS
    assert (config.limits.max_body_size, config.limits.replay_buffer) == (52_428_800, 1_048_576)
    assert (config.tokens.refresh_margin, config.tokens.default_ttl,
            config.tokens.idle_after) == (30, 299, 900)
    assert config.shutdown_timeout == 30
    cred = config.credentials["acme"]
    assert (cred.client_id, cred.client_secret.reveal()) == ("acme-id", SECRET)
    assert (cred.grant, cred.prefetch, cred.port) == ("client_credentials", True, None)
    assert config.source == str(tmp_path / "proxy.yaml")


def test_full_file_is_read_into_every_field(tmp_path: Path) -> None:
    secret_file = tmp_path / "partner.secret"
    secret_file.write_text(SECRET_2 + "\n")
    raw = {
        "listen": {"host": "0.0.0.0", "port": 9000},
        "upstream": {"api_url": "http://127.0.0.1:1234/", "token_url": "http://127.0.0.1:1/t",
                     "connect_timeout": 2.5, "timeout": 60, "allowed_paths": ["/retailer/"]},
        "limits": {"max_body_size": 1000, "replay_buffer": 10},
        "tokens": {"refresh_margin": 0, "default_ttl": 100, "idle_after": 5},
        "shutdown_timeout": 3,
        "credentials": {
            "acme": {"client_id": "a", "client_secret": SECRET, "prefetch": False,
                     "port": 9001},
            "partner-shop": {"grant": "refresh_token", "client_id": "p",
                             "client_secret_file": str(secret_file),
                             "refresh_token_file": str(tmp_path / "p.refresh"),
                             "redirect_uri": "https://partner.example/cb"},
        },
        "default_credentials": "partner-shop",
    }
    config = load_file(write(tmp_path, raw), env={})
    assert (config.listen.host, config.listen.port) == ("0.0.0.0", 9000)
    assert config.upstream.api_url == "http://127.0.0.1:1234"  # trailing slash dropped
    assert config.upstream.allowed_paths == ("/retailer",)
    assert (config.limits.max_body_size, config.limits.replay_buffer) == (1000, 10)
    assert config.tokens.refresh_margin == 0
    assert config.shutdown_timeout == 3
    assert config.credentials["acme"].prefetch is False
    assert config.dedicated_ports() == {9001: "acme"}
    partner = config.credentials["partner-shop"]
    assert partner.grant == "refresh_token"
    assert partner.client_secret.reveal() == SECRET_2
    assert partner.refresh_token_file == tmp_path / "p.refresh"
    assert partner.redirect_uri == "https://partner.example/cb"
    assert config.default_credentials == "partner-shop"


# ------------------------------------------------------------------ interpolation


def test_variables_and_fallbacks_are_interpolated(tmp_path: Path) -> None:
    text = (
        "listen:\n  port: ${PORT}\n  host: ${HOST:-0.0.0.0}\n"
        "upstream:\n  api_url: ${SCHEME:-https}://${API_HOST}/\n"
        "credentials:\n  acme:\n    client_id: id-${SUFFIX:-}x\n"
        "    client_secret: ${ACME_SECRET}\n    prefetch: ${PREFETCH:-false}\n"
    )
    env = {"PORT": "9090", "API_HOST": "api.example", "ACME_SECRET": SECRET}
    config = load_file(write(tmp_path, text), env=env)
    assert config.listen.port == 9090
    assert config.listen.host == "0.0.0.0"
    assert config.upstream.api_url == "https://api.example"
    assert config.credentials["acme"].client_id == "id-x"
    assert config.credentials["acme"].client_secret.reveal() == SECRET
    assert config.credentials["acme"].prefetch is False


def test_a_set_variable_wins_over_its_fallback(tmp_path: Path) -> None:
    text = "listen:\n  host: ${HOST:-0.0.0.0}\n" + yaml.safe_dump(BASE)
    config = load_file(write(tmp_path, text), env={"HOST": "10.1.2.3"})
    assert config.listen.host == "10.1.2.3"


def test_an_empty_variable_takes_its_fallback_like_a_shell(tmp_path: Path) -> None:
    # ${NAME:-fallback} means "unset or empty" in sh, Docker Compose and Kubernetes
    # manifests; an orchestrator that sets HOST= expects the fallback.
    text = "listen:\n  host: ${HOST:-0.0.0.0}\n" + yaml.safe_dump(BASE)
    config = load_file(write(tmp_path, text), env={"HOST": ""})
    assert config.listen.host == "0.0.0.0"


def test_interpolated_values_are_not_interpolated_again(tmp_path: Path) -> None:
    text = "credentials:\n  acme:\n    client_id: id\n    client_secret: ${ACME_SECRET}\n"
    config = load_file(write(tmp_path, text), env={"ACME_SECRET": "${OTHER}$x"})
    assert config.credentials["acme"].client_secret.reveal() == "${OTHER}$x"


@pytest.mark.parametrize(
    ("text", "key", "variable"),
    [
        ("credentials:\n  acme:\n    client_id: id\n    client_secret: ${ACME_SECRET}\n",
         "credentials.acme.client_secret", "ACME_SECRET"),
        ("upstream:\n  allowed_paths: [/retailer, '/x${ROOT}']\n" + yaml.safe_dump(BASE),
         "upstream.allowed_paths[1]", "ROOT"),
    ],
)
def test_unset_variable_is_an_error_naming_variable_and_key(
    tmp_path: Path, text: str, key: str, variable: str
) -> None:
    message = error_of(tmp_path, text, env={"UNRELATED": "1"})
    assert message.startswith(key + ":")
    assert variable in message


def secret_set(value: str) -> str:
    """A file whose one set has ``value`` as its client secret, written into the YAML as is."""
    return f"credentials:\n  acme:\n    client_id: id\n    client_secret: {value}\n"


@pytest.mark.parametrize(
    ("value", "variable"),
    [("${ACME_SECRET", "ACME_SECRET"), ("${ACME_SECRET:-" + SECRET, "ACME_SECRET"),
     ("x${ACME_SECRET", "ACME_SECRET")],
    ids=["bare", "with-fallback", "after-text"],
)
def test_an_unterminated_variable_is_an_error_naming_key_and_variable_not_a_secret(
    tmp_path: Path, value: str, variable: str
) -> None:
    # Taken literally, "${ACME_SECRET" would be sent to bol as the client secret.
    message = error_of(tmp_path, secret_set(value), env={variable: SECRET})
    assert message.startswith("credentials.acme.client_secret:")
    assert f"variable {variable} has no closing '}}'" in message
    assert SECRET not in message


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("${}" + SECRET, "'${}' names no variable"),
        ("${1X}" + SECRET, "not followed by a variable name"),
        ("${ ACME}" + SECRET, "not followed by a variable name"),
        (SECRET + "${", "the value ends in '${'"),
        ("${ACME-" + SECRET + "}", "after variable ACME, expected '}' or ':-fallback}'"),
        ("${ACME:?" + SECRET + "}", "after variable ACME, expected"),
        ("${ACME:-${" + SECRET + "}}", "the fallback of variable ACME holds another '${': "
                                      "nesting is not supported"),
    ],
    ids=["empty", "digit-first", "space", "at-the-end", "sh-default", "sh-error", "nested"],
)
def test_a_reference_that_does_not_parse_is_an_error_naming_the_key(
    tmp_path: Path, value: str, said: str
) -> None:
    message = error_of(tmp_path, secret_set(f"'{value}'"), env={"ACME": "a"})
    assert message.startswith("credentials.acme.client_secret:")
    assert said in message
    assert "write $${ for a literal ${" in message
    assert SECRET[:8] not in message and SECRET[-8:] not in message


@pytest.mark.parametrize(
    ("written", "read"),
    [("pa$$word", "pa$$word"), ("$5", "$5"), ("price$", "price$"), ("$ACME", "$ACME"),
     ("a$b{c}", "a$b{c}"), ("$${ACME}", "${ACME}"), ("x$${y}$${", "x${y}${"),
     ("$${ACME}-${ACME}", "${ACME}-from-env")],
)
def test_a_dollar_stays_literal_unless_it_starts_a_reference_and_doubled_escapes_one(
    tmp_path: Path, written: str, read: str
) -> None:
    config = load_file(write(tmp_path, secret_set(f"'{written}'")), env={"ACME": "from-env"})
    assert config.credentials["acme"].client_secret.reveal() == read


# ---------------------------------------------------------------- structure errors


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (with_(listen={"colour": "blue"}), "listen.colour"),
        (with_(colour="blue"), "colour"),
        (with_(upstream={"timeout": 5, "time_out": 5}), "upstream.time_out"),
        (with_(tokens={"refresh": 3}), "tokens.refresh"),
        (with_(limits={"max_body": 3}), "limits.max_body"),
        (acme(client_secrt="x"), "credentials.acme.client_secrt"),
    ],
)
def test_unknown_key_is_rejected_with_its_path(
    tmp_path: Path, raw: dict[str, Any], key: str
) -> None:
    message = error_of(tmp_path, raw)
    assert message.startswith(key + ":")
    assert "unknown key" in message


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (with_(listen={"prot": 8080}), "listen.prot: unknown key 'prot' (did you mean 'port'?)"),
        (with_(credentials=None, credential=BASE["credentials"]),
         "credential: unknown key 'credential' (did you mean 'credentials'?)"),
        (acme(client_secret=None, client_secert=SECRET),
         "credentials.acme.client_secert: unknown key 'client_secert' "
         "(did you mean 'client_secret'?)"),
        (with_(tokens={"refresh_margn": 5}),
         "tokens.refresh_margn: unknown key 'refresh_margn' (did you mean 'refresh_margin'?)"),
        (with_(upstream={"token-url": "https://x.example/t"}),
         "upstream.token-url: unknown key 'token-url' (did you mean 'token_url'?)"),
    ],
    ids=["listen", "top-level", "set", "tokens", "hyphen"],
)
def test_an_unknown_key_close_to_a_known_one_is_reported_first_with_a_suggestion(
    tmp_path: Path, raw: dict[str, Any], message: str
) -> None:
    # Reported before the key it stands for is found missing: "credentials: at least one
    # set is required" would send the user looking in the wrong place.
    assert error_of(tmp_path, raw) == message


def test_an_unknown_key_like_no_known_one_gets_no_suggestion(tmp_path: Path) -> None:
    assert error_of(tmp_path, with_(listen={"colour": "blue"})) == (
        "listen.colour: unknown key 'colour'")


@pytest.mark.parametrize("raw", [with_(default_credentials="acne"),
                                 with_(credentials={"acme": {"client_id": "i"},
                                                    "acne": "not a set"})])
def test_set_names_are_never_suggested(tmp_path: Path, raw: dict[str, Any]) -> None:
    assert "did you mean" not in error_of(tmp_path, raw)


@pytest.mark.parametrize(
    ("raw", "key", "shown"),
    [
        (with_(listen={"port": "eighty"}), "listen.port", "'eighty'"),
        (with_(listen={"port": 70000}), "listen.port", "70000"),
        (with_(listen={"port": 80.5}), "listen.port", "80.5"),
        (with_(listen={"port": True}), "listen.port", "True"),
        (with_(upstream={"timeout": "soon"}), "upstream.timeout", "'soon'"),
        (with_(upstream={"connect_timeout": 0}), "upstream.connect_timeout", "0"),
        (with_(upstream={"api_url": "ftp://api.bol.com"}), "upstream.api_url", "ftp://api.bol.com"),
        (with_(upstream={"token_url": "https://login.bol.com/token?x=1"}), "upstream.token_url",
         "x=1"),
        (with_(upstream={"allowed_paths": ["retailer"]}), "upstream.allowed_paths[0]",
         "'retailer'"),
        (with_(upstream={"allowed_paths": ["/retailer", "/a/../b"]}), "upstream.allowed_paths[1]",
         "/a/../b"),
        (with_(limits={"max_body_size": -1}), "limits.max_body_size", "-1"),
        (with_(tokens={"refresh_margin": -5}), "tokens.refresh_margin", "-5"),
        (with_(tokens={"default_ttl": float("nan")}), "tokens.default_ttl", "nan"),
        (with_(shutdown_timeout=[1]), "shutdown_timeout", "[1]"),
        (acme(prefetch="maybe"), "credentials.acme.prefetch", "'maybe'"),
        (acme(port="http"), "credentials.acme.port", "'http'"),
        (acme(port=0), "credentials.acme.port", "0"),
        (acme(grant="password"), "credentials.acme.grant", "'password'"),
    ],
)
def test_type_error_names_key_and_value(
    tmp_path: Path, raw: dict[str, Any], key: str, shown: str
) -> None:
    message = error_of(tmp_path, raw)
    assert message.startswith(key + ":")
    assert shown in message


@pytest.mark.parametrize(
    ("raw", "key"),
    [(with_(listen=8080), "listen"), (with_(upstream=["a"]), "upstream"),
     (with_(credentials=["acme"]), "credentials")],
)
def test_a_section_that_is_not_a_mapping_is_named(
    tmp_path: Path, raw: dict[str, Any], key: str
) -> None:
    message = error_of(tmp_path, raw)
    assert message.startswith(key + ":")
    assert "mapping" in message


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (acme(client_id=None), "credentials.acme.client_id"),
        (acme(client_secret=None), "credentials.acme"),
        (acme(client_secret=""), "credentials.acme.client_secret"),
        (acme(client_secret_file="/x"), "credentials.acme.client_secret"),  # both given
        (acme(grant="refresh_token"), "credentials.acme.refresh_token_file"),
        (acme(redirect_uri="https://x.example/cb"), "credentials.acme.redirect_uri"),
        (with_(credentials=None), "credentials"),
        (with_(credentials={}), "credentials"),
    ],
)
def test_missing_or_contradictory_set_keys_are_errors_naming_the_key(
    tmp_path: Path, raw: dict[str, Any], key: str
) -> None:
    assert error_of(tmp_path, raw).startswith(key + ":")


@pytest.mark.parametrize(
    "text", ["listen: [unclosed\n", "- a list\n- at the top\n", "just text\n"]
)
def test_a_file_that_is_not_a_mapping_of_keys_is_a_config_error(
    tmp_path: Path, text: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_file(write(tmp_path, text), env={})
    assert not isinstance(info.value, ConfigFileError)
    assert str(tmp_path / "proxy.yaml") in str(info.value)


def test_a_yaml_syntax_error_gives_the_parsers_reason_and_position_on_one_line(
    tmp_path: Path
) -> None:
    text = "listen:\n  port: 8080\ncredentials:\n  acme:\n\tclient_id: a\n"
    message = error_of(tmp_path, text)
    assert message == (f"{tmp_path / 'proxy.yaml'}: not valid YAML: line 5, column 1: "
                       "found character '\\t' that cannot start any token")


BESIDE_A_SECRET = {
    "alias": f"credentials:\n  acme:\n    client_id: a\n    client_secret: *{SECRET}\n",
    "tag": f"credentials:\n  acme:\n    client_id: a\n    client_secret: !{SECRET} x\n",
    "escape": f'credentials:\n  acme:\n    client_id: a\n    client_secret: "\\q{SECRET}"\n',
    "at-sign": f"credentials:\n  acme:\n    client_id: a\n    client_secret: @{SECRET}\n",
    "control": f"credentials:\n  acme:\n    client_id: a\n    client_secret: \x01{SECRET}\n",
    "unclosed-flow": f"credentials:\n  acme: {{client_id: a, client_secret: {SECRET}\n",
    "unclosed-quote": f"credentials:\n  acme:\n    client_secret: '{SECRET}\n",
}
MISTYPED = {
    "date": "credentials:\n  acme:\n    client_id: a\n    client_secret: 2024-13-45\n",
    "explicit-type": f"credentials:\n  acme:\n    client_id: a\n"
                     f"    client_secret: !!float {SECRET}\n",
}


@pytest.mark.parametrize("text", [*BESIDE_A_SECRET.values(), *MISTYPED.values()],
                         ids=[*BESIDE_A_SECRET, *MISTYPED])
def test_a_yaml_error_beside_a_secret_is_one_line_that_never_quotes_it(
    tmp_path: Path, text: str
) -> None:
    message = error_of(tmp_path, text)
    assert "not valid YAML: line " in message
    assert "\n" not in message
    for part in (SECRET, SECRET[:8], SECRET[-8:], "2024-13-45"):
        assert part not in message


@pytest.mark.parametrize("loader", [yaml.SafeLoader, yaml.CSafeLoader], ids=["python", "libyaml"])
@pytest.mark.parametrize("text", BESIDE_A_SECRET.values(), ids=BESIDE_A_SECRET.keys())
def test_either_yaml_parsers_problem_text_is_shown_without_its_quotes_of_the_file(
    text: str, loader: type[yaml.SafeLoader]
) -> None:
    # PyYAML's own parser quotes alias and tag names, and escaped letters: all of them
    # may be a secret's text. libyaml's parser is the one used where it is installed.
    with pytest.raises(yaml.YAMLError) as info:
        yaml.load(text, Loader=loader)
    message = configfile.describe(info.value, text)
    assert message.startswith("line ")
    assert SECRET[:8] not in message and "\n" not in message
    assert "'q'" not in message  # the letter after a backslash, in "escape"


@pytest.mark.parametrize(
    ("text", "shown"),
    [("a:\n\tb: 1\n", "'\\t'"), ("a: @b\n", "'@'"), ("a: `b\n", "'`'")],
)
def test_the_character_that_broke_the_syntax_is_named_by_either_parser(
    text: str, shown: str
) -> None:
    for loader in (yaml.SafeLoader, yaml.CSafeLoader):
        with pytest.raises(yaml.YAMLError) as info:
            yaml.load(text, Loader=loader)
        assert f"found character {shown} that cannot start any token" in (
            configfile.describe(info.value, text))


@pytest.mark.parametrize(("value", "kind"), [("2024-13-45", "a timestamp"),
                                             ("!!int forty", "an int"),
                                             ("!!bool maybe", "a bool")])
def test_a_value_its_type_cannot_hold_is_a_config_error_with_its_position(
    tmp_path: Path, value: str, kind: str
) -> None:
    # PyYAML raises a bare ValueError or KeyError for these, quoting the value, which
    # would end in a traceback.
    message = error_of(tmp_path, f"shutdown_timeout: {value}\n" + yaml.safe_dump(BASE))
    assert message.endswith(f"not valid YAML: line 1, column 19: this value cannot be read as "
                            f"{kind}; quote it to keep it as text")


def test_an_empty_file_fails_for_want_of_credentials(tmp_path: Path) -> None:
    assert error_of(tmp_path, "").startswith("credentials:")


def test_an_unreadable_configuration_file_is_a_file_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigFileError, match=r"nope\.yaml"):
        load_file(missing, env={})


# ----------------------------------------------------------------------- secrets


@pytest.mark.parametrize("content", [SECRET + "\n", SECRET + "\r\n", SECRET])
def test_secret_file_is_read_with_its_trailing_newline_stripped(
    tmp_path: Path, content: str
) -> None:
    secret_file = tmp_path / "acme.secret"
    secret_file.write_text(content, encoding="utf-8", newline="")
    config = load_file(write(tmp_path, acme(client_secret=None,
                                             client_secret_file=str(secret_file))), env={})
    assert config.credentials["acme"].client_secret.reveal() == SECRET


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_secret_file_is_a_file_error_naming_key_and_file(
    tmp_path: Path, kind: str
) -> None:
    target = tmp_path / "acme.secret"
    if kind == "directory":
        target.mkdir()
    with pytest.raises(ConfigFileError) as info:
        load_file(write(tmp_path, acme(client_secret=None, client_secret_file=str(target))),
                  env={})
    assert "credentials.acme.client_secret_file" in str(info.value)
    assert str(target) in str(info.value)


def test_empty_secret_file_is_a_config_error(tmp_path: Path) -> None:
    target = tmp_path / "acme.secret"
    target.write_text("\n")
    message = error_of(tmp_path, acme(client_secret=None, client_secret_file=str(target)))
    assert message.startswith("credentials.acme.client_secret_file:")


def test_unreadable_ca_file_is_a_file_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match=r"upstream\.ca_file"):
        load_file(write(tmp_path, with_(upstream={"ca_file": str(tmp_path / "no.pem")})), env={})


def test_secret_masks_itself_in_repr_str_and_format() -> None:
    secret = Secret(SECRET)
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", format(secret),
                  repr([secret]), repr({"k": secret})):
        assert SECRET not in shown
        assert "*" in shown
    assert secret.reveal() == SECRET


def test_secrets_compare_by_value() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert len({Secret("a"), Secret("a")}) == 1


def test_repr_of_config_and_set_never_holds_the_secret(tmp_path: Path) -> None:
    config = load_file(write(tmp_path, BASE), env={})
    cred = config.credentials["acme"]
    assert isinstance(cred, CredentialSet)
    for shown in (repr(config), str(config), repr(cred), str(cred), f"{cred}"):
        assert SECRET not in shown
    assert "acme-id" in repr(cred)  # the set itself is still shown


def test_summary_lines_never_hold_the_secret(tmp_path: Path) -> None:
    secret_file = tmp_path / "p.secret"
    secret_file.write_text(SECRET_2)
    raw = with_(credentials={
        "acme": {"client_id": "acme-id", "client_secret": SECRET, "port": 9001},
        "partner": {"grant": "refresh_token", "client_id": "p-id",
                    "client_secret_file": str(secret_file),
                    "refresh_token_file": str(tmp_path / "p.refresh")},
    }, default_credentials="acme")
    lines = list(summary(load_file(write(tmp_path, raw), env={})))
    text = "\n".join(lines)
    assert SECRET not in text and SECRET_2 not in text
    assert "acme-id" in text and "p-id" in text and "port 9001" in text
    assert "(default: acme)" in text


@pytest.mark.parametrize(("count", "said"), [(0, "0 credential sets"), (1, "1 credential set"),
                                             (2, "2 credential sets")])
def test_a_count_agrees_with_its_noun(count: int, said: str) -> None:
    assert plural(count, "credential set") == said


def test_summary_of_one_set_says_one_credential_set(tmp_path: Path) -> None:
    lines = list(summary(load_file(write(tmp_path, BASE), env={})))
    assert "1 credential set (default: acme)" in lines


@pytest.mark.parametrize(
    "text",
    [
        # a list of sets instead of a mapping of sets
        f"credentials:\n  - {{client_secret: {SECRET}}}\n",
        # the secret written where the set's mapping belongs
        f"credentials:\n  acme: {SECRET}\n",
    ],
)
def test_a_misshaped_credentials_section_does_not_echo_the_secret(
    tmp_path: Path, text: str
) -> None:
    # The message reaches stderr, and the logs on SIGHUP: never a secret there.
    message = error_of(tmp_path, text)
    assert message.startswith("credentials")
    assert SECRET not in message


# ------------------------------------------------------------------------- sets


@pytest.mark.parametrize(
    "name", ["Acme", "_proxy", "-acme", "acme shop", "acme.shop", "acmé", "retailer",
             "shared-demo", "advertiser"]
)
def test_set_name_outside_the_rules_is_rejected(tmp_path: Path, name: str) -> None:
    raw = with_(credentials={name: {"client_id": "i", "client_secret": "s"}})
    assert error_of(tmp_path, raw).startswith(f"credentials.{name}:")


def test_set_name_rule_follows_the_configured_allowed_paths(tmp_path: Path) -> None:
    raw = with_(upstream={"allowed_paths": ["/retailer", "/v2/things"]},
                credentials={"shared": {"client_id": "i", "client_secret": "s"}})
    assert set(load_file(write(tmp_path, raw), env={}).credentials) == {"shared"}
    raw["credentials"] = {"v2": {"client_id": "i", "client_secret": "s"}}
    assert error_of(tmp_path, raw).startswith("credentials.v2:")


@pytest.mark.parametrize("name", ["acme", "a", "0shop", "partner-shop", "shop_2", "retailers"])
def test_set_name_within_the_rules_is_accepted(tmp_path: Path, name: str) -> None:
    raw = with_(credentials={name: {"client_id": "i", "client_secret": "s"}})
    assert load_file(write(tmp_path, raw), env={}).default_credentials == name


def test_one_set_is_the_implied_default(tmp_path: Path) -> None:
    assert load_file(write(tmp_path, BASE), env={}).default_credentials == "acme"


def test_two_sets_without_a_default_have_none(tmp_path: Path) -> None:
    raw = with_(credentials={"a": {"client_id": "i", "client_secret": "s"},
                             "b": {"client_id": "j", "client_secret": "t"}})
    assert load_file(write(tmp_path, raw), env={}).default_credentials is None


def test_default_naming_no_set_is_rejected(tmp_path: Path) -> None:
    message = error_of(tmp_path, with_(default_credentials="acne"))
    assert message.startswith("default_credentials:")
    assert "acne" in message


@pytest.mark.parametrize(
    ("listen_port", "ports", "key"),
    [
        (8080, {"a": 8080}, "credentials.a.port"),
        (8080, {"a": 9001, "b": 9001}, "credentials.b.port"),
    ],
)
def test_a_port_used_twice_is_rejected(
    tmp_path: Path, listen_port: int, ports: dict[str, int], key: str
) -> None:
    raw = with_(listen={"port": listen_port}, default_credentials="a", credentials={
        name: {"client_id": name, "client_secret": "s", "port": port}
        for name, port in ports.items()
    })
    message = error_of(tmp_path, raw)
    assert message.startswith(key + ":")
    assert str(next(iter(ports.values()))) in message


# ------------------------------------------------------------------- zero-config


def test_zero_config_defines_one_default_set_from_the_environment() -> None:
    config = load_env({"BOL_CLIENT_ID": "zid", "BOL_CLIENT_SECRET": SECRET})
    assert list(config.credentials) == ["default"]
    assert config.default_credentials == "default"
    assert config.credentials["default"].client_id == "zid"
    assert config.credentials["default"].client_secret.reveal() == SECRET
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8080)
    assert config.upstream.api_url == "https://api.bol.com"
    assert config.source == "environment"


def test_zero_config_reads_listener_and_upstream_variables() -> None:
    config = load_env({
        "BOL_CLIENT_ID": "zid", "BOL_CLIENT_SECRET": SECRET,
        "BOL_PROXY_HOST": "0.0.0.0", "BOL_PROXY_PORT": "9999",
        "BOL_API_URL": "http://api.test:81", "BOL_TOKEN_URL": "http://login.test/token",
    })
    assert (config.listen.host, config.listen.port) == ("0.0.0.0", 9999)
    assert config.upstream.api_url == "http://api.test:81"
    assert config.upstream.token_url == "http://login.test/token"


def test_zero_config_secret_file_is_read_and_stripped(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    config = load_env({"BOL_CLIENT_ID": "zid", "BOL_CLIENT_SECRET_FILE": str(secret_file)})
    assert config.credentials["default"].client_secret.reveal() == SECRET


def test_zero_config_missing_secret_file_is_a_file_error_naming_the_variable(
    tmp_path: Path
) -> None:
    with pytest.raises(ConfigFileError) as info:
        load_env({"BOL_CLIENT_ID": "zid", "BOL_CLIENT_SECRET_FILE": str(tmp_path / "missing")})
    assert "BOL_CLIENT_SECRET_FILE" in str(info.value)
    assert str(tmp_path / "missing") in str(info.value)


@pytest.mark.parametrize("env", [{}, {"BOL_PROXY_PORT": "9000"}, {"BOL_CLIENT_ID": ""}])
def test_zero_config_without_credentials_says_how_to_configure(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_env(env)
    message = str(info.value)
    for hint in ("--config", "BOL_PROXY_CONFIG", "BOL_CLIENT_ID", "BOL_CLIENT_SECRET"):
        assert hint in message


def test_zero_config_id_without_secret_names_the_missing_variables() -> None:
    with pytest.raises(ConfigError, match="BOL_CLIENT_SECRET"):
        load_env({"BOL_CLIENT_ID": "zid"})


@pytest.mark.parametrize(
    ("variable", "value"),
    [("BOL_PROXY_PORT", "eighty"), ("BOL_PROXY_PORT", "70000"), ("BOL_API_URL", "api.bol.com"),
     ("BOL_TOKEN_URL", "ftp://login.bol.com/token")],
)
def test_zero_config_bad_value_is_an_error_naming_variable_and_value(
    variable: str, value: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_env({"BOL_CLIENT_ID": "zid", "BOL_CLIENT_SECRET": "s", variable: value})
    assert str(info.value).startswith(variable + ":")
    assert value in str(info.value)


# ---------------------------------------------------------------------- precedence


def _port_file(tmp_path: Path, port: int) -> str:
    return str(write(tmp_path, with_(listen={"port": port}), name=f"p{port}.yaml"))


ZERO = {"BOL_CLIENT_ID": "zid", "BOL_CLIENT_SECRET": "s", "BOL_PROXY_PORT": "7000"}


def test_load_prefers_the_path_over_the_variable_and_the_environment(tmp_path: Path) -> None:
    env = {**ZERO, "BOL_PROXY_CONFIG": _port_file(tmp_path, 7001)}
    assert load(_port_file(tmp_path, 7002), env).listen.port == 7002


def test_load_prefers_the_config_variable_over_zero_config(tmp_path: Path) -> None:
    env = {**ZERO, "BOL_PROXY_CONFIG": _port_file(tmp_path, 7001)}
    assert load(None, env).listen.port == 7001


@pytest.mark.parametrize("env", [ZERO, {**ZERO, "BOL_PROXY_CONFIG": ""}])
def test_load_falls_back_to_zero_config(env: dict[str, str]) -> None:
    config = load(None, env)
    assert (config.source, config.listen.port) == ("environment", 7000)


def test_load_interpolates_from_the_given_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "credentials:\n  acme: {client_id: '${ID}', client_secret: s}\n")
    assert load(str(path), {"ID": "from-env"}).credentials["acme"].client_id == "from-env"


def test_example_configuration_is_valid_and_takes_its_values_from_the_environment() -> None:
    config = load_file(EXAMPLE, env={})
    assert config.default_credentials in config.credentials
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8080)
    env = {"BOL_PROXY_HOST": "0.0.0.0", "BOL_PROXY_PORT": "9000",
           "ACME_CLIENT_ID": "acme-id", "ACME_CLIENT_SECRET": SECRET}
    config = load_file(EXAMPLE, env=env)
    assert (config.listen.host, config.listen.port) == ("0.0.0.0", 9000)
    assert config.credentials["acme"].client_secret.reveal() == SECRET
    assert SECRET not in "\n".join(summary(config))


def test_config_is_immutable(tmp_path: Path) -> None:
    config: Config = load_file(write(tmp_path, BASE), env={})
    with pytest.raises(AttributeError):
        config.listen.port = 1  # type: ignore[misc]


@pytest.mark.parametrize("key", ["api_url", "token_url"])
def test_credentials_in_an_upstream_url_are_refused_without_echoing_them(key: str) -> None:
    with pytest.raises(ConfigError, match=f"upstream.{key}: credentials in the URL") as info:
        validate({**BASE, "upstream": {key: "https://user:s3cretXYZ@api.bol.com"}})
    assert "s3cretXYZ" not in str(info.value)


def test_a_ca_file_without_certificates_is_a_configuration_error(tmp_path: Path) -> None:
    bundle = tmp_path / "corporate.pem"
    bundle.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"upstream\.ca_file: .* holds no PEM certificates"):
        validate({**BASE, "upstream": {"ca_file": str(bundle)}})


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("credentials:\n  acme: {client_id: a, client_secret: b}\n"
         "  acme: {client_id: c, client_secret: d}\n", "acme", 3),
        ("shutdown_timeout: 5\ncredentials:\n  acme: {client_id: a, client_secret: b}\n"
         "shutdown_timeout: 9\n", "shutdown_timeout", 4),
        ("credentials:\n  acme:\n    client_id: a\n    client_secret: b\n    client_id: c\n",
         "client_id", 5),
    ],
    ids=["set", "top-level", "set-key"],
)
def test_a_key_given_twice_is_an_error_naming_it_and_its_line(
    tmp_path: Path, text: str, key: str, line: int
) -> None:
    # YAML would keep the last one: a copied shop block would silently replace the first.
    with pytest.raises(ConfigError, match=rf"duplicate key '{key}' \(line {line}\)"):
        load_file(write(tmp_path, text), env={})


def test_a_ca_file_that_is_a_folder_is_a_file_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match=r"upstream\.ca_file: .*not a readable file"):
        load_file(write(tmp_path, with_(upstream={"ca_file": str(tmp_path)})), env={})


@pytest.mark.parametrize("key", ["shutdown_timeout", "upstream.timeout",
                                 "tokens.refresh_margin"])
def test_a_duration_beyond_a_week_is_rejected(key: str) -> None:
    section, _, name = key.rpartition(".")
    raw = with_(**({section: {name: "1e300"}} if section else {name: "1e300"}))
    with pytest.raises(ConfigError, match=rf"{key}: must be at most 604800"):
        validate(raw)


def test_a_merge_key_with_overrides_beside_it_is_not_a_duplicate(tmp_path: Path) -> None:
    text = ("credentials:\n  acme: &common\n    client_id: abc\n    client_secret: def\n"
            "  shop2:\n    <<: *common\n    client_id: other\n")
    config = load_file(write(tmp_path, text), env={})
    assert config.credentials["shop2"].client_id == "other"
    assert config.credentials["shop2"].client_secret.reveal() == "def"


def test_check_summary_says_how_to_point_a_tool_at_the_proxy() -> None:
    lines = list(summary(validate({**BASE, "listen": {"host": "0.0.0.0", "port": 9000}})))
    assert any("point tools at http://127.0.0.1:9000 instead of https://api.bol.com" in line
               for line in lines)
    assert any("login URL http://127.0.0.1:9000/token" in line for line in lines)


# ------------------------------------------------------------------ shared_state

REDIS_PASSWORD = "redis-password-0123456789"


def test_without_shared_state_the_proxy_works_alone(tmp_path: Path) -> None:
    shared = load_file(write(tmp_path, BASE), env={}).shared_state
    assert not shared.enabled and shared.redis_url is None
    assert shared.key_prefix == "bol-proxy:"


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379", "redis://redis", "redis://:pw@redis:6380/2",
    "rediss://user:pw@redis.example:6380/0", "redis://[::1]:6379",
])
def test_shared_state_takes_redis_and_rediss_urls(tmp_path: Path, url: str) -> None:
    raw = with_(shared_state={"redis_url": url, "key_prefix": "shop-a:"})
    shared = load_file(write(tmp_path, raw), env={}).shared_state
    assert shared.enabled and shared.redis_url is not None
    assert shared.redis_url.reveal() == url and shared.key_prefix == "shop-a:"


@pytest.mark.parametrize(("url", "why"), [
    ("http://redis:6379", "expected redis://"),
    ("redis://", "expected redis://"),
    ("redis://:" + REDIS_PASSWORD + "@redis:notaport", "not a valid URL"),
    ("redis://:" + REDIS_PASSWORD + "@redis/zero", "database number"),
    (["redis://redis"], "expected a redis:// or rediss:// URL"),
])
def test_a_bad_redis_url_is_an_error_that_never_echoes_it(
    tmp_path: Path, url: object, why: str
) -> None:
    with pytest.raises(ConfigError, match=r"shared_state\.redis_url") as info:
        load_file(write(tmp_path, with_(shared_state={"redis_url": url})), env={})
    assert why in str(info.value)
    assert REDIS_PASSWORD not in str(info.value)


@pytest.mark.parametrize("prefix", ["with space:", "x" * 65, "tab\t"])
def test_a_bad_key_prefix_is_an_error(tmp_path: Path, prefix: str) -> None:
    with pytest.raises(ConfigError, match=r"shared_state\.key_prefix"):
        load_file(write(tmp_path, with_(shared_state={"key_prefix": prefix})), env={})


def test_unknown_keys_under_shared_state_are_errors(tmp_path: Path) -> None:
    raw = with_(shared_state={"redis_url": "redis://redis", "redis_password": "x"})
    with pytest.raises(ConfigError, match=r"shared_state\.redis_password: unknown key"):
        load_file(write(tmp_path, raw), env={})


def test_the_redis_url_is_a_secret_masked_in_repr_and_summary(tmp_path: Path) -> None:
    url = f"rediss://bol:{REDIS_PASSWORD}@redis.example:6380/1"
    config = load_file(write(tmp_path, with_(shared_state={"redis_url": url})), env={})
    for shown in (repr(config), str(config), repr(config.shared_state)):
        assert REDIS_PASSWORD not in shown
    text = "\n".join(summary(config))
    assert REDIS_PASSWORD not in text and "bol:" not in text
    assert "shared state: rediss://********@redis.example:6380/1" in text


def test_summary_says_when_there_is_no_shared_state(tmp_path: Path) -> None:
    text = "\n".join(summary(load_file(write(tmp_path, BASE), env={})))
    assert "shared state: none" in text


def test_zero_config_takes_the_redis_url_from_the_environment() -> None:
    url = f"redis://:{REDIS_PASSWORD}@redis:6379"
    config = load_env({"BOL_CLIENT_ID": "zid", "BOL_CLIENT_SECRET": SECRET,
                       "BOL_PROXY_REDIS_URL": url})
    assert config.shared_state.redis_url == Secret(url)


def test_zero_config_names_the_redis_variable_in_its_errors() -> None:
    with pytest.raises(ConfigError, match=r"^BOL_PROXY_REDIS_URL: ") as info:
        load_env({"BOL_CLIENT_ID": "zid", "BOL_CLIENT_SECRET": SECRET,
                  "BOL_PROXY_REDIS_URL": f"http://:{REDIS_PASSWORD}@redis"})
    assert REDIS_PASSWORD not in str(info.value)


def test_check_summary_without_a_default_set_says_to_name_one() -> None:
    raw = {"credentials": {"shop": {"client_id": "a", "client_secret": SECRET},
                           "shop2": {"client_id": "b", "client_secret": SECRET}}}
    text = "\n".join(summary(validate(raw)))
    assert "2 credential sets (default: none)" in text
    assert "point tools at http://127.0.0.1:8080/<set>" in text
    assert "X-Bol-Credentials: <set>: there is no default set" in text


def test_a_variable_unquoted_inside_braces_gets_a_hint_to_quote_it(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text("credentials:\n  acme: {client_id: ${ACME_ID}, client_secret: x}\n")
    with pytest.raises(ConfigError, match=r"line 2, .*put a value that holds \$\{\.\.\.\} "
                                          "in quotes"):
        load_file(path, env={"ACME_ID": "id"})


@pytest.mark.parametrize(("url", "warned"), [
    ("http://api.bol.com", True), ("https://api.bol.com", False),
    ("http://127.0.0.1:9000", False), ("http://localhost:9000", False),
])
def test_plain_http_to_a_remote_upstream_is_warned_about(url: str, warned: bool) -> None:
    config = validate({**BASE, "upstream": {"api_url": url}})
    lines = [line for line in summary(config) if line.startswith("warning:")]
    assert bool(lines) is warned
    assert warnings(config) == [line.removeprefix("warning: ") for line in lines]


def test_a_url_without_its_scheme_says_it_needs_one() -> None:
    with pytest.raises(ConfigError, match=r"upstream\.api_url: expected a URL starting with "
                                          "https://"):
        validate({**BASE, "upstream": {"api_url": "api.bol.com"}})
