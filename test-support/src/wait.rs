//! Waits bounded by a deadline.

use std::time::{Duration, Instant};

/// The first pause between two tries of [`poll`].
const FIRST_PAUSE: Duration = Duration::from_millis(1);
/// The longest pause between two tries of [`poll`]: short enough that a wait ends soon after
/// its condition holds.
const MAX_PAUSE: Duration = Duration::from_millis(16);

/// A point in time by which a wait must be over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    at: Instant,
    timeout: Duration,
}

impl Deadline {
    /// The deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + timeout,
            timeout,
        }
    }

    /// The moment itself, for APIs that take an `Instant`.
    pub fn instant(&self) -> Instant {
        self.at
    }

    /// How long the wait was given when the deadline was set (for failure messages).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The time left; zero once the deadline has passed.
    pub fn left(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline has passed.
    pub fn passed(&self) -> bool {
        Instant::now() >= self.at
    }
}

/// Calls `probe` until it returns `Ok`, and returns that; once `timeout` has passed, returns
/// the last `Err` instead. `probe` runs at least once, and once more at the deadline; between
/// tries the thread sleeps a little (1 ms at first, at most 16 ms).
pub fn poll<T, E>(timeout: Duration, mut probe: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let deadline = Deadline::after(timeout);
    let mut pause = FIRST_PAUSE;
    loop {
        let result = probe();
        if result.is_ok() || deadline.passed() {
            return result;
        }
        std::thread::sleep(pause.min(deadline.left()));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Polls `condition` until it holds (see [`poll`]); panics, naming `what`, if it does not
/// within `timeout`. For states that nothing announces; where an event or a channel says
/// when something happened, wait on that instead.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let held = poll(timeout, || if condition() { Ok(()) } else { Err(()) });
    if held.is_err() {
        panic!("{what}: not within {timeout:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_counts_down_and_passes() {
        let deadline = Deadline::after(Duration::from_secs(60));
        assert!(!deadline.passed());
        assert!(deadline.left() > Duration::from_secs(59));
        assert_eq!(deadline.timeout(), Duration::from_secs(60));
        let past = Deadline::after(Duration::ZERO);
        assert!(past.passed());
        assert_eq!(past.left(), Duration::ZERO);
    }

    #[test]
    fn poll_returns_as_soon_as_the_probe_succeeds() {
        let mut tries = 0;
        let result: Result<u32, u32> = poll(Duration::from_secs(60), || {
            tries += 1;
            if tries == 3 { Ok(tries) } else { Err(tries) }
        });
        assert_eq!(result, Ok(3));
    }

    #[test]
    fn poll_returns_the_last_error_at_the_deadline() {
        let mut tries = 0;
        let result: Result<(), u32> = poll(Duration::from_millis(20), || {
            tries += 1;
            Err(tries)
        });
        // At least the first try and the one at the deadline.
        assert!(matches!(result, Err(n) if n >= 2), "{result:?}");
    }

    #[test]
    fn wait_until_sees_a_condition_another_thread_makes_true() {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let setter = {
            let done = done.clone();
            std::thread::spawn(move || done.store(true, std::sync::atomic::Ordering::SeqCst))
        };
        wait_until("the flag is set", Duration::from_secs(10), || {
            done.load(std::sync::atomic::Ordering::SeqCst)
        });
        setter
            .join()
            .unwrap_or_else(|_| panic!("the setter panicked"));
    }

    #[test]
    #[should_panic(expected = "never: not within")]
    fn wait_until_fails_at_the_deadline() {
        wait_until("never", Duration::from_millis(10), || false);
    }
}
