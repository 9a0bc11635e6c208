"""The shipped templates (deploy/templates/) and the one way they are filled: ``@@NAME@@`` placeholders."""

from __future__ import annotations

from importlib.resources import files

from flowerbed.errors import FlowerbedError


def template(name: str) -> str:
    """The text of ``deploy/templates/NAME`` as installed with the kit."""
    return files("flowerbed.deploy").joinpath(f"templates/{name}").read_text("utf-8")


def fill(name: str, values: dict[str, str]) -> str:
    """Template ``name`` with every ``@@KEY@@`` replaced; a placeholder left over is an error."""
    text = template(name)
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    if "@@" in text:
        raise FlowerbedError(f"the template {name} has an unfilled placeholder: reinstall flowerbed")
    return text
