"""RDMA receive path (pyverbs, imported lazily in this file only): frames land in ring slots by NIC DMA.

Design (buffers-and-rdma.md §1-2): one memory region over the ring slab and one over a small header table,
registered once. Every free slot is a posted RECV whose scatter list is [header row (96 bytes), the slot];
the sender SENDs header + payload (the TcpSource wire format) on an RC queue pair. The work-request id is the
slot index, so a completion names the slot directly; released slots are re-posted. Posted RECVs are the
credits: with no RECV posted the sender is throttled by RNR retry (backpressure; senders should use
rnr_retry = 7). With the free-running policy one scratch RECV is kept posted when the ring is full, so the
sender never stalls and the frame landing there is counted as dropped.

Only runs where a verbs device exists (ConnectX, or Soft-RoCE/siw loaded on the host); CI has none
(Firecracker kernel without CONFIG_INFINIBAND), so tests cover probe() and the slot logic through a fake
port (`port_factory`), not the pyverbs calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from ..ring import FrameRing, RingClosed
from .base import END_SERIES, END_STREAM, HEADER_SIZE, Source, SourceStats, SourceUnavailable, decode_header

log = logging.getLogger(__name__)
_FIX = ("install pyverbs (Debian: apt install python3-pyverbs rdma-core) and run where a verbs device exists; "
        "TcpSource receives the same wire format over plain sockets")


class VerbsPort(Protocol):
    """The few verbs operations RdmaSource needs (a connected RC QP, its CQ, registered memory)."""

    def post_recv(self, wr_id: int, header: np.ndarray, payload: np.ndarray) -> None: ...
    def start(self) -> None: ...  # accept the sender once the first receives are posted
    def poll(self, max_n: int) -> list[tuple[int, bool, int]]: ...  # (wr_id, success, byte_len)
    def close(self) -> None: ...


class RdmaSource(Source):
    """Passive RDMA-CM endpoint on host:port receiving one sender's frames into ring slots.

    Connection setup blocks until a sender connects; `stop` is honoured from then on.
    """

    name = "rdma"

    def __init__(self, host: str, port: int = 18515,
                 port_factory: Callable[[FrameRing, np.ndarray, np.ndarray], VerbsPort] | None = None):
        super().__init__()
        self.host, self.port = host, int(port)
        self.port_factory = port_factory
        if port_factory is None:
            self.probe()

    @classmethod
    def probe(cls) -> None:
        try:
            import pyverbs.device as device
        except ImportError as exc:
            raise SourceUnavailable(cls.name, f"pyverbs is not installed ({exc})", _FIX) from None
        try:
            devices = device.get_device_list()
        except Exception as exc:  # PyverbsRDMAError when the kernel has no RDMA subsystem
            raise SourceUnavailable(cls.name, f"no verbs devices: {exc}", _FIX) from None
        if not devices:
            raise SourceUnavailable(cls.name, "no verbs device (/sys/class/infiniband is empty)", _FIX)

    def run(self, ring: FrameRing, stop: threading.Event) -> SourceStats:  # type: ignore[override]
        n = ring.n_slots
        headers = ring.allocator.empty((n + 1, HEADER_SIZE), np.uint8)  # row n: the scratch receive's header
        scratch = ring.allocator.empty((ring.slot_nbytes,), np.uint8)
        posted = np.zeros(n + 1, bool)
        released = threading.Event()
        port: VerbsPort | None = None
        try:
            factory = self.port_factory or (lambda r, h, s: _PyverbsPort(self.host, self.port, r, h, s))
            port = factory(ring, headers, scratch)
            ring.set_release_hook(lambda _n: released.set())
            self._repost(ring, port, headers, scratch, posted)
            port.start()
            idle = 0
            while not stop.is_set():
                if released.is_set():
                    released.clear()
                    self._repost(ring, port, headers, scratch, posted)
                completions = port.poll(32)
                if not completions:
                    idle += 1
                    if idle > 64:  # busy-poll briefly, then back off to ~0.2 ms
                        time.sleep(2e-4)
                    continue
                idle = 0
                for wr_id, ok, byte_len in completions:
                    posted[wr_id] = False
                    if not ok:  # flushed: the connection went down and every posted receive errors out
                        log.info("rdma source: receive %d completed with an error; connection closed", wr_id)
                        return self.stats
                    if self._complete(ring, wr_id, headers[wr_id], byte_len):
                        return self.stats
                self._repost(ring, port, headers, scratch, posted)
        except RingClosed:
            log.info("rdma source: ring closed by its owner")
        finally:
            ring.set_release_hook(None)
            if port is not None:
                port.close()  # the QP is gone: receives still posted will never complete
            for slot in np.flatnonzero(posted[:n]).tolist():
                ring.abort(slot)
            ring.close_input()
        return self.stats

    @staticmethod
    def _repost(ring: FrameRing, port: VerbsPort, headers: np.ndarray, scratch: np.ndarray,
                posted: np.ndarray) -> None:
        """Post a receive for every free slot; in free-running mode keep the scratch one up when none is."""
        while (slot := ring.try_acquire()) is not None:
            port.post_recv(slot, headers[slot], ring.slab[slot])
            posted[slot] = True
        n = ring.n_slots
        if ring.policy != "backpressure" and not posted[:n].any() and not posted[n]:
            port.post_recv(n, headers[n], scratch)
            posted[n] = True

    def _complete(self, ring: FrameRing, wr_id: int, header: np.ndarray, byte_len: int) -> bool:
        """Account one received message; True at END_STREAM."""
        stats, h = self.stats, decode_header(memoryview(header))
        slot = wr_id if wr_id < ring.n_slots else None
        frame_ok = (not isinstance(h, str) and not h.flags & (END_SERIES | END_STREAM)
                    and h.shape == ring.frame_shape and h.dtype == ring.dtype
                    and byte_len == HEADER_SIZE + h.nbytes)
        if not frame_ok and slot is not None:
            ring.abort(slot)
        if isinstance(h, str):
            stats.malformed += 1
            log.warning("rdma source: bad header (%s)", h)
            return False
        if h.flags & (END_SERIES | END_STREAM):
            if h.flags & END_SERIES:
                ring.mark_end(h.series_id)
            return bool(h.flags & END_STREAM)
        if not frame_ok:
            stats.malformed += 1
            return False
        stats.sent += 1
        if slot is None:  # landed in the scratch receive: the ring was full
            ring.drop(h.frame_id)
            stats.dropped += 1
            return False
        ring.commit(slot, h.frame_id, series_id=h.series_id, position_px=h.position_px, position_m=h.position_m,
                    t_detector=h.t_detector)
        stats.received += 1
        return False


class _PyverbsPort:
    """rdma_cm passive side with an external RC QP and CQ (the flow of rdma-core's ext-QP tests)."""

    def __init__(self, host: str, port: int, ring: FrameRing, headers: np.ndarray, scratch: np.ndarray):
        import pyverbs.cm_enums as ce
        import pyverbs.enums as e
        from pyverbs.cmid import CMID, AddrInfo, CMEvent, CMEventChannel, ConnParam
        from pyverbs.cq import CQ
        from pyverbs.mr import MR
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
        from pyverbs.wr import SGE, RecvWR

        self._e, self._ce, self._SGE, self._RecvWR = e, ce, SGE, RecvWR
        self._CMEvent, self._ConnParam = CMEvent, ConnParam
        self.channel = CMEventChannel()
        self.listen_id = CMID(creator=self.channel, port_space=ce.RDMA_PS_TCP)
        self.listen_id.bind_addr(AddrInfo(src=host, src_service=str(port), port_space=ce.RDMA_PS_TCP,
                                          flags=ce.RAI_PASSIVE))
        self.listen_id.listen()
        log.info("rdma source: listening on %s:%d", host, port)
        event = CMEvent(self.channel)  # blocks until a sender connects
        if event.event_type != ce.RDMA_CM_EVENT_CONNECT_REQUEST:
            raise ConnectionError(f"rdma source: expected a connect request, got {event.event_str()}")
        self.cmid = CMID(creator=event, listen_id=self.listen_id)
        event.ack_cm_event()
        n = ring.n_slots + 1
        self.cq = CQ(self.cmid.context, n + 1, None, None, 0)
        cap = QPCap(max_send_wr=1, max_recv_wr=n, max_send_sge=1, max_recv_sge=2)
        self.qp = QP(self.cmid.pd, QPInitAttr(qp_type=e.IBV_QPT_RC, rcq=self.cq, scq=self.cq, cap=cap), QPAttr())
        # Registered once, over memory the ring already owns (allocator memory is page aligned).
        regions = (ring.slab, headers, scratch)
        self.mrs = [MR(self.cmid.pd, a.nbytes, e.IBV_ACCESS_LOCAL_WRITE, address=a.ctypes.data) for a in regions]
        self._keys = [(a.ctypes.data, a.ctypes.data + a.nbytes, mr.lkey) for a, mr in zip(regions, self.mrs,
                                                                                           strict=True)]
        attr, mask = self.cmid.init_qp_attr(e.IBV_QPS_INIT)
        self.qp.modify(attr, mask)  # receives may be posted from INIT on, before the peer can send

    def post_recv(self, wr_id: int, header: np.ndarray, payload: np.ndarray) -> None:
        sg = [self._SGE(header.ctypes.data, header.nbytes, self._lkey(header)),
              self._SGE(payload.ctypes.data, payload.nbytes, self._lkey(payload))]
        self.qp.post_recv(self._RecvWR(wr_id=wr_id, num_sge=2, sg=sg))

    def start(self) -> None:
        e, ce = self._e, self._ce
        self.cmid.accept(self._ConnParam(qp_num=self.qp.qp_num))
        for state in (e.IBV_QPS_RTR, e.IBV_QPS_RTS):
            attr, mask = self.cmid.init_qp_attr(state)
            self.qp.modify(attr, mask)
        event = self._CMEvent(self.channel)
        if event.event_type != ce.RDMA_CM_EVENT_ESTABLISHED:
            raise ConnectionError(f"rdma source: connection not established ({event.event_str()})")
        event.ack_cm_event()

    def poll(self, max_n: int) -> list[tuple[int, bool, int]]:
        _, wcs = self.cq.poll(max_n)
        return [(wc.wr_id, wc.status == self._e.IBV_WC_SUCCESS, wc.byte_len) for wc in wcs]

    def close(self) -> None:
        for obj in (self.qp, *self.mrs, self.cq, self.cmid, self.listen_id, self.channel):
            try:
                obj.close()
            except Exception as exc:  # teardown after a lost peer: report, keep closing the rest
                log.debug("rdma source: closing %s: %s", type(obj).__name__, exc)

    def _lkey(self, a: np.ndarray) -> int:
        addr = a.ctypes.data
        return next(k for lo, hi, k in self._keys if lo <= addr < hi)
