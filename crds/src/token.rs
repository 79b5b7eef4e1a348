//! The API-key token format: `ak_<keyid>_<secret><checksum>`.
//!
//! - `keyid`: 12 characters of lowercase RFC 4648 base32 (`a-z2-7`), 60 random bits. It
//!   is public: sidecars look a key up by it without scanning.
//! - `secret`: 43 base62 characters (256 bits of entropy).
//! - `checksum`: CRC32 of everything before it, as 6 base62 characters, so a mistyped or
//!   truncated key is refused before any hashing.
//!
//! Only a bcrypt hash of the whole token is ever stored; logs show [`mask`]ed tokens.

use std::fmt;

use rand::Rng;
use subtle::ConstantTimeEq;

/// Every token starts with this.
pub const PREFIX: &str = "ak_";
/// Length of the public key id.
pub const KEY_ID_LEN: usize = 12;
/// Length of the random secret part.
pub const SECRET_LEN: usize = 43;
/// Length of the base62 CRC32 suffix.
pub const CHECKSUM_LEN: usize = 6;
/// Total token length: `ak_` + key id + `_` + secret + checksum.
pub const TOKEN_LEN: usize = PREFIX.len() + KEY_ID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN;
/// bcrypt cost used for stored hashes (about 60 ms on one core of a 2020s server).
pub const HASH_COST: u32 = 10;

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a presented token was refused before any hashing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token does not start with `ak_`.
    #[error("API key must start with \"ak_\"")]
    WrongPrefix,
    /// The token has the wrong number of characters.
    #[error("API key must be {expected} characters long, got {actual}")]
    BadLength {
        /// The only valid length.
        expected: usize,
        /// What was presented.
        actual: usize,
    },
    /// The key id or separator is malformed.
    #[error("API key id must be 12 characters of a-z and 2-7 followed by \"_\"")]
    BadKeyId,
    /// The secret or checksum holds characters outside base62.
    #[error("API key secret must be base62 (0-9, A-Z, a-z)")]
    BadCharacters,
    /// The CRC32 suffix does not match: a typo or a truncated copy.
    #[error("API key checksum does not match: the key was mistyped or truncated")]
    BadChecksum,
}

/// The public, non-secret identifier of a key (`status.keyId`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct KeyId(String);

impl KeyId {
    /// The key id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Accepts a key id read from a status or bundle, checking its alphabet and length.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        if text.len() == KEY_ID_LEN && text.bytes().all(is_base32) {
            Ok(Self(text.to_owned()))
        } else {
            Err(TokenError::BadKeyId)
        }
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

/// A well-formed API key. The secret is never printed: `Debug` and `Display` mask it.
#[derive(Clone)]
pub struct ApiToken {
    text: String,
    key_id: KeyId,
}

impl ApiToken {
    /// Generates a new random token.
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let key_id: String = (0..KEY_ID_LEN)
            .map(|_| BASE32[rng.random_range(0..BASE32.len())] as char)
            .collect();
        let secret: String = (0..SECRET_LEN)
            .map(|_| BASE62[rng.random_range(0..BASE62.len())] as char)
            .collect();
        let body = format!("{PREFIX}{key_id}_{secret}");
        let text = format!("{body}{}", checksum(&body));
        Self {
            text,
            key_id: KeyId(key_id),
        }
    }

    /// Parses a presented token, refusing malformed ones without hashing anything.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let key_id = check(text)?;
        Ok(Self {
            text: text.to_owned(),
            key_id: KeyId(key_id.to_owned()),
        })
    }

    /// The public key id, for lookup.
    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    /// The full secret token. Handle with care: never log it.
    pub fn expose_secret(&self) -> &str {
        &self.text
    }

    /// The form safe for logs and audit records: `ak_***` and the last 3 characters.
    pub fn masked(&self) -> String {
        mask(&self.text)
    }

    /// Computes the bcrypt hash stored in `status.hash`.
    pub fn hash(&self, cost: u32) -> Result<String, bcrypt::BcryptError> {
        bcrypt::hash(&self.text, cost)
    }

    /// Checks the token against a stored bcrypt hash. bcrypt compares in constant time.
    /// A hash that cannot be parsed never verifies.
    pub fn verify(&self, hash: &str) -> bool {
        bcrypt::verify(&self.text, hash).unwrap_or(false)
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiToken({})", self.masked())
    }
}

impl fmt::Display for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

/// Checks a presented token's shape, alphabets and checksum without hashing or
/// allocating, and returns its key id. [`ApiToken::parse`] is this plus an owned copy;
/// the sidecar calls this on every request and parses only when bcrypt has to run.
pub fn check(text: &str) -> Result<&str, TokenError> {
    if !text.starts_with(PREFIX) {
        return Err(TokenError::WrongPrefix);
    }
    if text.len() != TOKEN_LEN {
        return Err(TokenError::BadLength {
            expected: TOKEN_LEN,
            actual: text.chars().count(),
        });
    }
    // Everything valid is ASCII; checking first keeps the byte slicing below safe.
    if !text.is_ascii() {
        return Err(TokenError::BadCharacters);
    }
    let bytes = text.as_bytes();
    let id_end = PREFIX.len() + KEY_ID_LEN;
    let key_id = &text[PREFIX.len()..id_end];
    if !key_id.bytes().all(is_base32) {
        return Err(TokenError::BadKeyId);
    }
    if bytes[id_end] != b'_' {
        return Err(TokenError::BadKeyId);
    }
    // base62 is exactly the ASCII letters and digits; a range check beats a table scan
    // on the hot path (every request with a key).
    if !bytes[id_end + 1..].iter().all(u8::is_ascii_alphanumeric) {
        return Err(TokenError::BadCharacters);
    }
    let (body, sum) = text.split_at(TOKEN_LEN - CHECKSUM_LEN);
    if checksum_digits(body).ct_eq(sum.as_bytes()).unwrap_u8() != 1 {
        return Err(TokenError::BadChecksum);
    }
    Ok(key_id)
}

/// Masks any presented string the way logs show keys: `ak_***` plus its last 3 characters.
/// Strings too short to hide anything are masked whole.
pub fn mask(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() < 12 {
        return "ak_***".to_owned();
    }
    let tail: String = chars[chars.len() - 3..].iter().collect();
    format!("ak_***{tail}")
}

/// RFC 4648 lowercase base32: `a-z` and `2-7`.
fn is_base32(b: u8) -> bool {
    b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)
}

/// CRC32 of `body` as 6 base62 digits (62^6 > 2^32).
fn checksum_digits(body: &str) -> [u8; CHECKSUM_LEN] {
    let mut value = u64::from(crc32fast::hash(body.as_bytes()));
    let mut digits = [b'0'; CHECKSUM_LEN];
    for slot in digits.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    digits
}

/// [`checksum_digits`] as text.
fn checksum(body: &str) -> String {
    checksum_digits(body).iter().map(|&b| b as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_have_the_documented_shape() {
        let token = ApiToken::generate();
        let text = token.expose_secret();
        assert_eq!(text.len(), TOKEN_LEN);
        assert!(text.starts_with("ak_"));
        assert_eq!(&text[15..16], "_");
        let parsed = ApiToken::parse(text).unwrap();
        assert_eq!(parsed.key_id(), token.key_id());
        assert_eq!(parsed.key_id().as_str(), &text[3..15]);
    }

    #[test]
    fn tokens_are_unique() {
        let a = ApiToken::generate();
        let b = ApiToken::generate();
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_ne!(a.key_id(), b.key_id());
    }

    #[test]
    fn wrong_prefix_is_refused() {
        let token = ApiToken::generate();
        let text = token.expose_secret().replacen("ak_", "sk_", 1);
        assert_eq!(ApiToken::parse(&text).unwrap_err(), TokenError::WrongPrefix);
        assert_eq!(ApiToken::parse("").unwrap_err(), TokenError::WrongPrefix);
    }

    #[test]
    fn truncated_or_padded_token_reports_lengths() {
        let token = ApiToken::generate();
        let text = token.expose_secret();
        assert_eq!(
            ApiToken::parse(&text[..TOKEN_LEN - 1]).unwrap_err(),
            TokenError::BadLength {
                expected: TOKEN_LEN,
                actual: TOKEN_LEN - 1
            }
        );
        let padded = format!("{text}x");
        assert!(matches!(
            ApiToken::parse(&padded).unwrap_err(),
            TokenError::BadLength { actual, .. } if actual == TOKEN_LEN + 1
        ));
    }

    #[test]
    fn single_character_typo_fails_the_checksum() {
        let token = ApiToken::generate();
        let mut bytes = token.expose_secret().as_bytes().to_vec();
        let i = 30;
        bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(bytes).unwrap();
        assert_eq!(ApiToken::parse(&typo).unwrap_err(), TokenError::BadChecksum);
    }

    #[test]
    fn bad_key_id_and_characters_are_refused() {
        let token = ApiToken::generate();
        let text = token.expose_secret();
        let upper_id = format!("ak_ABCDEFGHIJKL{}", &text[15..]);
        assert_eq!(
            ApiToken::parse(&upper_id).unwrap_err(),
            TokenError::BadKeyId
        );
        let no_sep = format!("{}-{}", &text[..15], &text[16..]);
        assert_eq!(ApiToken::parse(&no_sep).unwrap_err(), TokenError::BadKeyId);
        let bad_char = format!("{}!{}", &text[..20], &text[21..]);
        assert_eq!(
            ApiToken::parse(&bad_char).unwrap_err(),
            TokenError::BadCharacters
        );
        // Multi-byte characters of the right byte length must not panic the parser.
        let unicode = format!("ak_é{}", &text[5..]);
        assert_eq!(unicode.len(), TOKEN_LEN);
        assert_eq!(
            ApiToken::parse(&unicode).unwrap_err(),
            TokenError::BadCharacters
        );
    }

    #[test]
    fn masking_shows_only_the_last_three_characters() {
        let token = ApiToken::generate();
        let text = token.expose_secret();
        let masked = token.masked();
        assert_eq!(masked, format!("ak_***{}", &text[text.len() - 3..]));
        assert_eq!(format!("{token}"), masked);
        assert_eq!(format!("{token:?}"), format!("ApiToken({masked})"));
        assert!(!format!("{token:?}").contains(&text[16..30]));
        assert_eq!(mask("short"), "ak_***");
    }

    #[test]
    fn hash_verifies_only_the_same_token() {
        let token = ApiToken::generate();
        let other = ApiToken::generate();
        let hash = token.hash(4).unwrap();
        assert!(hash.starts_with("$2"));
        assert!(!hash.contains(token.expose_secret()));
        assert!(token.verify(&hash));
        assert!(!other.verify(&hash));
        assert!(!token.verify("not a bcrypt hash"));
    }

    #[test]
    fn alphabet_checks_match_the_generation_tables() {
        for b in 0..=u8::MAX {
            assert_eq!(is_base32(b), BASE32.contains(&b), "byte {b}");
            assert_eq!(b.is_ascii_alphanumeric(), BASE62.contains(&b), "byte {b}");
        }
    }

    #[test]
    fn check_agrees_with_parse_and_returns_the_key_id() {
        let token = ApiToken::generate();
        let text = token.expose_secret();
        assert_eq!(check(text), Ok(token.key_id().as_str()));
        let typo = format!(
            "{}{}",
            &text[..TOKEN_LEN - 1],
            if text.ends_with('a') { 'b' } else { 'a' }
        );
        for bad in [typo.as_str(), "", "ak_short", &text[..TOKEN_LEN - 1]] {
            assert_eq!(check(bad).err(), ApiToken::parse(bad).err(), "{bad:?}");
            assert!(check(bad).is_err());
        }
    }

    #[test]
    fn key_id_parse_checks_alphabet() {
        assert!(KeyId::parse("abcdefgh2345").is_ok());
        assert_eq!(KeyId::parse("abcdefgh1345"), Err(TokenError::BadKeyId));
        assert_eq!(KeyId::parse("abc"), Err(TokenError::BadKeyId));
    }
}
