//! Captures every tracing event of the test process into a buffer, so tests can assert
//! that no secret was ever logged.

use std::{
    io::Write,
    sync::{Mutex, OnceLock},
};

static BUFFER: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

struct Capture;

impl Write for Capture {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        buffer().lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn buffer() -> &'static Mutex<Vec<u8>> {
    BUFFER.get_or_init(|| Mutex::new(Vec::new()))
}

/// Installs the capturing subscriber (TRACE for everything) once per test binary.
pub fn install() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| Capture)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

/// Everything logged so far.
pub fn captured() -> String {
    String::from_utf8_lossy(&buffer().lock().unwrap()).into_owned()
}

/// Panics if `secret` (or its distinctive middle) appears in the logs.
pub fn assert_not_logged(secret: &str) {
    let logs = captured();
    assert!(
        !logs.is_empty(),
        "no logs captured at all; the capture is broken"
    );
    assert!(!logs.contains(secret), "a secret appeared in the logs");
    if secret.len() > 24 {
        assert!(
            !logs.contains(&secret[8..24]),
            "part of a secret appeared in the logs"
        );
    }
}
