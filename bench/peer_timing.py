"""Timing shared by the PyTorch peers (bench/peer_*.py), the method of the Rust benches: CUDA
events around each call, L2 flushed (a write over max(4 x L2, 64 MiB)) before each timed call,
statistics over `iters` calls after 3 warm-ups."""

import statistics


class Timer:
    def __init__(self, torch):
        self.torch = torch
        self.props = torch.cuda.get_device_properties(0)
        self.l2 = getattr(self.props, "L2_cache_size", 50 << 20)
        self.flush = torch.empty(max(4 * self.l2, 64 << 20), dtype=torch.uint8, device="cuda")

    def describe(self):
        p = self.props
        return (
            f"torch {self.torch.__version__} (CUDA {self.torch.version.cuda}) on {p.name}, "
            f"{p.multi_processor_count} SMs, L2 {self.l2 >> 20} MiB "
            f"(flush {self.flush.numel() >> 20} MiB per timed call)"
        )

    def time(self, fn, iters):
        """(median, min, mean, max) microseconds per call."""
        cuda = self.torch.cuda
        for _ in range(3):
            fn()
        starts = [cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            self.flush.fill_(i & 0xFF)
            starts[i].record()
            fn()
            ends[i].record()
        cuda.synchronize()
        us = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
        return statistics.median(us), min(us), statistics.fmean(us), max(us)

    def copy_gbps(self):
        """Device-to-device copy bandwidth, (read + write bytes) / time, of a 1 GiB copy (median
        of five after two untimed): bench/common's copy_bandwidth, the same way."""
        cuda = self.torch.cuda
        half = 1 << 30
        buf = self.torch.empty(2 * half, dtype=self.torch.uint8, device="cuda")
        src, dst = buf[half:], buf[:half]
        us = []
        for _ in range(7):
            start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            us.append(start.elapsed_time(end) * 1e3)
        del buf, src, dst
        return 2 * half / (statistics.median(us[2:]) * 1e-6) / 1e9
