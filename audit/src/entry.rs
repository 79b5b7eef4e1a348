//! What travels down the pipeline and lands in sinks: records and checkpoints.

use crate::checkpoint::Checkpoint;
use crate::error::Error;
use crate::record::AuditRecord;
use serde_json::Value;

/// One line of an audit stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// An audit record.
    Record(AuditRecord),
    /// A signed checkpoint.
    Checkpoint(Checkpoint),
}

impl Entry {
    /// True when `value` is a checkpoint object (`"type":"checkpoint"`).
    pub fn is_checkpoint_value(value: &Value) -> bool {
        value.get("type").and_then(Value::as_str) == Some("checkpoint")
    }

    /// Parses a stored JSON object.
    pub fn from_value(value: Value) -> Result<Entry, Error> {
        if Entry::is_checkpoint_value(&value) {
            serde_json::from_value(value)
                .map(Entry::Checkpoint)
                .map_err(|e| Error::Malformed(format!("checkpoint: {e}")))
        } else {
            serde_json::from_value(value)
                .map(Entry::Record)
                .map_err(|e| Error::Malformed(format!("record: {e}")))
        }
    }

    /// Parses one JSON line.
    pub fn from_json_line(line: &str) -> Result<Entry, Error> {
        let value: Value =
            serde_json::from_str(line).map_err(|e| Error::Malformed(e.to_string()))?;
        Entry::from_value(value)
    }

    /// The entry as a JSON value.
    pub fn to_value(&self) -> Result<Value, Error> {
        match self {
            Entry::Record(r) => serde_json::to_value(r),
            Entry::Checkpoint(c) => serde_json::to_value(c),
        }
        .map_err(|e| Error::Serialize(e.to_string()))
    }

    /// The entry as one line of JSON, without the newline.
    pub fn to_json_line(&self) -> Result<String, Error> {
        let mut out = Vec::with_capacity(512);
        self.write_json_line(&mut out)?;
        String::from_utf8(out).map_err(|e| Error::Serialize(e.to_string()))
    }

    /// Appends the entry as one line of JSON, without the newline, to `out`. Records
    /// take the direct path ([`AuditRecord::write_json_line`]).
    pub fn write_json_line(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        match self {
            Entry::Record(r) => r.write_json_line(out),
            Entry::Checkpoint(c) => {
                serde_json::to_writer(out, c).map_err(|e| Error::Serialize(e.to_string()))
            }
        }
    }

    /// When the entry was made.
    pub fn timestamp(&self) -> jiff::Timestamp {
        match self {
            Entry::Record(r) => r.timestamp,
            Entry::Checkpoint(c) => c.timestamp,
        }
    }

    /// The record, if this is one.
    pub fn as_record(&self) -> Option<&AuditRecord> {
        match self {
            Entry::Record(r) => Some(r),
            Entry::Checkpoint(_) => None,
        }
    }
}
