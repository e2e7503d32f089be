"""Credentials rows: the policy, the salted hash, and no clear password written."""

from __future__ import annotations

from wiretrail.app.credentials import check, credential, mask, policy_failures


def test_policy():
    assert policy_failures("Tr0ub4dor&3x") == []
    assert set(policy_failures("password")) >= {"common password", "no digit", "no upper case letter", "no symbol"}
    assert "same as the user name" in policy_failures("alice", "Alice")
    assert "shorter than 8" in policy_failures("aB3$")


def test_row_keeps_no_clear_password():
    row = credential(1, "ftp", "USER/PASS", "bob", b"hunter2")
    written = {k: v for k, v in row.items() if not k.startswith("_")}
    assert "hunter2" not in repr(written)
    assert row["_password"] == "hunter2" and row["weak"] and row["password_length"] == 7
    assert mask("hunter2") == "h*****2" and row["password_masked"] == "h*****2"
    assert check("hunter2", row["password_hash"]) and not check("hunter3", row["password_hash"])
    # one salt per row: the same password hashes differently
    assert credential(1, "ftp", "USER/PASS", "bob", "hunter2")["password_hash"] != row["password_hash"]
