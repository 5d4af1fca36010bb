"""docker/compose.yaml as compose resolves it, read without compose: YAML with its merge
keys, and compose's variable substitution. For running the services as processes
(tests/netns.py); tests/test_docker.py checks that this reads the file as
`docker-compose config` does."""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker" / "compose.yaml"


class ComposeError(Exception):
    """The file holds what a plain `dpodl` process cannot run, or a variable is missing."""


@dataclass(frozen=True, slots=True)
class Service:
    """One compose service, resolved: the container's paths are still in `command`."""

    name: str
    command: tuple[str, ...]  # the arguments to the image's entrypoint, `dpodl`
    environment: tuple[tuple[str, str], ...]
    volumes: tuple[tuple[str, str], ...]  # (volume name, path in the container)
    healthcheck: tuple[str, ...]  # the argv of a `CMD` health check, or ()


# $$, $NAME, ${NAME}, ${NAME-default}, ${NAME:-default}, ${NAME?error}, ${NAME:?error}
_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|(?P<named>[A-Za-z_][A-Za-z0-9_]*)"
                       r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """`text` with compose's variables substituted from `environ`."""
    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name, op = match["named"] or match["braced"], match["op"] or ""
        value = environ.get(name)
        missing = value is None or (op.startswith(":") and not value)
        if missing and op.endswith("-"):
            return match["arg"]
        if missing and op.endswith("?"):
            raise ComposeError(f"required variable {name} is missing a value: {match['arg']}")
        return value or ""  # compose, too, reads an unset variable as empty
    return _VARIABLE.sub(substitute, text)


def load_services(environ: Mapping[str, str], path: Path = COMPOSE) -> dict[str, Service]:
    """The services of a compose file, its variables taken from `environ`."""
    def resolve(value: object) -> object:
        if isinstance(value, str):
            return interpolate(value, environ)
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return value

    services = {}
    # safe_load applies YAML's merge keys (`<<: *node`) on its own.
    for name, raw in yaml.safe_load(path.read_text())["services"].items():
        raw = resolve(raw)
        if "entrypoint" in raw or not isinstance(raw.get("command"), list):
            raise ComposeError(f"{name}: only an argument list for the image's `dpodl` runs")
        environment = raw.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(entry.partition("=")[::2] for entry in environment)
        test = raw.get("healthcheck", {}).get("test", [])
        services[name] = Service(
            name=name, command=tuple(raw["command"]),
            environment=tuple((k, str(v)) for k, v in environment.items()),
            volumes=tuple(_volume(entry) for entry in raw.get("volumes", ())),
            healthcheck=tuple(test[1:]) if test[:1] == ["CMD"] else ())
    return services


def _volume(entry: str | dict) -> tuple[str, str]:
    """(source, target) of a `volumes` entry, in the short or the long syntax."""
    if isinstance(entry, dict):
        return entry["source"], entry["target"]
    source, target, *_ = entry.split(":")
    return source, target
