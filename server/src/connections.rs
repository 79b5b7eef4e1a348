//! Which connections a server holds, and which one gives way: a cap on all
//! connections and one per source IP, and, when the server is full, the connection idle
//! the longest (no request in flight; a TLS handshake in progress counts as idle) is
//! closed to make room. A connection is refused only when the server is full of busy
//! ones. So neither idle nor half-open connections can keep a new client out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why a new connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The source already holds its share of connections.
    PerSourceCap,
    /// Every connection is busy with a request.
    AllBusy,
}

/// Requests in flight on one connection, and since when it has had none.
#[derive(Clone, Copy, Debug)]
struct Activity {
    in_flight: usize,
    idle_since: Instant,
}

/// One admitted connection, as the registry and its own task see it.
#[derive(Debug)]
pub struct Connection {
    activity: watch::Sender<Activity>,
    /// Cancelled when the connection is evicted to make room for another.
    evicted: CancellationToken,
}

impl Connection {
    fn new() -> Self {
        Self {
            activity: watch::Sender::new(Activity {
                in_flight: 0,
                idle_since: Instant::now(),
            }),
            evicted: CancellationToken::new(),
        }
    }

    /// Marks a request in flight until the returned guard drops (with the response
    /// body, so a streamed response keeps the connection busy).
    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        self.activity.send_modify(|a| a.in_flight += 1);
        InFlight(self.clone())
    }

    /// Resolves once the connection has had no request in flight for `idle`
    /// (whatever else the client sends, HTTP/2 pings included).
    pub async fn idle_for(&self, idle: std::time::Duration) {
        let mut rx = self.activity.subscribe();
        loop {
            let activity = *rx.borrow_and_update();
            if activity.in_flight > 0 {
                if rx.changed().await.is_err() {
                    return;
                }
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep_until(activity.idle_since + idle) => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Resolves when the registry evicts this connection.
    pub async fn evicted(&self) {
        self.evicted.cancelled().await;
    }

    /// Since when the connection has been idle; `None` while a request is in flight.
    fn idle_since(&self) -> Option<Instant> {
        let activity = *self.activity.borrow();
        (activity.in_flight == 0).then_some(activity.idle_since)
    }
}

/// A request in flight on a connection.
#[derive(Debug)]
pub struct InFlight(Arc<Connection>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.activity.send_modify(|a| {
            a.in_flight = a.in_flight.saturating_sub(1);
            if a.in_flight == 0 {
                a.idle_since = Instant::now();
            }
        });
    }
}

#[derive(Debug, Default)]
struct Held {
    next_id: u64,
    connections: HashMap<u64, (IpAddr, Arc<Connection>)>,
    per_source: HashMap<IpAddr, usize>,
}

impl Held {
    fn remove(&mut self, id: u64) -> Option<Arc<Connection>> {
        let (ip, connection) = self.connections.remove(&id)?;
        if let Some(count) = self.per_source.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&ip);
            }
        }
        Some(connection)
    }
}

/// The connections of one server.
#[derive(Debug)]
pub struct Registry {
    max: usize,
    max_per_source: usize,
    held: Mutex<Held>,
}

impl Registry {
    /// At most `max` connections, `max_per_source` from one IP address.
    pub fn new(max: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            max_per_source: max_per_source.max(1),
            held: Mutex::new(Held::default()),
        })
    }

    /// Admits a connection from `source`, evicting the longest-idle one when full.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Slot, Refusal> {
        let source = source.to_canonical();
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.per_source.get(&source).copied().unwrap_or(0) >= self.max_per_source {
            return Err(Refusal::PerSourceCap);
        }
        if held.connections.len() >= self.max {
            let longest_idle = held
                .connections
                .iter()
                .filter_map(|(id, (_, c))| c.idle_since().map(|since| (since, *id)))
                .min()
                .map(|(_, id)| id);
            let evicted = longest_idle
                .and_then(|id| held.remove(id))
                .ok_or(Refusal::AllBusy)?;
            evicted.evicted.cancel();
        }
        let id = held.next_id;
        held.next_id += 1;
        let connection = Arc::new(Connection::new());
        held.connections.insert(id, (source, connection.clone()));
        *held.per_source.entry(source).or_insert(0) += 1;
        Ok(Slot {
            registry: self.clone(),
            id,
            connection,
        })
    }

    /// Connections held now.
    pub fn len(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .connections
            .len()
    }

    /// Whether no connection is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An admitted connection's place in the registry, given back on drop.
#[derive(Debug)]
pub struct Slot {
    registry: Arc<Registry>,
    id: u64,
    /// The connection's activity and eviction signal.
    pub connection: Arc<Connection>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.registry
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[tokio::test]
    async fn one_source_gets_only_its_share() {
        let registry = Registry::new(10, 2);
        let _a1 = registry.admit(A);
        let _a2 = registry.admit(A);
        assert_eq!(registry.admit(A).err(), Some(Refusal::PerSourceCap));
        assert!(registry.admit(B).is_ok());
    }

    #[tokio::test]
    async fn a_full_server_evicts_the_longest_idle_connection() {
        let registry = Registry::new(2, 2);
        let Ok(first) = registry.admit(A) else {
            panic!("admitted")
        };
        let Ok(second) = registry.admit(A) else {
            panic!("admitted")
        };
        let _busy = second.connection.begin_request();
        let Ok(third) = registry.admit(B) else {
            panic!("the idle connection makes room")
        };
        assert!(first.connection.evicted.is_cancelled());
        assert!(!second.connection.evicted.is_cancelled());
        let _also_busy = third.connection.begin_request();
        assert_eq!(registry.admit(B).err(), Some(Refusal::AllBusy));
        drop(first);
        assert_eq!(registry.len(), 2, "an evicted slot is not counted twice");
    }
}
