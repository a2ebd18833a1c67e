"""Entries of Mosquitto's password file and ACL file, as kept in Secret fsl-broker-auth.

Both files are sets of per-user entries: this module changes one user's entry and leaves every
other line as it was, so the coordinator's entry and each site's can be written independently.

- passwd: one `user:hash` line per user; the hash is Mosquitto 2's `$7$` format
  (PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt, base64), what `mosquitto_passwd` writes.
- acl: lines before the first `user` line are global (comments, `pattern` lines); then one
  block per user: a `user NAME` line followed by its `topic ...` lines.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

ITERATIONS = 101  # mosquitto_passwd's own choice


def hash_password(password: str, salt: bytes | None = None) -> str:
    """A password-file hash Mosquitto 2 accepts, with a fresh random salt unless given."""
    salt = os.urandom(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return f"$7${ITERATIONS}${_b64(salt)}${_b64(digest)}"


def check_password(hashed: str, password: str) -> bool:
    """Whether `password` matches a `$7$` hash (any other format: False)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    salt, digest = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    return hmac.compare_digest(hashlib.pbkdf2_hmac("sha512", password.encode(), salt,
                                                   int(parts[2])), digest)


def passwd_users(passwd: str) -> dict[str, str]:
    """user -> hash of a password file."""
    entries = {}
    for line in passwd.splitlines():
        if line.strip() and not line.startswith("#") and ":" in line:
            user, hashed = line.split(":", 1)
            entries[user] = hashed
    return entries


def with_password(passwd: str, user: str, password: str) -> str:
    """`passwd` where `user` logs in with `password`: unchanged if it already does."""
    if check_password(passwd_users(passwd).get(user, ""), password):
        return passwd
    entry = f"{user}:{hash_password(password)}"
    lines = passwd.splitlines()
    at = [i for i, line in enumerate(lines) if not line.startswith("#") and line.split(":", 1)[0] == user]
    if at:  # replaced where it stands; other lines stay byte for byte
        lines[at[0]] = entry
        lines = [line for i, line in enumerate(lines) if i not in at[1:]]
    else:
        lines.append(entry)
    return "\n".join(lines) + "\n"


def acl_blocks(acl: str) -> tuple[list[str], dict[str, list[str]]]:
    """(global entries, user -> that user's entries after its `user` line) of an ACL file.

    Entries only: comments and blank lines are not part of any block."""
    head: list[str] = []
    blocks: dict[str, list[str]] = {}
    current = head
    for line in acl.splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "user":
            current = blocks.setdefault(words[1], [])
        elif words and not words[0].startswith("#"):
            current.append(line)
    return head, blocks


def with_acl(acl: str, user: str, topics: list[str | tuple[str, str]]) -> str:
    """`acl` where `user` may exactly use `topics`: unchanged if it already may.

    A topic is a filter it may read and write, or an (access, filter) pair. Only that user's
    `topic` lines change, where they stand; every other line (other users' blocks, comments
    such as enroll's markers, blank lines) is kept byte for byte. A user without a block gets
    one at the end."""
    wanted = _topic_lines(topics)
    if acl_blocks(acl)[1].get(user) == wanted:
        return acl
    out: list[str] = []
    inside = found = False
    for line in acl.splitlines():
        words = line.split()
        if words[:1] in (["user"], ["pattern"]):
            inside = words == ["user", user]
            out.append(line)
            if inside:
                found = True
                out += wanted
            continue
        if not (inside and words[:1] == ["topic"]):
            out.append(line)
    if not found:
        if out and out[-1].strip():
            out.append("")
        out += [f"user {user}", *wanted]
    return "\n".join(out) + "\n"


def with_acl_entries(acl: str, user: str, topics: list[str | tuple[str, str]]) -> str:
    """`acl` where `user`'s block also holds `topics`: the ones it lacks are added after its
    last `topic` line, and nothing else changes. A user without a block is left without one."""
    lines = acl.splitlines()
    start = next((i for i, line in enumerate(lines) if line.split() == ["user", user]), None)
    if start is None:
        return acl
    last = end = start
    while end + 1 < len(lines) and lines[end + 1].split()[:1] not in (["user"], ["pattern"]):
        end += 1
        if lines[end].split()[:1] == ["topic"]:
            last = end
    have = {" ".join(line.split()) for line in lines[start + 1:end + 1]}
    missing = [line for line in _topic_lines(topics) if line not in have]
    if not missing:
        return acl
    lines[last + 1:last + 1] = missing
    return "\n".join(lines) + "\n"


def without_user(passwd: str, acl: str, user: str) -> tuple[str, str]:
    """(`passwd`, `acl`) without `user`'s password line, `user` line and `topic` lines; every
    other line (comments and blank lines included) is kept."""
    passwd_lines = [line for line in passwd.splitlines()
                    if line.startswith("#") or line.split(":", 1)[0] != user]
    acl_lines: list[str] = []
    inside = False
    for line in acl.splitlines():
        words = line.split()
        if words[:1] in (["user"], ["pattern"]):
            inside = words == ["user", user]
        if not (inside and words[:1] in (["user"], ["topic"])):
            acl_lines.append(line)
    return (("\n".join(passwd_lines) + "\n") if passwd_lines else "",
            ("\n".join(acl_lines) + "\n") if acl_lines else "")


def _topic_lines(topics: list[str | tuple[str, str]]) -> list[str]:
    pairs = [("readwrite", t) if isinstance(t, str) else t for t in topics]
    return [f"topic {access} {topic}" for access, topic in pairs]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
