"""Cleartext credentials seen on the wire, judged against a password policy.

Protocol modules (http, ftp, pop3, imap, smtp, telnet...) call `credential(...)` for each
user/password pair they see and return the row among their own: rows carrying
`_table = "credentials"` go to this table. The password is never stored: the row keeps a
salted hash (`sha256$salt$hash`, one random salt per row, so a candidate password can be
checked against a row but rows cannot be joined on it), a masked form, its length and the
ways it fails the policy. The clear password rides along in memory only, under
`_password`, for detectors that run on the records before they are written; the stage
drops every `_` key before writing.
"""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa

from wiretrail.app.base import SESSION_COLUMNS

TABLE = "credentials"
SCHEMA = pa.schema([
    *SESSION_COLUMNS,
    ("protocol", pa.string()),          # http, ftp, pop3, imap, smtp, telnet, ...
    ("mechanism", pa.string()),         # "basic auth", "form field password", "USER/PASS", "AUTH PLAIN", ...
    ("user", pa.string()),
    ("password_hash", pa.string()),     # sha256$<salt hex>$<sha256(salt + password) hex>
    ("password_masked", pa.string()),   # first and last character, the rest as *
    ("password_length", pa.int32()),
    ("policy_failures", pa.list_(pa.string())),
    ("weak", pa.bool_()),
])

# The policy: what security teams commonly audit cleartext logins for (NIST SP 800-63B asks
# for length and a blocklist of common passwords; classes are what most corporate policies add).
MIN_LENGTH = 8
COMMON = frozenset("""
123456 123456789 12345678 12345 1234567 1234567890 1234 password password1 password123 qwerty
qwerty123 111111 000000 123123 abc123 iloveyou admin admin123 administrator root toor letmein
welcome welcome1 monkey dragon master login passw0rd changeme secret test test123 guest user
default 654321 666666 888888 121212 sunshine princess football baseball shadow superman
trustno1 azerty 1q2w3e4r qwertyuiop zaq12wsx p@ssw0rd p@ssword pass pass123 anonymous ftp
""".split())


def policy_failures(password: str, user: str | None = None) -> list[str]:
    out = []
    if len(password) < MIN_LENGTH:
        out.append(f"shorter than {MIN_LENGTH}")
    if password.lower() in COMMON:
        out.append("common password")
    if user and password.lower() == user.lower():
        out.append("same as the user name")
    if not any(c.isdigit() for c in password):
        out.append("no digit")
    if not any(c.islower() for c in password):
        out.append("no lower case letter")
    if not any(c.isupper() for c in password):
        out.append("no upper case letter")
    if all(c.isalnum() for c in password):
        out.append("no symbol")
    return out


def mask(password: str) -> str:
    if len(password) <= 2:
        return "*" * len(password)
    return password[0] + "*" * (len(password) - 2) + password[-1]


def salted_hash(password: str) -> str:
    salt = os.urandom(8)
    return f"sha256${salt.hex()}${hashlib.sha256(salt + password.encode('utf-8', 'surrogateescape')).hexdigest()}"


def check(password: str, password_hash: str) -> bool:
    """Does `password` match a row's `password_hash`? (for an analyst testing a guess)"""
    try:
        _, salt, digest = password_hash.split("$")
        return hashlib.sha256(bytes.fromhex(salt) + password.encode("utf-8", "surrogateescape")).hexdigest() == digest
    except ValueError:
        return False


def credential(ts: int, protocol: str, mechanism: str, user: str | None, password: str | bytes | None) -> dict:
    """A `credentials` row (the session's uid and 5-tuple are filled in by the stage)."""
    if isinstance(password, bytes):
        password = password.decode("utf-8", "surrogateescape")
    row = {"_table": TABLE, "ts": ts, "protocol": protocol, "mechanism": mechanism, "user": user}
    if password is not None:
        failures = policy_failures(password, user)
        row.update(password_hash=salted_hash(password), password_masked=mask(password),
                   password_length=len(password), policy_failures=failures,
                   weak=bool(set(failures) & {f"shorter than {MIN_LENGTH}", "common password",
                                              "same as the user name"}) or len(failures) >= 3,
                   _password=password)
    return row
