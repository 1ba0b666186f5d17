"""Start-up faults a person can act on: a port in use, PostgreSQL or Redis unreachable, a
missing JWT_SECRET, missing migrations each stop `uvicorn service.app:app` (and, where it
applies, `python -m service dev`) with a non-zero exit and one line that names the fault and
says what to do, and no traceback. And `--help` describes every command and option with its
default; `--version` prints the version."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from service import cli

from .conftest import ROOT, free_port, make_settings, settings_env


def run(argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> tuple[int, str]:
    done = subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    return done.returncode, done.stderr


def one_line(stderr: str, *words: str) -> str:
    lines = [line for line in stderr.splitlines() if all(w in line for w in words)]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def uvicorn(port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "service.app:app", "--port", str(port)]


@pytest.fixture
def env(database_url: str, redis_url: str, prefix: str) -> dict[str, str]:
    return settings_env(make_settings(database_url, redis_url, prefix))


def test_uvicorn_without_jwt_secret_says_to_set_it(env):
    env["JWT_SECRET"] = ""
    code, err = run(uvicorn(free_port()), env)
    assert code != 0
    assert "set it to" in one_line(err, "JWT_SECRET")


def test_uvicorn_with_postgresql_unreachable_names_it_and_database_url(env):
    env["DATABASE_URL"] = f"postgresql://root@127.0.0.1:{free_port()}/nowhere"
    code, err = run(uvicorn(free_port()), env)
    assert code != 0
    assert "DATABASE_URL" in one_line(err, "PostgreSQL", "unreachable")


def test_uvicorn_with_redis_unreachable_names_it_and_redis_url(env):
    env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    code, err = run(uvicorn(free_port()), env)
    assert code != 0
    assert "REDIS_URL" in one_line(err, "Redis", "unreachable")


def test_uvicorn_without_migrations_names_the_command(fresh_database, redis_url, prefix):
    env = settings_env(make_settings(fresh_database, redis_url, prefix))
    code, err = run(uvicorn(free_port()), env)
    assert code != 0
    one_line(err, "lacks migrations", "python -m service migrate")


def test_uvicorn_on_a_port_in_use_names_the_port(env):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, err = run(uvicorn(port), env)
    assert code != 0
    assert "--port" in one_line(err, f"port {port}", "in use")


def _dev_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_"))}
    return {**env, "PYTHONPATH": str(ROOT), **values}


def test_dev_on_a_port_in_use_names_the_port(tmp_path: Path, database_url, redis_url):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        argv = [sys.executable, "-m", "service", "dev", "--port", str(port)]
        code, err = run(argv, _dev_env(DATABASE_URL=database_url, REDIS_URL=redis_url), tmp_path)
    assert code != 0
    assert "--port" in one_line(err, f"port {port}", "in use")


def free_pair() -> int:
    """A port P with P + 1 free too: `dev` starts two processes, on P and P + 1."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two free ports in a row")


def test_dev_with_postgresql_unreachable_names_it(tmp_path: Path, redis_url):
    dsn = f"postgresql://root@127.0.0.1:{free_port()}/nowhere"
    argv = [sys.executable, "-m", "service", "dev", "--port", str(free_pair())]
    code, err = run(argv, _dev_env(DATABASE_URL=dsn, REDIS_URL=redis_url), tmp_path)
    assert code != 0
    assert "DATABASE_URL" in one_line(err, "PostgreSQL", "unreachable")


def test_dev_with_redis_unreachable_names_it(tmp_path: Path, database_url):
    url = f"redis://127.0.0.1:{free_port()}/0"
    argv = [sys.executable, "-m", "service", "dev", "--port", str(free_pair())]
    code, err = run(argv, _dev_env(DATABASE_URL=database_url, REDIS_URL=url), tmp_path)
    assert code != 0
    assert "REDIS_URL" in one_line(err, "Redis", "unreachable")


def test_migrate_with_postgresql_unreachable_names_it(tmp_path: Path):
    dsn = f"postgresql://root@127.0.0.1:{free_port()}/nowhere"
    code, err = run(
        [sys.executable, "-m", "service", "migrate"], _dev_env(DATABASE_URL=dsn), tmp_path
    )
    assert code != 0
    assert "DATABASE_URL" in one_line(err, "PostgreSQL", "unreachable")


def test_every_command_and_option_is_described_with_its_default(capsys):
    parser = cli.parser()
    [commands] = [a for a in parser._actions if a.dest == "command"]
    for name, sub in commands.choices.items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help, f"{name} {action.dest}"
            if action.default not in (None, False) and action.dest != "help":
                assert "(default:" in sub.format_help().split(action.dest)[-1] or (
                    "(default:" in (action.help or "")
                ), f"{name} {action.dest}"
    with pytest.raises(SystemExit):
        cli.main(["dev", "--help"])
    out = capsys.readouterr().out
    assert "(default: 2)" in out and "(default: 8000)" in out


def test_version_prints_the_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"python -m service {cli.version()}"
    assert cli.version()[0].isdigit()
