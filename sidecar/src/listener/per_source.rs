//! At most a fixed number of open connections from one source address, so a single
//! client cannot hold every slot of a listener and starve the others.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

/// Open connections per source address.
#[derive(Debug)]
pub struct SourceSlots {
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One source's hold on a slot; released on drop.
#[derive(Debug)]
pub struct SourceSlot {
    slots: Arc<SourceSlots>,
    source: IpAddr,
}

impl SourceSlots {
    /// Slots for at most `limit` connections per source.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `source`, or `None` when it already holds `limit` connections.
    pub fn try_take(self: &Arc<Self>, source: IpAddr) -> Option<SourceSlot> {
        let source = source.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(source).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            slots: self.clone(),
            source,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self
            .slots
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn each_source_gets_its_own_limit_and_slots_come_back() {
        let slots = SourceSlots::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = slots.try_take(a).unwrap();
        let _second = slots.try_take(a).unwrap();
        assert!(slots.try_take(a).is_none());
        // The IPv4-mapped spelling is the same source.
        assert!(slots.try_take("::ffff:10.0.0.1".parse().unwrap()).is_none());
        assert!(slots.try_take(b).is_some());
        drop(first);
        assert!(slots.try_take(a).is_some());
    }
}
