//! The link budget: one token bucket shared by every blob being fetched, so `[download]
//! max_rate` holds for the box's link as a whole. Reads wait for tokens; the kernel's receive
//! window then keeps the sender at the same pace.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct RateLimiter {
    /// Bytes per second; 0 = unlimited.
    rate: u64,
    /// (last refill, tokens; negative = debt).
    state: Mutex<(Instant, f64)>,
}

impl RateLimiter {
    pub fn new(rate: u64) -> RateLimiter {
        RateLimiter {
            rate,
            state: Mutex::new((Instant::now(), 0.0)),
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// How many bytes to read at once: 1/32 s of budget (at least 16 KiB). Small reads matter on
    /// the wire: the kernel grows a socket's receive window after the bytes one read copies, and
    /// a large window lets the sender run megabytes ahead of the limit.
    pub fn chunk(&self, max: usize) -> usize {
        if self.rate == 0 {
            return max;
        }
        ((self.rate / 32) as usize).clamp(16 * 1024, max.max(16 * 1024))
    }

    /// How long to wait before reading `n` more bytes, given the clock `now`; records them.
    /// The bucket holds at most a quarter second of budget, so an idle link does not earn a burst.
    pub fn reserve_at(&self, n: usize, now: Instant) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let rate = self.rate as f64;
        let elapsed = now.saturating_duration_since(s.0).as_secs_f64();
        s.1 = (s.1 + elapsed * rate).min(rate / 4.0);
        s.0 = now;
        s.1 -= n as f64;
        if s.1 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.1 / rate)
        }
    }

    /// Block the calling (blocking) thread until `n` bytes fit in the budget.
    pub fn take(&self, n: usize) {
        let wait = self.reserve_at(n, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let r = RateLimiter::new(0);
        assert_eq!(r.reserve_at(1 << 30, Instant::now()), Duration::ZERO);
        assert_eq!(r.chunk(65536), 65536);
    }

    #[test]
    fn holds_the_rate_over_time() {
        // 100 KiB/s; read 10 MiB in chunks with a simulated clock that advances by the waits.
        let r = RateLimiter::new(100 * 1024);
        let chunk = r.chunk(64 * 1024);
        assert_eq!(chunk, 16 * 1024);
        assert_eq!(RateLimiter::new(1 << 20).chunk(64 * 1024), 32 * 1024);
        let t0 = Instant::now();
        let mut now = t0;
        let mut total = 0usize;
        while total < 10 * 1024 * 1024 {
            now += r.reserve_at(chunk, now);
            total += chunk;
        }
        let secs = now.duration_since(t0).as_secs_f64();
        let rate = total as f64 / secs;
        assert!((rate / (100.0 * 1024.0) - 1.0).abs() < 0.02, "{rate} B/s");
    }

    #[test]
    fn an_idle_link_earns_no_burst() {
        let r = RateLimiter::new(1000);
        let t0 = Instant::now();
        // An hour idle, then 1000 bytes: at most a quarter second of them is free.
        let w = r.reserve_at(1000, t0 + Duration::from_secs(3600));
        assert!(w >= Duration::from_millis(740), "{w:?}");
    }
}
