//! The Kubernetes KMS v2 plugin API (`k8s.io/kms/apis/v2/api.proto`, package `v2`,
//! service `KeyManagementService`), written out by hand so no `protoc` is needed. Field
//! numbers are the upstream ones.

use std::collections::HashMap;

/// gRPC path of `Status`.
pub const STATUS_PATH: &str = "/v2.KeyManagementService/Status";
/// gRPC path of `Encrypt`.
pub const ENCRYPT_PATH: &str = "/v2.KeyManagementService/Encrypt";
/// gRPC path of `Decrypt`.
pub const DECRYPT_PATH: &str = "/v2.KeyManagementService/Decrypt";

/// `StatusRequest {}`: polled for health and the current key id.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct StatusRequest {}

/// `StatusResponse`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct StatusResponse {
    /// The plugin API version (`v2`; `v2beta1` from older plugins).
    #[prost(string, tag = "1")]
    pub version: String,
    /// `ok` when healthy; anything else is the failure.
    #[prost(string, tag = "2")]
    pub healthz: String,
    /// The plugin's current KMS key id (the write key).
    #[prost(string, tag = "3")]
    pub key_id: String,
}

/// `EncryptRequest`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct EncryptRequest {
    /// The data to encrypt.
    #[prost(bytes = "vec", tag = "1")]
    pub plaintext: Vec<u8>,
    /// A unique id of this request, for the plugin's logs.
    #[prost(string, tag = "2")]
    pub uid: String,
}

/// `EncryptResponse`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct EncryptResponse {
    /// The encrypted data.
    #[prost(bytes = "vec", tag = "1")]
    pub ciphertext: Vec<u8>,
    /// The KMS key that encrypted it.
    #[prost(string, tag = "2")]
    pub key_id: String,
    /// Metadata the plugin needs back to decrypt; stored in the clear.
    #[prost(map = "string, bytes", tag = "3")]
    pub annotations: HashMap<String, Vec<u8>>,
}

/// `DecryptRequest`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct DecryptRequest {
    /// The data to decrypt.
    #[prost(bytes = "vec", tag = "1")]
    pub ciphertext: Vec<u8>,
    /// A unique id of this request, for the plugin's logs.
    #[prost(string, tag = "2")]
    pub uid: String,
    /// The key id `Encrypt` returned.
    #[prost(string, tag = "3")]
    pub key_id: String,
    /// The annotations `Encrypt` returned.
    #[prost(map = "string, bytes", tag = "4")]
    pub annotations: HashMap<String, Vec<u8>>,
}

/// `DecryptResponse`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct DecryptResponse {
    /// The decrypted data.
    #[prost(bytes = "vec", tag = "1")]
    pub plaintext: Vec<u8>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use prost::Message;

    use super::*;

    /// The wire bytes carry the upstream field numbers.
    #[test]
    fn field_numbers_match_the_upstream_proto() {
        let status = StatusResponse {
            version: "v2".into(),
            healthz: "ok".into(),
            key_id: "k".into(),
        };
        // tag = field << 3 | wire type 2 (length-delimited)
        assert_eq!(
            status.encode_to_vec(),
            [0x0a, 2, b'v', b'2', 0x12, 2, b'o', b'k', 0x1a, 1, b'k']
        );
        let decrypt = DecryptRequest {
            ciphertext: vec![1],
            uid: "u".into(),
            key_id: "k".into(),
            annotations: HashMap::from([("a".into(), vec![2])]),
        };
        let bytes = decrypt.encode_to_vec();
        assert_eq!(&bytes[..9], [0x0a, 1, 1, 0x12, 1, b'u', 0x1a, 1, b'k']);
        // map entry: field 4, entry {1: key, 2: value}
        assert_eq!(&bytes[9..], [0x22, 6, 0x0a, 1, b'a', 0x12, 1, 2]);
        assert_eq!(DecryptRequest::decode(&bytes[..]).unwrap(), decrypt);
        let encrypt = EncryptResponse {
            ciphertext: vec![],
            key_id: "k".into(),
            annotations: HashMap::new(),
        };
        assert_eq!(encrypt.encode_to_vec(), [0x12, 1, b'k']);
    }
}
