//! Newtype ids.

use std::fmt;

/// Longest client-supplied request id we accept; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// A request's id: taken from the client's `X-Request-Id` when it is a sane token, else
/// generated. It is echoed in responses and carried in logs; copies share it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RequestId(std::sync::Arc<str>);

impl RequestId {
    /// A fresh random id (128 bits, hex).
    pub fn generate() -> Self {
        Self(random_hex().into())
    }

    /// The client's id if it is 1..=128 visible ASCII characters, else a fresh one. Anything
    /// else (control characters, spaces, non-ASCII) could forge log lines or headers.
    pub fn from_client(value: Option<&str>) -> Self {
        match value {
            Some(v)
                if !v.is_empty()
                    && v.len() <= MAX_REQUEST_ID_LEN
                    && v.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Self(v.into())
            }
            _ => Self::generate(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({})", self.0)
    }
}

/// 32 lowercase hex digits from a non-cryptographic generator: ids are for correlation, not
/// for secrets.
pub fn random_hex() -> String {
    // Not `format!`: its machinery cost about 1,000 instructions per request here.
    hex(&fastrand::u128(..).to_be_bytes())
}

/// `bytes` as lowercase hex digits, two per byte.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

/// Appends `bytes` to `out` as lowercase hex digits, two per byte.
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_kept_only_when_safe() {
        assert_eq!(RequestId::from_client(Some("abc-123")).as_str(), "abc-123");
        for bad in ["", "a b", "x\r\ny", "é", &"a".repeat(129)] {
            let id = RequestId::from_client(Some(bad));
            assert_ne!(id.as_str(), bad);
            assert_eq!(id.as_str().len(), 32);
        }
        assert_eq!(RequestId::from_client(None).as_str().len(), 32);
    }

    #[test]
    fn generated_ids_are_32_lowercase_hex_digits_and_differ() {
        let a = random_hex();
        assert_eq!(a.len(), 32);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(a, random_hex());
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }
}
