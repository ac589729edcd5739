"""Load the effective settings from every layer.

Layers, lowest precedence first (the names used in provenance):

``default``  built-in defaults (:mod:`stem.config.schema`)
``code``     values passed in code to ``Stem(...)``
``system``   ``<config dir>/stem.yaml``
``conf.d``   ``<config dir>/conf.d/*.yaml`` in lexical order
``profile``  ``<config dir>/stem.<profile>.yaml``
``file``     the file given with ``--config`` (or ``STEM_CONFIG``)
``env``      ``STEM_<SECTION>_<KEY>`` environment variables
``cli``      command-line flags (dotted key -> value)

The config dir is ``/etc/stem`` unless ``STEM_CONFIG_DIR`` (or ``config_dir=``) says
otherwise. The profile comes from ``profile=`` (``--profile``), else ``STEM_PROFILE``,
else ``development``. Missing layer files are skipped, except a ``--config`` file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from stem.config.layers import Merger, env_tree, mapping_tree
from stem.config.model import Settings
from stem.config.provenance import ConfigIssue, Provenance, SettingsError
from stem.config.resolve import build_settings
from stem.config.yamlsafe import Node, YAMLProblem, parse_yaml
from stem.errors import ConfigError

DEFAULT_CONFIG_DIR = "/etc/stem"
DEFAULT_PROFILE = "development"
MAX_CONFIG_BYTES = 1024 * 1024
_PROFILE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def resolve_profile(profile: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The profile name: the argument, else ``STEM_PROFILE``, else ``development``."""
    env = os.environ if environ is None else environ
    name = profile or env.get("STEM_PROFILE") or DEFAULT_PROFILE
    if not _PROFILE.match(name):
        raise ConfigError(
            f"profile {name!r} must be letters, digits, '_' or '-' (it names a file "
            f"stem.<profile>.yaml)"
        )
    return name


def config_files(
    config_dir: str, profile: str, config_file: str | None
) -> list[tuple[str, str, bool]]:
    """``(layer, path, required)`` of every file layer, lowest precedence first."""
    base = Path(config_dir)
    files = [("system", str(base / "stem.yaml"), False)]
    confd = base / "conf.d"
    try:
        names = sorted(p.name for p in confd.iterdir() if p.name.endswith(".yaml"))
    except (FileNotFoundError, NotADirectoryError):
        names = []
    except OSError:
        # Unreadable (permissions): its settings must not be silently left out. Read as a
        # required layer, the directory fails with the reason, naming it.
        files.append(("conf.d", str(confd), True))
        names = []
    files += [("conf.d", str(confd / name), False) for name in names]
    files.append(("profile", str(base / f"stem.{profile}.yaml"), False))
    if config_file:
        extra = os.path.realpath(os.path.expanduser(config_file))
        # A file of the directory's layers named again (STEM_CONFIG=/etc/stem/stem.yaml)
        # stays at its own layer: read twice, it would land above the profile and undo it.
        layered = {os.path.realpath(path) for _, path, _ in files}
        if extra not in layered or not os.path.exists(extra):
            files.append(("file", os.path.abspath(os.path.expanduser(config_file)), True))
    return files


def _read_layer(path: str, layer: str, required: bool, merger: Merger) -> Node | None:
    where = Provenance(layer, path)
    if layer == "conf.d" and os.path.isdir(path):  # the directory itself: see config_files
        try:
            os.listdir(path)
        except OSError as exc:
            merger.issue("", f"cannot list the conf.d directory: {exc.strerror}", where)
            return None
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        if required:
            merger.issue("", "config file does not exist", where)
        return None
    except OSError as exc:
        merger.issue("", f"cannot read config file: {exc.strerror}", where)
        return None
    if len(data) > MAX_CONFIG_BYTES:
        merger.issue("", f"config file is larger than {MAX_CONFIG_BYTES} bytes", where)
        return None
    try:
        return parse_yaml(data.decode("utf-8"))
    except UnicodeDecodeError:
        merger.issue("", "config file is not UTF-8 text", where)
    except YAMLProblem as exc:
        merger.issue("", exc.message, Provenance(layer, path, exc.line))
    return None


def load_settings(
    *,
    profile: str | None = None,
    config_file: str | None = None,
    overrides: Mapping[str, object] | None = None,
    code_defaults: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    config_dir: str | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> Settings:
    """The effective settings, with provenance for every value.

    ``overrides`` are command-line values by dotted key (``{"broker.url": ...}``; None
    means the flag was not given); ``flag_names`` maps a dotted key to the flag that set
    it, for messages (common flags are known already). ``code_defaults`` are the values
    given to ``Stem(...)``, nested or dotted. ``environ`` defaults to ``os.environ``; its
    ``STEM_PROFILE``, ``STEM_CONFIG_DIR`` and ``STEM_CONFIG`` stand in for ``profile``,
    ``config_dir`` and ``config_file`` when those are not given.

    Raises :class:`~stem.config.provenance.SettingsError` (a ``ConfigError``) listing every
    problem with its file and line (or variable or flag), key path and layer.
    """
    env = dict(os.environ if environ is None else environ)
    name = resolve_profile(profile, env)
    directory = config_dir or env.get("STEM_CONFIG_DIR") or DEFAULT_CONFIG_DIR
    merger = Merger()
    if code_defaults:
        merger.apply(mapping_tree(code_defaults, text=False), "code", "Stem(...)")
    files: list[str] = []
    extra = config_file or env.get("STEM_CONFIG") or None
    for layer, path, required in config_files(directory, name, extra):
        tree = _read_layer(path, layer, required, merger)
        if tree is not None:
            files.append(path)
            merger.apply(tree, layer, path, base_dir=os.path.dirname(path))
    merger.apply(env_tree(env, merger), "env", "environment")
    if overrides:
        tree = mapping_tree(overrides, text=True, flags=flag_names or {})
        merger.apply(tree, "cli", "command line")
    if merger.issues:
        raise SettingsError(_dedupe(merger.issues))
    return build_settings(merger, name, tuple(files))


def _dedupe(issues: list[ConfigIssue]) -> list[ConfigIssue]:
    seen: set[str] = set()
    out = []
    for issue in issues:
        if str(issue) not in seen:
            seen.add(str(issue))
            out.append(issue)
    return out
