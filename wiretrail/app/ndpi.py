"""Protocol identification with nDPI 5 (the build inside the `nfstream` wheel).

The `nfstream` wheel (pinned in pyproject.toml) links nDPI 5.0 statically into its cffi
extension `_lib_engine`, which exports every `ndpi_*` symbol, and whose `ffi` already knows
nDPI's types (`struct ndpi_flow_struct`, `ndpi_protocol`, ...). We look the symbols up with
ctypes (dlsym on the already-loaded extension) and cast their addresses to typed function
pointers with that `ffi`: no compiler, no second copy of nDPI. nfstream's own Python side
is never imported: `_lib_engine` needs only cffi's `_cffi_backend` at import (nfstream 6.6.0
also pulls pandas, dpkt, psutil, python-dateutil, tzdata; it leaves the pinned numpy, numba
and pyarrow as they are, so the package is installed with its dependencies).

Function signatures are those of nDPI 5.0 (ndpi_api.h): notably `ndpi_detection_giveup(mod,
flow)` without the 4.x guess arguments and `ndpi_protocol2name(mod, ndpi_master_app_protocol,
...)`. The library's flow struct size and the enum values used here are checked at load.

`Identifier` is one nDPI detection module; it classifies flows packet by packet (IP-layer
bytes, as ndpiReader feeds them). `classify_batch` + `NdpiState` drive it from the pipeline:
numpy picks the rows of sessions that are still undecided (and within the packet cap), Python
runs only for those packets, and a session's nDPI state is freed as soon as it is decided
(its small result is kept until `NdpiState.finish(sid)` when the session closes).
"""

from __future__ import annotations

import ctypes
import struct
from typing import NamedTuple

import numpy as np

from wiretrail.app.session_rows import SessionRows
from wiretrail.errors import WiretrailError

__all__ = ["Identifier", "NdpiResult", "NdpiState", "classify_batch", "DEFAULT_CONFIG", "LABELS_ONLY"]

# nDPI's own enums (values from ndpi_typedefs.h of the bundled 5.0 build; checked at load).
STATE_CLASSIFIED = 3        # NDPI_STATE_CLASSIFIED: nothing more to extract
STATE_MONITORING = 2        # NDPI_STATE_MONITORING: classified, only monitoring left
RISK_KNOWN_PROTO_NON_STD_PORT = 5  # NDPI_KNOWN_PROTOCOL_ON_NON_STANDARD_PORT
IN_PKT_DIR_C_TO_S, IN_PKT_DIR_S_TO_C = 1, 2

# Configuration applied before ndpi_finalize_initialization: (protocol or None, param, value).
# packets_limit_per_flow and ookla's aggressiveness are what nDPI's regression results use
# (example/config.txt); DNS sub-classification (DNS.Google, ...) is off by default in 5.0 but
# on in the 4.x results and in nfstream.
DEFAULT_CONFIG: tuple[tuple[str | None, str, str], ...] = (
    (None, "packets_limit_per_flow", "32"),
    ("dns", "subclassification", "enable"),
    ("ookla", "dpi.aggressiveness", "0x1"),
)

# What Identifier(labels_only=True), the ingest pipeline's, adds: nDPI stops computing
# metadata that only its own reports show and Wiretrail takes from its own parsers (JA3S/JA4
# and the other fingerprints, certificate details, payload entropy, DNS answers, STUN
# addresses), and risks the pipeline does not keep (the IP lists of anonymous subscribers and
# crawlers, the fully-encrypted heuristic, every risk but the port flag). Labels (Master.App,
# category, the port flag) are the same with and without (tests/test_ndpi.py compares them on
# every flow of nDPI's test captures); nDPI's time per packet is about 40% lower (0.70 -> 0.40
# CPU s on mix.pcap for the fingerprints and certificates), and a DNS flow is done at its
# query (5,600 of 288,610 calls on mix.pcap). HTTP's process_response stays on: a response's
# Content-Type sub-classifies (HTTP.OCSP).
LABELS_ONLY: tuple[tuple[str | None, str, str], ...] = (
    (None, "dpi.compute_entropy", "0"),
    (None, "metadata.tcp_fingerprint", "disable"),
    (None, "metadata.ndpi_fingerprint", "disable"),
    ("tls", "metadata.sha1_fingerprint", "disable"),
    ("tls", "metadata.ja3s_fingerprint", "disable"),
    ("tls", "metadata.ja4c_fingerprint", "disable"),
    ("tls", "metadata.cert_validity", "disable"),
    ("tls", "metadata.browser", "disable"),
    ("tls", "metadata.versions_supported", "disable"),
    ("tls", "metadata.cipher", "disable"),
    ("tls", "metadata.alpn_negotiated", "disable"),
    (None, "flow_risk_lists.load", "0"),
    (None, "fully_encrypted_heuristic", "disable"),
    ("dns", "process_response", "disable"),
    ("stun", "metadata.attribute.mapped_address", "disable"),
    ("stun", "metadata.attribute.response_origin", "disable"),
    ("stun", "metadata.attribute.other_address", "disable"),
    ("stun", "metadata.attribute.relayed_address", "disable"),
    # every flow risk but the one the sessions keep (the port flag), and no risk's text: nDPI
    # then neither checks the others nor copies their strings, which it frees with the flow
    (None, "flow_risk.all", "disable"),
    (None, f"flow_risk.{RISK_KNOWN_PROTO_NON_STD_PORT}", "enable"),
    (None, "flow_risk.all.info", "disable"),
)

# Protocols whose flows carry nDPI's `protos.tls_quic` union member (JA4, JA3S).
_TLS_FAMILY = ("TLS", "QUIC", "DTLS", "SMTPS", "IMAPS", "POPS", "FTPS")

_SIGS = {
    "ndpi_init_detection_module": "struct ndpi_detection_module_struct *(*)(void *)",
    "ndpi_finalize_initialization": "int (*)(struct ndpi_detection_module_struct *)",
    "ndpi_exit_detection_module": "void (*)(struct ndpi_detection_module_struct *)",
    "ndpi_set_config": "int (*)(struct ndpi_detection_module_struct *, const char *, const char *, const char *)",
    "ndpi_detection_get_sizeof_ndpi_flow_struct": "uint32_t (*)(void)",
    "ndpi_flow_malloc": "void *(*)(size_t)",
    "ndpi_flow_free": "void (*)(void *)",
    "ndpi_detection_process_packet":
        "ndpi_protocol (*)(struct ndpi_detection_module_struct *, struct ndpi_flow_struct *, "
        "const unsigned char *, unsigned short, uint64_t, struct ndpi_flow_input_info *)",
    "ndpi_detection_giveup":
        "ndpi_protocol (*)(struct ndpi_detection_module_struct *, struct ndpi_flow_struct *)",
    "ndpi_protocol2name":
        "char *(*)(struct ndpi_detection_module_struct *, ndpi_master_app_protocol, char *, unsigned int)",
    "ndpi_category_get_name":
        "const char *(*)(struct ndpi_detection_module_struct *, ndpi_protocol_category_t)",
    "ndpi_confidence_get_name": "const char *(*)(ndpi_confidence_t)",
    "ndpi_get_proto_by_name": "uint16_t (*)(struct ndpi_detection_module_struct *, const char *)",
    "ndpi_risk2str": "const char *(*)(ndpi_risk_enum)",
    "ndpi_revision": "const char *(*)(void)",
}


def _bit_of(ffi, *fields: tuple[str, ...]) -> tuple[int, int]:
    """(byte offset, mask) of one-bit fields of the flow struct that share a byte: bitfields
    have no offsetof, so each is set in a zeroed struct and found among its bytes."""
    where, mask = set(), 0
    for path in fields:
        flow = ffi.new("struct ndpi_flow_struct *")
        obj = flow
        for name in path[:-1]:
            obj = getattr(obj, name)
        setattr(obj, path[-1], 1)
        raw = ffi.buffer(flow)[:]
        at = [i for i, b in enumerate(raw) if b]
        if len(at) != 1 or raw[at[0]] & (raw[at[0]] - 1):
            raise ValueError(f"{'.'.join(path)} is not one bit")
        where.add(at[0])
        mask |= raw[at[0]]
    if len(where) != 1:
        raise ValueError(f"{', '.join('.'.join(p) for p in fields)} are not in one byte")
    return where.pop(), mask


class _Lib:
    """The bundled nDPI: the extension's ffi and typed pointers to its ndpi_* functions."""

    _instance: _Lib | None = None

    def __init__(self):
        try:
            import _lib_engine  # nfstream's compiled engine (nDPI 5 + libpcap, statically linked)
        except Exception as err:  # ImportError, or a broken shared object
            raise WiretrailError(f"nDPI unavailable: cannot load nfstream's _lib_engine "
                                 f"(pip install nfstream==6.6.0): {err}".splitlines()[0]) from None
        ffi = _lib_engine.ffi
        try:
            dll = ctypes.CDLL(_lib_engine.__file__)  # same handle as the loaded module: dlsym only
            for name, sig in _SIGS.items():
                addr = ctypes.cast(getattr(dll, name), ctypes.c_void_p).value
                setattr(self, name[5:], ffi.cast(sig, addr))
            self.process_packet_addr = ctypes.cast(dll.ndpi_detection_process_packet, ctypes.c_void_p).value
            self.giveup_addr = ctypes.cast(dll.ndpi_detection_giveup, ctypes.c_void_p).value
            self.free_flow_data_addr = ctypes.cast(dll.ndpi_free_flow_data, ctypes.c_void_p).value
            flow_size = int(self.detection_get_sizeof_ndpi_flow_struct())
            want = ffi.sizeof("struct ndpi_flow_struct")
            enums = ffi.typeof("enum ndpi_classification_state").relements
            risks = ffi.typeof("ndpi_risk_enum").relements
            tls_hello = _bit_of(ffi, ("protos", "tls_quic", "client_hello_processed"),
                                ("protos", "tls_quic", "subprotocol_detected"))
        except Exception as err:
            raise WiretrailError(f"nDPI unavailable: unexpected _lib_engine build: {err}".splitlines()[0]) from None
        if flow_size != want:
            raise WiretrailError(f"nDPI unavailable: flow struct is {flow_size} bytes in the library, "
                                 f"{want} in its declarations")
        if (enums.get("NDPI_STATE_CLASSIFIED") != STATE_CLASSIFIED
                or enums.get("NDPI_STATE_MONITORING") != STATE_MONITORING
                or risks.get("NDPI_KNOWN_PROTOCOL_ON_NON_STANDARD_PORT") != RISK_KNOWN_PROTO_NON_STD_PORT):
            raise WiretrailError("nDPI unavailable: unexpected enum values in the bundled nDPI")
        self.ffi = ffi
        self.flow_size = flow_size
        self.tls_hello = tls_hello
        self.version = ffi.string(self.revision()).decode()
        self.max_risk = int(risks.get("NDPI_MAX_RISK", 64))

    @classmethod
    def get(cls) -> _Lib:
        if cls._instance is None:
            cls._instance = _Lib()
        return cls._instance


class _Flow:
    """One flow inside an Identifier (the handle returned by new_flow)."""

    __slots__ = ("ptr", "addr", "key", "n", "done", "proto", "gaveup", "ret")

    def __init__(self, ptr, addr: int, key):
        self.ptr = ptr
        self.addr = addr      # the flow's address, as the numba loop takes it
        self.key = key
        self.n = 0            # packets given to nDPI
        self.done = False     # nDPI concluded (classified, or gave up at the packet cap)
        self.proto = None     # last ndpi_protocol returned (a cffi value), or
        self.ret = None       # its bytes, as the numba loop left them (read when needed)
        self.gaveup = False


class NdpiResult(NamedTuple):
    app: str            # "Master.App" as ndpiReader prints it: "TLS.YouTube", "DNS", "Unknown"
    category: str       # nDPI category name ("Web", "Network", "Unspecified", ...)
    confidence: str     # "DPI", "Match by port", ... ("Unknown" when undetected)
    extra: dict         # host, ja4, ja3s, risk, risks, non_std_port, dpi_packets

    @property
    def port_mismatch(self) -> bool:
        return bool(self.extra.get("non_std_port", False))


class Label(NamedTuple):
    """What the pipeline keeps of a result: one shared tuple per distinct label."""
    app: str
    category: str
    port_mismatch: bool   # nDPI's "known protocol on a non-standard port" risk


UNKNOWN = NdpiResult("Unknown", "Unspecified", "Unknown", {"non_std_port": False})
UNKNOWN_LABEL = Label("Unknown", "Unspecified", False)


class Identifier:
    """One nDPI detection module. Flows are created with new_flow, fed with add_packet
    (IP-layer bytes), read with result and released with free; close() releases the module.

    `max_packets`: packets per flow after which nDPI gives up (ndpiReader's
    packets_limit_per_flow, 32 in nDPI's own test configuration).

    Fed as ndpiReader feeds it: every packet of the flow in capture order from its first one,
    no direction hint, timestamps in ms, until nDPI concludes. nDPI 5 gives up by itself when no
    dissector is left (the flow comes back CLASSIFIED, guessed by port or IP if it can); a flow
    still undecided at the cap or when its session ends is given up here. ndpiReader's extra
    UDP cap (24 packets) changes no flow of nDPI's test captures, so one cap serves both.
    `config`: (protocol or None, parameter, value) triples for ndpi_set_config.
    `labels_only`: the caller keeps labels only (Master.App, category, the port flag), as the
        ingest pipeline does: LABELS_ONLY is added to `config`, and a TLS flow is concluded
        once its ClientHello is processed and its SNI sub-classified it (TLS.YouTube): nDPI
        then reads the certificate for metadata and risks only, its names being matched only
        when the SNI did not sub-classify (processCertificateElements), which saves the
        server's handshake packets of most TLS flows.
    `use_direction`: tell nDPI each packet's direction (client->server or back) instead of
    letting it infer directions from addresses and ports, as ndpiReader does by default.
    """

    def __init__(self, max_packets: int = 32, config=DEFAULT_CONFIG, *, use_direction: bool = False,
                 labels_only: bool = False):
        lib = _Lib.get()
        if labels_only:
            config = tuple(config) + LABELS_ONLY
        self._lib = lib
        self._ffi = ffi = lib.ffi
        self.max_packets = int(max_packets)
        self.version = lib.version
        mod = lib.init_detection_module(ffi.NULL)
        if mod == ffi.NULL:
            raise WiretrailError("nDPI: cannot create a detection module (out of memory?)")
        for proto, param, value in config:
            rc = lib.set_config(mod, ffi.NULL if proto is None else proto.encode(), param.encode(),
                                str(value).encode())
            if rc != 0:
                lib.exit_detection_module(mod)
                raise WiretrailError(f"nDPI: configuration {proto or ''} {param}={value} refused (code {rc})")
        if lib.finalize_initialization(mod) != 0:
            lib.exit_detection_module(mod)
            raise WiretrailError("nDPI: initialisation failed")
        self._mod = mod
        self._process = lib.detection_process_packet
        self._live: set[_Flow] = set()
        self._names: dict[tuple[int, int], str] = {}
        self._cats: dict[int, str] = {}
        self._confs: dict[int, str] = {}
        self._risk_names: dict[int, list[str]] = {}
        self._namebuf = ffi.new("char[128]")
        self._tls_ids = {i for i in (int(lib.get_proto_by_name(mod, n.encode())) for n in _TLS_FAMILY) if i}
        self.tls_master = int(lib.get_proto_by_name(mod, b"TLS"))
        self.hello_off, self.hello_mask = lib.tls_hello if labels_only else (0, 0)
        self.use_direction = use_direction
        self._dir = {True: ffi.new("struct ndpi_flow_input_info *"), False: ffi.new("struct ndpi_flow_input_info *")}
        self._dir[True].in_pkt_dir = IN_PKT_DIR_C_TO_S
        self._dir[False].in_pkt_dir = IN_PKT_DIR_S_TO_C
        self.calls = 0  # ndpi_detection_process_packet calls made
        self._zero_flow = bytes(lib.flow_size)  # a new flow starts zeroed, as ndpi_flow_malloc's callers do
        # where the ids sit in an ndpi_protocol's bytes (the numba loop hands back bytes): read
        # one at a time with the struct, for a whole slab with the offsets
        om, oa, oc = (ffi.offsetof("ndpi_protocol", "proto", "master_protocol"),
                      ffi.offsetof("ndpi_protocol", "proto", "app_protocol"), ffi.offsetof("ndpi_protocol", "category"))
        self._ret_offsets = (om, oa, oc)
        self._ret_layout = struct.Struct(f"<{om}xH{oa - om - 2}xH{oc - oa - 2}xi")
        self._labels: dict[tuple[int, int, int, bool], Label] = {}
        # the numba feeding loop (app.ndpi_kernel), when the platform's calling convention allows
        self.kernel = None
        from wiretrail.app import ndpi_kernel

        if ndpi_kernel.AVAILABLE and not use_direction:
            self.kernel = np.uint64(lib.process_packet_addr)
            self.module_addr = np.uint64(int(ffi.cast("uintptr_t", mod)))
            self.proto_size = ffi.sizeof("ndpi_protocol")
            self.state_offset = ffi.offsetof("struct ndpi_flow_struct", "state")
            self.risk_offset = ffi.offsetof("struct ndpi_flow_struct", "risk")

    # ---- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_mod", None) is None:
            return
        for h in list(self._live):
            self.free(h)
        self._lib.exit_detection_module(self._mod)
        self._mod = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- flows ------------------------------------------------------------------------------
    def new_flow(self, key=None) -> _Flow:
        """A new flow (`key` is kept on the handle for the caller's use)."""
        ffi = self._ffi
        raw = self._lib.flow_malloc(self._lib.flow_size)
        if raw == ffi.NULL:
            raise MemoryError("nDPI flow allocation failed")
        ptr = ffi.cast("struct ndpi_flow_struct *", raw)
        ffi.memmove(ptr, self._zero_flow, len(self._zero_flow))
        h = _Flow(ptr, int(ffi.cast("uintptr_t", raw)), key)
        self._live.add(h)
        return h

    def free(self, handle: _Flow) -> None:
        if handle.ptr is not None:
            self._lib.flow_free(handle.ptr)
            handle.ptr = None
            self._live.discard(handle)

    def add_packet(self, handle: _Flow, ip_bytes, ts_ms: int, from_orig: bool = True) -> bool:
        """Give nDPI one packet (bytes from the IP header to the end of the datagram).
        True when nDPI has concluded and the flow needs no more packets. Never raises."""
        try:
            if handle.done or handle.ptr is None:
                return True
            n = len(ip_bytes)
            if n <= 0:
                return False
            buf = ip_bytes if isinstance(ip_bytes, bytes) else self._ffi.from_buffer("unsigned char[]", ip_bytes)
            return self._feed(handle, buf, min(n, 65535), int(ts_ms), bool(from_orig))
        except Exception:
            return handle.done

    def _feed(self, h: _Flow, buf, n: int, ts_ms: int, from_orig: bool) -> bool:
        """add_packet without the checks (buf: bytes or a cffi pointer; 0 < n <= 65535)."""
        info = self._dir[from_orig] if self.use_direction else self._ffi.NULL
        h.proto = self._process(self._mod, h.ptr, buf, n, ts_ms, info)
        self.calls += 1
        h.n += 1
        st = h.ptr.state
        if st == STATE_CLASSIFIED or st == STATE_MONITORING:
            h.done = True
        elif (self.hello_mask and int(h.proto.proto.master_protocol) == self.tls_master
              and self._ffi.cast("uint8_t *", h.ptr)[self.hello_off] & self.hello_mask == self.hello_mask):
            h.done = True  # labels_only: the label cannot change any more
        elif h.n >= self.max_packets:
            self._giveup(h)
            h.done = True
        return h.done

    def _giveup(self, h: _Flow) -> None:
        if not h.gaveup and h.ptr is not None:
            h.proto = self._lib.detection_giveup(self._mod, h.ptr)
            h.gaveup = True

    def result(self, handle: _Flow) -> NdpiResult:
        """(app, category, confidence, extra) of a flow; gives up first if nDPI had not
        concluded (the session ended before it could)."""
        h = handle
        if h.ptr is None:
            return UNKNOWN
        if h.n == 0:
            return UNKNOWN
        if not h.done:
            self._giveup(h)
        ffi, lib, f = self._ffi, self._lib, h.ptr
        master, app_id, cat_id = self._ids(h)
        name, cat = self._name(master, app_id), self._category(cat_id)
        conf_id = int(f.confidence)
        conf = self._confs.get(conf_id)
        if conf is None:
            s = lib.confidence_get_name(conf_id)
            conf = self._confs[conf_id] = ffi.string(s).decode(errors="replace") if s != ffi.NULL else str(conf_id)
        risk = int(f.risk)
        extra = {"non_std_port": bool((risk >> RISK_KNOWN_PROTO_NON_STD_PORT) & 1), "risk": risk,
                 "dpi_packets": h.n, "master_id": master, "app_id": app_id}
        host = ffi.string(f.host_server_name)
        if host:
            extra["host"] = host.decode(errors="replace")
        if master in self._tls_ids or app_id in self._tls_ids:
            tq = f.protos.tls_quic
            ja4 = ffi.string(tq.ja4_client)
            if ja4:
                extra["ja4"] = ja4.decode(errors="replace")
            ja3s = ffi.string(tq.ja3_server)
            if ja3s:
                extra["ja3s"] = ja3s.decode(errors="replace")
        if risk:
            extra["risks"] = self.risk_names(risk)
        return NdpiResult(name, cat, conf, extra)

    def label(self, handle: _Flow) -> Label:
        """result()'s app, category and port flag only: what the pipeline keeps, without the
        per-session strings (host, JA4...) and dict that result() builds."""
        h = handle
        if h.ptr is None or h.n == 0:
            return UNKNOWN_LABEL
        if not h.done:
            self._giveup(h)
        master, app_id, cat_id = self._ids(h)
        mismatch = bool((int(h.ptr.risk) >> RISK_KNOWN_PROTO_NON_STD_PORT) & 1)
        return self.label_of(master, app_id, cat_id, mismatch)

    def label_of_key(self, key: int) -> Label:
        """The Label of a label key (ndpi_kernel.label_keys' number)."""
        return self.label_of(key >> 40, (key >> 24) & 0xFFFF, (key >> 1) & 0x7FFFFF, bool(key & 1))

    def label_of(self, master: int, app_id: int, cat_id: int, mismatch: bool) -> Label:
        key = (master, app_id, cat_id, mismatch)
        label = self._labels.get(key)
        if label is None:
            label = self._labels[key] = Label(self._name(master, app_id), self._category(cat_id), mismatch)
        return label

    def _ids(self, h: _Flow) -> tuple[int, int, int]:
        """(master, app, category) ids of a flow's last ndpi_protocol."""
        if h.proto is not None:
            p = h.proto
            return int(p.proto.master_protocol), int(p.proto.app_protocol), int(p.category)
        if h.ret is not None:
            return self._ret_layout.unpack_from(h.ret)
        return 0, 0, 0

    def _name(self, master: int, app_id: int) -> str:
        name = self._names.get((master, app_id))
        if name is None:
            ffi = self._ffi
            pair = ffi.new("ndpi_master_app_protocol *", {"master_protocol": master, "app_protocol": app_id})
            name = ffi.string(self._lib.protocol2name(self._mod, pair[0], self._namebuf, 128)).decode(errors="replace")
            self._names[(master, app_id)] = name
        return name

    def _category(self, cat_id: int) -> str:
        cat = self._cats.get(cat_id)
        if cat is None:
            ffi = self._ffi
            s = self._lib.category_get_name(self._mod, cat_id)
            cat = self._cats[cat_id] = ffi.string(s).decode(errors="replace") if s != ffi.NULL else str(cat_id)
        return cat

    def risk_names(self, risk: int) -> list[str]:
        names = self._risk_names.get(risk)  # a few distinct risk sets cover most sessions
        if names is None:
            ffi, names = self._ffi, []
            for bit in range(1, self._lib.max_risk):
                if (risk >> bit) & 1:
                    s = self._lib.risk2str(bit)
                    names.append(ffi.string(s).decode() if s != ffi.NULL else str(bit))
            if len(self._risk_names) < 4096:
                self._risk_names[risk] = names
        return list(names)


class _Slab:
    """nDPI flow structs for the numba loop, in chunks of numpy memory indexed by slot.

    Per session the Python side only maps its id to a slot: allocation, zeroing, feeding,
    giving up, reading results and freeing go over arrays of slots (ndpi_kernel), where
    malloc, a cffi object and a result per session cost 1.4 of the 2.1 CPU s nDPI took on
    mix.pcap. Chunks never move (nDPI may keep pointers into a flow); chunks start zeroed, and
    when a slot is given back ndpi_free_flow_data frees what nDPI allocated for it and its
    struct is zeroed: a free slot is always ready for nDPI.
    """

    CHUNK = 4096

    def __init__(self, ident: Identifier):
        self.ident = ident
        self.flow_size = ident._lib.flow_size
        self.proto_size = ident.proto_size
        self.chunks: list[np.ndarray] = []
        self.addr = np.zeros(0, dtype=np.uint64)      # flow struct address per slot
        self.count = np.zeros(0, dtype=np.int64)      # packets given to nDPI per slot
        self.done = np.zeros(0, dtype=np.uint8)       # 1 concluded, 2 at the packet cap
        self.ret = np.zeros((0, self.proto_size), dtype=np.uint8)  # last ndpi_protocol per slot
        self.free = np.zeros(0, dtype=np.int64)       # a stack of the free slots: free[:n_free]
        self.n_free = 0

    def _grow(self) -> None:
        chunk = np.zeros((self.CHUNK, self.flow_size), dtype=np.uint8)
        self.chunks.append(chunk)
        first = len(self.addr)
        self.addr = np.concatenate([self.addr, np.uint64(chunk.ctypes.data)
                                    + np.arange(self.CHUNK, dtype=np.uint64) * np.uint64(self.flow_size)])
        self.count = np.concatenate([self.count, np.zeros(self.CHUNK, dtype=np.int64)])
        self.done = np.concatenate([self.done, np.zeros(self.CHUNK, dtype=np.uint8)])
        self.ret = np.concatenate([self.ret, np.zeros((self.CHUNK, self.proto_size), dtype=np.uint8)])
        # room on the stack for every slot; the new ones go on top, the lowest first
        free = np.empty(len(self.addr), dtype=np.int64)
        free[:self.n_free] = self.free[:self.n_free]
        free[self.n_free:self.n_free + self.CHUNK] = np.arange(first + self.CHUNK - 1, first - 1, -1)
        self.free = free
        self.n_free += self.CHUNK

    def take(self, k: int) -> np.ndarray:
        """k slots with zeroed flow structs."""
        while self.n_free < k:
            self._grow()
        self.n_free -= k
        slots = self.free[self.n_free:self.n_free + k].copy()
        from wiretrail.app.ndpi_kernel import take_slots_kernel

        take_slots_kernel(slots, self.count, self.done)
        return slots

    def give_back(self, slots: np.ndarray) -> None:
        from wiretrail.app.ndpi_kernel import free_kernel

        if len(slots):
            free_kernel(np.uint64(self.ident._lib.free_flow_data_addr), self.addr, slots, self.flow_size)
            self.free[self.n_free:self.n_free + len(slots)] = slots
            self.n_free += len(slots)

    def giveup(self, slots: np.ndarray) -> None:
        from wiretrail.app.ndpi_kernel import giveup_kernel

        if len(slots):
            ident = self.ident
            giveup_kernel(np.uint64(ident._lib.giveup_addr), ident.module_addr, np.uint64(self.ret.ctypes.data),
                          self.proto_size, self.addr, slots)

    def label_keys(self, slots: np.ndarray) -> np.ndarray:
        """Each slot's label as one number (ndpi_kernel.label_keys: master, app, category and
        the port-mismatch flag of its last result; decoded by Identifier.label_of_key)."""
        from wiretrail.app.ndpi_kernel import label_keys

        ident = self.ident
        om, oa, oc = ident._ret_offsets
        keys = np.empty(len(slots), dtype=np.int64)
        # the port-mismatch risk's bit, in the first byte of the flow's little-endian u64 risk
        label_keys(self.ret, np.ascontiguousarray(slots, dtype=np.int64), om, oa, oc, self.addr,
                   np.uint64(ident.risk_offset + RISK_KNOWN_PROTO_NON_STD_PORT // 8),
                   1 << (RISK_KNOWN_PROTO_NON_STD_PORT % 8), keys)
        return keys

    def results(self, slots: np.ndarray) -> list[NdpiResult]:
        """Identifier.result of each slot (NdpiState's `detail`: host, JA4...), one by one."""
        ident, ffi = self.ident, self.ident._ffi
        out = []
        for u in slots.tolist():
            h = _Flow(ffi.cast("struct ndpi_flow_struct *", int(self.addr[u])), int(self.addr[u]), None)
            h.n, h.done, h.gaveup, h.ret = int(self.count[u]), True, True, self.ret[u].tobytes()
            out.append(ident.result(h))
        return out


class NdpiState:
    """Per-session identification state for the pipeline: nDPI flows of undecided sessions,
    and the labels of decided sessions until they close (`finish_ids`), in two columns of a
    SessionRows (the stage's, shared with its own columns, or one of its own): `ndpi_flow` the
    session's nDPI flow (a slot of the _Slab where the numba loop runs (x86-64), else a key of
    `handles`), -1 for none; `ndpi_label` its label, an index into `labels` (0: Unknown), -1
    while undecided. With `detail` the whole NdpiResult of each decided session is kept
    instead (`details`, by row; the label column then says 0: decided)."""

    def __init__(self, identifier: Identifier, max_live: int = 1 << 18, detail: bool = False,
                 rows: SessionRows | None = None):
        self.identifier = identifier
        self.detail = detail
        self.unknown = UNKNOWN if detail else UNKNOWN_LABEL
        self.rows = SessionRows() if rows is None else rows
        self._own_rows = rows is None  # else its owner releases the rows of closed sessions
        self.rows.add_column("ndpi_flow", np.int64, -1)
        self.rows.add_column("ndpi_label", np.int32, -1)
        self.labels: list[Label] = [UNKNOWN_LABEL]
        self._label_ids: dict[Label, int] = {UNKNOWN_LABEL: 0}
        # the label keys (_Slab.label_keys) met so far, sorted, and their label ids
        self._known_keys = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32))
        self.details: dict[int, NdpiResult] = {}
        self.handles: dict[int, _Flow] = {}          # row -> nDPI flow (feeding from Python)
        self.slab = _Slab(identifier) if identifier.kernel is not None else None
        self.slot_row = np.zeros(0, dtype=np.int64)  # slab slot -> its session's row
        # A flood or scan opens sessions faster than nDPI can decide them: past this many
        # undecided sessions (about 1.2 KB of nDPI state each) new ones stay unidentified.
        self.max_live = max_live
        self.live_count = 0                          # sessions with an nDPI flow
        self.skipped = 0                             # sessions left unidentified for that reason

    def __len__(self) -> int:
        """Sessions with state: undecided ones with a flow, and decided ones not closed yet."""
        c = self.rows.col
        return int(((c["ndpi_flow"] >= 0) | (c["ndpi_label"] >= 0)).sum())

    @property
    def decided_count(self) -> int:
        return int((self.rows.col["ndpi_label"] >= 0).sum())

    def _ids(self, labels: list[Label]) -> np.ndarray:
        ids = self._label_ids
        for label in labels:
            if label not in ids:
                ids[label] = len(self.labels)
                self.labels.append(label)
        return np.array([ids[label] for label in labels], dtype=np.int32)

    def _key_ids(self, keys: np.ndarray) -> np.ndarray:
        """Label ids of label keys (_Slab.label_keys), found in the sorted keys met so far: a
        few hundred labels among thousands of slots per call, where decoding each distinct
        key to a Label and looking that up cost 0.5-1 ms per call."""
        known, known_ids = self._known_keys
        at = np.searchsorted(known, keys)
        found = at < len(known)
        found[found] = known[at[found]] == keys[found]
        if not found.all():
            new = np.unique(keys[~found])
            label_of = self.identifier.label_of_key
            new_ids = self._ids([label_of(k) for k in new.tolist()])
            merged = np.concatenate([known, new])
            order = np.argsort(merged, kind="stable")
            known, known_ids = merged[order], np.concatenate([known_ids, new_ids])[order]
            self._known_keys = (known, known_ids)
            at = np.searchsorted(known, keys)
        return known_ids[at]

    def _slot_ids(self, slots: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Label ids of slots whose nDPI work is over (given up where it had not concluded;
        Unknown where nDPI never saw a packet); their rows' details kept with `detail`; the
        slots are given back."""
        slab = self.slab
        pending = slots[slab.done[slots] != 1]
        slab.giveup(pending[slab.count[pending] > 0])
        if self.detail:
            for r, result, seen in zip(rows.tolist(), slab.results(slots), (slab.count[slots] > 0).tolist()):
                self.details[r] = result if seen else UNKNOWN
            ids = np.zeros(len(slots), dtype=np.int32)
        else:
            ids = self._key_ids(slab.label_keys(slots))
            ids[slab.count[slots] == 0] = 0
        slab.give_back(slots)
        self.live_count -= len(slots)
        return ids

    def _handle_id(self, row: int, h: _Flow) -> int:
        """Label id of a flow fed from Python (given up if not concluded); the flow is freed."""
        result = self.identifier.result(h) if self.detail else self.identifier.label(h)
        self.identifier.free(h)
        del self.handles[row]
        self.live_count -= 1
        if self.detail:
            self.details[row] = result
            return 0
        return int(self._ids([result])[0])

    def take_slots(self, rows: np.ndarray) -> None:
        """nDPI flows (slab slots) for sessions `rows` (distinct, none yet)."""
        slots = self.slab.take(len(rows))
        if len(self.slot_row) < len(self.slab.addr):
            self.slot_row = np.concatenate([self.slot_row, np.full(len(self.slab.addr) - len(self.slot_row), -1,
                                                                   dtype=np.int64)])
        self.slot_row[slots] = rows
        self.rows.col["ndpi_flow"][rows] = slots
        self.live_count += len(rows)

    def decide_slots(self, slots: np.ndarray) -> None:
        """Sessions whose slots are done: their labels set, their slots given back."""
        rows = self.slot_row[slots]
        self.rows.col["ndpi_label"][rows] = self._slot_ids(slots, rows)
        self.rows.col["ndpi_flow"][rows] = -1

    def finish_ids(self, sids) -> np.ndarray:
        """Label ids (into `labels`) of closed sessions (e.g. the `sid` column of
        FlowTable.expire()/flush()); their nDPI state is dropped."""
        sids = np.asarray(sids, dtype=np.int64)
        rows = self.rows.find(sids)
        ids = np.zeros(len(sids), dtype=np.int32)  # no row: no IP packet of it was ever seen
        have = np.flatnonzero(rows >= 0)
        r = rows[have]
        label, flow = self.rows.col["ndpi_label"][r], self.rows.col["ndpi_flow"][r]
        ids[have] = np.maximum(label, 0)
        pending = np.flatnonzero((label < 0) & (flow >= 0))
        if len(pending):
            if self.slab is not None:
                ids[have[pending]] = self._slot_ids(flow[pending], r[pending])
            else:
                for k, row in zip(have[pending].tolist(), r[pending].tolist()):
                    ids[k] = self._handle_id(row, self.handles[row])
        self.rows.col["ndpi_label"][r] = -1
        self.rows.col["ndpi_flow"][r] = -1
        if self._own_rows:
            self.rows.release(sids)
        return ids

    def finish_results(self, sids) -> list[Label | NdpiResult]:
        """The Label (NdpiResult with `detail`) of each closed session; its state is dropped."""
        sids = np.asarray(sids, dtype=np.int64)
        rows = self.rows.find(sids) if self.detail else None
        ids = self.finish_ids(sids)
        if not self.detail:
            return [self.labels[i] for i in ids.tolist()]
        return [self.details.pop(r, UNKNOWN) for r in rows.tolist()]

    def finish_result(self, sid: int) -> Label | NdpiResult:
        return self.finish_results([int(sid)])[0]

    def finish(self, sid: int) -> tuple[str, str]:
        """(app, category) of a closed session; its state is dropped."""
        r = self.finish_result(sid)
        return r.app, r.category

    def finish_many(self, sids) -> tuple[list[str], list[str], list[bool]]:
        """apps, categories and 'known protocol on a non-standard port' flags of closed sessions."""
        done = self.finish_results(sids)
        return [r.app for r in done], [r.category for r in done], [r.port_mismatch for r in done]

    def close(self) -> None:
        if self.slab is not None:
            flows = self.rows.col["ndpi_flow"]
            self.slab.give_back(flows[flows >= 0])
        else:
            for h in self.handles.values():
                self.identifier.free(h)
            self.handles.clear()
        self.rows.col["ndpi_flow"][:] = -1
        self.rows.col["ndpi_label"][:] = -1
        self.details.clear()
        self.live_count = 0


def classify_batch(identifier: Identifier, state: NdpiState, batch, cols: dict, sid: np.ndarray,
                   is_orig: np.ndarray, seq: np.ndarray | None, row: np.ndarray) -> int:
    """Feed nDPI the packets of `batch` that belong to sessions not decided yet.

    `sid`, `is_orig`, `seq` (the packet's number within its session; None: not known) and
    `row` (the session's row) come from FlowTable.update. Rows are chosen with numpy (a session id, an IP header, fewer than
    `identifier.max_packets` packets into the session), then by ndpi_kernel.feed_rows (the
    session not decided, IP bytes captured). Returns the number of packets given to nDPI.
    """
    from wiretrail.app.ndpi_kernel import feed_rows

    n = len(sid)
    if n == 0:
        return 0
    l3 = cols["l3_off"]
    ok = (sid >= 0) & (l3 >= 0)
    if seq is not None:
        ok &= seq < identifier.max_packets
    rows = np.flatnonzero(ok)
    if len(rows) == 0:
        return 0
    srow = state.rows.attach(sid[rows], row[rows])
    m = len(rows)
    picked, srow_out = np.empty(m, dtype=np.int64), np.empty(m, dtype=np.int64)
    start, length, ts_ms = np.empty(m, dtype=np.uint64), np.empty(m, dtype=np.uint16), np.empty(m, dtype=np.uint64)
    k = feed_rows(rows, srow, state.rows.col["ndpi_label"], batch.offset, l3, batch.caplen, cols["ip_len"], batch.ts,
                  picked, srow_out, start, length, ts_ms)
    if k == 0:
        return 0
    rows, srow, start, length, ts_ms = picked[:k], srow_out[:k], start[:k], length[:k], ts_ms[:k]

    ident = identifier
    if ident.kernel is not None:
        return _feed_in_kernel(ident, state, batch, srow, start, length, ts_ms)
    label_col = state.rows.col["ndpi_label"]
    ffi = ident._ffi
    base = ffi.from_buffer("unsigned char[]", batch.data)
    feed, new_flow, handles = ident._feed, ident.new_flow, state.handles
    fed = 0
    for r, st, ln, t, o in zip(srow.tolist(), start.tolist(), length.tolist(), ts_ms.tolist(),
                               is_orig[rows].tolist()):
        h = handles.get(r)
        if h is None:
            if label_col[r] >= 0:
                continue  # decided earlier in this batch
            if state.live_count >= state.max_live:
                state.skipped += 1
                label_col[r] = 0
                continue
            h = handles[r] = new_flow(r)
            state.live_count += 1
        fed += 1
        try:
            done = feed(h, base + st, ln, t, o)
        except Exception:  # never let one packet stop the batch
            done = True
        if done:
            label_col[r] = state._handle_id(r, h)
    return fed


def _feed_in_kernel(ident: Identifier, state: NdpiState, batch, srow, start, length, ts_ms) -> int:
    """classify_batch's loop in numba (app.ndpi_kernel) over the state's slab: per session,
    only array operations on its row and slot."""
    from wiretrail.app.ndpi_kernel import feed_kernel

    slab, flow_col = state.slab, state.rows.col["ndpi_flow"]
    slot = flow_col[srow]
    new = slot < 0
    if new.any():
        # the new sessions in the order they first come; past NdpiState.max_live they stay unidentified
        new_rows = state.rows.distinct(srow[new])
        room = max(0, state.max_live - state.live_count)
        if len(new_rows) > room:
            state.rows.col["ndpi_label"][new_rows[room:]] = 0
            state.skipped += len(new_rows) - room
            new_rows = new_rows[:room]
            keep = state.rows.col["ndpi_label"][srow] < 0
            srow, start, length, ts_ms = srow[keep], start[keep], length[keep], ts_ms[keep]
        if len(new_rows):
            state.take_slots(new_rows)
        slot = flow_col[srow]
    data = np.ascontiguousarray(batch.data)
    finished = np.empty(len(slot), dtype=np.int64)
    got = int(feed_kernel(ident.kernel, ident.module_addr, np.uint64(slab.ret.ctypes.data), ident.proto_size,
                          slab.addr, slab.count, slab.done, ident.state_offset, ident.max_packets,
                          STATE_CLASSIFIED, STATE_MONITORING, ident.tls_master, np.uint64(ident._ret_offsets[0]),
                          np.uint64(ident.hello_off), ident.hello_mask, np.uint64(data.ctypes.data), start, length,
                          ts_ms, slot, finished))
    calls, n_finished = got >> 32, got & 0xFFFFFFFF
    ident.calls += calls
    if n_finished:
        state.decide_slots(finished[:n_finished])
    return calls
