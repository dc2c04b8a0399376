//! Who is calling. API keys are checked against the replicated key table in the node's applied
//! state (a revoke is a Raft write, so it holds on every node as soon as it is applied there);
//! nothing on this path waits on Raft.
//!
//! Keys look like `mk_<id>_<secret>`: a public 12-hex-digit id (safe to log and show) and a
//! 256-bit secret from the OS random source. The cluster stores only the SHA-256 of the whole
//! key. A high-entropy key needs no slow password hash; the digest is compared in constant time.

pub mod jwt;

use std::sync::{Arc, PoisonError, RwLock, Weak};

use meridian_proto::cluster::ClusterState;
use meridian_proto::ids::hex;
use meridian_proto::{ApiError, ErrorKind};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

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

/// The credentials a client presented, as they came.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// `Authorization` (`Bearer …`).
    pub authorization: Option<&'a str>,
    /// `X-API-Key`.
    pub api_key: Option<&'a str>,
}

/// Makes a new key from the OS random source.
pub fn generate_key() -> Result<NewKey, getrandom::Error> {
    let mut id = [0u8; ID_HEX / 2];
    let mut secret = [0u8; SECRET_HEX / 2];
    getrandom::fill(&mut id)?;
    getrandom::fill(&mut secret)?;
    let id = hex(&id);
    let whole = format!("{KEY_PREFIX}{id}_{}", hex(&secret));
    Ok(NewKey {
        sha256_hex: sha256_hex(whole.as_bytes()),
        id,
        secret: whole,
    })
}

/// A random token of `bytes` bytes, hex-encoded (admin tokens).
pub fn random_token(bytes: usize) -> Result<String, getrandom::Error> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)?;
    Ok(hex(&buf))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
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
    pub key_id: Option<Arc<str>>,
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

/// The key table as this node last read it: per key id, the stored digest (as bytes) and who
/// the key stands for, each valid while the applied state it was read from is the current one.
/// Checking a known key then costs one SHA-256, one lookup and no allocation. The state changes
/// with every Raft apply (a revoke included), and an entry read from an older state is read
/// again, so a revoke holds as soon as it is applied here. Only ids in the key table are
/// kept: the cache is no larger than the table.
#[derive(Default)]
pub struct KeyTable {
    by_id: RwLock<hashbrown::HashMap<Box<str>, KnownKey>>,
}

impl std::fmt::Debug for KeyTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyTable").finish_non_exhaustive()
    }
}

/// One key's record as of one applied state.
struct KnownKey {
    /// The state it was read from, held weakly (only its address is compared; holding it keeps
    /// the address from being reused by a later state).
    state: Weak<ClusterState>,
    /// `None` if the stored digest is not 64 hex digits (no key can match it).
    sha256: Option<[u8; 32]>,
    /// `None` if the key is revoked or its tenant is gone.
    principal: Option<Principal>,
}

impl KnownKey {
    fn read(state: &Arc<ClusterState>, id: &str) -> Option<Self> {
        let record = state.api_keys.get(id)?;
        let live =
            record.revoked_at_unix_ms.is_none() && state.tenants.contains_key(&record.tenant);
        Some(Self {
            state: Arc::downgrade(state),
            sha256: digest_from_hex(&record.sha256_hex),
            principal: live.then(|| Principal {
                tenant: record.tenant.as_str().into(),
                key_id: Some(record.id.as_str().into()),
                user: None,
                tier: None,
            }),
        })
    }

    fn verdict(&self, key: &str, digest: &[u8; 32]) -> Result<Principal, ApiError> {
        if !self
            .sha256
            .is_some_and(|stored| constant_time_eq(digest, &stored))
        {
            return Err(unknown_or_malformed(key));
        }
        self.principal
            .clone()
            .ok_or_else(|| unauthenticated("revoked_api_key", "the API key has been revoked"))
    }
}

impl KeyTable {
    /// Checks an API key against the key table of the node's current applied state. The errors
    /// say what is wrong (missing, malformed, unknown or revoked) and never repeat the key.
    /// The digest is computed before the state is looked at, and the state's lock is not held
    /// while this table's is taken for writing.
    pub fn check(
        &self,
        state: &watch::Receiver<Arc<ClusterState>>,
        presented: Option<&str>,
    ) -> Result<Principal, ApiError> {
        let Some(key) = presented.filter(|k| !k.is_empty()) else {
            return Err(unauthenticated(
                "missing_api_key",
                "no API key: send it as `Authorization: Bearer mk_…` or in `X-API-Key`",
            ));
        };
        // The id is looked up as given; the key's form is checked only when it does not match
        // (a key whose digest matches is the key that was made, well formed).
        let Some(id) = key
            .strip_prefix(KEY_PREFIX)
            .filter(|rest| rest.as_bytes().get(ID_HEX) == Some(&b'_'))
            .and_then(|rest| rest.get(..ID_HEX))
        else {
            return Err(unknown_or_malformed(key));
        };
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let fresh = {
            let state = state.borrow();
            match read(&self.by_id).get(id) {
                Some(known) if std::ptr::eq(known.state.as_ptr(), Arc::as_ptr(&state)) => {
                    return known.verdict(key, &digest);
                }
                // An id this table does not hold, and the state does not either: nothing to
                // forget, so no write.
                None if !state.api_keys.contains_key(id) => {
                    return Err(unknown_or_malformed(key));
                }
                // Read from an older state, or not yet read: read the record again.
                _ => KnownKey::read(&state, id),
            }
        };
        let verdict = fresh.as_ref().map_or_else(
            || Err(unknown_or_malformed(key)),
            |known| known.verdict(key, &digest),
        );
        let mut by_id = write(&self.by_id);
        match (fresh, by_id.get_mut(id)) {
            (Some(known), Some(entry)) => *entry = known,
            (Some(known), None) => {
                by_id.insert(id.into(), known);
            }
            (None, _) => {
                by_id.remove(id);
            }
        }
        verdict
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

fn malformed() -> ApiError {
    unauthenticated(
        "malformed_api_key",
        "the API key is malformed: Meridian keys look like mk_<12 hex digits>_<64 hex digits>",
    )
}

/// A key that matches no record: malformed if it is not of the form keys are made in, else
/// unknown.
fn unknown_or_malformed(key: &str) -> ApiError {
    let hex_ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let well_formed = key
        .strip_prefix(KEY_PREFIX)
        .and_then(|r| r.split_once('_'))
        .is_some_and(|(id, secret)| hex_ok(id, ID_HEX) && hex_ok(secret, SECRET_HEX));
    if well_formed {
        unauthenticated(
            "invalid_api_key",
            "the API key is not known to this cluster",
        )
    } else {
        malformed()
    }
}

/// 64 hex digits as the 32 bytes they spell.
fn digest_from_hex(hex: &str) -> Option<[u8; 32]> {
    let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use meridian_proto::cluster::{ApiKeyRecord, Tenant};

    use super::*;

    fn state_with(key: &NewKey, revoked: bool) -> Arc<ClusterState> {
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
        Arc::new(s)
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
        let keys = KeyTable::default();
        let (applied, state) = watch::channel(Arc::clone(&s));
        let check = |k: Option<&str>| keys.check(&state, k);
        let p = check(Some(&key.secret)).expect("valid key");
        assert_eq!(&*p.tenant, "acme");
        assert_eq!(p.key_id.as_deref(), Some(key.id.as_str()));
        // Again, from the cache: the same answer.
        assert_eq!(check(Some(&key.secret)).expect("valid key"), p);
        assert_eq!(code(check(None)), "missing_api_key");
        assert_eq!(code(check(Some("sk-openai"))), "malformed_api_key");
        // A known id with a secret of the wrong form is malformed, not unknown.
        let short = &key.secret[..key.secret.len() - 1];
        assert_eq!(code(check(Some(short))), "malformed_api_key");
        let mut wrong = key.secret.clone();
        wrong.pop();
        wrong.push(if key.secret.ends_with('0') { '1' } else { '0' });
        let err = check(Some(&wrong)).expect_err("wrong secret");
        assert_eq!(err.code.as_deref(), Some("invalid_api_key"));
        assert!(
            !err.message.contains(&wrong[3..]),
            "the key is never echoed"
        );
        // An id the table does not hold is not remembered.
        let other = generate_key().expect("randomness");
        assert_eq!(code(check(Some(&other.secret))), "invalid_api_key");
        assert_eq!(read(&keys.by_id).len(), 1);
        // A new state revokes the key: the cached entry is read again.
        applied.send_replace(state_with(&key, true));
        assert_eq!(code(check(Some(&key.secret))), "revoked_api_key");
        // And one without the key at all forgets it.
        applied.send_replace(Arc::new(ClusterState::default()));
        assert_eq!(code(check(Some(&key.secret))), "invalid_api_key");
        assert!(read(&keys.by_id).is_empty());
        // A stored digest that is not hex matches nothing.
        let mut bad = (*s).clone();
        bad.api_keys.get_mut(&key.id).expect("record").sha256_hex = "zz".repeat(32);
        applied.send_replace(Arc::new(bad));
        assert_eq!(code(check(Some(&key.secret))), "invalid_api_key");
        assert_eq!(
            digest_from_hex(&key.sha256_hex).map(|d| hex(&d)),
            Some(key.sha256_hex.clone())
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
