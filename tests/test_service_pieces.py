"""The pieces of the service recipe, in process: systemd credentials as the secrets' source, and a
setgid data dir that makes what jobqueue creates group-writable (the SQLite file included)."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobqueue.api import JobQueue
from jobqueue.files.sharing import create_with_umask, share_with_group
from jobqueue.settings import ConfigError, load_settings


@pytest.fixture
def umask() -> Iterator[None]:
    """Whatever a test does to the process umask is undone after it."""
    saved = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(saved)


def _current_umask() -> int:
    value = os.umask(0o022)
    os.umask(value)
    return value


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secrets_come_from_credentials_below_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "openai_api_key").write_text("sk-from-credential\n")
    (creds / "openai_webhook_secret").write_text("whsec_from_credential")
    config = tmp_path / "jobqueue.toml"
    config.write_text('api_key = "sk-from-file"\n')
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))

    settings = load_settings(config)
    assert settings.api_key is not None and settings.webhook_secret is not None
    assert settings.api_key.get_secret_value() == "sk-from-credential"  # the newline dropped
    assert settings.webhook_secret.get_secret_value() == "whsec_from_credential"

    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    settings = load_settings(config)
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == "sk-from-env"
    given = load_settings(config, api_key="sk-given").api_key
    assert given is not None and given.get_secret_value() == "sk-given"


def test_a_missing_credential_is_none_and_an_unreadable_one_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_settings().api_key is None
    (creds / "openai_api_key").mkdir()  # readable by nobody as a file, root included
    with pytest.raises(ConfigError, match=r"cannot read the credential .*openai_api_key"):
        load_settings()


def test_a_setgid_data_dir_clears_the_group_bits_of_the_umask(tmp_path: Path, umask: None) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    os.umask(0o077)
    assert share_with_group(plain) is False
    assert _current_umask() == 0o077
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2770)
    assert share_with_group(shared) is True
    assert _current_umask() == 0o007
    os.umask(0o022)
    share_with_group(shared)
    assert _current_umask() == 0o002


def test_the_sqlite_file_and_its_wal_follow_the_umask_not_sqlite_0644(
    tmp_path: Path, umask: None
) -> None:
    os.umask(0o002)
    db = tmp_path / "jobqueue.db"
    create_with_umask(db)
    assert _mode(db) == 0o664
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    assert _mode(Path(f"{db}-wal")) == 0o664
    conn.close()
    db.chmod(0o600)
    create_with_umask(db)  # an existing file is left as it is
    assert _mode(db) == 0o600


def test_a_queue_on_a_setgid_data_dir_writes_group_writable_files(
    tmp_path: Path, umask: None
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o2770)
    os.umask(0o022)
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"custom_id": "a", "method": "POST", "url": "/v1/embeddings",'
        ' "body": {"model": "text-embedding-3-small", "input": "hi"}}\n'
    )
    with JobQueue(data_dir=data, base_url="http://127.0.0.1:9/v1") as jq:
        jq.submit(source, "/v1/embeddings")
    made = list(data.rglob("*"))
    assert any(p.name == "jobqueue.db" for p in made) and any(p.is_dir() for p in made)
    for path in made:
        assert _mode(path) & 0o060 == 0o060, f"{path} is {stat.filemode(path.stat().st_mode)}"
        if path.is_dir():
            assert path.stat().st_mode & stat.S_ISGID, path
