"""Files that hold secrets: permission checks and signing-key parsing.

A secret file must not be accessible by group or others (``chmod 600``); the loader
refuses one outside the development profile, and gate ``G007-secret-file-mode`` reports it
in every profile.
"""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

from stem.config.fields import FieldProblem
from stem.config.schema import decode_key, is_key_path, key_entry_problem

MAX_SECRET_BYTES = 1024 * 1024


def euid() -> int:
    """This process's effective uid (tests replace it to judge files as a service user)."""
    return os.geteuid()


def mode_problem(path: str) -> str | None:
    """Why ``path`` is too open for a secret, or None. Missing files are not judged here.

    Two layouts pass: owned by this user with mode 0600 (or stricter), and the packaged one,
    owned by root and readable by this process's group (``0640 root:stem``), which the
    service user can read but not change. Anything readable by others, or by a group this
    process is not in, fails. Run as root, the packaged layout fails too (root cannot know
    which group is the service's), with a message that says to check as the service user."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077:
        return None
    packaged = not mode & 0o037 and st.st_uid == 0
    if packaged and st.st_gid in {os.getegid(), *os.getgroups()}:
        return None
    if packaged and euid() == 0:
        return (
            f"secret file {path} is readable by group {_group_name(st.st_gid)} (mode "
            f"{mode:04o}): right if that is the service's group; root cannot tell, so run "
            "this check as the service user (sudo -u stem stem config check)"
        )
    return (
        f"secret file {path} is accessible by group or others (mode {mode:04o}); "
        f"run: chmod 600 {path} (or keep it root-owned, group of the service, mode 0640)"
    )


def _group_name(gid: int) -> str:
    try:
        return repr(grp.getgrgid(gid).gr_name)
    except KeyError:
        return str(gid)


def read_secret_file(path: str) -> str:
    """The text of a secret file. Raises :class:`FieldProblem` naming the path."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SECRET_BYTES + 1)
    except FileNotFoundError:
        raise FieldProblem(f"secret file {path} does not exist") from None
    except PermissionError:
        raise FieldProblem(f"secret file {path} is not readable by this user") from None
    except OSError as exc:
        raise FieldProblem(f"cannot read secret file {path}: {exc.strerror}") from None
    if len(data) > MAX_SECRET_BYTES:
        raise FieldProblem(f"secret file {path} is larger than {MAX_SECRET_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FieldProblem(f"secret file {path} is not UTF-8 text") from None


def parse_keys_file(text: str, source: str) -> list[str]:
    """The key entries in a ``signing.keys_file``: one per line, ``#`` comments allowed."""
    entries: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        problem = None if is_key_path(line) else key_entry_problem(line)
        if problem:
            raise FieldProblem(f"{source}:{number}: {problem}")
        entries.append(line)
    if not entries:
        raise FieldProblem(f"key file {source} holds no key entries")
    return entries


def hmac_key_sizes(entries: tuple[str, ...]) -> list[tuple[str, int, str]]:
    """``(kid, bytes, where)`` of every HMAC secret the entries name. Files that cannot be
    read are left out: loading the keyring reports those."""
    sizes: list[tuple[str, int, str]] = []
    for index, entry in enumerate(entries, start=1):
        if not is_key_path(entry):
            kid, _, material = entry.partition(":")
            raw = decode_key(material)
            if raw is not None:
                sizes.append((kid, len(raw), f"signing key entry {index}"))
            continue
        path = Path(entry).expanduser()
        files = sorted(path.glob("*.hmac-sha256.key")) if path.is_dir() else [path]
        for file in files:
            try:
                text = file.read_text("ascii").strip()
            except (OSError, UnicodeDecodeError):
                continue
            raw = decode_key(text)
            if raw is not None:
                sizes.append((file.name.partition(".")[0], len(raw), str(file)))
    return sizes


def entry_kids(entries: tuple[str, ...]) -> list[str]:
    """Key ids of the entries: inline ids, and the ``KID.`` prefix of key file names."""
    kids: list[str] = []
    for entry in entries:
        if not is_key_path(entry):
            kids.append(entry.partition(":")[0])
            continue
        path = Path(entry).expanduser()
        try:
            files = sorted(p.name for p in path.iterdir()) if path.is_dir() else [path.name]
        except OSError:
            continue
        kids += [name.partition(".")[0] for name in files if name.endswith(".key")]
    return kids
