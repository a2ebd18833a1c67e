"""A node's lines in Mosquitto's password file and ACL file, added and removed one node at a time.

Both files hold entries that enrollment did not write (the coordinator's, which deploy keeps,
and an operator's): those lines are never rewritten. A node's entries are appended on enroll and
cut out on revoke, so enrolling or revoking one node leaves every other line byte-identical.
Hashing is fsl_edge.deploy.broker_auth's (Mosquitto 2's `$7$` PBKDF2-SHA512) and a node's topics
fsl_edge.deploy.topics', both shared with deploy.
"""

from __future__ import annotations

from fsl_edge.deploy.broker_auth import hash_password, passwd_users  # noqa: F401 (re-exported)
from fsl_edge.deploy.topics import node_topics  # noqa: F401 (re-exported)


def passwd_add(text: str, user: str, password: str) -> str:
    """`text` with a `user:$7$...` line for `password` appended."""
    return _append(text, f"{user}:{hash_password(password)}\n")


def passwd_remove(text: str, user: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True)
                   if line.startswith("#") or line.split(":", 1)[0] != user)


def acl_block(name: str, note: str = "") -> str:
    """A node's ACL entries: a marker comment, `user <name>`, its topics, then a blank line.

    Mosquitto reads every `topic` line up to the next `user` line as that user's, so the block
    opens with its own `user` line wherever it lands in the file.
    """
    lines = [f"# fsl-edge node {name}" + (f" ({note})" if note else ""), f"user {name}"]
    lines += [f"topic {access} {topic}" for access, topic in node_topics(name)]
    return "\n".join(lines) + "\n\n"


def acl_users(text: str) -> list[str]:
    return [words[1] for words in map(str.split, text.splitlines()) if len(words) == 2 and words[0] == "user"]


def acl_add(text: str, name: str, note: str = "") -> str:
    # A blank line first keeps the block apart from a last block that lacks one.
    if text and not text.endswith("\n\n"):
        text = _append(text, "\n")
    return text + acl_block(name, note)


def acl_remove(text: str, name: str) -> str:
    """Cut `name`'s block: its marker comment, `user` line and topics, and one blank line after.

    The block ends at its last entry, not at the next `user` line: comments just above that line
    belong to the next block (deploy rewrites the file without blank lines between blocks).
    """
    lines = text.splitlines(keepends=True)
    while True:
        starts = [i for i, line in enumerate(lines) if line.split() == ["user", name]]
        if not starts:
            return "".join(lines)
        start = end = starts[0]
        while end + 1 < len(lines) and lines[end + 1].split()[:1] not in (["user"], ["pattern"]):
            end += 1
        while end > start and (not lines[end].strip() or lines[end].lstrip().startswith("#")):
            end -= 1  # trailing blanks and comments: the next block's
        end += 1
        if end < len(lines) and not lines[end].strip():
            end += 1  # the blank line acl_add wrote after the block
        if start > 0 and lines[start - 1].split()[:4] == ["#", "fsl-edge", "node", name]:
            start -= 1  # its marker comment
        lines[start:end] = []


def _append(text: str, addition: str) -> str:
    return (text if not text or text.endswith("\n") else text + "\n") + addition
