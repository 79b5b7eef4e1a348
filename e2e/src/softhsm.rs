//! SoftHSM2 for the pkcs11 KEK provider's tests and benchmarks: where its module is,
//! and a token directory of one's own (SoftHSM reads `SOFTHSM2_CONF` once per process).

use std::path::{Path, PathBuf};

/// SoftHSM's PKCS#11 module where Debian and a source build put it.
pub fn module() -> Option<PathBuf> {
    let arch = std::env::consts::ARCH;
    [
        "/usr/lib/softhsm/libsofthsm2.so".to_owned(),
        format!("/usr/lib/{arch}-linux-gnu/softhsm/libsofthsm2.so"),
        "/usr/local/lib/softhsm/libsofthsm2.so".to_owned(),
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// Writes `dir/softhsm2.conf` with its tokens in `dir/tokens`; returns the conf file
/// for `SOFTHSM2_CONF`.
pub fn write_conf(dir: &Path) -> std::io::Result<PathBuf> {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens)?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )?;
    Ok(conf)
}
