"""What hooks receive (a minimal environment, never a secret unless named) and the hook
configurations refused at start-up, each in one line with exit code 2."""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

import pytest

from jobqueue.cli.app import main
from jobqueue.hooks import CommandSink, build_sinks, event_body
from jobqueue.settings import ConfigError, HookConfig, load_settings
from tests.daemon_helpers import API_KEY

KEY_CANARY = "sk-canary-key-0123456789abcdef"
SECRET_CANARY = "whsec_Y2FuYXJ5LXNlY3JldC1jYW5hcnk="
EVENT = {
    "id": "evt_1", "type": "job.completed", "job_id": "job_1", "batch_id": None,
    "created_at": "2026-01-01T00:00:00Z", "from": "running", "to": "completed", "data": {},
}  # fmt: skip
# What /bin/sh itself may add to the environment it passes on.
SHELL_OWN = {"PWD", "OLDPWD", "SHLVL", "_"}


def _environment_seen_by(sink: CommandSink) -> dict[str, str]:
    sink.deliver(EVENT, event_body(EVENT))
    out = Path(sink.command.rsplit(">", 1)[1].strip().strip("'"))
    pairs = out.read_bytes().split(b"\0")
    return dict(p.decode().split("=", 1) for p in pairs if p)


@pytest.fixture
def canaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY_CANARY)
    monkeypatch.setenv("OPENAI_WEBHOOK_SECRET", SECRET_CANARY)
    monkeypatch.setenv("JOBQUEUE_METRICS_TOKEN", "token-canary")
    monkeypatch.setenv("JOBQUEUE_DATABASE_URL", "postgresql+psycopg://u:password-canary@h/db")
    monkeypatch.setenv("SOME_OTHER_VAR", "other")
    monkeypatch.setenv("LANG", "C.UTF-8")


def test_a_command_hook_gets_a_minimal_environment(canaries, tmp_path: Path) -> None:
    dump = tmp_path / "env.bin"
    sink = CommandSink(f"env -0 > {shlex.quote(str(dump))}", "*")
    seen = _environment_seen_by(sink)
    allowed = {"PATH", "HOME", "LANG", "JOBQUEUE_EVENT_TYPE", "JOBQUEUE_EVENT_ID",
               "JOBQUEUE_JOB_ID"} | SHELL_OWN  # fmt: skip
    assert set(seen) <= allowed, set(seen) - allowed
    assert seen["PATH"] == os.environ["PATH"] and seen["LANG"] == "C.UTF-8"
    assert seen["JOBQUEUE_EVENT_TYPE"] == "job.completed"
    text = dump.read_bytes()
    for canary in (KEY_CANARY, SECRET_CANARY, b"token-canary", b"password-canary"):
        assert (canary if isinstance(canary, bytes) else canary.encode()) not in text


def test_a_command_hook_gets_what_its_config_names(canaries, tmp_path: Path) -> None:
    dump = tmp_path / "env.bin"
    [sink] = build_sinks(
        [HookConfig(command=f"env -0 > {shlex.quote(str(dump))}",
                    env={"TARGET": "ops", "PATH": "/usr/bin:/bin"},
                    pass_env=["OPENAI_API_KEY", "NOT_SET_ANYWHERE"])]
    )  # fmt: skip
    seen = _environment_seen_by(sink)  # type: ignore[arg-type]
    assert seen["TARGET"] == "ops"
    assert seen["PATH"] == "/usr/bin:/bin"  # `env` wins over the daemon's own
    assert seen["OPENAI_API_KEY"] == KEY_CANARY  # named explicitly, so passed
    assert "NOT_SET_ANYWHERE" not in seen
    assert "OPENAI_WEBHOOK_SECRET" not in seen and "SOME_OTHER_VAR" not in seen


def _executable(path: Path, body: str = "#!/bin/sh\nexit 0\n", mode: int = 0o755) -> Path:
    path.write_text(body)
    path.chmod(mode)
    return path


def test_hook_commands_that_cannot_run_are_refused(tmp_path: Path) -> None:
    plain = _executable(tmp_path / "plain.sh", mode=0o644)
    ok = _executable(tmp_path / "ok.sh")
    cases = {
        "/nonexistent/notify --token abc": "'/nonexistent/notify' does not exist",
        "no-such-program-anywhere arg": "'no-such-program-anywhere' is not found on PATH",
        f"{plain} arg": "is not executable",
        f"{tmp_path} arg": "is a directory",
        "FOO=1 exec no-such-program-anywhere": "is not found on PATH",
    }
    for command, expected in cases.items():
        with pytest.raises(ConfigError, match=r"hooks\[0\]: hook command") as exc:
            build_sinks([HookConfig(command=command)])
        assert expected in str(exc.value)
        assert "--token" not in str(exc.value)  # arguments may hold a token: never repeated
    for command in [f"{ok} --flag", "true", "FOO=1 cat >/dev/null", "exec cat", "echo hi | tr a b",
                    "$HOME/bin/whatever", "if true; then :; fi"]:  # fmt: skip
        build_sinks([HookConfig(command=command)])
    with pytest.raises(ConfigError, match="is not found on PATH"):
        build_sinks([HookConfig(command="ok.sh", env={"PATH": "/nowhere"})])
    build_sinks([HookConfig(command="ok.sh", env={"PATH": str(tmp_path)})])
    if os.geteuid() != 0:  # root may run what it cannot read
        assert stat.S_IMODE(plain.stat().st_mode) == 0o644


@pytest.mark.parametrize(
    ("hook", "expected"),
    [
        ({"url": "ftp://x/secret-path"}, "hook url must be an http:// or https:// URL"),
        ({"url": "file:///etc/passwd"}, "hook url must be an http:// or https:// URL"),
        ({"url": "https:///no-host"}, "hook url has no host"),
        ({"url": "http://[::1"}, "hook url is not a valid URL"),
        ({"url": "https://a.example/x", "env": {"A": "1"}}, "`env` and `pass_env` are for"),
        ({"command": "true", "secret": "whsec_AAAA"}, "`secret` is for webhook"),
        ({"command": "true", "pass_env": ["NOT A NAME"]}, "is not an environment variable"),
        ({"command": "true", "url": "https://a.example"}, "exactly one of `command` or `url`"),
        ({"command": "true", "timeout": 0}, "greater than 0"),
        ({"command": "echo 'unbalanced"}, "hook command is not valid shell"),
    ],
)
def test_bad_hook_tables_are_refused_when_the_config_loads(hook: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(hooks=[hook])
    message = str(exc.value)
    assert message.startswith("invalid configuration: hooks.0") and expected in message
    assert "secret-path" not in message and "whsec_AAAA" not in message


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "jobqueue.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[[hooks]]\nurl = "ftp://x"\n', "hooks.0: hook url must be an http:// or https://"),
        ('[[hooks]]\ncommand = "/nonexistent/notify"\n', "hooks[0]: hook command"),
        ('listen = "20052"\n', "listen: '20052': expected HOST:PORT"),
        ("webhook_max_bytes = 10\n", "webhook_max_bytes"),
        ("http_timeout = -1\n", "http_timeout"),
        ("no_such_key = 1\n", "no_such_key"),
        ("this is not toml\n", "error: "),
    ],
)
def test_bad_configs_stop_the_daemon_in_one_line(
    toml: str, expected: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    config = _config(tmp_path, toml)
    code = main(["-c", str(config), "--database-url", f"sqlite:///{tmp_path / 'q.db'}",
                 "run", "--once"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


@pytest.mark.parametrize("kind", ["directory", "fifo", "missing"])
def test_a_config_path_that_is_not_a_file_is_refused_without_opening_it(
    kind: str, tmp_path: Path, capsys
) -> None:
    path = tmp_path / "cfg"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening it would block for ever
    code = main(["-c", str(path), "status"])
    err = capsys.readouterr().err
    assert code == 2
    expected = {
        "directory": f"error: config file is not a regular file (a directory): {path}",
        "fifo": f"error: config file is not a regular file (a FIFO): {path}",
        "missing": f"error: config file not found: {path}",
    }[kind]
    assert err.strip().splitlines() == [expected]
