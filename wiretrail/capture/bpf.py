"""BPF filters: compiled by the real libpcap (through ctypes), run by a numba virtual machine.

libpcap's compiler defines what a filter means (the same program tcpdump would run);
the interpreter follows libpcap's bpf_filter(): a load beyond the captured bytes, a
division by zero or a jump past the end rejects the packet, as the kernel does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import tempfile
import threading

import numpy as np
from wiretrail.jit import kernel

from wiretrail.errors import WiretrailError

PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF
DLT_RAW = 12  # Linux libpcap's DLT for raw IP; files say LINKTYPE_RAW (101) or 12/14

# LINKTYPE_* (file) values whose DLT_* (libpcap API) value differs on Linux.
_LINKTYPE_TO_DLT = {101: DLT_RAW, 12: DLT_RAW, 14: DLT_RAW, 100: 13}  # 100: ATM_RFC1483


class _BpfInsn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_BpfInsn))]


# struct bpf_insn as laid out in memory (native byte order).
_INSN_DTYPE = np.dtype([("code", "=u2"), ("jt", "u1"), ("jf", "u1"), ("k", "=u4")])

_libpcap = None
# pcap_compile is not thread-safe in older libpcap releases (a global parser state).
_compile_lock = threading.Lock()


def _load_libpcap():
    global _libpcap
    if _libpcap is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("pcap") or "libpcap.so.0.8")
        except OSError as err:
            raise WiretrailError(f"BPF filters need libpcap, which cannot be loaded: {err}") from None
        lib.pcap_open_dead.restype = ctypes.c_void_p
        lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.pcap_compile.restype = ctypes.c_int
        lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(_BpfProgram), ctypes.c_char_p,
                                     ctypes.c_int, ctypes.c_uint32]
        lib.pcap_geterr.restype = ctypes.c_char_p
        lib.pcap_geterr.argtypes = [ctypes.c_void_p]
        lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
        lib.pcap_close.argtypes = [ctypes.c_void_p]
        lib.pcap_open_offline.restype = ctypes.c_void_p
        lib.pcap_open_offline.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        _libpcap = lib
    return _libpcap


def _open_savefile_handle(lib, linktype: int, snaplen: int):
    """A handle that reads an empty capture file of `linktype`, or None.

    Filters run over frames read from files, and libpcap compiles some primitives
    differently for a savefile than for a dead handle (DLT_NULL: "ip6" matches the BSD
    AF_INET6 values 24/28/30 of the capturing host, not this host's 10), so compiling
    against a savefile handle gives exactly what `tcpdump -r` runs. It also maps the
    file's LINKTYPE_* value to libpcap's DLT_* value itself.
    """
    header = struct.pack("=IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, linktype)
    with tempfile.NamedTemporaryFile(prefix="wiretrail-bpf-", suffix=".pcap") as f:
        f.write(header)
        f.flush()
        errbuf = ctypes.create_string_buffer(512)
        return lib.pcap_open_offline(f.name.encode(), errbuf) or None


def compile_bpf(expr: str, linktype: int, snaplen: int = 262144) -> np.ndarray:
    """Compile `expr` for frames of `linktype` into an (n, 4) uint32 array of
    (code, jt, jf, k) instructions; a bad expression raises WiretrailError."""
    lib = _load_libpcap()
    dlt = _LINKTYPE_TO_DLT.get(int(linktype), int(linktype))
    with _compile_lock:
        handle = _open_savefile_handle(lib, int(linktype), int(snaplen)) or lib.pcap_open_dead(dlt, int(snaplen))
        if not handle:
            raise WiretrailError(f"cannot compile filters for link type {linktype}")
        try:
            program = _BpfProgram()
            if lib.pcap_compile(handle, ctypes.byref(program), expr.encode(), 1, PCAP_NETMASK_UNKNOWN) != 0:
                reason = (lib.pcap_geterr(handle) or b"").decode("utf-8", "replace")
                reason = " ".join(reason.split()) or "syntax error"
                raise WiretrailError(f"bad filter {expr!r}: {reason}")
            try:
                size = program.bf_len * ctypes.sizeof(_BpfInsn)
                raw = np.frombuffer(ctypes.string_at(program.bf_insns, size), dtype=_INSN_DTYPE)
                program_array = np.stack([raw[f].astype(np.uint32) for f in ("code", "jt", "jf", "k")], axis=1)
            finally:
                lib.pcap_freecode(ctypes.byref(program))
        finally:
            lib.pcap_close(handle)
    return np.ascontiguousarray(program_array)


# Classic BPF opcodes (pcap/bpf.h), spelled as literals in the kernel below:
#   class = code & 0x07: LD 0, LDX 1, ST 2, STX 3, ALU 4, JMP 5, RET 6, MISC 7
#   size  = code & 0x18: W 0x00, H 0x08, B 0x10       source: K 0x00, X 0x08
#   mode  = code & 0xe0: IMM 0x00, ABS 0x20, IND 0x40, MEM 0x60, LEN 0x80, MSH 0xa0
#   ALU op = code & 0xf0: ADD 0, SUB 0x10, MUL 0x20, DIV 0x30, OR 0x40, AND 0x50,
#                         LSH 0x60, RSH 0x70, NEG 0x80, MOD 0x90, XOR 0xa0
#   JMP op = code & 0xf0: JA 0, JEQ 0x10, JGT 0x20, JGE 0x30, JSET 0x40
#   RET value = code & 0x18: K 0x00, X 0x08, A 0x10;  MISC: TAX 0x00, TXA 0x80


@kernel(inline=True)
def _load(data, start, caplen, k, size):
    """(ok, value): big-endian load of `size` bytes at frame offset k (k may be >= 2^32)."""
    if k < 0 or k + size > caplen:
        return False, np.int64(0)
    p = start + k
    if size == 4:
        return True, (np.int64(data[p]) << 24) | (np.int64(data[p + 1]) << 16) | (np.int64(data[p + 2]) << 8) | np.int64(data[p + 3])
    if size == 2:
        return True, (np.int64(data[p]) << 8) | np.int64(data[p + 1])
    return True, np.int64(data[p])


@kernel(inline=True)
def _run(prog, data, start, caplen, wirelen, mem):
    """Return value of the program for one frame (0 = reject). A, X are kept in int64
    and masked to 32 bits after each arithmetic step. `mem`: the 16 scratch words, the
    caller's (a kernel that allocates nothing is compiled without reference counting)."""
    n_insns = prog.shape[0]
    for k in range(16):
        mem[k] = 0
    a = np.int64(0)
    x = np.int64(0)
    pc = 0
    while pc < n_insns:
        code = prog[pc, 0]
        k = np.int64(prog[pc, 3])
        cls = code & 0x07
        if cls == 0x00 or cls == 0x01:  # LD / LDX
            mode = code & 0xE0
            size = code & 0x18
            nbytes = 4 if size == 0x00 else (2 if size == 0x08 else 1)
            if mode == 0x00:
                value = k
            elif mode == 0x80:
                value = np.int64(wirelen)
            elif mode == 0x60:
                value = mem[k & 15]
            elif mode == 0x20 or mode == 0x40:
                off = k if mode == 0x20 else k + x
                ok, value = _load(data, start, caplen, off, nbytes)
                if not ok:
                    return 0
            elif mode == 0xA0:  # LDX MSH: 4 * (P[k] & 0xf), the IPv4 header length
                ok, value = _load(data, start, caplen, k, 1)
                if not ok:
                    return 0
                value = (value & 0x0F) * 4
            else:
                return 0
            if cls == 0x00:
                a = value
            else:
                x = value
        elif cls == 0x02:  # ST
            mem[k & 15] = a
        elif cls == 0x03:  # STX
            mem[k & 15] = x
        elif cls == 0x04:  # ALU
            op = code & 0xF0
            operand = x if (code & 0x08) else k
            if op == 0x00:
                a = a + operand
            elif op == 0x10:
                a = a - operand
            elif op == 0x20:
                a = a * operand
            elif op == 0x30:
                if operand == 0:
                    return 0
                a = a // operand
            elif op == 0x90:
                if operand == 0:
                    return 0
                a = a % operand
            elif op == 0x40:
                a = a | operand
            elif op == 0x50:
                a = a & operand
            elif op == 0xA0:
                a = a ^ operand
            elif op == 0x60:
                a = (a << operand) if operand < 32 else np.int64(0)
            elif op == 0x70:
                a = (a >> operand) if operand < 32 else np.int64(0)
            elif op == 0x80:
                a = -a
            else:
                return 0
            a &= 0xFFFFFFFF
        elif cls == 0x05:  # JMP
            op = code & 0xF0
            if op == 0x00:
                pc += 1 + int(k)
                continue
            operand = x if (code & 0x08) else k
            if op == 0x10:
                taken = a == operand
            elif op == 0x20:
                taken = a > operand
            elif op == 0x30:
                taken = a >= operand
            elif op == 0x40:
                taken = (a & operand) != 0
            else:
                return 0
            pc += 1 + int(prog[pc, 1] if taken else prog[pc, 2])
            continue
        elif cls == 0x06:  # RET
            rval = code & 0x18
            if rval == 0x10:
                return a
            if rval == 0x08:
                return x
            return k
        else:  # MISC
            if code & 0xF8 == 0x80:
                a = x
            else:
                x = a
        pc += 1
    return 0  # fell off the end: libpcap's validator would have refused the program


@kernel
def _match_all(prog, data, offset, caplen, wirelen, out, mem):
    for i in range(offset.shape[0]):
        out[i] = _run(prog, data, offset[i], np.int64(caplen[i]), wirelen[i], mem) != 0


def bpf_match(prog: np.ndarray, data: np.ndarray, offset: np.ndarray, caplen: np.ndarray,
              wirelen: np.ndarray) -> np.ndarray:
    """Run a compiled program over every frame; True where it accepts the frame."""
    out = np.zeros(len(offset), dtype=np.bool_)
    if len(offset):
        _match_all(np.ascontiguousarray(prog, dtype=np.uint32), data,
                   np.asarray(offset, dtype=np.int64), np.asarray(caplen, dtype=np.int32),
                   np.asarray(wirelen, dtype=np.int32), out, np.empty(16, dtype=np.int64))
    return out
