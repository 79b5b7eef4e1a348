//! Child processes that cannot outlive the test process.
//!
//! Each control-plane binary runs under a tiny `/bin/sh` supervisor whose stdin is a
//! pipe held by the test process. When the pipe closes — on [`Supervised::drop`], or
//! because the test process exited, panicked or was killed — the supervisor sends the
//! binary SIGTERM, then SIGKILL after five seconds. That is what cleans up the
//! [`shared`](super::shared) instance, which lives in a `static` and is never dropped;
//! a [`Janitor`] removes its directory the same way.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long [`Supervised::stop`] waits before killing the supervisor itself. The
/// supervisor escalates to SIGKILL at 5 s, so this is only reached if `sh` misbehaves.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// `$0` is the process name, `$@` the binary and its arguments. fd 3 keeps the pipe;
/// the binary itself gets no stdin. The exit status is the binary's.
const SUPERVISOR: &str = r#"
exec 3<&0 0</dev/null
"$@" 3<&- &
child=$!
echo "$child" >>"$PORTCULLIS_ENVTEST_PIDS"
(
  cat <&3 >/dev/null
  kill -TERM "$child" 2>/dev/null
  i=0
  while kill -0 "$child" 2>/dev/null; do
    i=$((i + 1))
    if [ "$i" -gt 50 ]; then kill -KILL "$child" 2>/dev/null; break; fi
    sleep 0.1
  done
) &
wait "$child"
"#;

/// `$1` is the directory to remove once the pipe closes and every pid listed in
/// `$1/pids` is gone (bounded at 15 s).
const JANITOR: &str = r#"
cat >/dev/null
i=0
while [ "$i" -lt 150 ]; do
  alive=0
  for p in $(cat "$1/pids" 2>/dev/null); do
    if kill -0 "$p" 2>/dev/null; then alive=1; fi
  done
  if [ "$alive" = 0 ]; then break; fi
  i=$((i + 1))
  sleep 0.1
done
rm -rf -- "$1"
"#;

/// One control-plane binary running under its supervisor.
pub(crate) struct Supervised {
    name: &'static str,
    supervisor: Child,
    lifeline: Option<ChildStdin>,
    log: PathBuf,
}

impl Supervised {
    /// Starts `program args…` in `cwd`, appending stdout and stderr to `log` and its
    /// pid to `pids_file`.
    pub(crate) fn spawn(
        name: &'static str,
        program: &Path,
        args: &[OsString],
        cwd: &Path,
        log: &Path,
        pids_file: &Path,
    ) -> io::Result<Self> {
        let out = File::create(log)?;
        let err = out.try_clone()?;
        let mut supervisor = Command::new("/bin/sh")
            .arg("-c")
            .arg(SUPERVISOR)
            .arg(name)
            .arg(program)
            .args(args)
            .current_dir(cwd)
            .env("PORTCULLIS_ENVTEST_PIDS", pids_file)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()?;
        let lifeline = supervisor.stdin.take();
        Ok(Self {
            name,
            supervisor,
            lifeline,
            log: log.to_path_buf(),
        })
    }

    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// The exit status if the binary has already exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.supervisor.try_wait().ok().flatten()
    }

    /// The last `lines` lines of the binary's log.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// Asks the binary to stop (SIGTERM, SIGKILL after 5 s) without waiting.
    pub(crate) fn begin_stop(&mut self) {
        self.lifeline = None;
    }

    /// Stops the binary and waits (bounded) until it is gone.
    pub(crate) fn stop(&mut self) {
        self.begin_stop();
        wait_bounded(&mut self.supervisor, STOP_TIMEOUT);
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Removes a directory once the test process lets go of it, even if it never runs
/// its destructors.
pub(crate) struct Janitor {
    process: Child,
    lifeline: Option<ChildStdin>,
}

impl Janitor {
    pub(crate) fn spawn(dir: &Path) -> io::Result<Self> {
        let mut process = Command::new("/bin/sh")
            .arg("-c")
            .arg(JANITOR)
            .arg("portcullis-envtest-janitor")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let lifeline = process.stdin.take();
        Ok(Self { process, lifeline })
    }
}

impl Drop for Janitor {
    fn drop(&mut self) {
        self.lifeline = None;
        wait_bounded(&mut self.process, STOP_TIMEOUT);
    }
}

fn wait_bounded(child: &mut Child, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The last `lines` lines of a log file (reading at most its last 64 KiB).
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    const MAX_BYTES: u64 = 64 * 1024;
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
