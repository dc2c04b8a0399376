//! Who is calling. API keys are checked against the replicated key table in the node's applied
//! state (a revoke is a Raft write, so it holds on every node as soon as it is applied there);
//! nothing on this path waits on Raft.
//!
//! Keys look like `mk_<id>_<secret>`: a public 12-hex-digit id (safe to log and show) and a
//! 256-bit secret from the OS random source. The cluster stores only the SHA-256 of the whole
//! key. A high-entropy key needs no slow password hash; the digest is compared in constant time.

pub mod jwt;

use std::sync::Arc;

use meridian_proto::cluster::ClusterState;
use meridian_proto::{ApiError, ErrorKind};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The visible prefix of every Meridian API key.
pub const KEY_PREFIX: &str = "mk_";
const ID_HEX: usize = 12;
const SECRET_HEX: usize = 64;

/// A freshly made key. `secret` is the whole key, shown once and never stored.
#[derive(Clone)]
pub struct NewKey {
    pub id: String,
    pub secret: String,
    pub sha256_hex: String,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Makes a new key from the OS random source.
pub fn generate_key() -> Result<NewKey, String> {
    let mut id = [0u8; ID_HEX / 2];
    let mut secret = [0u8; SECRET_HEX / 2];
    getrandom::fill(&mut id).map_err(|e| format!("no OS randomness: {e}"))?;
    getrandom::fill(&mut secret).map_err(|e| format!("no OS randomness: {e}"))?;
    let id = hex(&id);
    let whole = format!("{KEY_PREFIX}{id}_{}", hex(&secret));
    Ok(NewKey {
        sha256_hex: sha256_hex(whole.as_bytes()),
        id,
        secret: whole,
    })
}

/// A random token of `bytes` bytes, hex-encoded (admin tokens).
pub fn random_token(bytes: usize) -> Result<String, String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| format!("no OS randomness: {e}"))?;
    Ok(hex(&buf))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    sha256_hex_digits(bytes)
        .iter()
        .map(|&d| char::from(d))
        .collect()
}

/// The SHA-256 of `bytes` as 64 lowercase hex digits, on the stack (the check of every request's
/// key allocates nothing).
fn sha256_hex_digits(bytes: &[u8]) -> [u8; 64] {
    let mut out = [0u8; 64];
    for (pair, b) in out.chunks_exact_mut(2).zip(Sha256::digest(bytes)) {
        pair[0] = HEX_DIGITS[usize::from(b >> 4)];
        pair[1] = HEX_DIGITS[usize::from(b & 0xf)];
    }
    out
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(HEX_DIGITS[usize::from(b >> 4)]));
        out.push(char::from(HEX_DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Whether `a` and `b` are equal, in time that depends only on their lengths. Compared eight
/// bytes at a time: every request's key check runs this.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (a_words, a_rest) = a.as_chunks::<8>();
    let (b_words, b_rest) = b.as_chunks::<8>();
    let mut equal = a_rest.ct_eq(b_rest);
    for (x, y) in a_words.iter().zip(b_words) {
        equal &= u64::from_ne_bytes(*x).ct_eq(&u64::from_ne_bytes(*y));
    }
    bool::from(equal)
}

/// Who a request is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant: Arc<str>,
    /// The key id (`None` for JWT callers).
    pub key_id: Option<String>,
    /// The end user, when the caller names one (JWT `sub`, or a header).
    pub user: Option<Arc<str>>,
    /// The tier a JWT names (used when the tenant is not in the tenant table).
    pub tier: Option<Arc<str>>,
}

fn unauthenticated(code: &str, message: &str) -> ApiError {
    ApiError::new(ErrorKind::Unauthenticated, message).with_code(code)
}

/// The credential in an `Authorization: Bearer …` or `X-API-Key` header value.
pub fn bearer<'a>(authorization: Option<&'a str>, x_api_key: Option<&'a str>) -> Option<&'a str> {
    if let Some(v) = x_api_key {
        return Some(v.trim());
    }
    let v = authorization?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Checks an API key against the key table. The errors say what is wrong (missing, malformed,
/// unknown or revoked) and never repeat the key.
pub fn authenticate_key(
    state: &ClusterState,
    presented: Option<&str>,
) -> Result<Principal, ApiError> {
    let Some(key) = presented.filter(|k| !k.is_empty()) else {
        return Err(unauthenticated(
            "missing_api_key",
            "no API key: send it as `Authorization: Bearer mk_…` or in `X-API-Key`",
        ));
    };
    let malformed = || {
        unauthenticated(
            "malformed_api_key",
            "the API key is malformed: Meridian keys look like mk_<12 hex digits>_<64 hex digits>",
        )
    };
    let rest = key.strip_prefix(KEY_PREFIX).ok_or_else(malformed)?;
    let (id, secret) = rest.split_once('_').ok_or_else(malformed)?;
    let hex_ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex_ok(id, ID_HEX) || !hex_ok(secret, SECRET_HEX) {
        return Err(malformed());
    }
    let unknown = || {
        unauthenticated(
            "invalid_api_key",
            "the API key is not known to this cluster",
        )
    };
    let record = state.api_keys.get(id).ok_or_else(unknown)?;
    if !constant_time_eq(
        &sha256_hex_digits(key.as_bytes()),
        record.sha256_hex.as_bytes(),
    ) {
        return Err(unknown());
    }
    if record.revoked_at_unix_ms.is_some() || !state.tenants.contains_key(&record.tenant) {
        return Err(unauthenticated(
            "revoked_api_key",
            "the API key has been revoked",
        ));
    }
    Ok(Principal {
        tenant: record.tenant.as_str().into(),
        key_id: Some(record.id.clone()),
        user: None,
        tier: None,
    })
}

#[cfg(test)]
mod tests {
    use meridian_proto::cluster::{ApiKeyRecord, Tenant};

    use super::*;

    fn state_with(key: &NewKey, revoked: bool) -> ClusterState {
        let mut s = ClusterState::default();
        s.tenants.insert(
            "acme".into(),
            Tenant {
                id: "acme".into(),
                tier: "free".into(),
                ..Tenant::default()
            },
        );
        s.api_keys.insert(
            key.id.clone(),
            ApiKeyRecord {
                id: key.id.clone(),
                tenant: "acme".into(),
                sha256_hex: key.sha256_hex.clone(),
                label: String::new(),
                created_at_unix_ms: 0,
                revoked_at_unix_ms: revoked.then_some(1),
            },
        );
        s
    }

    fn code(r: Result<Principal, ApiError>) -> String {
        r.expect_err("refused").code.unwrap_or_default()
    }

    #[test]
    fn keys_authenticate_and_every_failure_is_named() {
        let key = generate_key().expect("randomness");
        assert!(key.secret.starts_with("mk_") && key.secret.len() == 3 + 12 + 1 + 64);
        assert_ne!(generate_key().expect("randomness").secret, key.secret);
        let s = state_with(&key, false);
        let p = authenticate_key(&s, Some(&key.secret)).expect("valid key");
        assert_eq!(&*p.tenant, "acme");
        assert_eq!(code(authenticate_key(&s, None)), "missing_api_key");
        assert_eq!(
            code(authenticate_key(&s, Some("sk-openai"))),
            "malformed_api_key"
        );
        let mut wrong = key.secret.clone();
        wrong.pop();
        wrong.push(if key.secret.ends_with('0') { '1' } else { '0' });
        let err = authenticate_key(&s, Some(&wrong)).expect_err("wrong secret");
        assert_eq!(err.code.as_deref(), Some("invalid_api_key"));
        assert!(
            !err.message.contains(&wrong[3..]),
            "the key is never echoed"
        );
        let other = generate_key().expect("randomness");
        assert_eq!(
            code(authenticate_key(&s, Some(&other.secret))),
            "invalid_api_key"
        );
        let revoked = state_with(&key, true);
        assert_eq!(
            code(authenticate_key(&revoked, Some(&key.secret))),
            "revoked_api_key"
        );
    }

    #[test]
    fn credentials_come_from_either_header() {
        assert_eq!(bearer(Some("Bearer abc"), None), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc "), None), Some("abc"));
        assert_eq!(bearer(Some("Basic abc"), None), None);
        assert_eq!(bearer(None, Some("k")), Some("k"));
        assert!(constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd"));
        let long = b"0123456789abcdef0123456789abcdef0123";
        assert!(constant_time_eq(long, long));
        for i in 0..long.len() {
            let mut other = *long;
            other[i] ^= 1;
            assert!(!constant_time_eq(long, &other), "byte {i}");
        }
        assert!(!constant_time_eq(long, &long[1..]) && constant_time_eq(b"", b""));
    }
}
