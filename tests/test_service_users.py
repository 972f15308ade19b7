"""The service recipe of the README, run for real with two non-root users of one group.

As the README installs it: a system user `D` whose primary group is `G` runs the daemon, with the
config root:G 0640 and the API key a root-only file that systemd hands over as a credential
(imitated here: a copy in a directory only `D` can read, named by $CREDENTIALS_DIRECTORY); an
operator `O`, a member of `G` with a private primary group and a login umask of 0022, runs the
CLI; both use one SQLite database in a data dir D:G 2770 (setgid). The operator submits (so the
CLI creates the database and the job's folder), the daemon runs the job against the emulator
to the end (so it writes into what the CLI made), the operator reads the results (what the
daemon wrote). Needs root, `useradd`/`usermod`/`userdel`/`groupdel` and `setpriv`; skipped with
the reason otherwise. The users and group are removed afterwards.

Also: `systemd-analyze verify` passes on config/jobqueue.service where systemd is installed.
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from jobqueue.emulator import EmulatorConfig, serve_in_thread
from tests.daemon_helpers import API_KEY
from tests.factories import chat_file

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "config" / "jobqueue.service"
ENDPOINT = "/v1/chat/completions"
TOOLS = ("useradd", "usermod", "userdel", "groupdel", "setpriv", "install")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])


def _tool(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def _why_not() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the service recipe is for Linux (systemd)"
    if os.geteuid() != 0:
        return "needs root to create the two test users and their group (useradd, usermod)"
    missing = [name for name in TOOLS if _tool(name) is None]
    if missing:
        return f"missing {', '.join(missing)} (shadow's useradd/usermod, util-linux's setpriv)"
    return None


@dataclass(frozen=True)
class Accounts:
    group: str  # the service's group: the daemon's primary group, the operator's supplementary
    daemon: str  # the service user (`jobqueue` in the README)
    operator: str  # a person who runs the CLI
    base: Path  # a scratch tree both can enter: etc/, credentials/, data/, out/
    python: str  # a Python both can run that imports this jobqueue


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _as(user: str, group: str, *argv: str) -> list[str]:
    """argv run as `user` with primary `group` and the supplementary groups of /etc/group."""
    return [_tool("setpriv") or "setpriv", f"--reuid={user}", f"--regid={group}", "--init-groups",
            "--", *argv]  # fmt: skip


def _user_env(**extra: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8", **extra}


def _python_for(user: str, group: str, base: Path) -> str | None:
    """This interpreter if `user` can run it and import jobqueue; else the system's Python of the
    same version over this environment's packages (an interpreter under /root, as pyenv puts it,
    is out of other users' reach); None when neither works."""
    probe = ["-c", "import jobqueue.cli, sqlalchemy, httpx"]

    def works(python: str) -> bool:
        done = subprocess.run(_as(user, group, python, *probe), env=_user_env(),
                              capture_output=True, cwd="/")  # fmt: skip
        return done.returncode == 0

    if works(sys.executable):
        return sys.executable
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system.exists():
        return None
    venv = base / "python"
    made = subprocess.run([str(system), "-m", "venv", "--without-pip", str(venv)],
                          capture_output=True)  # fmt: skip
    if made.returncode != 0:
        return None
    site_dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    asked = [
        str(venv / "bin" / "python"),
        "-c",
        "import sysconfig; print(sysconfig.get_path('purelib'))",
    ]
    ours = Path(subprocess.run(asked, capture_output=True, text=True, check=True).stdout.strip())
    (ours / "_outer_environment.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in sorted(site_dirs))
    )
    python = str(venv / "bin" / "python")
    return python if works(python) else None


@pytest.fixture(scope="module")
def accounts() -> Iterator[Accounts]:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    tag = secrets.token_hex(3)
    daemon, operator = f"jqd{tag}", f"jqo{tag}"
    group = daemon  # `useradd --user-group`: the service's group has the service's name
    base = Path(tempfile.mkdtemp(prefix="jobqueue-service-"))
    base.chmod(0o755)
    made_users: list[str] = []
    try:
        # As the README: useradd --system --user-group --no-create-home --home-dir /nonexistent
        #   --shell /usr/sbin/nologin jobqueue
        _run(_tool("useradd") or "useradd", "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", daemon)  # fmt: skip
        made_users.append(daemon)
        # A person with a group of their own, who then joins the service's: usermod -aG jobqueue
        _run(_tool("useradd") or "useradd", "--user-group", "--no-create-home",
             "--shell", "/usr/sbin/nologin", operator)  # fmt: skip
        made_users.append(operator)
        _run(_tool("usermod") or "usermod", "-aG", group, operator)
        python = _python_for(daemon, group, base)
        if python is None:
            pytest.skip(
                f"no Python the test users can run: {sys.executable} is in a directory they "
                f"cannot enter and /usr/bin has no python{sys.version_info.major}."
                f"{sys.version_info.minor} to stand in for it"
            )
        yield Accounts(group, daemon, operator, base, python)
    finally:
        for user in reversed(made_users):
            subprocess.run([_tool("userdel") or "userdel", user], capture_output=True)
        for name in (operator, group):
            try:
                grp.getgrnam(name)
            except KeyError:
                continue
            subprocess.run([_tool("groupdel") or "groupdel", name], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _install_like_the_readme(acc: Accounts, base_url: str) -> tuple[Path, Path, Path]:
    """The README's recipe in a scratch tree: (config, credentials dir, data dir)."""
    install = _tool("install") or "install"
    etc, data, creds = acc.base / "etc", acc.base / "data", acc.base / "credentials"
    _run(install, "-d", "-m", "0755", str(etc))
    # install -d -o jobqueue -g jobqueue -m 2770 /var/lib/jobqueue
    _run(install, "-d", "-o", acc.daemon, "-g", acc.group, "-m", "2770", str(data))
    # install -m 0640 -o root -g jobqueue … /etc/jobqueue/jobqueue.toml
    source = acc.base / "jobqueue.toml.src"
    source.write_text(
        f'data_dir = "{data}"\nbase_url = "{base_url}"\npoll_interval = 0.2\n'
        'lease_seconds = "30s"\nlog_level = "info"\nlog_format = "json"\n'
    )
    _run(
        install,
        "-m",
        "0640",
        "-o",
        "root",
        "-g",
        acc.group,
        str(source),
        str(etc / "jobqueue.toml"),
    )
    # install -m 0600 /dev/null /etc/jobqueue/openai_api_key, then the key in it
    key = etc / "openai_api_key"
    _run(install, "-m", "0600", "/dev/null", str(key))
    key.write_text(API_KEY + "\n")
    # What systemd does with LoadCredential=openai_api_key:/etc/jobqueue/openai_api_key: a copy
    # in a directory of the service's own, readable by its user only.
    creds.mkdir()
    shutil.copyfile(key, creds / "openai_api_key")
    uid = pwd.getpwnam(acc.daemon).pw_uid
    for path, mode in ((creds / "openai_api_key", 0o400), (creds, 0o500)):
        os.chown(path, uid, -1)
        path.chmod(mode)
    return etc / "jobqueue.toml", creds, data


def _cli(
    acc: Accounts, config: Path, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess:
    """The CLI as the operator, with the login umask of Debian and Ubuntu (0022)."""
    return subprocess.run(
        _as(acc.operator, acc.operator, acc.python, "-m", "jobqueue", "--config", str(config),
            "--log-level", "warning", *args),
        env=_user_env(), capture_output=True, text=True, timeout=timeout, umask=0o022, cwd="/",
    )  # fmt: skip


def _terminate(proc: subprocess.Popen, log: Path) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        pytest.fail(f"the daemon did not stop on SIGTERM; its log:\n{log.read_text()[-6000:]}")


def test_daemon_and_cli_as_two_users_of_one_group_share_database_and_files(
    accounts: Accounts, tmp_path: Path
) -> None:
    acc = accounts
    with serve_in_thread(EmulatorConfig(time_scale=3600, seed=7, api_key=API_KEY)) as em:
        config, creds, data = _install_like_the_readme(acc, em.base_url)
        source = chat_file(acc.base / "requests.jsonl", 40)
        source.chmod(0o644)
        out = acc.base / "out"
        out.mkdir()
        os.chown(out, pwd.getpwnam(acc.operator).pw_uid, -1)

        # The operator first: the CLI creates the database and the job's folder.
        submitted = _cli(acc, config, "submit", str(source), "-e", ENDPOINT,
                         "--max-batch-requests", "15", "--json")  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        job_id = orjson.loads(submitted.stdout)["id"]

        # The daemon as the service user: no key in its environment, only the credential; the
        # unit's UMask=0007.
        log = tmp_path / "daemon.log"
        run = [acc.python, "-m", "jobqueue", "--config", str(config), "run"]
        daemon = subprocess.Popen(
            _as(acc.daemon, acc.group, *run),
            env=_user_env(CREDENTIALS_DIRECTORY=str(creds)),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
            umask=0o007, cwd="/",
        )  # fmt: skip
        try:
            waited = _cli(acc, config, "wait", job_id, "--timeout", "120", "--json", timeout=180)
            assert daemon.poll() is None, log.read_text()[-6000:]
            assert waited.returncode == 0, (waited.stdout, waited.stderr, log.read_text()[-6000:])
            assert orjson.loads(waited.stdout)["status"] == "completed"
            # A second job while the daemon runs: both write the database at once.
            again = _cli(acc, config, "submit", str(source), "-e", ENDPOINT, "--json")
            assert again.returncode == 0, again.stderr
            second = orjson.loads(again.stdout)["id"]
            waited = _cli(acc, config, "wait", second, "--timeout", "120", timeout=180)
            assert waited.returncode == 0, (waited.stderr, log.read_text()[-6000:])
        finally:
            code = _terminate(daemon, log)
        assert code == 0, log.read_text()[-6000:]

    # The operator reads what the daemon downloaded.
    results = _cli(acc, config, "results", job_id, "-o", str(out / "results.jsonl"))
    assert results.returncode == 0, results.stderr
    lines = [orjson.loads(line) for line in (out / "results.jsonl").read_bytes().splitlines()]
    assert [r["custom_id"] for r in lines] == [f"req-{i}" for i in range(40)]
    assert all(r["response"]["status_code"] == 200 and not r["error"] for r in lines)

    text = log.read_text()
    assert "PermissionError" not in text and "Permission denied" not in text, text[-6000:]
    assert "Traceback" not in text, text[-6000:]

    # Both wrote below the data dir, and everything there is the group's, readable and writable
    # by it (directories searchable and setgid), whoever made it.
    gid = grp.getgrnam(acc.group).gr_gid
    owners: set[str] = set()
    for path in [data, *data.rglob("*")]:
        st = path.lstat()
        owners.add(pwd.getpwuid(st.st_uid).pw_name)
        assert st.st_gid == gid, f"{path} is not the group's"
        assert st.st_mode & 0o060 == 0o060, f"{path} is {stat.filemode(st.st_mode)}"
        if stat.S_ISDIR(st.st_mode):
            assert st.st_mode & stat.S_ISGID and st.st_mode & 0o010, path
    assert {acc.daemon, acc.operator} <= owners, owners
    assert stat.S_IMODE(data.stat().st_mode) == 0o2770  # others stay out
    db = data / "jobqueue.db"
    assert pwd.getpwuid(db.stat().st_uid).pw_name == acc.operator  # the CLI made it


def test_an_unreadable_config_exits_2_which_the_unit_does_not_restart(
    accounts: Accounts,
) -> None:
    """The daemon's answer to a config its user cannot read is exit code 2, once, and the unit
    lists 2 in RestartPreventExitStatus=, so systemd does not restart it every 5 s for ever."""
    acc = accounts
    config = acc.base / "root-only.toml"
    config.write_text('log_level = "info"\n')
    config.chmod(0o600)
    done = subprocess.run(
        _as(acc.daemon, acc.group, acc.python, "-m", "jobqueue", "--config", str(config), "run"),
        env=_user_env(), capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "not readable" in done.stderr and "Traceback" not in done.stderr
    prevent = [line.split("=", 1)[1].split() for line in UNIT.read_text().splitlines()
               if line.startswith("RestartPreventExitStatus=")]  # fmt: skip
    assert prevent and "2" in prevent[0]


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # The unit as shipped but for where jobqueue is installed: verify checks that ExecStart's
    # program exists.
    here = Path(sys.executable).parent / "jobqueue"
    program = str(here) if here.exists() else shutil.which("jobqueue")
    if program is None:
        pytest.skip("no jobqueue executable to point ExecStart= at")
    text = UNIT.read_text()
    assert "/opt/jobqueue/.venv/bin/jobqueue" in text
    unit = tmp_path / "jobqueue.service"
    unit.write_text(text.replace("/opt/jobqueue/.venv/bin/jobqueue", program))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    about_ours = [line for line in (done.stdout + done.stderr).splitlines()
                  if "jobqueue.service" in line or str(unit) in line]  # fmt: skip
    assert done.returncode == 0 and not about_ours, done.stdout + done.stderr
