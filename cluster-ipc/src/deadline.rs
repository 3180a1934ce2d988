//! Deadlines, and the time left until them, the one way every blocking wait of a cluster
//! computes them.
//!
//! ```
//! use std::time::Duration;
//!
//! let deadline = cluster_ipc::deadline::after(Duration::from_millis(1500));
//! let left = cluster_ipc::deadline::left(deadline).expect("not passed yet");
//! assert!(left <= Duration::from_millis(1500) && left.subsec_micros() % 1000 == 0);
//! assert_eq!(cluster_ipc::deadline::left(std::time::Instant::now()), None);
//! ```

use std::time::{Duration, Instant};

/// A year: what an unbounded timeout saturates to.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365);

/// A deadline `timeout` from now, saturating far in the future instead of overflowing (so
/// `Duration::MAX` means "for ever" without a panic).
pub fn after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout).unwrap_or(now + FAR_FUTURE)
}

/// The time left until `deadline`, rounded up to whole milliseconds so that a wait with a
/// millisecond timeout (`poll(2)`, `epoll_wait`) never spins on a sub-millisecond remainder;
/// `None` once the deadline has passed.
pub fn left(deadline: Instant) -> Option<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return None;
    }
    let millis = u64::try_from(left.as_micros().div_ceil(1000)).unwrap_or(u64::MAX);
    Some(Duration::from_millis(millis))
}
