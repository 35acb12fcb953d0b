//! `--bwlimit`: a token bucket that paces the background reader.
//!
//! Only the background reader's own reads are charged: copy-before-write
//! reads (made for a guest write, which must not wait for a budget) and
//! holes (captured without reading) cost nothing. Tokens are bytes; they
//! accrue at the limit, in exact integer arithmetic (bytes × nanoseconds),
//! up to a cap. The reader waits for a batch's worth of tokens *before* it
//! claims the batch — never while it holds clusters a guest write may be
//! waiting for — and pays for what it actually read afterwards.
//!
//! The bucket starts empty, so from the reader's start at time 0 the bytes
//! it has read when it starts a read at time `t` never exceed
//! `limit × t`, at any rate, however long each wait (a wait is as long as
//! needed, in one piece, and ends early when the backup ends).

use std::time::Duration;

const NANOS: u128 = 1_000_000_000;

/// Time as the pacing sees it: a real clock in production, a simulated one
/// in tests (so a test at 64 KiB/s takes no minutes and asserts exact
/// budgets instead of elapsed times).
pub trait Clock: Sync {
    /// Time since an arbitrary fixed start.
    fn now(&self) -> Duration;
    /// Sleeps `d`, or less if the backup ends meanwhile.
    fn sleep(&self, d: Duration);
}

/// A token bucket of bytes: `rate` bytes per second, at most `cap` bytes
/// saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u128,
    /// Tokens × 10⁹ (bytes × nanoseconds per second), so refills are exact.
    tokens: u128,
    cap: u128,
    last: Duration,
}

impl TokenBucket {
    /// An empty bucket filling at `rate` bytes per second (at least 1),
    /// holding at most `cap` bytes (at least `rate / 20`, i.e. 50 ms worth,
    /// so fast limits are not held back by the granularity of sleeps), as
    /// of time `now`.
    pub fn new(rate: u64, cap: u64, now: Duration) -> TokenBucket {
        let rate = u128::from(rate.max(1));
        let cap = u128::from(cap).max(rate / 20);
        TokenBucket {
            rate,
            tokens: 0,
            cap: cap * NANOS,
            last: now,
        }
    }

    /// The most bytes the bucket saves up.
    pub fn cap(&self) -> u64 {
        (self.cap / NANOS) as u64
    }

    fn refill(&mut self, now: Duration) {
        if now > self.last {
            let ns = (now - self.last).as_nanos();
            self.tokens = self
                .tokens
                .saturating_add(ns.saturating_mul(self.rate))
                .min(self.cap);
            self.last = now;
        }
    }

    /// How long from `now` until `need` bytes (at most the cap) are
    /// available; zero if they are.
    pub fn wait_for(&mut self, need: u64, now: Duration) -> Duration {
        self.refill(now);
        let need = (u128::from(need) * NANOS).min(self.cap);
        if self.tokens >= need {
            return Duration::ZERO;
        }
        // Round up: after sleeping this long the tokens are there. Tokens
        // accrue only from `last` on (later than `now` while in debt).
        let ns = (need - self.tokens).div_ceil(self.rate);
        let ns = u64::try_from(ns).unwrap_or(u64::MAX);
        Duration::from_nanos(ns).saturating_add(self.last.saturating_sub(now))
    }

    /// Pays for `bytes` read at `now` (may leave the bucket in debt if more
    /// was read than waited for; the next wait pays it back).
    pub fn take(&mut self, bytes: u64, now: Duration) {
        self.refill(now);
        let cost = u128::from(bytes) * NANOS;
        if cost <= self.tokens {
            self.tokens -= cost;
        } else {
            // Debt is not expected (the reader waits for a whole batch),
            // but must not be forgotten: charge it to the future.
            let debt_ns = (cost - self.tokens).div_ceil(self.rate);
            self.tokens = 0;
            self.last += Duration::from_nanos(u64::try_from(debt_ns).unwrap_or(u64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_exactly_as_long_as_the_rate_requires() {
        let mut b = TokenBucket::new(65536, 262144, Duration::ZERO);
        assert_eq!(b.cap(), 262144);
        // Empty at the start: 256 KiB at 64 KiB/s is 4 s away.
        assert_eq!(b.wait_for(262144, Duration::ZERO), Duration::from_secs(4));
        assert_eq!(
            b.wait_for(262144, Duration::from_secs(1)),
            Duration::from_secs(3)
        );
        assert_eq!(b.wait_for(262144, Duration::from_secs(4)), Duration::ZERO);
        b.take(262144, Duration::from_secs(4));
        // Saving up stops at the cap.
        assert_eq!(b.wait_for(262144, Duration::from_secs(100)), Duration::ZERO);
        b.take(262144, Duration::from_secs(100));
        assert_eq!(
            b.wait_for(65536, Duration::from_secs(100)),
            Duration::from_secs(1)
        );
        // Any rate, however low: one byte per second.
        let mut slow = TokenBucket::new(1, 262144, Duration::ZERO);
        assert_eq!(
            slow.wait_for(262144, Duration::ZERO),
            Duration::from_secs(262144)
        );
        // Odd rates round the wait up, never down.
        let mut odd = TokenBucket::new(3, 10, Duration::ZERO);
        let w = odd.wait_for(10, Duration::ZERO);
        assert_eq!(w, Duration::from_nanos(3_333_333_334));
        assert_eq!(odd.wait_for(10, w), Duration::ZERO);
    }

    #[test]
    fn a_fast_rate_saves_up_50_ms() {
        let b = TokenBucket::new(1 << 30, 262144, Duration::ZERO);
        assert_eq!(b.cap(), (1 << 30) / 20);
    }

    #[test]
    fn debt_is_paid_back() {
        let mut b = TokenBucket::new(1000, 1000, Duration::ZERO);
        b.take(3000, Duration::ZERO);
        assert_eq!(b.wait_for(1000, Duration::ZERO), Duration::from_secs(4));
    }
}
