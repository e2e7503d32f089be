"""Feeding nDPI from a numba loop instead of one Python call per packet.

`ndpi_detection_process_packet` returns its 56-byte `ndpi_protocol` by value; on x86-64
(System V) that is a hidden first argument pointing at caller memory, so the function is
called here by address as if it took that buffer first. After each call the
flow's `state` byte says whether nDPI has concluded. Only x86-64 takes this path; elsewhere
`app.ndpi` feeds packets from Python.
"""

from __future__ import annotations

import platform

import numpy as np

from wiretrail.jit import kernel, numba_hook

AVAILABLE = platform.machine() in ("x86_64", "AMD64")


@numba_hook
def _define_intrinsics() -> None:
    """The intrinsics the kernels call; numba builds them when it compiles a kernel (the
    compiled extension has them built in)."""
    global _process_packet, _giveup, _call_with_pointer, _load_u8, _prefetch_at, _zero_at
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _process_packet(typingctx, fn, ret, module, flow, packet, length, ts):
        """Call ndpi_detection_process_packet at address `fn`; the struct return made explicit as
        the first pointer. Addresses are plain integers, so the kernel stays cacheable."""
        sig = types.void(types.uint64, types.uint64, types.uint64, types.uint64, types.uint64, types.uint16,
                         types.uint64)

        def codegen(context, builder, signature, args):
            from llvmlite import ir

            i8p = ir.IntType(8).as_pointer()
            fnty = ir.FunctionType(i8p, [i8p, i8p, i8p, i8p, ir.IntType(16), ir.IntType(64), i8p])
            f = builder.inttoptr(args[0], fnty.as_pointer())
            ptrs = [builder.inttoptr(a, i8p) for a in args[1:5]]
            builder.call(f, [*ptrs, args[5], args[6], ir.Constant(i8p, None)])
            return context.get_dummy_value()
        return sig, codegen

    @intrinsic
    def _giveup(typingctx, fn, ret, module, flow):
        """Call ndpi_detection_giveup at address `fn`, its struct return made explicit."""
        sig = types.void(types.uint64, types.uint64, types.uint64, types.uint64)

        def codegen(context, builder, signature, args):
            from llvmlite import ir

            i8p = ir.IntType(8).as_pointer()
            fnty = ir.FunctionType(i8p, [i8p, i8p, i8p])
            f = builder.inttoptr(args[0], fnty.as_pointer())
            builder.call(f, [builder.inttoptr(a, i8p) for a in args[1:4]])
            return context.get_dummy_value()
        return sig, codegen

    @intrinsic
    def _call_with_pointer(typingctx, fn, arg):
        """Call a `void f(void *)` at address `fn` (ndpi_free_flow_data)."""
        sig = types.void(types.uint64, types.uint64)

        def codegen(context, builder, signature, args):
            from llvmlite import ir

            i8p = ir.IntType(8).as_pointer()
            fnty = ir.FunctionType(ir.VoidType(), [i8p])
            builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [builder.inttoptr(args[1], i8p)])
            return context.get_dummy_value()
        return sig, codegen

    @intrinsic
    def _prefetch_at(typingctx, address):
        """Prefetch, for reading, the cache line at an absolute address (never faults)."""
        sig = types.void(types.uint64)

        def codegen(context, builder, signature, args):
            from numba.core import cgutils

            from wiretrail.bytes_kernels import emit_prefetch

            emit_prefetch(builder, builder.inttoptr(args[0], cgutils.voidptr_t))
            return context.get_dummy_value()
        return sig, codegen

    @intrinsic
    def _zero_at(typingctx, address, size):
        """Zero `size` bytes at an absolute address (a memset: a flow struct made ready for nDPI)."""
        sig = types.void(types.uint64, types.int64)

        def codegen(context, builder, signature, args):
            from numba.core import cgutils

            cgutils.memset(builder, builder.inttoptr(args[0], cgutils.voidptr_t), args[1], 0)
            return context.get_dummy_value()
        return sig, codegen

    @intrinsic
    def _load_u8(typingctx, address):
        """The byte at an absolute address (a field of an nDPI flow)."""
        sig = types.uint8(types.uint64)

        def codegen(context, builder, signature, args):
            ptr = builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.uint8)))
            return builder.load(ptr)
        return sig, codegen


@kernel
def feed_rows(rows, srow, label, offset, l3_off, caplen, ip_len, ts, out_rows, out_srow, out_start, out_length,
              out_ts_ms):
    """Of the batch's packets `rows` (their sessions' rows srow), those nDPI is to be given: their
    session not decided yet (label < 0) and some IP bytes captured; each one's IP packet as
    where it starts in the batch's buffer and its length (the IP header's, cut at what was
    captured and at 65535), and its time in ms. Written at the start of the out_ arrays, in
    order; returns how many. (One pass where numpy made a dozen arrays per batch.)"""
    n = 0
    for k in range(len(rows)):
        s = srow[k]
        if label[s] >= 0:
            continue
        r = rows[k]
        l3 = np.int64(l3_off[r])
        room = np.int64(caplen[r]) - l3
        length = np.int64(ip_len[r])
        length = min(length, room) if length > 0 else room
        length = min(length, 65535)
        if length <= 0:
            continue
        out_rows[n] = r
        out_srow[n] = s
        out_start[n] = np.uint64(offset[r] + l3)
        out_length[n] = np.uint16(length)
        out_ts_ms[n] = np.uint64(ts[r] // 1_000_000)
        n += 1
    return n


@kernel
def feed_kernel(process, module, ret_base, ret_size, flow_ptr, count, done, state_off, max_packets,
                classified, monitoring, tls_master, master_off, hello_off, hello_mask,
                data_base, start, length, ts_ms, which, finished):
    """Give nDPI packet k of the batch (its flow is which[k]) unless that flow is done.
    done[u]: 1 concluded, 2 at the packet cap (the caller gives up on it). With a
    `hello_mask`, a flow whose master protocol is `tls_master` is concluded as soon as the
    flag bits `hello_mask` of its byte `hello_off` are all set (Identifier's labels_only).
    The flows done by this call are listed in `finished` (as long as the batch) in the order
    they finished. Returns calls made * 2**32 + flows finished."""
    calls = 0
    n_finished = 0
    for k in range(len(start)):
        # the frame two ahead and the first lines of its flow struct are fetched while nDPI
        # works on this one: nDPI is given a session's first frames only, so both are cold
        if k + 2 < len(start):
            ahead = data_base + start[k + 2]
            _prefetch_at(ahead)
            _prefetch_at(ahead + np.uint64(64))
            flow = flow_ptr[which[k + 2]]
            for line in range(4):
                _prefetch_at(flow + np.uint64(64 * line))
        u = which[k]
        if done[u]:
            continue
        ret = ret_base + np.uint64(u * ret_size)
        _process_packet(process, ret, module, flow_ptr[u], data_base + start[k], length[k], ts_ms[k])
        calls += 1
        count[u] += 1
        st = _load_u8(np.uint64(flow_ptr[u] + state_off))
        if st == classified or st == monitoring:
            done[u] = 1
        elif (hello_mask != 0
              and (_load_u8(flow_ptr[u] + hello_off) & hello_mask) == hello_mask
              and _load_u8(ret + master_off) + (np.uint16(_load_u8(ret + master_off + np.uint64(1))) << 8)
              == tls_master):
            done[u] = 1
        elif count[u] >= max_packets:
            done[u] = 2
        if done[u]:
            finished[n_finished] = u
            n_finished += 1
    return (calls << 32) + n_finished


@kernel
def label_keys(ret, slots, master_off, app_off, cat_off, flow_ptr, flag_off, flag_mask, out):
    """Per slot, its label as one number: master << 40 | app << 24 | category << 1 | flag, from
    the slot's last ndpi_protocol (ret's row: little-endian u16 ids, a 32-bit category) and one
    flag bit of its flow (the port-mismatch risk)."""
    for k in range(len(slots)):
        u = slots[k]
        master = np.int64(ret[u, master_off]) | (np.int64(ret[u, master_off + 1]) << 8)
        app = np.int64(ret[u, app_off]) | (np.int64(ret[u, app_off + 1]) << 8)
        cat = (np.int64(ret[u, cat_off]) | (np.int64(ret[u, cat_off + 1]) << 8)
               | (np.int64(ret[u, cat_off + 2]) << 16))
        flag = 1 if _load_u8(flow_ptr[u] + flag_off) & flag_mask else 0
        out[k] = (master << 40) | (app << 24) | ((cat & 0x7FFFFF) << 1) | flag


@kernel
def take_slots_kernel(slots, count, done):
    """The flows of `slots` made ready for nDPI: their packet counts and done flags reset (a free
    slot's struct is zero already: free_kernel zeroes it)."""
    for k in range(len(slots)):
        u = slots[k]
        count[u] = 0
        done[u] = 0


@kernel
def giveup_kernel(giveup, module, ret_base, ret_size, flow_ptr, slots):
    """ndpi_detection_giveup for the flows in `slots`; its result lands at ret_base + slot * ret_size."""
    for k in range(len(slots)):
        u = slots[k]
        _giveup(giveup, ret_base + np.uint64(u * ret_size), module, flow_ptr[u])


@kernel
def free_kernel(free_flow_data, flow_ptr, slots, flow_size):
    """ndpi_free_flow_data for the flows in `slots` (what nDPI allocated for them: the flow
    structs themselves are the caller's memory), then each struct zeroed, ready to be taken
    again. Zeroed here rather than when taken: nDPI has just read and written it, so it is
    still in cache, where a slot taken later is usually cold."""
    for k in range(len(slots)):
        flow = flow_ptr[slots[k]]
        _call_with_pointer(free_flow_data, flow)
        _zero_at(flow, flow_size)
