//! Polling until the cluster shows what a test waits for, with the last error in the
//! failure message, and names no other test run uses.

use std::future::Future;
use std::time::{Duration, Instant};

/// Calls `check` every `interval` until it returns `Ok(Some(_))`, or fails after
/// `timeout` naming `what` and the last error `check` returned.
pub async fn until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("not yet");
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            anyhow::bail!("{what}: not within {timeout:?} (last: {last})");
        }
        tokio::time::sleep(interval).await;
    }
}

/// [`until`], asking every 100 ms.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    until(what, timeout, Duration::from_millis(100), check).await
}

/// Six random hex digits: a suffix that keeps names of concurrent tests and runs apart.
pub fn suffix() -> String {
    format!("{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// `<prefix>-<suffix>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", suffix())
}
