//! The time source, injected where tests need to move time (segment rotation,
//! retention, checkpoint timestamps): the workspace's one clock, from
//! `portcullis_api::clock`.

pub use portcullis_api::clock::{Clock, ManualClock, SystemClock};
