//! `portcullis-proxy wait-ready`: blocks until the proxy's admin `/ready` answers 200.
//!
//! Where the API server predates native sidecars (< 1.29) the injector makes the proxy
//! the first regular container with this command as its `postStart` hook: the kubelet
//! starts containers in order and does not start the next one until the previous
//! container's `postStart` hook returns, so application containers start only once the
//! proxy is ready and the iptables redirect has somewhere to go.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::InitError;

/// Arguments of `portcullis-proxy wait-ready`.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct WaitReadyArgs {
    /// Address of the proxy's admin server.
    #[arg(long, default_value = "127.0.0.1:4191")]
    pub admin_addr: SocketAddr,
    /// Give up after this long (e.g. `120s`, `2m`).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

const POLL: Duration = Duration::from_millis(200);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// Polls `GET /ready` until it answers 200 or `args.timeout` passes.
pub fn run_wait_ready(args: &WaitReadyArgs) -> Result<(), InitError> {
    let deadline = Instant::now() + args.timeout;
    loop {
        let last = match probe(args.admin_addr) {
            Ok(200) => return Ok(()),
            Ok(status) => format!("/ready answered {status}"),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(InitError::NotReady {
                addr: args.admin_addr,
                waited: args.timeout,
                last,
            });
        }
        std::thread::sleep(POLL);
    }
}

/// One `GET /ready`; the status code.
fn probe(addr: SocketAddr) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, ATTEMPT_TIMEOUT)?;
    stream.set_read_timeout(Some(ATTEMPT_TIMEOUT))?;
    stream.set_write_timeout(Some(ATTEMPT_TIMEOUT))?;
    // One write: a server that answers after the first segment must not see a second.
    let request = format!("GET /ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        match stream.read(&mut head[read..])? {
            0 => break,
            n => read += n,
        }
    }
    // "HTTP/1.1 200 OK"
    std::str::from_utf8(&head[..read])
        .ok()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP response"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn waits_until_ready_answers_200() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicU32::new(0));
        let counter = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 256];
                while !request.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let status = if n < 2 {
                    "503 Service Unavailable"
                } else {
                    "200 OK"
                };
                let _ = write!(stream, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
            }
        });
        let args = WaitReadyArgs {
            admin_addr: addr,
            timeout: Duration::from_secs(10),
        };
        run_wait_ready(&args).unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn gives_up_with_the_last_error() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let args = WaitReadyArgs {
            admin_addr: addr,
            timeout: Duration::from_millis(300),
        };
        let err = run_wait_ready(&args).unwrap_err();
        assert!(err.to_string().contains("not ready"), "{err}");
    }
}
