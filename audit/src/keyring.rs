//! Tenant data-encryption keys (DEKs) by version. Old versions stay in the ring after
//! rotation so old segments remain readable until retention removes them.
//!
//! Key-ring file (CLI `--key-ring`): a JSON object of version → base64 key,
//! `{"1":"<base64 32 bytes>","2":"…"}`. Single key file (`--dek-file`): the 32 raw bytes,
//! or their base64 or hex, optionally followed by a newline.

use crate::error::Error;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use std::collections::BTreeMap;
use std::fmt;

/// Length of an AES-256 key.
pub const KEY_LEN: usize = 32;

/// One DEK with its version. `Debug` shows only the version.
#[derive(Clone, PartialEq, Eq)]
pub struct DataKey {
    version: u32,
    bytes: [u8; KEY_LEN],
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("version", &self.version)
            .field("bytes", &"<redacted>")
            .finish()
    }
}

impl DataKey {
    /// A key from its 32 bytes.
    pub fn new(version: u32, bytes: [u8; KEY_LEN]) -> Self {
        DataKey { version, bytes }
    }

    /// A key from a slice, which must be 32 bytes.
    pub fn from_slice(version: u32, bytes: &[u8]) -> Result<Self, Error> {
        let bytes: [u8; KEY_LEN] = bytes.try_into().map_err(|_| {
            Error::DataKey(format!(
                "DEK version {version} has {} bytes, expected {KEY_LEN}",
                bytes.len()
            ))
        })?;
        Ok(DataKey { version, bytes })
    }

    /// A random key, for tests and demos (the operator makes the real ones).
    pub fn generate(version: u32) -> Self {
        DataKey {
            version,
            bytes: rand::random(),
        }
    }

    /// The key version (written into each segment header).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The key bytes; only the cipher should see them.
    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }
}

/// Parses key material: 32 raw bytes, or base64 / hex text of 32 bytes.
pub fn parse_key_material(version: u32, raw: &[u8]) -> Result<DataKey, Error> {
    if raw.len() == KEY_LEN {
        return DataKey::from_slice(version, raw);
    }
    let text = std::str::from_utf8(raw)
        .map_err(|_| Error::DataKey("key file is neither 32 raw bytes nor text".into()))?
        .trim();
    if text.len() == 2 * KEY_LEN
        && let Ok(bytes) = hex::decode(text)
    {
        return DataKey::from_slice(version, &bytes);
    }
    let bytes = B64
        .decode(text)
        .map_err(|_| Error::DataKey("key is not 32 bytes of base64 or hex".into()))?;
    DataKey::from_slice(version, &bytes)
}

/// DEKs by version, plus optionally one key to try for any version.
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: BTreeMap<u32, DataKey>,
    any_version: Option<DataKey>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .field("any_version", &self.any_version.is_some())
            .finish()
    }
}

impl KeyRing {
    /// An empty ring.
    pub fn new() -> Self {
        KeyRing::default()
    }

    /// A ring holding `keys`.
    pub fn from_keys(keys: impl IntoIterator<Item = DataKey>) -> Self {
        let mut ring = KeyRing::new();
        for key in keys {
            ring.insert(key);
        }
        ring
    }

    /// A ring with one key used whatever version a segment names (CLI `--dek-file`).
    pub fn single_for_any_version(key: DataKey) -> Self {
        KeyRing {
            keys: BTreeMap::new(),
            any_version: Some(key),
        }
    }

    /// Adds or replaces a version.
    pub fn insert(&mut self, key: DataKey) {
        self.keys.insert(key.version, key);
    }

    /// The key for `version`.
    pub fn get(&self, version: u32) -> Option<&DataKey> {
        self.keys.get(&version).or(self.any_version.as_ref())
    }

    /// Versions held.
    pub fn versions(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// Parses a key-ring file (see the module docs).
    pub fn from_json(text: &str) -> Result<Self, Error> {
        let map: BTreeMap<String, String> = serde_json::from_str(text).map_err(|_| {
            Error::DataKey("key ring must be a JSON object of version -> base64 key".into())
        })?;
        let mut ring = KeyRing::new();
        for (version, key) in map {
            let version: u32 = version.parse().map_err(|_| {
                Error::DataKey(format!("key ring version {version:?} is not a number"))
            })?;
            ring.insert(parse_key_material(version, key.as_bytes())?);
        }
        Ok(ring)
    }

    /// Serialises the ring in the key-ring file format.
    pub fn to_json(&self) -> String {
        let map: BTreeMap<String, String> = self
            .keys
            .iter()
            .map(|(v, k)| (v.to_string(), B64.encode(k.bytes)))
            .collect();
        serde_json::to_string(&map).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_key_bytes() {
        let key = DataKey::new(3, [0xAB; 32]);
        let ring = KeyRing::from_keys([key.clone()]);
        for text in [format!("{key:?}"), format!("{ring:?}")] {
            assert!(
                !text.to_lowercase().contains("ab, ab") && !text.contains("171"),
                "{text}"
            );
        }
    }

    #[test]
    fn key_material_forms() -> Result<(), Error> {
        let bytes = [7u8; 32];
        assert_eq!(parse_key_material(1, &bytes)?.bytes(), &bytes);
        assert_eq!(
            parse_key_material(1, hex::encode(bytes).as_bytes())?.bytes(),
            &bytes
        );
        let b64 = format!("{}\n", B64.encode(bytes));
        assert_eq!(parse_key_material(1, b64.as_bytes())?.bytes(), &bytes);
        assert!(parse_key_material(1, b"short").is_err());
        Ok(())
    }

    #[test]
    fn ring_json_round_trip() -> Result<(), Error> {
        let ring = KeyRing::from_keys([DataKey::generate(1), DataKey::generate(2)]);
        let back = KeyRing::from_json(&ring.to_json())?;
        assert_eq!(back.versions(), vec![1, 2]);
        assert_eq!(back.get(2), ring.get(2));
        assert!(back.get(3).is_none());
        Ok(())
    }
}
