//! How fast one peer may push live changes (`p2p_peer_max_changes_per_second`).
//!
//! A till's people write a few changes a second; a script holding the shop secret can push
//! tens of thousands (18,500 products in a second in a probe), which every till then stores
//! and relays. Refusing the excess would open gaps that catch-up fills at once, so the
//! excess is *delayed* instead: the connection applies a run of live changes only when the
//! peer's budget allows it, and reads nothing from that peer meanwhile, so TCP pushes back on
//! the sender. Bursts of ten seconds' worth pass at once (a manager importing a catalog on
//! one till is not slowed for a few thousand products). Catch-up batches are not counted:
//! this node asks for them and acknowledges each before the next comes.
//!
//! The budget is a GCRA bucket from the `governor` crate.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Seconds of the rate that may pass at once.
const BURST_SECONDS: u32 = 10;

/// One peer connection's budget of live changes.
pub struct LiveChangeBudget {
    per_second: u32,
    burst: NonZeroU32,
    limiter: DefaultDirectRateLimiter,
}

impl LiveChangeBudget {
    /// A budget of `per_second` changes (at least 1), bursts of ten seconds' worth.
    pub fn new(per_second: u32) -> LiveChangeBudget {
        let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        let burst = rate.saturating_mul(NonZeroU32::new(BURST_SECONDS).unwrap_or(NonZeroU32::MIN));
        LiveChangeBudget {
            per_second: rate.get(),
            burst,
            limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
        }
    }

    /// The rate this budget enforces.
    pub fn per_second(&self) -> u32 {
        self.per_second
    }

    /// Waits until `changes` live changes fit the budget and takes them. Returns how long it
    /// waited (zero when they fitted at once).
    pub async fn admit(&self, changes: usize) -> Duration {
        let started = Instant::now();
        let mut left = u32::try_from(changes).unwrap_or(u32::MAX);
        while let Some(chunk) = NonZeroU32::new(left.min(self.burst.get())) {
            // A chunk never exceeds the burst, so the limiter can always grant it.
            if self.limiter.until_n_ready(chunk).await.is_err() {
                break;
            }
            left -= chunk.get();
        }
        started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_passes_at_once_and_the_excess_waits_for_the_rate() {
        let budget = LiveChangeBudget::new(100);
        // Ten seconds' worth at once.
        assert!(budget.admit(1_000).await < Duration::from_millis(50));
        // Then 20 more need about 0.2 s at 100 a second.
        let waited = budget.admit(20).await;
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
    }

    #[tokio::test]
    async fn more_than_a_burst_in_one_run_is_admitted_in_pieces_not_refused() {
        let budget = LiveChangeBudget::new(50);
        let waited = budget.admit(520).await;
        // 500 at once, 20 more at 50 a second.
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        assert!(waited < Duration::from_secs(3), "{waited:?}");
        assert_eq!(LiveChangeBudget::new(0).per_second(), 1);
    }
}
