"""The deployment files, checked without a Docker engine (none runs in CI).

docker-compose.yml is read the way Compose reads it (YAML, then `${VAR...}` interpolation) and
its commands go through the real CLI parser; the Dockerfile's install must be the Makefile's.
The slow tests run both compose services' commands as real processes, with their healthchecks.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from media_servers import closed_port
from redis_server import _ping, free_port
from service_harness import wait_for

from livelens.stream.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
VENV_BIN = Path(sys.executable).parent
LIVELENS = shutil.which("livelens", path=str(VENV_BIN))
REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
# What `docker compose up` needs in the environment (or .env); everything else has a default.
REQUIRED_ENV = {"LIVELENS_TOKEN": "deploy-token"}


# ------------------------------------------------------------------ Compose's interpolation
class MissingVariable(ValueError):
    """`${VAR:?message}` with VAR unset (or empty): Compose refuses the file with the message."""


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Substitute variables in one string as the Compose specification says.

    `$$` is a literal `$`; `$VAR` and `${VAR}` (unset: empty); `${VAR:-default}` (unset or empty)
    and `${VAR-default}` (unset); `${VAR:?err}`/`${VAR?err}` fail; `${VAR:+alt}`/`${VAR+alt}`.
    Defaults may themselves hold variables.
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
            continue
        following = text[i + 1 : i + 2]
        if following == "$":
            out.append("$")
            i += 2
        elif following == "{":
            depth, j = 1, i + 2
            while j < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            if depth:
                raise ValueError(f"invalid interpolation format (unterminated ${{) in {text!r}")
            out.append(_expand(text[i + 2 : j - 1], env))
            i = j
        elif name := _NAME.match(text, i + 1):
            out.append(env.get(name.group(), ""))
            i = name.end()
        else:
            raise ValueError(f"invalid interpolation format in {text!r}")
    return "".join(out)


def _expand(expression: str, env: Mapping[str, str]) -> str:
    match = _BRACED.fullmatch(expression)
    if match is None:
        raise ValueError(f"invalid interpolation format: ${{{expression}}}")
    name, op, arg = match["name"], match["op"], match["arg"]
    value = env.get(name)
    if op is None:
        return value or ""
    present = bool(value) if op.startswith(":") else value is not None
    if op.endswith("-"):
        return value if present else interpolate(arg, env)  # type: ignore[return-value]
    if op.endswith("?"):
        if not present:
            raise MissingVariable(f"{name}: {interpolate(arg, env)}")
        return value  # type: ignore[return-value]
    return interpolate(arg, env) if present else ""


def _interpolate_all(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_all(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_all(value, env) for key, value in node.items()}
    return node


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml as `docker compose config` would see it with this environment."""
    raw = yaml.safe_load(COMPOSE.read_text())
    return _interpolate_all(raw, REQUIRED_ENV if env is None else env)


def compose_variables() -> set[str]:
    """Every variable docker-compose.yml reads."""
    return set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", COMPOSE.read_text()))


def test_interpolation_follows_the_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("a$SET-${SET}$$SET", env) == "ax-x$SET"
    assert interpolate("${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d}", env) == "d d  d"
    assert interpolate("${UNSET:-${SET}/y}", env) == "x/y"
    assert interpolate("${SET:+alt}|${EMPTY:+alt}|${EMPTY+alt}|${UNSET}", env) == "alt||alt|"
    assert interpolate("${EMPTY?no}", env) == ""
    with pytest.raises(MissingVariable, match="EMPTY: give it"):
        interpolate("${EMPTY:?give it}", env)
    with pytest.raises(MissingVariable, match="UNSET: no"):
        interpolate("${UNSET?no}", env)
    for bad in ("${SET", "${1X}", "$ x"):
        with pytest.raises(ValueError, match="interpolation"):
            interpolate(bad, env)


# ------------------------------------------------------------------------- the Dockerfile
@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form ENTRYPOINT/CMD/HEALTHCHECK CMD."""
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation line"
    return instructions


def only(keyword: str) -> Instruction:
    found = [i for i in dockerfile() if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def args_defaults() -> dict[str, str]:
    return dict(i.args.split("=", 1) for i in dockerfile() if i.keyword == "ARG" and "=" in i.args)


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in dockerfile():
        if instruction.keyword == "ENV":
            for item in shlex.split(instruction.args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def volume_path() -> str:
    """The image's one VOLUME (plain or JSON form)."""
    args = only("VOLUME").args
    (path,) = json.loads(args) if args.startswith("[") else args.split()
    return path


def test_dockerfile_installs_with_the_makefile() -> None:
    runs = [i.args for i in dockerfile() if i.keyword == "RUN"]
    installs = [r for r in runs if "make venv" in r]
    assert len(installs) == 1, runs
    # The only install is the README's `make venv`; a pip line here could drift from it.
    assert not any(re.search(r"\bpip3?\s+install\b|-m\s+pip\b", r) for r in runs), runs
    torch = args_defaults()["TORCH"]
    assert re.search(r'make venv TORCH="\$\{TORCH\}"', installs[0]), installs[0]
    # What `make venv` runs with that TORCH, on a clean tree (dry run: nothing is executed).
    dry = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "venv", "VENV=/nonexistent/.venv", f"TORCH={torch}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    torch_line = f'/nonexistent/.venv/bin/pip install --quiet "{torch}"'
    project_line = '/nonexistent/.venv/bin/pip install --quiet -e ".[test]"'
    assert torch_line in dry and project_line in dry, dry
    assert dry.index(torch_line) < dry.index(project_line), dry
    # torch must satisfy pyproject's range, or the project install would replace it.
    requirement = next(d for d in _pyproject()["project"]["dependencies"] if d.startswith("torch"))
    version = torch.removeprefix("torch==")
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"pin torch in the image, got {torch}"
    low, high = re.fullmatch(r"torch>=([\d.]+),<([\d.]+)", requirement).groups()  # type: ignore[union-attr]
    assert _v(low) <= _v(version) < _v(high), (torch, requirement)
    apt = next(r for r in runs if "apt-get install" in r)
    for package in ("make", "python3-venv", "gcc", "python3-dev"):
        assert re.search(rf"\s{re.escape(package)}(\s|$)", apt), package


def _v(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dockerfile_runs_the_console_script_as_a_user_with_the_cache_volume() -> None:
    base = only("FROM").args
    assert base == "${CUDA_IMAGE}", base
    image = args_defaults()["CUDA_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime)-ubuntu24\.04", image), image
    workdir = only("WORKDIR").args
    scripts = _pyproject()["project"]["scripts"]
    assert scripts["livelens"] == "livelens.stream.cli:main"
    assert only("ENTRYPOINT").exec_form() == [f"{workdir}/.venv/bin/livelens"]
    assert only("USER").args not in ("root", "0")
    env = dockerfile_env()
    assert env["PATH"].startswith(f"{workdir}/.venv/bin:")  # `python` = the venv's, for probes
    volume = volume_path()
    for key in ("HF_HOME", "LIVELENS_CACHE", "TRITON_CACHE_DIR"):
        assert env[key].startswith(volume + "/"), (key, env[key])

    args = build_parser().parse_args(only("CMD").exec_form())
    assert (args.command, args.host, args.port, args.redis_url) == (
        "serve",
        "0.0.0.0",
        8000,
        "none",
    )
    assert only("EXPOSE").args == str(args.port)
    health = only("HEALTHCHECK").args
    assert "--start-period=10m" in health
    probe = Instruction("CMD", health.split(" CMD ", 1)[1]).exec_form()
    assert _probe_url(probe) == f"http://127.0.0.1:{args.port}/healthz"


def _probe_url(command: list[str]) -> str:
    """The URL a `python -c "...urlopen('URL'...)"` healthcheck fetches."""
    assert command[:2] == ["python", "-c"], command
    (url,) = re.findall(r"urlopen\('([^']+)'", command[2])
    return url


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's patterns leave `path` out of the build context.

    Docker's rules: patterns are relative to the context root, `*` stays within one path
    element, `**` spans any number, a match on a parent folder excludes what is inside, and the
    last matching pattern wins (`!` re-includes).
    """
    ignored = False
    parts = path.split("/")
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        regex = ""
        for piece in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                piece, re.escape(piece)
            )
        prefixes = ("/".join(parts[:n]) for n in range(1, len(parts) + 1))
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_host_venv_and_secrets_out_but_the_sources_in() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        ".venv/.installed",  # would make `make venv` a no-op, with the host's CPU torch
        ".venv/bin/python",
        ".env",
        ".env.production",
        ".git/HEAD",
        "stream/__pycache__/app.cpython-311.pyc",
        "livelens.egg-info/PKG-INFO",
    ):
        assert _ignored(path, patterns), path
    project = _pyproject()
    needed = ["Makefile", "pyproject.toml", project["project"]["readme"]]
    for folder in project["tool"]["setuptools"]["package-dir"].values():
        needed += [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*") if p.is_file()]
    needed = [p for p in needed if "__pycache__" not in p]
    assert "clients/console/index.html" in needed
    assert [p for p in needed if _ignored(p, patterns)] == []


# --------------------------------------------------------------------- docker-compose.yml
def test_compose_services_gpu_volumes_and_restart_policy() -> None:
    compose = load_compose()
    services = compose["services"]
    assert set(services) == {"livelens", "redis"}
    app, redis = services["livelens"], services["redis"]
    assert app["build"] == "."
    assert app["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert app["volumes"] == [f"model-cache:{volume_path()}"]
    assert redis["volumes"] == ["redis-data:/data"]  # the official image's WORKDIR and dir
    assert set(compose["volumes"]) == {"model-cache", "redis-data"}
    assert app["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert app["restart"] == redis["restart"] == "unless-stopped"
    assert re.fullmatch(r"redis:\d+(\.\d+)*", redis["image"]), redis["image"]
    for service in (app, redis):
        health = service["healthcheck"]
        assert health["test"][0] in ("CMD", "CMD-SHELL")
        assert {"interval", "timeout", "retries"} <= set(health)
    assert _seconds(app["healthcheck"]["start_period"]) >= 600  # download + convert on 1st start
    assert _seconds(app["stop_grace_period"]) >= 10


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_passes_the_tokens_through_and_refuses_to_start_without_one() -> None:
    env = load_compose({"LIVELENS_TOKEN": "t0k", "HF_TOKEN": "hf_abc"})
    assert env["services"]["livelens"]["environment"] == {
        "LIVELENS_TOKEN": "t0k",
        "LIVELENS_REDIS_URL": "redis://127.0.0.1:6379/0",
        "LIVELENS_ALLOW_SOURCES": "",
        "HF_TOKEN": "hf_abc",
    }
    anonymous = load_compose({"LIVELENS_TOKEN": "t0k"})["services"]["livelens"]["environment"]
    assert anonymous["HF_TOKEN"] == ""  # huggingface_hub treats an empty token as none
    for unsafe in ({}, {"LIVELENS_TOKEN": ""}):  # an empty token would mean no auth at all
        with pytest.raises(MissingVariable, match="LIVELENS_TOKEN"):
            load_compose(unsafe)


def test_compose_command_is_accepted_by_the_real_cli() -> None:
    app = load_compose()["services"]["livelens"]
    args = build_parser().parse_args(app["command"])
    assert args.command == "serve"
    assert (args.host, args.port, args.model) == ("0.0.0.0", 8000, "DAMO-NLP-SG/VideoLLaMA3-2B")
    assert (args.prune_threshold, args.max_sessions) == ("4", 16)
    # The token and the Redis URL travel in the environment, not in `ps` output.
    assert args.token is None and args.redis_url is None and args.redis_url_file is None
    assert app["environment"]["LIVELENS_REDIS_URL"] == "redis://127.0.0.1:6379/0"
    changed = {
        **REQUIRED_ENV,
        "LIVELENS_MODEL": "DAMO-NLP-SG/VideoLLaMA3-7B",
        "LIVELENS_PORT": "9000",
        "LIVELENS_REDIS_PORT": "6390",
        "LIVELENS_PRUNE_THRESHOLD": "8",
    }
    compose = load_compose(changed)
    args = build_parser().parse_args(compose["services"]["livelens"]["command"])
    assert (args.model, args.port, args.prune_threshold) == (
        "DAMO-NLP-SG/VideoLLaMA3-7B",
        9000,
        "8",
    )
    assert compose["services"]["livelens"]["environment"]["LIVELENS_REDIS_URL"] == (
        "redis://127.0.0.1:6390/0"
    )
    assert _probe_url(compose["services"]["livelens"]["healthcheck"]["test"][1:]) == (
        "http://127.0.0.1:9000/healthz"
    )
    assert compose["services"]["redis"]["ports"] == ["127.0.0.1:6390:6379"]


def test_no_secret_goes_on_a_compose_command_line() -> None:
    """Command lines are public on the host (`ps`, /proc/PID/cmdline): credentials and URLs
    that may carry one (Redis' password) belong in `environment:`."""
    secrets = {"LIVELENS_TOKEN": "tok-4c1e", "HF_TOKEN": "hf_9b2d"}
    services = load_compose(secrets)["services"]
    for name, service in services.items():
        command = [str(part) for part in service.get("command", [])]
        assert command, name
        flagged = {"--token", "--redis-url", "--requirepass"}
        assert flagged.isdisjoint(command), (name, command)
        assert not [part for part in command if "://" in part or "@" in part], (name, command)
        assert not [part for part in command for value in secrets.values() if value in part]


def test_livelens_on_the_host_network_reaches_the_published_redis() -> None:
    services = load_compose()["services"]
    app, redis = services["livelens"], services["redis"]
    # Host networking: ICE candidates and ephemeral UDP ports are the host's own. `ports:` would
    # be ignored there, and the compose network's `redis` name does not resolve.
    assert app["network_mode"] == "host" and "ports" not in app and "networks" not in app
    url = urlsplit(app["environment"]["LIVELENS_REDIS_URL"])
    published = [p.split(":") for p in redis["ports"]]
    assert published == [["127.0.0.1", str(url.port), "6379"]]  # loopback only, no exposure
    assert url.hostname == "127.0.0.1"


def test_healthchecks_probe_a_route_the_app_serves() -> None:
    from livelens.stream.app import create_app
    from livelens.stream.service import LiveService

    routes = {getattr(r, "path", None) for r in create_app(LiveService(None)).routes}  # type: ignore[arg-type]
    app = load_compose()["services"]["livelens"]
    url = urlsplit(_probe_url(app["healthcheck"]["test"][1:]))
    assert url.path == "/healthz" and url.path in routes
    assert url.hostname == "127.0.0.1"  # the container's own loopback = the host's, with host net
    assert load_compose()["services"]["redis"]["healthcheck"]["test"] == [
        "CMD-SHELL",
        "redis-cli ping | grep -q PONG",
    ]


def test_every_compose_variable_is_documented() -> None:
    doc = DEPLOY_DOC.read_text()
    variables = compose_variables()
    assert {"LIVELENS_TOKEN", "HF_TOKEN", "LIVELENS_MODEL"} <= variables
    assert [v for v in sorted(variables) if f"`{v}`" not in doc] == []


# ---------------------------------------------- the compose services' commands, for real
def _run_healthcheck(test: list[str], *, replace: tuple[str, str] | None = None) -> int:
    """Run a compose healthcheck `test` here as the engine would in the container: exit status.

    CMD runs the argv directly (`python` resolves to the venv's, first on PATH as in the image);
    CMD-SHELL goes through `sh -c`. `replace` adapts one fragment (e.g. the redis-cli port).
    """
    kind, *rest = test
    if kind == "CMD-SHELL":
        (script,) = rest
        if replace:
            assert script.count(replace[0]) == 1, script
            script = script.replace(*replace)
        argv = ["sh", "-c", script]
    else:
        assert kind == "CMD" and replace is None
        argv = rest
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(argv, env=env, capture_output=True, timeout=15).returncode


def _redis_cli(port: int, *command: str) -> str:
    assert REDIS_CLI is not None
    argv = [REDIS_CLI, "-p", str(port), *command]
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout


@contextmanager
def compose_redis(data: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """The redis service's command, on a local port, with `data` standing in for /data."""
    command = load_compose()["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    data.mkdir(parents=True, exist_ok=True)
    argv = [REDIS_SERVER, *command[1:]]
    argv += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--daemonize", "no"]
    log = (data / "redis.log").open("ab")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)  # type: ignore[arg-type]
    try:
        wait_for(lambda: _ping(port) or process.poll() is not None, timeout=10, interval=0.02)
        assert process.poll() is None, (data / "redis.log").read_text()[-2000:]
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=10)
        log.close()


needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None or REDIS_CLI is None,
    reason="redis-server/redis-cli are not on PATH (apt-get install redis-server)",
)


@needs_redis
def test_compose_redis_is_healthy_and_keeps_data_through_a_crash(tmp_path: Path) -> None:
    health = load_compose()["services"]["redis"]["healthcheck"]["test"]
    port = free_port()
    with_port = ("redis-cli", f"{REDIS_CLI} -p {port}")
    assert _run_healthcheck(health, replace=with_port) != 0  # nothing listens yet
    with compose_redis(tmp_path / "data", port) as process:
        assert _run_healthcheck(health, replace=with_port) == 0
        assert _redis_cli(port, "CONFIG", "GET", "appendonly").split() == ["appendonly", "yes"]
        assert _redis_cli(port, "SET", "livelens:probe", "kept").strip() == "OK"
        # SIGKILL: no shutdown save. Only the append-only file can bring the key back (the
        # default RDB snapshot rules would not have fired within a second).
        process.kill()
        process.wait(timeout=10)
    assert _run_healthcheck(health, replace=with_port) != 0
    assert list((tmp_path / "data").glob("appendonlydir/*.aof"))
    with compose_redis(tmp_path / "data", port):
        assert _redis_cli(port, "GET", "livelens:probe").strip() == "kept"


@needs_redis
@pytest.mark.slow
@pytest.mark.skipif(LIVELENS is None, reason="the livelens console script is not installed")
def test_compose_livelens_command_serves_and_passes_its_healthcheck(
    model_cache: Path, tmp_path: Path
) -> None:
    """The livelens service as compose starts it, with LIVELENS_MODEL=tiny and local ports."""
    redis_port, port = free_port(), closed_port()
    env = {
        "LIVELENS_TOKEN": "deploy-token",
        "LIVELENS_MODEL": "tiny",
        "LIVELENS_HOST": "127.0.0.1",
        "LIVELENS_PORT": str(port),
        "LIVELENS_REDIS_PORT": str(redis_port),
    }
    app = load_compose(env)["services"]["livelens"]
    health = app["healthcheck"]["test"]
    assert _run_healthcheck(health) != 0  # nothing listens yet: the probe can fail
    process_env = {**os.environ, **app["environment"], "LIVELENS_CACHE": str(model_cache)}
    log_path = tmp_path / "serve.log"
    with compose_redis(tmp_path / "redis", redis_port), log_path.open("w") as log:
        server = subprocess.Popen(
            [LIVELENS, *app["command"]], env=process_env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_for(
                lambda: server.poll() is not None or _run_healthcheck(health) == 0,
                timeout=120,
                interval=0.5,
            )
            assert server.poll() is None, log_path.read_text()[-2000:]
            url = f"http://127.0.0.1:{port}"
            health_json = httpx.get(f"{url}/healthz").json()
            assert (health_json["status"], health_json["model"]) == ("ok", "tiny")
            assert health_json["redis"] is True  # the compose redis URL reached our redis
            assert httpx.get(f"{url}/v1/sessions").status_code == 401
            authorized = {"Authorization": "Bearer deploy-token"}  # from `environment:`
            assert httpx.get(f"{url}/v1/sessions", headers=authorized).status_code == 200
        finally:
            # `docker stop` sends SIGTERM and kills after stop_grace_period.
            server.send_signal(signal.SIGTERM)
            try:
                code = server.wait(timeout=_seconds(app["stop_grace_period"]))
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
                code = None
    output = log_path.read_text()
    # uvicorn shuts down gracefully (lifespan: sessions finished, registry closed), then
    # re-raises the signal, so the container exits as terminated by SIGTERM (143).
    assert code in (0, -signal.SIGTERM), output[-2000:]
    assert "Application shutdown complete" in output, output[-2000:]
    assert _run_healthcheck(health) != 0
