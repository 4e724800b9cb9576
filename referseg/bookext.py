"""The book's own Sphinx extension (``_config.yml``: ``sphinx.extra_extensions``).

Launch buttons (Binder, Colab, ...) need the repository the book comes from: with
``repository.url`` empty in ``_config.yml`` the theme cannot build their links, so this
extension drops the launch providers and the book shows no launch button. The URL can also
come from the environment, without editing ``_config.yml``::

    REFERSEG_REPOSITORY_URL=https://github.com/<owner>/referseg referseg book

It also works around Sphinx 7.4 writing an inline script twice into every page when an
extension adds it after the builder started (sphinx-thebe's ``const THEBE_JS_URL = ...``,
whose second copy is a JavaScript error in every page's console).
"""

from __future__ import annotations

import os
from typing import Any

REPOSITORY_ENV = "REFERSEG_REPOSITORY_URL"
LAUNCH_PROVIDERS = ("binderhub_url", "jupyterhub_url", "colab_url", "deepnote_url", "jupyterlite_url", "thebe")


def repository_options(theme_options: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """``html_theme_options`` with the repository URL of the environment (when set there) and
    without launch providers when there is no repository URL at all."""
    environ = os.environ if environ is None else environ
    options = dict(theme_options)
    url = (environ.get(REPOSITORY_ENV) or options.get("repository_url") or "").strip()
    options["repository_url"] = url
    if not url:
        launch = dict(options.get("launch_buttons") or {})
        options["launch_buttons"] = {key: value for key, value in launch.items() if key not in LAUNCH_PROVIDERS}
    return options


def _config_inited(app: Any, config: Any) -> None:
    options = repository_options(config.html_theme_options or {})
    config.html_theme_options.clear()
    config.html_theme_options.update(options)


def unique_scripts(scripts: list[Any]) -> list[Any]:
    """The page's scripts without repeats; an inline script added once as ``None`` and once as
    ``""`` (Sphinx 7.4 does both) counts as a repeat."""
    seen, unique = set(), []
    for script in scripts:
        filename = getattr(script, "filename", script) or ""
        attributes = tuple(sorted((key, str(value)) for key, value in getattr(script, "attributes", {}).items()))
        key = (str(filename), attributes)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    return unique


def _page_context(app: Any, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    if "script_files" in context:
        context["script_files"][:] = unique_scripts(list(context["script_files"]))


def setup(app: Any) -> dict[str, Any]:
    app.connect("config-inited", _config_inited)
    app.connect("html-page-context", _page_context, priority=900)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
