//! How to react to an HTTP answer, and how long to wait before trying again.
//!
//! Pure: `classify` looks at a status, the `Retry-After` header and the body; `Backoff` yields
//! bounded delays. Both clients (Mandiant and Sentinel) use them, so the two agree on what is
//! transient. Every retry loop in the product is bounded by `RetryPolicy::max_attempts`.

use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::Instant;

/// What to do with one HTTP answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: use the answer.
    Success,
    /// 429: throttled; wait this long if the server said, else back off.
    Throttled(Option<Duration>),
    /// 5xx, 408, or a proxy's error page: transient, back off and resend the same request.
    Transient,
    /// 401 (and for Mandiant 403): refresh the token once, then give up.
    Unauthorized,
    /// Anything else: the request itself is wrong; resending will not help.
    Fatal,
}

pub fn classify(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    now: OffsetDateTime,
) -> Outcome {
    match status {
        200..=299 => Outcome::Success,
        429 => Outcome::Throttled(
            retry_after
                .and_then(|h| parse_retry_after(h, now))
                .or_else(|| try_again_in(body)),
        ),
        401 => Outcome::Unauthorized,
        408 | 500 | 502 | 503 | 504 => Outcome::Transient,
        // Other 5xx (501, 505…) say the request cannot be served as sent.
        _ => Outcome::Fatal,
    }
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: OffsetDateTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822).ok()?;
    let delta = when - now;
    Some(if delta.is_positive() {
        Duration::from_secs_f64(delta.as_seconds_f64())
    } else {
        Duration::ZERO
    })
}

/// Sentinel's 429 body: `{"statusCode":429,"message":"Rate limit is exceeded. Try again in 12 seconds."}`.
pub fn try_again_in(body: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("Try again in ")? + "Try again in ".len();
    let digits: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok().map(Duration::from_secs)
}

/// Limits shared by the retry loops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// The first backoff delay; each later one doubles.
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// A server asking for a longer wait than this is waited for this long only; the attempt
    /// bound still ends the loop.
    pub max_retry_after: Duration,
    /// Per-request timeout; a hung response counts as transient.
    pub request_timeout: Duration,
}

impl RetryPolicy {
    pub const DEFAULT: RetryPolicy = RetryPolicy {
        max_attempts: 6,
        base_delay: Duration::from_secs(2),
        max_delay: Duration::from_secs(60),
        max_retry_after: Duration::from_secs(120),
        request_timeout: Duration::from_secs(120),
    };

    /// The wait before attempt `attempt + 1` (attempt counts from 1), without jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base_delay
            .checked_mul(factor)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }

    /// The wait for a throttled answer: what the server asked (capped), else backoff.
    pub fn throttle_wait(&self, asked: Option<Duration>, attempt: u32) -> Duration {
        match asked {
            Some(d) => d.min(self.max_retry_after),
            None => self.backoff(attempt),
        }
    }
}

/// A retry wait would end after the cycle's deadline; `retrying` says what failed last, so a
/// budget stop caused by an unreachable service names it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the cycle's time budget ends before the next retry could be sent (retrying after: {retrying})"
)]
pub struct OutOfTime {
    pub retrying: String,
}

/// The deadline of the cycle a client works for; `None` outside a cycle (`check`).
#[derive(Debug, Default)]
pub struct Deadline(std::sync::Mutex<Option<Instant>>);

impl Deadline {
    pub fn set(&self, deadline: Option<Instant>) {
        *self.0.lock().expect("deadline lock") = deadline;
    }

    /// Sleeps `wait`, unless that would pass the deadline: then the caller stops cleanly
    /// instead of overrunning the Functions timeout with retries.
    pub async fn sleep(&self, wait: Duration, retrying: &str) -> Result<(), OutOfTime> {
        let deadline = *self.0.lock().expect("deadline lock");
        if deadline.is_some_and(|d| Instant::now() + wait >= d) {
            return Err(OutOfTime {
                retrying: retrying.to_string(),
            });
        }
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-12-03 12:00:00 UTC);

    #[test]
    fn classification_table() {
        let table: &[(u16, Option<&str>, &str, Outcome)] = &[
            (200, None, "", Outcome::Success),
            (204, None, "", Outcome::Success),
            (
                429,
                Some("7"),
                "",
                Outcome::Throttled(Some(Duration::from_secs(7))),
            ),
            (
                429,
                Some("Thu, 03 Dec 2026 12:00:30 GMT"),
                "",
                Outcome::Throttled(Some(Duration::from_secs(30))),
            ),
            (
                429,
                None,
                r#"{"statusCode":429,"message":"Rate limit is exceeded. Try again in 12 seconds."}"#,
                Outcome::Throttled(Some(Duration::from_secs(12))),
            ),
            (429, None, "slow down", Outcome::Throttled(None)),
            (401, None, "", Outcome::Unauthorized),
            (408, None, "", Outcome::Transient),
            (500, None, "", Outcome::Transient),
            (502, None, "<html>Bad gateway</html>", Outcome::Transient),
            (503, None, "", Outcome::Transient),
            (504, None, "", Outcome::Transient),
            (501, None, "", Outcome::Fatal),
            (400, None, "", Outcome::Fatal),
            (403, None, "", Outcome::Fatal),
            (404, None, "", Outcome::Fatal),
        ];
        for (status, ra, body, want) in table {
            assert_eq!(
                classify(*status, *ra, body.as_bytes(), NOW),
                *want,
                "status {status} retry-after {ra:?} body {body:?}"
            );
        }
    }

    #[test]
    fn a_past_http_date_means_now() {
        assert_eq!(
            parse_retry_after("Thu, 03 Dec 2026 11:00:00 GMT", NOW),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", NOW), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_past_the_deadline_is_refused() {
        let d = Deadline::default();
        assert_eq!(d.sleep(Duration::from_secs(3600), "x").await, Ok(()));
        d.set(Some(Instant::now() + Duration::from_secs(10)));
        assert_eq!(d.sleep(Duration::from_secs(5), "x").await, Ok(()));
        assert_eq!(
            d.sleep(Duration::from_secs(5), "HTTP 503").await,
            Err(OutOfTime {
                retrying: "HTTP 503".into()
            })
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = RetryPolicy {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
            ..RetryPolicy::DEFAULT
        };
        let delays: Vec<u64> = (1..=6).map(|a| p.backoff(a).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 10, 10]);
        assert_eq!(p.backoff(200), Duration::from_secs(10));
        assert_eq!(
            p.throttle_wait(Some(Duration::from_secs(3600)), 1),
            p.max_retry_after
        );
        assert_eq!(p.throttle_wait(None, 3), Duration::from_secs(4));
    }
}
