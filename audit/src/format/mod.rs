//! Output formats: JSON lines (machine), the one-line human form, and CSV export.

pub mod csv;
pub mod human;
pub mod json;
