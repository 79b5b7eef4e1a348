//! The policy store: readers load the current bundle lock-free; a new bundle replaces
//! it only when its version is newer, so a stale or replayed bundle can never roll a
//! revocation back.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use super::CompiledPolicy;

/// What [`PolicyStore::install`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Install {
    /// The bundle is now in force.
    Installed {
        /// Its version.
        version: u64,
    },
    /// The bundle was not newer than the one in force and was ignored.
    Stale {
        /// The version in force.
        current: u64,
        /// The version offered.
        offered: u64,
    },
}

/// The current policy bundle, swapped atomically; cheap to clone.
#[derive(Clone, Default)]
pub struct PolicyStore {
    current: Arc<ArcSwapOption<CompiledPolicy>>,
    // Serialises writers only; readers never take it.
    writer: Arc<Mutex<()>>,
    changes: Arc<watch::Sender<u64>>,
}

impl std::fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyStore")
            .field("version", &self.load().map(|b| b.version))
            .finish()
    }
}

impl PolicyStore {
    /// An empty store: every request is refused with 503 until a bundle arrives.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bundle in force. Lock-free.
    pub fn load(&self) -> Option<Arc<CompiledPolicy>> {
        self.current.load_full()
    }

    /// Whether a bundle was ever installed.
    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }

    /// Installs `bundle` (a `PolicyBundle` or an already compiled policy) if it is newer
    /// than the one in force.
    pub fn install(&self, bundle: impl Into<CompiledPolicy>) -> Install {
        let bundle = bundle.into();
        let _guard = self
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let offered = bundle.version;
        if let Some(current) = self.current.load().as_ref()
            && current.version >= offered
        {
            return Install::Stale {
                current: current.version,
                offered,
            };
        }
        self.current.store(Some(Arc::new(bundle)));
        self.changes.send_replace(offered);
        Install::Installed { version: offered }
    }

    /// A receiver whose value is the version in force, changing on every install.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use portcullis_crds::PolicyBundle;

    use super::*;

    fn bundle(version: u64) -> PolicyBundle {
        PolicyBundle {
            version,
            tenant: "acme".into(),
            ..PolicyBundle::default()
        }
    }

    #[test]
    fn only_newer_versions_replace_the_bundle() {
        let store = PolicyStore::new();
        assert!(!store.is_ready());
        assert_eq!(store.install(bundle(2)), Install::Installed { version: 2 });
        assert_eq!(
            store.install(bundle(1)),
            Install::Stale {
                current: 2,
                offered: 1
            }
        );
        assert_eq!(
            store.install(bundle(2)),
            Install::Stale {
                current: 2,
                offered: 2
            }
        );
        assert_eq!(store.load().map(|b| b.version), Some(2));
        assert_eq!(store.install(bundle(3)), Install::Installed { version: 3 });
        assert_eq!(*store.subscribe().borrow(), 3);
    }
}
