//! A sliding-window limiter: never more than `limit` requests in any `window`.
//!
//! Sentinel's upload host counts requests over a sliding 60-second window. A token bucket
//! that allows a burst of 100 and then refills steadily would let a 101st request through
//! less than 60 seconds after the first and earn a 429; this limiter instead remembers when
//! each of the last `limit` requests started, and a new one waits until the oldest is a full
//! window old. One limiter is shared by the whole process.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

#[derive(Debug)]
pub struct SlidingWindow {
    limit: usize,
    window: Duration,
    /// Start times of the last `limit` requests, oldest first. The lock is held while a
    /// caller waits, so waiters are served in order.
    starts: Mutex<VecDeque<Instant>>,
    /// True while a caller waits for the window to move (shown as progress on a terminal).
    waiting: AtomicBool,
}

impl SlidingWindow {
    pub fn new(limit: usize, window: Duration) -> Self {
        assert!(limit > 0, "a limiter must let something through");
        SlidingWindow {
            limit,
            window,
            starts: Mutex::new(VecDeque::with_capacity(limit)),
            waiting: AtomicBool::new(false),
        }
    }

    /// Sentinel's documented limit: 100 requests a minute.
    pub fn sentinel() -> Self {
        Self::new(100, Duration::from_secs(60))
    }

    /// Whether a request is waiting for the window to move right now.
    pub fn is_waiting(&self) -> bool {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Waits until one more request fits, and counts it.
    pub async fn acquire(&self) {
        let mut starts = self.starts.lock().await;
        if starts.len() == self.limit {
            let oldest = *starts.front().expect("full queue");
            if oldest + self.window > Instant::now() {
                self.waiting.store(true, Ordering::Relaxed);
                tokio::time::sleep_until(oldest + self.window).await;
                self.waiting.store(false, Ordering::Relaxed);
            }
            starts.pop_front();
        }
        starts.push_back(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_full_window_goes_at_once_and_the_next_waits_for_the_first_to_age() {
        let l = SlidingWindow::new(100, Duration::from_secs(60));
        let t0 = Instant::now();
        for _ in 0..100 {
            l.acquire().await;
        }
        assert_eq!(Instant::now() - t0, Duration::ZERO);
        l.acquire().await;
        assert_eq!(Instant::now() - t0, Duration::from_secs(60));
    }

    /// Requests spread over time: every 60-second window holds at most `limit` starts.
    #[tokio::test(start_paused = true)]
    async fn no_window_ever_holds_more_than_the_limit() {
        let l = Arc::new(SlidingWindow::new(10, Duration::from_secs(60)));
        let t0 = Instant::now();
        let mut starts = Vec::new();
        for i in 0..45u64 {
            // Irregular gaps, so bursts and trickles mix.
            tokio::time::sleep(Duration::from_millis((i * 7919) % 9000)).await;
            l.acquire().await;
            starts.push(Instant::now() - t0);
        }
        for (i, s) in starts.iter().enumerate() {
            let in_window = starts[i..]
                .iter()
                .take_while(|t| **t < *s + Duration::from_secs(60))
                .count();
            assert!(
                in_window <= 10,
                "{in_window} requests in the window from {s:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_the_limit() {
        let l = Arc::new(SlidingWindow::new(5, Duration::from_secs(60)));
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..12)
            .map(|_| {
                let l = l.clone();
                tokio::spawn(async move {
                    l.acquire().await;
                    Instant::now() - t0
                })
            })
            .collect();
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap().as_secs());
        }
        times.sort();
        assert_eq!(times, vec![0, 0, 0, 0, 0, 60, 60, 60, 60, 60, 120, 120]);
    }
}
