"""Credentials out of every message: the one place that hides the secrets URLs carry.

A broker URL may hold a password (`redis://:PASSWORD@host/0`, `redis://user:PASSWORD@...`,
or `redis://host/0?password=PASSWORD`). Every message that names a URL goes through
`redact_url` or `redact_text` before it reaches a response, a log line or an error; the
logging filter of diffusiond.logs applies `redact_text` to every record, so a library's
own log line that quotes the URL is scrubbed too.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

# Query parameters whose value is a secret, compared in lower case.
_SECRET_PARAMS = frozenset({"password", "pass", "passwd", "pwd", "secret", "token", "auth"})

# `scheme://userinfo@`: the userinfo is everything up to the last "@" before the path; a
# password may itself hold "@" or ":" (unescaped, as people type them).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s]*)@")
# `password=...` in a query string, or as a library prints its settings (`Conn(password=x)`).
_SECRET_QUERY = re.compile(
    r"(?P<name>(?:^|(?<=[?&;,(\s]))(?:"
    + "|".join(sorted(_SECRET_PARAMS))
    + r")=)(?P<value>[^&#\s'\",)]*)",
    re.IGNORECASE,
)


def _masked_userinfo(match: re.Match[str]) -> str:
    userinfo = match["userinfo"]
    user, colon, _password = userinfo.partition(":")
    if colon:  # user:password or :password: the user name stays, the password goes
        return f"{match['scheme']}{user}:{MASK}@"
    # `redis://secret@host` is a password-only form for Redis (the URL's user is its
    # password when no password is given): mask it all.
    return f"{match['scheme']}{MASK}@" if userinfo else match[0]


def redact_text(text: str) -> str:
    """`text` with the credentials of every URL in it masked; the rest unchanged."""
    if "@" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(_masked_userinfo, text)
    return _SECRET_QUERY.sub(lambda match: match["name"] + MASK, text)


def redact_url(url: str | None) -> str:
    """`url` without its credentials: user name kept, password and secret parameters masked."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL we can take apart: mask whatever looks like a secret
        return redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if colon else f"{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, MASK if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*"
        )
    return urlunsplit(parts._replace(netloc=netloc, query=query))
