"""``--config FILE``: a command's options from a YAML or JSON file.

Keys are the command's option names, with dashes or underscores (``image-size`` and
``image_size`` are the same key), plus its arguments by name (``dataset``,
``source``, ``bundle``). A run's own ``config.json`` (``{"dataset": ...,
"config": {...}}``, see ``train.run_format``) is read too, so a finished run can be
repeated exactly with ``tagmill train --config RUN/config.json --out AGAIN``.

The file fills in what the command line did not give: a flag on the command line
always wins. Every key is checked against the command's options and its value against
the option's type before the command starts, and a wrong one is an
:class:`~tagmill.errors.InputError` naming the key and the file.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Mapping
from typing import Any

import typer

from tagmill import storage
from tagmill.errors import InputError

#: options that only make sense on a command line, never in a file
NOT_IN_FILES = {"config_file", "help"}


def read_config_file(location: str) -> dict[str, Any]:
    """The mapping a YAML or JSON file holds (JSON is read as JSON, for exact errors)."""
    text = storage.read_text(location)
    if location.lower().endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as exc:  # json.JSONDecodeError
            raise InputError(f"{location} is not a valid JSON file: {exc}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(f"{location} is not a valid YAML file: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{location} must hold a mapping of option names to values, not a {type(data).__name__}")
    return data


def command_defaults(
    command: Any, location: str, ctx: Any = None, *,
    saved_run: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The file at ``location`` as the ``default_map`` of ``command`` (a Typer command):
    keyed by parameter name, values converted by the parameter's own type.

    ``saved_run`` maps a saved run's configuration fields to the command's option names
    where they differ (``resize_method`` → ``resize``); with it, a run's ``config.json``
    is accepted as well as a file of options."""
    data = read_config_file(location)
    if saved_run is not None and _is_saved_run(data):
        data = {"dataset": data["dataset"], **{saved_run.get(k, k): v for k, v in data["config"].items()}}
    params = _params_by_key(command)
    chosen: dict[str, tuple[str, Any]] = {}
    for raw_key, value in data.items():
        key = str(raw_key).strip().lstrip("-").replace("-", "_")
        param = params.get(key)
        if param is None:
            known = ", ".join(sorted(k for k, p in params.items() if k == p.name))
            raise InputError(f"{location}: unknown option {raw_key!r} for `tagmill {command.name}`", hint=f"its options: {known}")
        if param.name in chosen:
            raise InputError(f"{location}: {raw_key!r} and {chosen[param.name][0]!r} are the same option; give it once")
        if value is None:  # left open, as when the option is not given
            continue
        chosen[param.name] = (str(raw_key), _convert(param, value, str(raw_key), location, ctx))
    return {name: value for name, (_, value) in chosen.items()}


def _is_saved_run(data: dict[str, Any]) -> bool:
    return set(data) == {"dataset", "config"} and isinstance(data["config"], dict)


def _params_by_key(command: Any) -> dict[str, Any]:
    """Each parameter under its name and its long option names, dashes as underscores."""
    found: dict[str, Any] = {}
    for param in command.params:
        if param.name is None or param.name in NOT_IN_FILES:
            continue
        found[param.name] = param
        for opt in getattr(param, "opts", []):
            if opt.startswith("--"):
                found.setdefault(opt[2:].replace("-", "_"), param)
    return found


def _convert(param: Any, value: Any, key: str, location: str, ctx: Any) -> Any:
    """Check ``value`` against the option's annotation strictly (YAML's ``yes`` is not a
    number, 1.5 is not a whole number), then convert it as the command line would."""
    annotation = param.type_descriptor.annotation
    many = typing.get_origin(annotation) is list
    element = typing.get_args(annotation)[0] if many else annotation
    if many:
        items = value if isinstance(value, list) else [value]
    elif isinstance(value, (list, dict)):
        raise InputError(f"{location}: {key} takes one value, not a {type(value).__name__}")
    else:
        items = [value]
    checked = [_check_one(item, element, key, location) for item in items]
    try:
        return param.get_runtime_param().coerce(checked if many else checked[0], param=param, ctx=ctx)
    except typer.BadParameter as exc:
        raise InputError(f"{location}: {key} expects {_expected(element)}: {exc.message}") from None


def _check_one(value: Any, element: Any, key: str, location: str) -> Any:
    wrong = isinstance(value, (list, dict)) or (
        not isinstance(value, (bool, str)) if element is bool else isinstance(value, bool)
    )
    if wrong:
        raise InputError(f"{location}: {key} expects {_expected(element)}, not {value!r}")
    if element is str and isinstance(value, (int, float)):
        return str(value)  # time_budget: 90, device: 0
    return value


def _expected(element: Any) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number"}.get(element, "text")


__all__ = ["command_defaults", "read_config_file"]
