"""SMB1, SMB2 and SMB3 over the NetBIOS session service (TCP 445 and 139): the `smb` table.

Input is a session's two reassembled streams. Each direction is cut into NetBIOS session
messages (type 0, 17-bit length); session requests/keepalives on 139 are skipped. A
message holds one SMB1 message (with its AndX chain), SMB2 messages compounded by
NextCommand, or an SMB3 transform (encrypted) / compression header. A message cut by a
gap or by the end of the captured data is read as far as it goes (its header and fixed
fields are usually whole); reading resumes at the next NetBIOS header after the gap (a
zero type byte followed, four bytes on, by an SMB signature), which is also how a capture
that starts mid-session is picked up.

Requests are paired with responses by MessageId (SMB2; interim STATUS_PENDING answers are
skipped) or by (MID, PID) in order (SMB1), then walked in request order with the state a
server keeps: trees by TreeId (share path and type, from TREE CONNECT), files by FileId
(name, size and times from CREATE), the dialect from NEGOTIATE.

Rows: one per exchange for NEGOTIATE (dialects; client and server GUIDs), SESSION_SETUP (the
NTLMSSP AUTHENTICATE's user, domain and host; SMB1 plain-text account fields and both sides'
native OS and LAN manager), LOGOFF, TREE_CONNECT, TREE_DISCONNECT,
CREATE, CLOSE, IOCTL, QUERY_DIRECTORY, QUERY_INFO, SET_INFO (rename, delete, attributes,
end of file), LOCK, FLUSH, CHANGE_NOTIFY, SMB1 DELETE/RENAME/TRANS/TRANS2/NT_TRANSACT; READ
and WRITE are folded to one row per file and command until the file is closed (`messages`
exchanges, `bytes` moved), so a 1 GB copy is one row, not 16,000. ECHO, CANCEL and
OPLOCK_BREAK give no row. DCE/RPC on a named pipe (SMB2: WRITE/READ, or an IOCTL
FSCTL_PIPE_TRANSCEIVE) gives one row per call instead: the client's PDU (BIND with its
interfaces, REQUEST with its opnum, ...) and, joined by call id, the server's answer (BIND_ACK
results, RESPONSE, FAULT), as Suricata's smb dcerpc transactions; on a share never seen
connected, a file is taken for a pipe when a WRITE's data is one whole PDU. SMB 3 transform
(encrypted) messages give one row per session (`command` "TRANSFORM", `encrypted` true, `messages` how many, the first one's time) and are
otherwise skipped: SMB 3 encrypts per session or per share, so plain messages of other trees
can follow and are still read (compression transforms likewise give a "COMPRESSED" row).

Zeek's smb_files.log from this table (`action` is Zeek's SMB::Action name):
    select rows with action in the logged set (FILE_OPEN, FILE_RENAME, FILE_DELETE,
    PRINT_OPEN, PRINT_CLOSE, and FILE_READ/FILE_WRITE for Zeek versions that log them);
    ts, uid, id.* as is; path = tree; name = name, "" -> "<share_root>"; size = size or 0;
    prev_name; times.* = created/accessed/modified/changed when modified > 0; then drop
    repeats within a uid of (action, name, tree, size, times without accessed) -- Zeek's
    recent_files. (fuid comes from the files framework: not produced here.)
smb_mapping.log: rows with command TREE_CONNECT and status STATUS_SUCCESS: path = tree,
share_type.

Nothing raises: a broken message sets `malformed` on its row (or on a row of its own).
"""

from __future__ import annotations

import struct

import pyarrow as pa

from wiretrail.app import ntlm
from wiretrail.app.base import SESSION_COLUMNS, Direction, Stream

TABLE = "smb"
SCHEMA = pa.schema([
    *SESSION_COLUMNS,
    ("dialect", pa.string()),          # SMB1, 2.0.2, 2.1, 3.0, 3.0.2, 3.1.1; SMB2 = 2/3, not negotiated here
    ("command", pa.string()),          # NEGOTIATE, SESSION_SETUP, TREE_CONNECT, CREATE, READ, ...
    ("status", pa.string()),           # STATUS_SUCCESS, ... (hex when not named; null: no response seen)
    ("rtt", pa.duration("ns")),
    ("session_id", pa.uint64()),
    ("tree_id", pa.uint32()),
    ("message_id", pa.uint64()),
    ("tree", pa.string()),             # share path, \\server\share (Zeek's smb_files `path`)
    ("share_type", pa.string()),       # DISK, PIPE, PRINT
    ("name", pa.string()),             # file name (CREATE, and later operations on its FileId)
    ("prev_name", pa.string()),        # before a rename
    ("file_id", pa.string()),          # hex of the FileId (SMB2) or FID (SMB1)
    ("action", pa.string()),           # Zeek's SMB::Action: FILE_OPEN, FILE_READ, FILE_WRITE, ...
    ("disposition", pa.string()),      # CREATE: FILE_OPEN, FILE_CREATE, FILE_OVERWRITE_IF, ...
    ("create_action", pa.string()),    # CREATE response: FILE_OPENED, FILE_CREATED, ...
    ("delete_on_close", pa.bool_()),
    ("directory", pa.bool_()),
    ("size", pa.uint64()),             # end of file from CREATE (or as set)
    ("created", pa.timestamp("ns")),
    ("accessed", pa.timestamp("ns")),
    ("modified", pa.timestamp("ns")),
    ("changed", pa.timestamp("ns")),
    ("offset", pa.uint64()),           # READ/WRITE: first offset
    ("bytes", pa.uint64()),            # READ/WRITE: bytes moved (as the responses/requests say)
    ("messages", pa.int32()),          # READ/WRITE: exchanges folded into this row
    ("info_class", pa.string()),       # QUERY_INFO/SET_INFO/QUERY_DIRECTORY class; IOCTL code; TRANS2 sub-command
    ("pattern", pa.string()),          # QUERY_DIRECTORY search pattern
    ("client_dialects", pa.list_(pa.string())),
    ("native_os", pa.string()),        # SMB1 SESSION_SETUP request
    ("native_lm", pa.string()),
    ("server_native_os", pa.string()), # SMB1 SESSION_SETUP response ("" when it names none)
    ("server_native_lm", pa.string()),
    ("client_guid", pa.string()),      # NEGOTIATE (SMB2) request, as GUID text
    ("server_guid", pa.string()),      # NEGOTIATE response, as GUID text
    ("ntlm_user", pa.string()),
    ("ntlm_domain", pa.string()),
    ("ntlm_host", pa.string()),
    ("ntlm_version", pa.string()),
    ("server_nb_computer_name", pa.string()),
    ("server_dns_computer_name", pa.string()),
    # DCE/RPC on a named pipe (SMB2 WRITE/READ, IOCTL FSCTL_PIPE_TRANSCEIVE): one row per call
    ("dcerpc_request", pa.string()),   # BIND, REQUEST, ALTER_CONTEXT, AUTH3 (Suricata's names)
    ("dcerpc_response", pa.string()),  # BINDACK, RESPONSE, FAULT, ...
    ("dcerpc_call_id", pa.uint32()),
    ("dcerpc_opnum", pa.uint16()),     # REQUEST: the operation number within the interface
    ("dcerpc_interfaces", pa.list_(pa.struct([("uuid", pa.string()), ("version", pa.string()),
                                              ("ack_result", pa.uint16()), ("ack_reason", pa.uint16())]))),
    ("encrypted", pa.bool_()),
    ("malformed", pa.bool_()),
])
PORTS = {445, 139}
NDPI = {"SMBv1", "SMBv23", "NetBIOS"}  # NetBIOS: nDPI's label for the session service on 139, SMB's carrier

# ---- registries ------------------------------------------------------------------------------

SMB2_COMMANDS = ["NEGOTIATE", "SESSION_SETUP", "LOGOFF", "TREE_CONNECT", "TREE_DISCONNECT", "CREATE",
                 "CLOSE", "FLUSH", "READ", "WRITE", "LOCK", "IOCTL", "CANCEL", "ECHO", "QUERY_DIRECTORY",
                 "CHANGE_NOTIFY", "QUERY_INFO", "SET_INFO", "OPLOCK_BREAK"]
SMB1_COMMANDS = {
    0x00: "CREATE_DIRECTORY", 0x01: "DELETE_DIRECTORY", 0x02: "OPEN", 0x03: "CREATE", 0x04: "CLOSE",
    0x05: "FLUSH", 0x06: "DELETE", 0x07: "RENAME", 0x08: "QUERY_INFORMATION", 0x09: "SET_INFORMATION",
    0x0A: "READ", 0x0B: "WRITE", 0x10: "CHECK_DIRECTORY", 0x24: "LOCKING_ANDX", 0x25: "TRANSACTION",
    0x26: "TRANSACTION_SECONDARY", 0x2B: "ECHO", 0x2D: "OPEN_ANDX", 0x2E: "READ_ANDX", 0x2F: "WRITE_ANDX",
    0x32: "TRANSACTION2", 0x33: "TRANSACTION2_SECONDARY", 0x34: "FIND_CLOSE2", 0x70: "TREE_CONNECT",
    0x71: "TREE_DISCONNECT", 0x72: "NEGOTIATE", 0x73: "SESSION_SETUP", 0x74: "LOGOFF", 0x75: "TREE_CONNECT",
    0x80: "QUERY_INFORMATION_DISK", 0x81: "SEARCH", 0xA0: "NT_TRANSACT", 0xA1: "NT_TRANSACT_SECONDARY",
    0xA2: "CREATE", 0xA4: "NT_CANCEL", 0xA5: "NT_RENAME",
}
NO_ROW = {"ECHO", "CANCEL", "OPLOCK_BREAK", "NT_CANCEL", "TRANSACTION_SECONDARY", "TRANSACTION2_SECONDARY",
          "NT_TRANSACT_SECONDARY", "LOCKING_ANDX"}
DIALECTS = {0x0202: "2.0.2", 0x0210: "2.1", 0x0222: "2.2.2", 0x0224: "2.2.4", 0x0300: "3.0", 0x0302: "3.0.2",
            0x0310: "3.1.0", 0x0311: "3.1.1", 0x02FF: "2.???"}
NT_STATUS = {
    0x00000000: "STATUS_SUCCESS", 0x00000103: "STATUS_PENDING", 0x0000010B: "STATUS_NOTIFY_CLEANUP",
    0x0000010C: "STATUS_NOTIFY_ENUM_DIR", 0x80000005: "STATUS_BUFFER_OVERFLOW",
    0x80000006: "STATUS_NO_MORE_FILES", 0x8000001A: "STATUS_NO_MORE_ENTRIES",
    0xC0000001: "STATUS_UNSUCCESSFUL", 0xC0000002: "STATUS_NOT_IMPLEMENTED",
    0xC0000003: "STATUS_INVALID_INFO_CLASS", 0xC0000004: "STATUS_INFO_LENGTH_MISMATCH",
    0xC0000008: "STATUS_INVALID_HANDLE", 0xC000000D: "STATUS_INVALID_PARAMETER",
    0xC000000F: "STATUS_NO_SUCH_FILE", 0xC0000010: "STATUS_INVALID_DEVICE_REQUEST",
    0xC0000011: "STATUS_END_OF_FILE", 0xC0000016: "STATUS_MORE_PROCESSING_REQUIRED",
    0xC0000022: "STATUS_ACCESS_DENIED", 0xC0000023: "STATUS_BUFFER_TOO_SMALL",
    0xC0000033: "STATUS_OBJECT_NAME_INVALID", 0xC0000034: "STATUS_OBJECT_NAME_NOT_FOUND",
    0xC0000035: "STATUS_OBJECT_NAME_COLLISION", 0xC0000039: "STATUS_OBJECT_PATH_INVALID",
    0xC000003A: "STATUS_OBJECT_PATH_NOT_FOUND", 0xC0000043: "STATUS_SHARING_VIOLATION",
    0xC0000054: "STATUS_FILE_LOCK_CONFLICT", 0xC0000055: "STATUS_LOCK_NOT_GRANTED",
    0xC0000056: "STATUS_DELETE_PENDING", 0xC000005E: "STATUS_NO_LOGON_SERVERS",
    0xC0000061: "STATUS_PRIVILEGE_NOT_HELD", 0xC000006A: "STATUS_WRONG_PASSWORD",
    0xC000006D: "STATUS_LOGON_FAILURE", 0xC000006E: "STATUS_ACCOUNT_RESTRICTION",
    0xC000006F: "STATUS_INVALID_LOGON_HOURS", 0xC0000070: "STATUS_INVALID_WORKSTATION",
    0xC0000071: "STATUS_PASSWORD_EXPIRED", 0xC0000072: "STATUS_ACCOUNT_DISABLED",
    0xC00000AC: "STATUS_PIPE_NOT_AVAILABLE", 0xC00000AD: "STATUS_INVALID_PIPE_STATE",
    0xC00000AE: "STATUS_PIPE_BUSY", 0xC00000B0: "STATUS_PIPE_DISCONNECTED", 0xC00000B1: "STATUS_PIPE_CLOSING",
    0xC00000B5: "STATUS_IO_TIMEOUT", 0xC00000BA: "STATUS_FILE_IS_A_DIRECTORY",
    0xC00000BB: "STATUS_NOT_SUPPORTED", 0xC00000C9: "STATUS_NETWORK_NAME_DELETED",
    0xC00000CC: "STATUS_BAD_NETWORK_NAME", 0xC0000101: "STATUS_DIRECTORY_NOT_EMPTY",
    0xC0000103: "STATUS_NOT_A_DIRECTORY", 0xC0000120: "STATUS_CANCELLED",
    0xC0000128: "STATUS_FILE_CLOSED", 0xC000015B: "STATUS_LOGON_TYPE_NOT_GRANTED",
    0xC0000184: "STATUS_INVALID_DEVICE_STATE", 0xC000018D: "STATUS_TRUSTED_RELATIONSHIP_FAILURE",
    0xC0000193: "STATUS_ACCOUNT_EXPIRED", 0xC0000203: "STATUS_USER_SESSION_DELETED",
    0xC0000224: "STATUS_PASSWORD_MUST_CHANGE", 0xC0000225: "STATUS_NOT_FOUND",
    0xC0000234: "STATUS_ACCOUNT_LOCKED_OUT", 0xC0000257: "STATUS_PATH_NOT_COVERED",
    0xC000035C: "STATUS_NETWORK_SESSION_EXPIRED", 0xC0000466: "STATUS_SERVER_UNAVAILABLE",
    0xC000A100: "STATUS_HASH_NOT_SUPPORTED", 0xC000A101: "STATUS_HASH_NOT_PRESENT",
    0xC0000205: "STATUS_INSUFF_SERVER_RESOURCES", 0xC00000D0: "STATUS_REQUEST_NOT_ACCEPTED",
    0xC000020C: "STATUS_CONNECTION_DISCONNECTED", 0xC0000122: "STATUS_INVALID_COMPUTER_NAME",
    0xC0000064: "STATUS_NO_SUCH_USER", 0xC00000BE: "STATUS_BAD_NETWORK_PATH",
    0xC00000CA: "STATUS_NETWORK_ACCESS_DENIED", 0xC0000048: "STATUS_PORT_NOT_SET",
    0xC0000017: "STATUS_NO_MEMORY", 0xC000009A: "STATUS_INSUFFICIENT_RESOURCES",
    0xC00000E3: "STATUS_NOT_LOCKED", 0xC0000044: "STATUS_QUOTA_EXCEEDED",
    0xC000007F: "STATUS_DISK_FULL", 0xC0000024: "STATUS_OBJECT_TYPE_MISMATCH",
    0xC0000009: "STATUS_BAD_INITIAL_STACK", 0xC0000079: "STATUS_INVALID_SECURITY_DESCR",
}
# SMB1 DOS errors (class, code) for servers that do not send NT status
DOS_ERRORS = {(1, 2): "ERRDOS_BADFILE", (1, 3): "ERRDOS_BADPATH", (1, 5): "ERRDOS_NOACCESS",
              (1, 6): "ERRDOS_BADFID", (1, 18): "ERRDOS_NOFILES", (1, 32): "ERRDOS_BADSHARE",
              (1, 80): "ERRDOS_FILEEXISTS", (2, 1): "SRV_ERROR", (2, 2): "SRV_BADPW", (2, 4): "SRV_ACCESS",
              (2, 5): "SRV_INVTID", (2, 6): "SRV_INVNETNAME", (2, 91): "SRV_BADUID",
              (2, 22): "SRV_UNKNOWN_SMB"}
DISPOSITIONS = ["FILE_SUPERSEDE", "FILE_OPEN", "FILE_CREATE", "FILE_OPEN_IF", "FILE_OVERWRITE",
                "FILE_OVERWRITE_IF"]
CREATE_ACTIONS = ["FILE_SUPERSEDED", "FILE_OPENED", "FILE_CREATED", "FILE_OVERWRITTEN"]
SHARE_TYPES = {1: "DISK", 2: "PIPE", 3: "PRINT"}
INFO_CLASSES = {4: "FileBasicInformation", 5: "FileStandardInformation", 6: "FileInternalInformation",
                10: "FileRenameInformation", 13: "FileDispositionInformation", 14: "FilePositionInformation",
                18: "FileAllInformation", 19: "FileAllocationInformation", 20: "FileEndOfFileInformation",
                22: "FileStreamInformation", 34: "FileNetworkOpenInformation", 35: "FileAttributeTagInformation",
                64: "FileDispositionInformationEx", 65: "FileRenameInformationEx",
                1: "FileDirectoryInformation", 2: "FileFullDirectoryInformation",
                3: "FileBothDirectoryInformation", 12: "FileNamesInformation",
                37: "FileIdBothDirectoryInformation", 38: "FileIdFullDirectoryInformation"}
IOCTLS = {0x0011C017: "FSCTL_PIPE_TRANSCEIVE", 0x00060194: "FSCTL_DFS_GET_REFERRALS",
          0x000601B0: "FSCTL_DFS_GET_REFERRALS_EX", 0x00140204: "FSCTL_VALIDATE_NEGOTIATE_INFO",
          0x001401FC: "FSCTL_QUERY_NETWORK_INTERFACE_INFO", 0x00110018: "FSCTL_PIPE_WAIT",
          0x0011400C: "FSCTL_PIPE_PEEK", 0x00144064: "FSCTL_SRV_ENUMERATE_SNAPSHOTS",
          0x00140078: "FSCTL_SRV_REQUEST_RESUME_KEY", 0x001440F2: "FSCTL_SRV_COPYCHUNK",
          0x001480F2: "FSCTL_SRV_COPYCHUNK_WRITE", 0x000900A4: "FSCTL_SET_REPARSE_POINT",
          0x000900A8: "FSCTL_GET_REPARSE_POINT", 0x00098098: "FSCTL_SET_SPARSE"}
TRANS2 = {0: "OPEN2", 1: "FIND_FIRST2", 2: "FIND_NEXT2", 3: "QUERY_FS_INFORMATION", 4: "SET_FS_INFORMATION",
          5: "QUERY_PATH_INFORMATION", 6: "SET_PATH_INFORMATION", 7: "QUERY_FILE_INFORMATION",
          8: "SET_FILE_INFORMATION", 0x0D: "CREATE_DIRECTORY", 0x10: "GET_DFS_REFERRAL"}
MAGICS = (b"\xfeSMB", b"\xffSMB", b"\xfdSMB", b"\xfcSMB")
FILE_DELETE_ON_CLOSE = 0x1000
FILE_DIRECTORY_FILE = 0x1
MAX_ROWS = 20000          # per session: a bound on what one session can cost
MAX_MESSAGES = 200000


def status_name(code: int) -> str:
    return NT_STATUS.get(code) or "0x%08x" % code


def _filetime(v: int) -> int | None:
    """Windows FILETIME (100 ns since 1601) -> ns since 1970; None for 0 / out of range."""
    if v <= 0 or v >= 0x7FFFFFFFFFFFFFFF:
        return None
    ns = (v - 116444736000000000) * 100
    if ns <= 0 or ns > 4102444800 * 10**9:  # after 2100: not a time
        return None
    return ns


def _utf16(b: bytes) -> str:
    if len(b) % 2:
        b = b[:-1]
    return b.decode("utf-16-le", "replace").rstrip("\x00")


def guid_text(b: bytes) -> str | None:
    """A GUID's 16 bytes (little-endian first three fields, as SMB sends them) as its text form."""
    if len(b) != 16:
        return None
    return "%08x-%04x-%04x-%s-%s" % (*struct.unpack_from("<IHH", b), b[8:10].hex(), b[10:16].hex())


# DCE/RPC connection-oriented PDU types (C706 12.6.4.1; the names Suricata logs)
DCERPC_TYPES = ["REQUEST", "PING", "RESPONSE", "FAULT", "WORKING", "NOCALL", "REJECT", "ACK", "CL_CANCEL", "FACK",
                "CANCEL_ACK", "BIND", "BINDACK", "BINDNAK", "ALTER_CONTEXT", "ALTER_CONTEXT_RESP", "AUTH3",
                "SHUTDOWN", "CO_CANCEL", "ORPHANED", "RTS"]
_DCERPC_CALLS = {0, 11, 14, 16}  # what a client sends: REQUEST, BIND, ALTER_CONTEXT, AUTH3


def dcerpc_pdu(data: bytes) -> dict | None:
    """The header of a DCE/RPC PDU at the start of `data` (version 5) and what a log wants of
    its body: a BIND's interfaces (uuid, "major.minor"), a BIND_ACK's results, a REQUEST's
    opnum. None when `data` does not start with a PDU (a later piece of a long one). Never raises."""
    if len(data) < 16 or data[0] != 5 or data[1] > 1 or data[2] >= len(DCERPC_TYPES):
        return None
    e = "<" if data[4] & 0x10 else ">"  # the data representation's integer byte order
    ptype = data[2]
    pdu = {"type": ptype, "first": bool(data[3] & 1), "frag_length": struct.unpack_from(e + "H", data, 8)[0],
           "call_id": struct.unpack_from(e + "I", data, 12)[0]}
    try:
        if ptype in (11, 14) and len(data) >= 28:  # BIND, ALTER_CONTEXT: the presentation contexts
            n, at, ifaces = data[24], 28, []
            for _ in range(n):
                if at + 24 > len(data):
                    break
                n_ts = data[at + 2]
                uuid = data[at + 4:at + 20]
                if e == ">":  # the text form reads the first three fields little-endian
                    uuid = uuid[3::-1] + uuid[5:3:-1] + uuid[7:5:-1] + uuid[8:]
                major, minor = struct.unpack_from(e + "HH", data, at + 20)
                ifaces.append({"uuid": guid_text(uuid), "version": f"{major}.{minor}"})
                at += 24 + 20 * n_ts
            pdu["interfaces"] = ifaces
        elif ptype in (12, 15) and len(data) >= 26:  # BIND_ACK, ALTER_CONTEXT_RESP: one result per context
            at = 26 + struct.unpack_from(e + "H", data, 24)[0]
            at += -at % 4
            if at + 4 <= len(data):
                n = data[at]
                pdu["results"] = [struct.unpack_from(e + "HH", data, at + 4 + 24 * k)
                                  for k in range(n) if at + 8 + 24 * k <= len(data)]
        elif ptype == 0 and len(data) >= 24:  # REQUEST
            pdu["opnum"] = struct.unpack_from(e + "H", data, 22)[0]
    except struct.error:
        pass
    return pdu


def _cstr(b: bytes, at: int, unicode: bool) -> tuple[str, int]:
    """A NUL-terminated string at `at`: (text, offset after it)."""
    if unicode:
        i = at
        while i + 1 < len(b) and (b[i] or b[i + 1]):
            i += 2
        return _utf16(b[at:i]), i + 2
    i = b.find(b"\x00", at)
    if i < 0:
        i = len(b)
    return b[at:i].decode("latin-1"), i + 1


# ---- framing ---------------------------------------------------------------------------------

# An SMB2 header's fields at their offsets: status (8), command (12), flags (16), next command
# (20), message id (24), tree id (36, sync), session id (40); one unpack instead of six.
_SMB2_HEADER = struct.Struct("<8xIH2xIIQ4xIQ")
_STRUCTS: dict[str, struct.Struct] = {}


def _u(buf, fmt: str, at: int):
    """The one value of `fmt` at buf[at], None where buf ends before it."""
    s = _STRUCTS.get(fmt)
    if s is None:
        s = _STRUCTS[fmt] = struct.Struct(fmt)
    return s.unpack_from(buf, at)[0] if at + s.size <= len(buf) else None


class _Msg:
    __slots__ = ("off", "ts", "v", "raw", "cmd", "status", "flags", "mid", "tid", "sid", "pid", "uid",
                 "flags2", "partial", "related", "is_async")

    def __init__(self, off, ts, v, raw, partial):
        self.off, self.ts, self.v, self.raw, self.partial = off, ts, v, raw, partial
        self.cmd = self.status = self.flags = self.mid = self.tid = self.sid = self.pid = self.uid = 0
        self.flags2 = 0
        self.related = self.is_async = False


def _resync(data: bytes, start: int) -> int:
    """Offset of the next plausible NetBIOS session message carrying SMB, or -1."""
    i = data.find(b"SMB", start + 5)
    while i >= 0:
        m = i - 1
        h = m - 4
        if h >= start and data[m] in (0xFE, 0xFF, 0xFD, 0xFC) and data[h] == 0 and not data[h + 1] & 0xFE:
            return h
        i = data.find(b"SMB", i + 1)
    return -1


def _frames(d: Direction, bad: list) -> list[tuple[int, bytes, bool]]:
    """NetBIOS session messages of a direction: (offset, message bytes, cut short)."""
    data = d.data
    n = len(data)
    gaps = sorted(g for g, _ in d.gaps if 0 < g < n)
    out: list = []
    pos = 0
    gi = 0
    if n >= 8 and data[4:8] not in MAGICS and data[0] not in (0x81, 0x82, 0x83, 0x84, 0x85):
        pos = _resync(data, 0)  # mid-session start
        if pos < 0:
            return out
    while 0 <= pos and pos + 4 <= n and len(out) < MAX_MESSAGES:
        while gi < len(gaps) and gaps[gi] <= pos:
            gi += 1
        nxt_gap = gaps[gi] if gi < len(gaps) else n
        t = data[pos]
        ln = ((data[pos + 1] & 1) << 16) | (data[pos + 2] << 8) | data[pos + 3]
        end = pos + 4 + ln
        if t == 0 and data[pos + 1] & 0xFE == 0 and (ln == 0 or data[pos + 4:pos + 8] in MAGICS
                                                     or pos + 8 > nxt_gap):
            if ln == 0:
                pos = end
                continue
            if end <= nxt_gap:
                out.append((pos + 4, data[pos + 4:end], False))
                pos = end
                continue
            # cut by a gap or by the end of the data: read what is there, resume after the gap
            out.append((pos + 4, data[pos + 4:nxt_gap], True))
            if nxt_gap >= n:
                break
            if data[nxt_gap:nxt_gap + 1] == b"\x00" and data[nxt_gap + 4:nxt_gap + 8] in MAGICS:
                pos = nxt_gap  # the gap ended on a message boundary
            else:
                pos = _resync(data, nxt_gap - 5)
            continue
        if t in (0x81, 0x82, 0x83, 0x84, 0x85) and data[pos + 1] & 0xFE == 0 and ln < 1024 and end <= nxt_gap:
            pos = end  # session request / response / keepalive
            continue
        # not a frame here: garbage (flagged) or the bytes just after a gap; resynchronise
        if pos + 4 <= nxt_gap and not any(g == pos for g in gaps):
            bad.append(True)
        pos = _resync(data, pos)
    return out


def _messages(d: Direction, bad: list) -> tuple[list[_Msg], list]:
    """SMB messages of a direction, and its transform frames: (offset, kind, session id)."""
    out: list[_Msg] = []
    sealed: list = []
    for off, fr, cut in _frames(d, bad):
        if fr[:4] == b"\xfdSMB" or fr[:4] == b"\xfcSMB":
            # encrypted (SMB 3 transform) or compressed: nothing to read inside; SMB 3 encrypts
            # per session or per share, so plain messages may still follow
            sid = struct.unpack_from("<Q", fr, 44)[0] if fr[0] == 0xFD and len(fr) >= 52 else None
            sealed.append((off, "TRANSFORM" if fr[0] == 0xFD else "COMPRESSED", sid))
            continue
        if fr[:4] == b"\xffSMB":
            if len(fr) < 32:
                bad.append(True)
                continue
            m = _Msg(off, d.time_at(off), 1, fr, cut)
            m.cmd = fr[4]
            m.status = struct.unpack_from("<I", fr, 5)[0]
            m.flags = fr[9]
            m.flags2 = struct.unpack_from("<H", fr, 10)[0]
            pid_hi = struct.unpack_from("<H", fr, 12)[0]
            m.tid, pid_lo, m.uid, m.mid = struct.unpack_from("<HHHH", fr, 24)
            m.pid = (pid_hi << 16) | pid_lo
            m.sid = m.uid
            out.append(m)
            continue
        p = 0
        while p + 4 <= len(fr) and fr[p:p + 4] == b"\xfeSMB":
            if len(fr) - p < 64:
                bad.append(True)
                break
            status, cmd, flags, nextc, mid, tid, sid = _SMB2_HEADER.unpack_from(fr, p)
            end = p + nextc if nextc else len(fr)
            if nextc and (nextc < 64 or end > len(fr)):
                end = len(fr)
                nextc = 0
            raw = fr[p:end]
            m = _Msg(off + p, d.time_at(off + p), 2, raw, cut and not nextc)
            m.status, m.cmd, m.flags, m.mid, m.sid = status, cmd, flags, mid, sid
            m.is_async = bool(flags & 2)
            m.tid = 0 if m.is_async else tid
            m.related = bool(flags & 4)
            out.append(m)
            if not nextc:
                break
            p = end
        else:
            if p == 0 and fr[:4] not in MAGICS:
                bad.append(True)
    return out, sealed


# ---- the session walk ------------------------------------------------------------------------


class _File:
    __slots__ = ("name", "size", "times", "tree", "share_type", "prev_name", "fid", "doc")

    def __init__(self, fid):
        self.fid = fid
        self.name = self.size = self.times = self.tree = self.share_type = self.prev_name = None
        self.doc = False


class _Session:
    def __init__(self, s: Stream):
        self.s = s
        self.rows: list[dict] = []
        self.dialect: str | None = None
        self.trees: dict[int, tuple[str | None, str | None]] = {}
        self.files: dict = {}
        self.open_io: dict = {}        # (fid, command) -> row being folded
        self.last_fid = None           # compound: the FileId of the previous CREATE
        self.pending_tree: dict = {}   # SMB1: tid unknown until the response: mid -> path
        self.smb1_dialects: list[str] = []
        self.dce_calls: dict = {}      # (fid, DCE/RPC call id) -> the row of that call
        self.dce_last: dict = {}       # fid -> the row of its last call (later pieces of a PDU join it)

    # -- helpers
    def row(self, m: _Msg, r: _Msg | None, command: str, **kw) -> dict:
        row = {"ts": m.ts, "dialect": self.dialect or ("SMB1" if m.v == 1 else "SMB2"), "command": command,
               "session_id": m.sid if m.sid else (r.sid if r is not None else None),
               "tree_id": m.tid or (r.tid if r is not None else None) or None,
               "message_id": m.mid, "malformed": False, "encrypted": False}
        if r is not None:
            row["status"] = self.status(r)
            row["rtt"] = max(0, r.ts - m.ts)
        tree = self.trees.get(row["tree_id"]) if row["tree_id"] is not None else None
        if tree:
            row["tree"], row["share_type"] = tree
        row.update(kw)
        if len(self.rows) < MAX_ROWS:
            self.rows.append(row)
        return row

    def status(self, r: _Msg) -> str:
        if r.v == 1 and not r.flags2 & 0x4000:  # DOS error class/code
            cls, code = r.raw[5], struct.unpack_from("<H", r.raw, 7)[0]
            if cls == 0:
                return "STATUS_SUCCESS"
            return DOS_ERRORS.get((cls, code)) or "0x%02x%04x" % (cls, code)
        return status_name(r.status)

    def file(self, fid) -> _File:
        f = self.files.get(fid)
        if f is None:
            f = self.files[fid] = _File(fid)
            if len(self.files) > 65536:
                self.files.clear()
        return f

    def file_fields(self, f: _File, m: _Msg) -> dict:
        out = {"file_id": f.fid.hex() if isinstance(f.fid, bytes) else "%04x" % f.fid, "name": f.name,
               "size": f.size, "prev_name": f.prev_name}
        if f.times:
            out.update(f.times)
        tree = self.tree_of(f, m)
        if tree:
            out["tree"], out["share_type"] = tree
        return out

    def tree_of(self, f: _File, m: _Msg) -> tuple[str, str] | None:
        """(path, share type) of the tree a file was opened on, else of the message's tree id."""
        return f.tree or self.trees.get(m.tid)

    def share_type(self, f: _File, m: _Msg) -> str | None:
        """DISK, PIPE or PRINT: the type of tree_of's share; None when no tree is known."""
        return (self.tree_of(f, m) or (None, None))[1]

    def action(self, st: str | None, verb: str) -> str:
        if st == "PIPE":
            return "PIPE_" + verb
        if st == "PRINT":
            return "PRINT_" + verb
        return "FILE_" + verb

    def auth(self, blob: bytes, row: dict) -> None:
        for msg in ntlm.find(blob, 4):
            if msg.get("malformed"):
                row["malformed"] = True
            if msg.get("type") == 3:
                row["ntlm_user"] = msg.get("user") or row.get("ntlm_user")
                row["ntlm_domain"] = msg.get("domain") or row.get("ntlm_domain")
                row["ntlm_host"] = msg.get("host") or row.get("ntlm_host")
            elif msg.get("type") == 2:
                row["server_nb_computer_name"] = msg.get("server_nb_computer_name")
                row["server_dns_computer_name"] = msg.get("server_dns_computer_name")
            if msg.get("version") and not row.get("ntlm_version"):
                row["ntlm_version"] = msg["version"]

    # -- DCE/RPC on named pipes
    def dce_request(self, fid, pdu: dict, row: dict) -> None:
        """A client PDU becomes the call of `row`."""
        row["dcerpc_request"] = DCERPC_TYPES[pdu["type"]]
        row["dcerpc_call_id"] = pdu["call_id"]
        if "opnum" in pdu:
            row["dcerpc_opnum"] = pdu["opnum"]
        if "interfaces" in pdu:
            row["dcerpc_interfaces"] = [dict(i, ack_result=None, ack_reason=None) for i in pdu["interfaces"]]
        if len(self.dce_calls) > 4096:
            self.dce_calls.clear()
        self.dce_calls[(fid, pdu["call_id"])] = self.dce_last[fid] = row

    def dce_response(self, fid, pdu: dict) -> bool:
        """A server PDU joins its call's row; False when no call of that id was seen."""
        row = self.dce_calls.get((fid, pdu["call_id"]))  # kept: a long answer comes in fragments
        if row is None:
            return False
        row["dcerpc_response"] = DCERPC_TYPES[pdu["type"]]
        for iface, (result, reason) in zip(row.get("dcerpc_interfaces") or (), pdu.get("results", ())):
            iface["ack_result"], iface["ack_reason"] = result, reason
        return True

    def pipe_io(self, cmd: str, fid, f: _File, m: _Msg, r: _Msg | None, raw: bytes | None, offset: int | None,
                n: int | None, probe: bool = False) -> bool:
        """A READ or WRITE on a named pipe that carries DCE/RPC (`raw`: the data written or
        read, None when the message is too short to say): a WRITE that starts a call is that
        call's row, the READ that brings its answer (or a later piece of either) adds to it and
        makes no row of its own. False: not DCE/RPC, folded as any file's I/O. `probe`: the
        share's type is not known; only a file that DCE/RPC was found on is taken, by PDUs
        whose length field is the data's."""
        if raw is None:
            return False

        def joined(row):  # the exchange counted on the call's row, which it belongs to
            row["messages"] = (row.get("messages") or 0) + 1
            row["bytes"] = (row.get("bytes") or 0) + (n or 0)
            return True

        pdu = dcerpc_pdu(raw)
        if probe and fid not in self.dce_last and (pdu is None or pdu["frag_length"] != len(raw)):
            return False
        if pdu is None or (pdu["type"] in _DCERPC_CALLS) != (cmd == "WRITE"):
            last = self.dce_last.get(fid)  # a later piece of the last call's PDUs
            return last is not None and pdu is None and joined(last)
        call = self.dce_calls.get((fid, pdu["call_id"]))
        if cmd == "READ":
            return call is not None and self.dce_response(fid, pdu) and joined(call)
        if not pdu["first"] and call is not None:  # a later fragment of a call
            return joined(call)
        kw = self.file_fields(f, m)
        kw["action"] = self.action("PIPE", cmd)
        row = self.row(m, r, cmd, offset=offset, bytes=n or 0, messages=1, **kw)
        self.dce_request(fid, pdu, row)
        return True

    # -- SMB2
    def smb2(self, m: _Msg, r: _Msg | None) -> None:
        cmd = SMB2_COMMANDS[m.cmd] if m.cmd < len(SMB2_COMMANDS) else "0x%04x" % m.cmd
        if cmd in NO_ROW:
            return
        b = m.raw[64:]
        rb = r.raw[64:] if r is not None else b""
        ok = r is not None and r.status == 0

        u = _u

        def data(msg, buf, off_fmt, off_at, len_at):  # the bytes a body points at (offset from the header)
            off, ln = u(buf, off_fmt, off_at), u(buf, "<I", len_at)
            return None if off is None or ln is None else msg.raw[off:off + ln]

        def fid_at(buf, at):
            fid = buf[at:at + 16]
            if len(fid) < 16:
                return None
            if fid == b"\xff" * 16 and m.related and self.last_fid is not None:
                return self.last_fid
            return fid

        if cmd == "NEGOTIATE":
            n = u(b, "<H", 2) or 0
            offered = []
            for i in range(min(n, 64)):
                v = u(b, "<H", 36 + 2 * i)
                if v is None:
                    break
                offered.append(DIALECTS.get(v, "0x%04x" % v))
            server_guid = None
            if r is not None and u(rb, "<H", 0) == 65:
                v = u(rb, "<H", 4)
                if v is not None and v != 0x02FF:
                    self.dialect = DIALECTS.get(v, "0x%04x" % v)
                server_guid = guid_text(rb[8:24])
            self.row(m, r, cmd, client_dialects=offered or None, dialect=self.dialect or "SMB2",
                     client_guid=guid_text(b[12:28]), server_guid=server_guid)
        elif cmd == "SESSION_SETUP":
            row = self.row(m, r, cmd)
            off, ln = u(b, "<H", 12), u(b, "<H", 14)
            if off is not None and ln:
                self.auth(m.raw[off:off + ln], row)
            if r is not None and u(rb, "<H", 0) == 9:
                off, ln = u(rb, "<H", 4), u(rb, "<H", 6)
                if off and ln:
                    self.auth(r.raw[off:off + ln], row)
        elif cmd == "TREE_CONNECT":
            off, ln = u(b, "<H", 4), u(b, "<H", 6)
            path = _utf16(m.raw[off:off + ln]) if off is not None and ln else None
            st = SHARE_TYPES.get(rb[2]) if ok and len(rb) >= 3 and u(rb, "<H", 0) == 16 else None
            tid = r.tid if r is not None else None
            if ok and tid:
                self.trees[tid] = (path, st)
            self.row(m, r, cmd, tree=path, share_type=st, tree_id=tid or None)
        elif cmd == "TREE_DISCONNECT":
            self.row(m, r, cmd)
            self.trees.pop(m.tid, None) if ok else None
        elif cmd == "CREATE":
            off, ln = u(b, "<H", 44), u(b, "<H", 46)
            name = _utf16(m.raw[off:off + ln]) if off is not None and ln else ("" if len(b) >= 48 else None)
            disp = u(b, "<I", 36)
            opts = u(b, "<I", 40) or 0
            kw = {"name": name, "disposition": DISPOSITIONS[disp] if disp is not None and disp < 6 else None,
                  "delete_on_close": bool(opts & FILE_DELETE_ON_CLOSE),
                  "directory": bool(opts & FILE_DIRECTORY_FILE) or None}
            tree = self.trees.get(m.tid)
            if ok and len(rb) >= 80 and u(rb, "<H", 0) == 89:
                fid = rb[64:80]
                self.last_fid = fid
                f = self.file(fid)
                f.name, f.prev_name = name, None
                f.size = u(rb, "<Q", 48)
                f.tree = tree
                times = {"created": _filetime(u(rb, "<Q", 8)), "accessed": _filetime(u(rb, "<Q", 16)),
                         "modified": _filetime(u(rb, "<Q", 24)), "changed": _filetime(u(rb, "<Q", 32))}
                f.times = times if times["modified"] else None
                f.doc = kw["delete_on_close"]
                ca = u(rb, "<I", 4)
                kw.update(self.file_fields(f, m))
                kw["create_action"] = CREATE_ACTIONS[ca] if ca is not None and ca < 4 else None
                kw["directory"] = bool((u(rb, "<I", 56) or 0) & 0x10)
                kw["action"] = self.action(tree[1] if tree else None, "OPEN")
                kw["name"] = name
            elif r is not None and r.status == 0:
                kw["malformed"] = True
            self.row(m, r, cmd, **kw)
        elif cmd in ("READ", "WRITE"):
            fid = fid_at(b, 16)
            if fid is None:
                self.row(m, r, cmd, malformed=not m.partial)
                return
            f = self.file(fid)
            if cmd == "READ":
                n = u(rb, "<I", 4) if ok else 0
            else:
                n = u(rb, "<I", 4) if ok else 0
                if r is None:
                    n = u(b, "<I", 4)
            # a pipe, or a share not seen connected (a capture that starts mid-session): DCE/RPC
            # is looked for in its data
            st = self.share_type(f, m)
            if st in ("PIPE", None):
                raw = data(m, b, "<H", 2, 4) if cmd == "WRITE" else (data(r, rb, "<B", 2, 4) if r is not None else b"")
                if self.pipe_io(cmd, fid, f, m, r, raw, u(b, "<Q", 8), n, probe=st is None):
                    return
            key = (fid, cmd)
            row = self.open_io.get(key)
            if row is None:
                kw = self.file_fields(f, m)
                kw["action"] = self.action(st, cmd)
                row = self.open_io[key] = self.row(m, r, cmd, offset=u(b, "<Q", 8), bytes=0, messages=0, **kw)
            row["messages"] += 1
            row["bytes"] += n or 0
            # reading on to the end of the file after data came is how a read ends, not a failure
            # (Suricata's read transaction is done with its data and logged as a success)
            read_to_end = cmd == "READ" and r is not None and r.status == 0xC0000011 and row["bytes"] > 0
            if (r is not None and r.status not in (0, 0x103) and row.get("status") == "STATUS_SUCCESS"
                    and not read_to_end):
                row["status"] = self.status(r)
        elif cmd == "CLOSE":
            fid = fid_at(b, 8)
            kw = {}
            if fid is not None:
                f = self.files.get(fid) or self.file(fid)
                kw = self.file_fields(f, m)
                kw["action"] = self.action(self.share_type(f, m), "CLOSE")
                self.open_io.pop((fid, "READ"), None)
                self.open_io.pop((fid, "WRITE"), None)
                self.dce_last.pop(fid, None)
            self.row(m, r, cmd, **kw)
            if fid is not None and ok and fid in self.files:
                f = self.files.pop(fid)
                if f.doc and (f.tree is None or f.tree[1] in (None, "DISK")):
                    # delete-on-close: the file goes when its handle does
                    self.row(m, r, "CLOSE", action="FILE_DELETE", **{**self.file_fields(f, m)})
        elif cmd == "SET_INFO":
            itype, cls = u(b, "<B", 2), u(b, "<B", 3)
            blen, boff = u(b, "<I", 4), u(b, "<H", 8)
            fid = fid_at(b, 16)
            kw = {"info_class": INFO_CLASSES.get(cls, str(cls)) if itype == 1 else f"{itype}:{cls}"}
            buf = m.raw[boff:boff + blen] if boff is not None and blen is not None else b""
            if fid is not None:
                f = self.file(fid)
                st = self.share_type(f, m)
                if itype == 1 and cls in (10, 65) and len(buf) >= 20:
                    nl = struct.unpack_from("<I", buf, 16)[0]
                    new = _utf16(buf[20:20 + nl])
                    if ok or r is None:
                        f.prev_name, f.name = f.name, new
                    kw.update(self.file_fields(f, m))
                    kw["action"] = self.action(st, "RENAME")
                    if not (ok or r is None):
                        kw["prev_name"], kw["name"] = f.name, new
                elif itype == 1 and ((cls == 13 and buf[:1] not in (b"", b"\x00")) or
                                     (cls == 64 and len(buf) >= 4 and struct.unpack_from("<I", buf)[0] & 1)):
                    kw.update(self.file_fields(f, m))
                    kw["action"] = self.action(st, "DELETE")
                    kw["delete_on_close"] = True
                elif itype == 1 and cls == 4:
                    kw.update(self.file_fields(f, m))
                    kw["action"] = self.action(st, "SET_ATTRIBUTE")
                elif itype == 1 and cls in (19, 20) and len(buf) >= 8:
                    if cls == 20 and ok:
                        f.size = struct.unpack_from("<Q", buf)[0]
                    kw.update(self.file_fields(f, m))
                else:
                    kw.update(self.file_fields(f, m))
            self.row(m, r, cmd, **kw)
        elif cmd in ("QUERY_INFO", "QUERY_DIRECTORY", "IOCTL", "FLUSH", "LOCK", "CHANGE_NOTIFY"):
            at = {"QUERY_INFO": 24, "QUERY_DIRECTORY": 8, "IOCTL": 8, "FLUSH": 8, "LOCK": 8,
                  "CHANGE_NOTIFY": 8}[cmd]
            fid = fid_at(b, at)
            kw = {}
            if fid is not None and fid != b"\xff" * 16:
                kw = self.file_fields(self.file(fid), m)
            if cmd == "QUERY_INFO":
                itype, cls = u(b, "<B", 2), u(b, "<B", 3)
                kw["info_class"] = INFO_CLASSES.get(cls, str(cls)) if itype == 1 else f"{itype}:{cls}"
            elif cmd == "QUERY_DIRECTORY":
                cls = u(b, "<B", 2)
                kw["info_class"] = INFO_CLASSES.get(cls, str(cls)) if cls is not None else None
                off, ln = u(b, "<H", 24), u(b, "<H", 26)
                if off and ln:
                    kw["pattern"] = _utf16(m.raw[off:off + ln])
            elif cmd == "IOCTL":
                code = u(b, "<I", 4)
                kw["info_class"] = IOCTLS.get(code, "0x%08x" % code) if code is not None else None
                if code == 0x0011C017 and fid is not None:  # FSCTL_PIPE_TRANSCEIVE: a call and its answer
                    call = self.row(m, r, cmd, **kw)
                    pdu = dcerpc_pdu(data(m, b, "<I", 24, 28) or b"")  # the input buffer: the call
                    if pdu is not None and pdu["type"] in _DCERPC_CALLS:
                        self.dce_request(fid, pdu, call)
                        answer = dcerpc_pdu(data(r, rb, "<I", 32, 36) or b"") if r is not None else None  # output
                        if answer is not None:
                            self.dce_response(fid, answer)
                    return
            self.row(m, r, cmd, **kw)
        else:  # LOGOFF, unknown commands
            self.row(m, r, cmd, malformed=cmd.startswith("0x"))

    # -- SMB1
    def smb1(self, m: _Msg, r: _Msg | None) -> None:
        raw = m.raw
        uni = bool(m.flags2 & 0x8000)
        cmd_code = m.cmd
        p = 32          # parameter block of the current command in the chain (request)
        rp = 32         # and in the response
        seen = 0
        while cmd_code != 0xFF and seen < 8:
            seen += 1
            name = SMB1_COMMANDS.get(cmd_code, "SMB1_0x%02x" % cmd_code)
            if p >= len(raw):
                if seen == 1:
                    self.row(m, r, name, malformed=not m.partial)
                return
            wc = raw[p]
            words = raw[p + 1:p + 1 + 2 * wc]
            bc_at = p + 1 + 2 * wc
            bc = struct.unpack_from("<H", raw, bc_at)[0] if bc_at + 2 <= len(raw) else 0
            data_at = bc_at + 2
            data = raw[data_at:data_at + bc]
            rwords, rdata, rdata_at = b"", b"", 0
            if r is not None and rp < len(r.raw):
                rwc = r.raw[rp]
                rwords = r.raw[rp + 1:rp + 1 + 2 * rwc]
                rbc_at = rp + 1 + 2 * rwc
                rbc = struct.unpack_from("<H", r.raw, rbc_at)[0] if rbc_at + 2 <= len(r.raw) else 0
                rdata_at = rbc_at + 2
                rdata = r.raw[rdata_at:rdata_at + rbc]
            if name not in NO_ROW:
                self.smb1_one(m, r, name, wc, words, data, data_at, rwords, rdata, rdata_at, uni)
            andx = cmd_code in (0x24, 0x2D, 0x2E, 0x2F, 0x73, 0x74, 0x75, 0xA2) and len(words) >= 4
            if not andx:
                return
            cmd_code = words[0]
            nxt = struct.unpack_from("<H", words, 2)[0]
            if nxt <= p or nxt >= len(raw):
                return
            p = nxt
            if len(rwords) >= 4 and rwords[0] != 0xFF:
                rn = struct.unpack_from("<H", rwords, 2)[0]
                rp = rn if rn > rp else len(r.raw)
            else:
                rp = 1 << 30

    def smb1_one(self, m, r, cmd, wc, words, data, data_at, rwords, rdata, rdata_at, uni):
        ok = r is not None and self.status(r) == "STATUS_SUCCESS"

        w = _u

        def ustr(buf, at, base_at):
            """A string in a bytes block: unicode strings are 2-aligned to the header."""
            if uni and (base_at + at) % 2:
                at += 1
            return _cstr(buf, at, uni)

        if cmd == "NEGOTIATE":
            offered = []
            i = 0
            while i < len(data) and len(offered) < 32:
                if data[i] != 2:
                    break
                s, i = _cstr(data, i + 1, False)
                offered.append(s)
            self.smb1_dialects = offered
            idx = w(rwords, "<H", 0)
            chosen = offered[idx] if idx is not None and idx < len(offered) else None
            if r is not None and r.v == 1:
                self.dialect = "SMB1"
            elif r is not None and r.v == 2 and len(r.raw) >= 70:
                v = struct.unpack_from("<H", r.raw, 68)[0]
                chosen = DIALECTS.get(v, "0x%04x" % v)
                if v != 0x02FF:
                    self.dialect = chosen
            # NT LM 0.12 with extended security: the server's GUID opens the response's bytes
            # (without it they hold a challenge and a domain name, which Suricata logs as a GUID)
            extended = len(rwords) == 34 and struct.unpack_from("<I", rwords, 19)[0] & 0x80000000
            server_guid = guid_text(rdata[:16]) if r is not None and r.v == 1 and extended else None
            if r is not None and r.v == 2 and len(r.raw) >= 88:
                server_guid = guid_text(r.raw[72:88])
            self.row(m, r, cmd, client_dialects=offered or None, info_class=chosen,
                     dialect="SMB1" if r is None or r.v == 1 else self.dialect, server_guid=server_guid)
        elif cmd == "SESSION_SETUP":
            row = self.row(m, r, cmd)
            if wc == 12:  # extended security: a security blob
                bl = w(words, "<H", 14) or 0
                self.auth(data[:bl], row)
                at = bl
            elif wc in (13, 10):
                if wc == 13:
                    ol, ul = w(words, "<H", 14) or 0, w(words, "<H", 16) or 0
                else:
                    ol, ul = w(words, "<H", 14) or 0, 0
                at = ol + ul
                user, at = ustr(data, at, data_at)
                dom, at = ustr(data, at, data_at)
                row["ntlm_user"], row["ntlm_domain"] = user or None, dom or None
            else:
                at = len(data)
            if at < len(data):
                os_, at = ustr(data, at, data_at)
                lm, at = ustr(data, at, data_at)
                row["native_os"], row["native_lm"] = os_ or None, lm or None
            if r is not None and len(rwords) >= 8 and len(rwords) // 2 == 4:
                self.auth(rdata[:w(rwords, "<H", 6) or 0], row)
            if r is not None and r.v == 1 and rdata_at:
                # the server's native OS and LAN manager open the bytes (3 words, or an error's
                # 0) or follow the security blob (4 words); a blob longer than the bytes: none
                at = 0 if len(rwords) in (0, 6) else w(rwords, "<H", 6)
                if at is not None and at <= len(rdata):
                    r_uni = bool(r.flags2 & 0x8000)
                    if r_uni and (rdata_at + at) % 2:
                        at += 1
                    os_, at = _cstr(rdata, at, r_uni)
                    lm, _ = _cstr(rdata, at, r_uni) if at < len(rdata) else ("", 0)
                    row["server_native_os"], row["server_native_lm"] = os_, lm
            self.dialect = self.dialect or "SMB1"
        elif cmd == "TREE_CONNECT":
            pl = w(words, "<H", 6) or 0
            path, _ = ustr(data, pl, data_at) if wc >= 4 else ("", 0)
            st = None
            if ok and rdata:
                svc = rdata.split(b"\x00", 1)[0]
                st = {b"A:": "DISK", b"IPC": "PIPE", b"LPT1:": "PRINT", b"COMM": "COMM"}.get(svc)
            tid = r.tid if r is not None else None
            if ok and tid:
                self.trees[tid] = (path or None, st)
            self.row(m, r, cmd, tree=path or None, share_type=st, tree_id=tid or None)
        elif cmd == "OPEN_ANDX":
            name, _ = ustr(data, 0, data_at) if wc >= 15 else (None, 0)
            tree = self.trees.get(m.tid)
            kw = {"name": name}
            fid = w(rwords, "<H", 4) if ok else None
            if fid is not None and name is not None:
                f = self.file(fid)
                f.name, f.prev_name, f.tree, f.doc = name, None, tree, False
                f.size = w(rwords, "<I", 12)
                mt = w(rwords, "<I", 8)
                f.times = {"modified": mt * 10**9} if mt else None
                kw.update(self.file_fields(f, m))
                kw["action"] = self.action(tree[1] if tree else None, "OPEN")
            self.row(m, r, "CREATE", **kw)
        elif cmd == "CREATE":  # NT_CREATE_ANDX
            nl = w(words, "<H", 5)
            disp, opts = w(words, "<I", 35), w(words, "<I", 39) or 0
            name, _ = ustr(data, 0, data_at) if nl is not None else (None, 0)
            kw = {"name": name, "disposition": DISPOSITIONS[disp] if disp is not None and disp < 6 else None,
                  "delete_on_close": bool(opts & FILE_DELETE_ON_CLOSE)}
            tree = self.trees.get(m.tid)
            fid = w(rwords, "<H", 5) if ok else None
            if fid is not None and len(rwords) >= 68:
                f = self.file(fid)
                f.name, f.prev_name, f.tree, f.doc = name, None, tree, kw["delete_on_close"]
                f.size = w(rwords, "<Q", 55)
                times = {"created": _filetime(w(rwords, "<Q", 11)), "accessed": _filetime(w(rwords, "<Q", 19)),
                         "modified": _filetime(w(rwords, "<Q", 27)), "changed": _filetime(w(rwords, "<Q", 35))}
                f.times = times if times["modified"] else None
                kw.update(self.file_fields(f, m))
                kw["directory"] = bool(rwords[67]) if len(rwords) > 67 else None
                kw["action"] = self.action(tree[1] if tree else None, "OPEN")
                kw["name"] = name
            self.row(m, r, cmd, **kw)
        elif cmd in ("READ_ANDX", "WRITE_ANDX", "READ", "WRITE"):
            fid = w(words, "<H", 4 if cmd.endswith("ANDX") else 0)
            verb = "READ" if cmd.startswith("READ") else "WRITE"
            if fid is None:
                self.row(m, r, verb, malformed=not m.partial)
                return
            f = self.file(fid)
            if verb == "READ":
                n = w(rwords, "<H", 10) if ok and cmd == "READ_ANDX" else 0
            else:
                n = (w(rwords, "<H", 4) if ok and cmd == "WRITE_ANDX" else w(words, "<H", 20)) or 0
            key = (fid, verb)
            row = self.open_io.get(key)
            if row is None:
                kw = self.file_fields(f, m)
                kw["action"] = self.action(self.share_type(f, m), verb)
                row = self.open_io[key] = self.row(m, r, verb, offset=w(words, "<I", 6), bytes=0, messages=0,
                                                   **kw)
            row["messages"] += 1
            row["bytes"] += n or 0
        elif cmd == "CLOSE":
            fid = w(words, "<H", 0)
            kw = {}
            if fid is not None:
                f = self.file(fid)
                kw = self.file_fields(f, m)
                kw["action"] = self.action(self.share_type(f, m), "CLOSE")
                self.open_io.pop((fid, "READ"), None)
                self.open_io.pop((fid, "WRITE"), None)
            self.row(m, r, cmd, **kw)
            if fid is not None and ok:
                f = self.files.pop(fid, None)
                if f is not None and f.doc:
                    self.row(m, r, "CLOSE", action="FILE_DELETE", **self.file_fields(f, m))
        elif cmd == "DELETE":
            name, _ = ustr(data, 1, data_at) if data[:1] == b"\x04" else ("", 0)
            self.row(m, r, cmd, name=name or None, action="FILE_DELETE")
        elif cmd in ("RENAME", "NT_RENAME"):
            old, at = ustr(data, 1, data_at) if data[:1] == b"\x04" else ("", 0)
            new = ""
            if data[at:at + 1] == b"\x04":
                new, _ = ustr(data, at + 1, data_at)
            self.row(m, r, "RENAME", prev_name=old or None, name=new or None,
                     action="FILE_RENAME")
        elif cmd == "TRANSACTION2":
            sub = w(words, "<H", 28) if wc >= 14 else None
            self.row(m, r, cmd, info_class=TRANS2.get(sub, str(sub)) if sub is not None else None)
        elif cmd == "TREE_DISCONNECT":
            self.row(m, r, cmd)
            if ok:
                self.trees.pop(m.tid, None)
        else:
            self.row(m, r, cmd)


def _pair(reqs: list[_Msg], resps: list[_Msg]) -> list[tuple[_Msg | None, _Msg | None]]:
    """Requests with their responses, in request order; responses with no request after them."""
    by2: dict[int, _Msg] = {}
    by1: dict[tuple, list[_Msg]] = {}
    for r in resps:
        if r.v == 2:
            if r.status == 0x103 and r.is_async and r.mid in by2:
                continue  # interim answer: keep the final one
            if r.mid in by2 and by2[r.mid].status != 0x103:
                continue
            by2[r.mid] = r
        else:
            by1.setdefault((r.mid, r.pid, r.cmd), []).append(r)
    out = []
    used: set[int] = set()
    for q in reqs:
        if q.v == 2:
            r = by2.pop(q.mid, None) if q.cmd != 12 else None  # a CANCEL has no answer of its own
            if r is not None and r.cmd != q.cmd:
                by2[q.mid] = r
                r = None
        else:
            lst = by1.get((q.mid, q.pid, q.cmd))
            r = lst.pop(0) if lst else None
            if r is None and q.cmd == 0x72 and 0 in by2 and by2[0].cmd == 0:
                r = by2.pop(0)  # SMB1 NEGOTIATE offering SMB2: answered in SMB2
        if r is not None:
            used.add(id(r))
        out.append((q, r))
    # responses whose requests were not captured (a mid-session start)
    for r in resps:
        if id(r) not in used and not (r.v == 2 and r.status == 0x103):
            if r.v == 2 and r.mid in by2 and by2[r.mid] is r:
                out.append((None, r))
            elif r.v == 1 and r in by1.get((r.mid, r.pid, r.cmd), []):
                out.append((None, r))
    out.sort(key=lambda qr: (qr[0] or qr[1]).ts)
    return out


def parse_stream(s: Stream) -> list[dict]:
    try:
        return _parse_stream(s)
    except Exception:  # defensive: a parser bug costs this session's rows, flagged
        if s.orig.data[4:8] in MAGICS or s.resp.data[4:8] in MAGICS:
            return [{"ts": s.orig.time_at(0) or s.resp.time_at(0), "malformed": True}]
        return []


def _parse_stream(s: Stream) -> list[dict]:
    bad_o: list = []
    bad_r: list = []
    reqs, sealed_o = _messages(s.orig, bad_o)
    resps, sealed_r = _messages(s.resp, bad_r)
    if not reqs and not resps and not sealed_o and not sealed_r:
        return []
    sess = _Session(s)
    # a request from the server direction (or a response from the client) is a role flip or
    # garbage: keep each list to its own kind
    reqs = [m for m in reqs if not _is_response(m)]
    resps = [m for m in resps if _is_response(m)]
    for q, r in _pair(reqs, resps):
        m = q if q is not None else r
        try:
            if m.v == 2:
                if q is None:
                    sess.smb2(_as_request(r), r)
                else:
                    sess.smb2(q, r)
            else:
                sess.smb1(q if q is not None else _as_request(r), r)
        except Exception:
            sess.row(m, r, "UNKNOWN", malformed=True)
    rows = sess.rows
    for kind in ("TRANSFORM", "COMPRESSED"):
        firsts = [(s.orig.time_at(x[0]), x[2]) for x in sealed_o if x[1] == kind][:1] + \
                 [(s.resp.time_at(x[0]), x[2]) for x in sealed_r if x[1] == kind][:1]
        if firsts:
            ts, sid = min(firsts, key=lambda x: x[0])
            n = sum(x[1] == kind for x in sealed_o) + sum(x[1] == kind for x in sealed_r)
            rows.append({"ts": ts, "dialect": sess.dialect or "SMB2", "command": kind, "session_id": sid,
                         "messages": n, "encrypted": kind == "TRANSFORM", "malformed": False})
    if (bad_o or bad_r) and rows:
        rows[-1]["malformed"] = True
    elif (bad_o or bad_r) and not rows:
        rows.append({"ts": s.orig.time_at(0) or s.resp.time_at(0), "malformed": True})
    for row in rows:
        for k in ("rtt",):
            if row.get(k) is not None:
                row[k] = int(row[k])
    rows.sort(key=lambda r: r.get("ts") or 0)
    return rows


def _is_response(m: _Msg) -> bool:
    if m.v == 2:
        return bool(m.flags & 1)
    return bool(m.flags & 0x80)


def _as_request(r: _Msg) -> _Msg:
    """A stand-in request for a response whose request was not captured: header fields only."""
    q = _Msg(r.off, r.ts, r.v, r.raw[:64] if r.v == 2 else r.raw[:32] + b"\x00\x00\x00", True)
    for k in ("cmd", "mid", "tid", "sid", "pid", "uid", "flags2"):
        setattr(q, k, getattr(r, k))
    return q
