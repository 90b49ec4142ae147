"""Secrets and files: placeholders refused, passwords masked wherever they sit, private SQLite files, credentials."""

from __future__ import annotations

import asyncio
import os
import secrets
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator import Aggregator, ConfigError, StoreUnavailable, dsn, options, store

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "systemd" / "aggregator.env.example"
PUBLIC = {"AGGREGATOR_LISTEN": "0.0.0.0:8714"}
REAL = {"AGGREGATOR_DATABASE_URL": "postgresql://svc:0c5e2b9f7a41d3e8@db.internal/usage",
        "AGGREGATOR_API_TOKENS": secrets.token_urlsafe(32), "AGGREGATOR_PSEUDONYM_KEY": secrets.token_hex(32)}
NEW_SECRET = "python3 -c 'import secrets; print(secrets.token_hex(32))'"


@pytest.fixture
def no_config(tmp_path: Path) -> str:
    """An empty config file, so that no /etc/aggregator/aggregator.toml of the machine is read."""
    path = tmp_path / "aggregator.toml"
    path.write_text("")
    return str(path)


def load(environ: dict[str, str], config_path: str, **flags: object) -> options.DaemonSettings:
    return options.load_daemon_settings(dict(flags), environ=environ, config_path=config_path)


def example_environment() -> dict[str, str]:
    """The variables of systemd/aggregator.env.example, as systemd's EnvironmentFile= reads them."""
    lines = [line for line in EXAMPLE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_placeholder_secrets_are_refused(no_config: str) -> None:
    """Each secret of aggregator.env.example, alone among real ones and on a public address, is refused with
    a ConfigError naming the key, where it was set and how to make a real one, never echoing the value; so
    is anything placeholder-like as a token or key. Real random secrets pass."""
    example = example_environment()
    assert set(example) == set(REAL)
    with pytest.raises(ConfigError):
        load({**example, **PUBLIC}, no_config)
    for variable, placeholder in example.items():
        with pytest.raises(ConfigError) as raised:
            load({**REAL, variable: placeholder, **PUBLIC}, no_config)
        message = str(raised.value)
        key = variable.removeprefix("AGGREGATOR_").lower()
        assert message.startswith(f"{key}: ") and f"(set by env {variable})" in message
        assert "placeholder" in message and placeholder not in message
        if key != "database_url":
            assert NEW_SECRET in message
    for fake in ("my-changeme-token-0123456789", "Placeholder-0123456789abcdef", "x" * 32,
                 "an-example-secret-0123456789abcdef", "REPLACE_WITH_A_RANDOM_VALUE_0123", "0123456789XXXXabcdef"):
        for variable in ("AGGREGATOR_API_TOKENS", "AGGREGATOR_PSEUDONYM_KEY"):
            with pytest.raises(ConfigError, match=variable.removeprefix("AGGREGATOR_").lower()):
                load({**REAL, variable: fake, **PUBLIC}, no_config)
    settings = load({**REAL, **PUBLIC}, no_config)
    assert (settings.api_tokens, settings.aggregator.delivery.pseudonym_key) == (
        (REAL["AGGREGATOR_API_TOKENS"],), REAL["AGGREGATOR_PSEUDONYM_KEY"])


def test_placeholder_pseudonym_key_is_refused_embedded_too(tmp_path: Path) -> None:
    """An embedded Aggregator given the example's key (or the environment's) refuses it as the daemon does."""
    placeholder = example_environment()["AGGREGATOR_PSEUDONYM_KEY"]
    with pytest.raises(ConfigError, match="pseudonym_key: the key contains .* a placeholder") as raised:
        Aggregator(database_url=f"sqlite:///{tmp_path / 'a.db'}", pseudonym_key=placeholder, handle_sigterm=False)
    assert placeholder not in str(raised.value)
    real = Aggregator(database_url=f"sqlite:///{tmp_path / 'a.db'}", pseudonym_key=REAL["AGGREGATOR_PSEUDONYM_KEY"],
                      handle_sigterm=False)
    assert real.settings.delivery.pseudonym_key == REAL["AGGREGATOR_PSEUDONYM_KEY"]


async def ping(url: str) -> None:
    db = store.Store(url)
    try:
        await db.ping()
    finally:
        await db.close()


def test_password_in_query_string_is_masked(no_config: str) -> None:
    """Secret query parameters (password, sslpassword, passwd, pwd, secret, token; any case) are masked by
    mask_url, by `config check`, and in the store's errors, including a real failed connection."""
    masked = {"postgresql://svc@db.internal/usage?password=q-s3cret&sslmode=require":
              "postgresql://svc@db.internal/usage?password=***&sslmode=require",
              "postgresql://svc:u-s3cret@h/db?SSLPassword=a1&passwd=b2&pwd=c3&Secret=d4&token=e5&ssl=require":
              "postgresql://svc:***@h/db?SSLPassword=***&passwd=***&pwd=***&Secret=***&token=***&ssl=require"}
    assert masked == {url: dsn.mask_url(url) for url in masked}
    url = "postgresql://svc@db.internal/usage?password=q-s3cret"
    shown = load({**REAL, "AGGREGATOR_DATABASE_URL": url}, no_config).masked()["database_url"]
    assert "q-s3cret" not in shown and "password=***" in shown
    with pytest.raises(StoreUnavailable) as raised, store.translate_errors(url):
        raise OSError("connect failed for postgresql://svc@db.internal/usage?password=q-s3cret (password q-s3cret)")
    assert "q-s3cret" not in str(raised.value) and "password=***" in str(raised.value)
    with pytest.raises(StoreUnavailable) as failed:
        asyncio.run(ping(f"postgresql://svc@127.0.0.1:{_closed_port()}/usage?password=q-s3cret"))
    assert "q-s3cret" not in str(failed.value) and "password=***" in str(failed.value)


def test_password_with_unencoded_at_is_masked(no_config: str) -> None:
    """A password with unencoded '@' (read by SQLAlchemy and libpq as ending at the first one, the rest taken
    for the host) is masked whole; such a URL is refused, masked, naming the fix (%40); the store's errors
    scrub every piece of it, the piece read as a host included."""
    url = "postgresql://svc:p@ss@w0rd@db.internal:5432/usage"
    expected = "postgresql://svc:***@db.internal:5432/usage"
    assert expected == dsn.mask_url(url)
    for attempt in (lambda: load({**REAL, "AGGREGATOR_DATABASE_URL": url}, no_config),
                    lambda: Aggregator(database_url=url, handle_sigterm=False)):
        with pytest.raises(ConfigError) as raised:
            attempt()
        message = str(raised.value)
        assert "svc:***@db.internal" in message and "%40" in message
        assert not any(piece in message for piece in ("p@ss", "ss@w0rd", "w0rd"))
    with pytest.raises(StoreUnavailable) as failed, store.translate_errors(url):
        raise OSError("could not translate host name \"ss@w0rd@db.internal\" for user svc, password p@ss@w0rd")
    assert not any(piece in str(failed.value) for piece in ("p@ss", "w0rd")), str(failed.value)
    encoded = "postgresql://svc:p%40ss%40w0rd@db.internal:5432/usage"  # the fix: accepted, masked
    assert "svc:***@db.internal" in load({**REAL, "AGGREGATOR_DATABASE_URL": encoded}, no_config).masked()[
        "database_url"]


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def modes(directory: Path) -> dict[str, int]:
    names = ("aggregator.db", "aggregator.db-wal", "aggregator.db-shm")
    return {".": stat.S_IMODE(directory.stat().st_mode),
            **{name: stat.S_IMODE((directory / name).stat().st_mode) for name in names}}


def test_sqlite_files_and_state_directory_are_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      umask_022: None) -> None:
    """On the embedded default (a fresh state directory) under umask 022, once data is tracked and flushed,
    the directory is 0700 and the database and its -wal and -shm are 0600: they hold raw ids."""
    for variable in ("STATE_DIRECTORY", "AGGREGATOR_DATABASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    agg = Aggregator(handle_sigterm=False, flush_interval="1h", collect_interval="1h").start()
    try:
        agg.track(uuid.uuid4(), uuid.uuid4())
        agg.flush()
        seen = modes(tmp_path / "xdg" / "aggregator")
    finally:
        agg.stop()
    private = {".": 0o700, "aggregator.db": 0o600, "aggregator.db-wal": 0o600, "aggregator.db-shm": 0o600}
    assert private == seen


def test_a_chosen_directory_keeps_its_mode_and_an_old_database_file_is_narrowed(tmp_path: Path,
                                                                                 umask_022: None) -> None:
    """A directory the user chose keeps its mode; a database file created before (0644) becomes 0600."""
    chosen = tmp_path / "data"
    chosen.mkdir(mode=0o755)
    (chosen / "aggregator.db").touch(mode=0o644)
    agg = Aggregator(database_url=f"sqlite:///{chosen / 'aggregator.db'}", handle_sigterm=False,
                     flush_interval="1h", collect_interval="1h").start()
    try:
        agg.track(uuid.uuid4(), uuid.uuid4())
        agg.flush()
        seen = modes(chosen)
    finally:
        agg.stop()
    expected = {".": 0o755, "aggregator.db": 0o600, "aggregator.db-wal": 0o600, "aggregator.db-shm": 0o600}
    assert expected == seen


def test_secrets_are_read_from_systemd_credentials(tmp_path: Path, no_config: str) -> None:
    """Each secret option is read, stripped, from $CREDENTIALS_DIRECTORY/<key>: over the TOML file, under the
    environment and the flags; `config check` names the source `credential <path>` and masks the values.
    Credentials go through the same checks (a placeholder is refused, naming the credential); one that is
    not text is refused without echoing it."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    token, key = secrets.token_urlsafe(32), secrets.token_hex(32)
    (credentials / "database_url").write_text("postgresql://svc:cred-pw-0123@db.internal/usage\n")
    (credentials / "api_tokens").write_text(f"  {token}\n")
    (credentials / "pseudonym_key").write_text(f"{key}\n")
    file_config = tmp_path / "file.toml"
    file_config.write_text(f'api_tokens = ["{secrets.token_urlsafe(32)}"]\n')
    environ = {"CREDENTIALS_DIRECTORY": str(credentials), **PUBLIC}
    settings = load(environ, str(file_config))
    assert ((token,), key) == (settings.api_tokens, settings.aggregator.delivery.pseudonym_key)
    assert "cred-pw-0123" in settings.aggregator.database_url
    assert {k: f"credential {credentials / k}" for k in ("database_url", "api_tokens", "pseudonym_key")} == {
        k: settings.sources[k] for k in ("database_url", "api_tokens", "pseudonym_key")}
    over = load({**environ, "AGGREGATOR_PSEUDONYM_KEY": REAL["AGGREGATOR_PSEUDONYM_KEY"]}, no_config,
                api_tokens=REAL["AGGREGATOR_API_TOKENS"])
    assert ("env AGGREGATOR_PSEUDONYM_KEY", "flag --api-tokens", f"credential {credentials / 'database_url'}") == (
        over.sources["pseudonym_key"], over.sources["api_tokens"], over.sources["database_url"])
    check = subprocess.run([str(Path(sys.executable).parent / "aggregator"), "config", "check", "--config", no_config],
                           capture_output=True, text=True, timeout=60,
                           env={k: v for k, v in {**os.environ, **environ}.items() if not k.startswith("AGGREGATOR_")
                                or k in PUBLIC})
    assert check.returncode == 0, check.stderr
    lines = {line.split("=")[0].strip(): line for line in check.stdout.splitlines()}
    assert f"# credential {credentials / 'api_tokens'}" in lines["api_tokens"]
    assert f"# credential {credentials / 'database_url'}" in lines["database_url"]
    assert not any(secret in check.stdout for secret in (token, key, "cred-pw-0123"))
    (credentials / "pseudonym_key").write_text("CHANGE-ME-replace-with-64-random-hex-characters\n")
    with pytest.raises(ConfigError, match=f"pseudonym_key: .*set by credential {credentials / 'pseudonym_key'}"):
        load(environ, no_config)
    (credentials / "pseudonym_key").write_bytes(b"\xff\xfe" + key.encode())
    with pytest.raises(ConfigError, match="not UTF-8") as raised:
        load(environ, no_config)
    assert key not in str(raised.value)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
