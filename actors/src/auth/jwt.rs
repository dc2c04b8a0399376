//! JWT callers: HS256 with a shared secret, RS256 and EdDSA with public keys from a JWKS file.
//!
//! The token never chooses how it is checked: HS256 uses only the configured secret (a JWKS
//! public key is never an HMAC secret), RS256 only RSA keys and EdDSA only OKP keys from the
//! JWKS, each key bound to the one algorithm its type allows. `alg: none` and anything else are
//! refused. `exp`, `iss` and `aud` are required and checked, with a configurable leeway. The
//! tenant (and optionally the tier) come from claims; `sub` is the end user.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use meridian_proto::{ApiError, ErrorKind};
use serde_json::{Map, Value};

use super::Principal;

/// Longest token accepted, in bytes (a bound on work before the signature is checked).
const MAX_TOKEN: usize = 16 * 1024;

/// How JWTs are checked (from the node's `[jwt]` configuration).
#[derive(Debug, Clone, Default)]
pub struct JwtSettings {
    pub issuer: String,
    pub audience: String,
    pub leeway: Duration,
    /// The HS256 secret, if HS256 tokens are accepted.
    pub hs256_secret: Option<Vec<u8>>,
    /// A JWKS document with the RS256 / EdDSA public keys.
    pub jwks: Option<String>,
    /// The claim naming the tenant (default `tenant`).
    pub tenant_claim: String,
    /// The claim naming the tier, if tokens carry one.
    pub tier_claim: Option<String>,
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

pub struct JwtVerifier {
    settings: JwtSettings,
    hs256: Option<DecodingKey>,
    keys: Vec<Key>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.settings.issuer)
            .field("audience", &self.settings.audience)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

/// Why the configured keys cannot verify tokens.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("the JWKS is not valid: {0}")]
    NotJwks(serde_json::Error),
    #[error("JWKS key {index}: only RSA (RS256) and OKP (EdDSA) keys are accepted")]
    KeyType { index: usize },
    #[error("JWKS key {index}: its \"alg\" does not match its key type ({alg:?})")]
    AlgMismatch { index: usize, alg: Algorithm },
    #[error("JWKS key {index}: {source}")]
    Key {
        index: usize,
        source: jsonwebtoken::errors::Error,
    },
    #[error("no key: set an HS256 secret or a JWKS file")]
    NoKey,
}

fn refused(code: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Unauthenticated, message).with_code(code)
}

impl JwtVerifier {
    /// Builds the verifier; errors say which key of the JWKS is unusable.
    pub fn new(settings: JwtSettings) -> Result<Self, JwksError> {
        let hs256 = settings
            .hs256_secret
            .as_deref()
            .map(DecodingKey::from_secret);
        let mut keys = Vec::new();
        if let Some(doc) = &settings.jwks {
            let set: JwkSet = serde_json::from_str(doc).map_err(JwksError::NotJwks)?;
            for (i, jwk) in set.keys.iter().enumerate() {
                // The key's type decides its algorithm; a key that claims another is refused.
                let alg = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                    _ => return Err(JwksError::KeyType { index: i }),
                };
                let expected = match alg {
                    Algorithm::RS256 => KeyAlgorithm::RS256,
                    _ => KeyAlgorithm::EdDSA,
                };
                if let Some(claimed) = jwk.common.key_algorithm
                    && claimed != expected
                {
                    return Err(JwksError::AlgMismatch { index: i, alg });
                }
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|source| JwksError::Key { index: i, source })?;
                keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    alg,
                    key,
                });
            }
        }
        if hs256.is_none() && keys.is_empty() {
            return Err(JwksError::NoKey);
        }
        Ok(Self {
            settings,
            hs256,
            keys,
        })
    }

    /// Checks a token; the error says what is wrong and never repeats the token.
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        if token.len() > MAX_TOKEN {
            return Err(refused("malformed_token", "the token is too large"));
        }
        let header = decode_header(token)
            .map_err(|_| refused("malformed_token", "the token is not a well-formed JWT"))?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::RS256 | Algorithm::EdDSA => {
                let candidates: Vec<&Key> =
                    self.keys.iter().filter(|k| k.alg == header.alg).collect();
                let chosen = match &header.kid {
                    Some(kid) => candidates
                        .iter()
                        .find(|k| k.kid.as_deref() == Some(kid))
                        .copied(),
                    None if candidates.len() == 1 => candidates.first().copied(),
                    None => None,
                };
                if chosen.is_none() && !candidates.is_empty() {
                    return Err(refused(
                        "unknown_key",
                        "the token's key (kid) is not one this cluster trusts",
                    ));
                }
                chosen.map(|k| &k.key)
            }
            _ => None,
        };
        let Some(key) = key else {
            return Err(refused(
                "unsupported_algorithm",
                format!("tokens signed with {:?} are not accepted here", header.alg),
            ));
        };
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.settings.issuer]);
        v.set_audience(&[&self.settings.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        // A token whose `nbf` is still ahead (beyond the leeway) is not valid yet.
        v.validate_nbf = true;
        v.leeway = self.settings.leeway.as_secs();
        let data = decode::<Map<String, Value>>(token, key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => refused("expired_token", "the token has expired"),
                K::ImmatureSignature => {
                    refused("token_not_yet_valid", "the token is not valid yet")
                }
                K::InvalidSignature => {
                    refused("invalid_signature", "the token's signature does not verify")
                }
                K::InvalidAudience => refused(
                    "invalid_audience",
                    "the token is not meant for this service (aud)",
                ),
                K::InvalidIssuer => refused("invalid_issuer", "the token's issuer is not trusted"),
                K::MissingRequiredClaim(c) => {
                    refused("missing_claim", format!("the token has no `{c}` claim"))
                }
                K::InvalidAlgorithm => refused(
                    "unsupported_algorithm",
                    "the token's algorithm does not match its key",
                ),
                _ => refused("malformed_token", "the token could not be verified"),
            }
        })?;
        let claim = |name: &str| data.claims.get(name).and_then(Value::as_str);
        let tenant = claim(&self.settings.tenant_claim).ok_or_else(|| {
            refused(
                "missing_claim",
                format!("the token has no `{}` claim", self.settings.tenant_claim),
            )
        })?;
        // The tenant names ledger keys and roll-ups (`tenant/<t>/…`): only a name an admin could
        // have given a tenant is taken.
        if let Some(problem) = meridian_proto::convert::invalid_name(tenant) {
            return Err(refused(
                "invalid_claim",
                format!(
                    "the token's `{}` claim: {problem}",
                    self.settings.tenant_claim
                ),
            ));
        }
        Ok(Principal {
            tenant: tenant.into(),
            key_id: None,
            user: claim("sub").map(Arc::from),
            tier: self
                .settings
                .tier_claim
                .as_deref()
                .and_then(claim)
                .map(Arc::from),
        })
    }
}

/// Whether a credential looks like a JWT (three dot-separated parts) rather than an API key.
pub fn looks_like_jwt(credential: &str) -> bool {
    credential.split('.').count() == 3 && !credential.starts_with(super::KEY_PREFIX)
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;

    const SECRET: &[u8] = b"a-test-secret-of-a-reasonable-length";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    fn settings() -> JwtSettings {
        JwtSettings {
            issuer: "https://auth.example".into(),
            audience: "meridian".into(),
            leeway: Duration::from_secs(5),
            hs256_secret: Some(SECRET.to_vec()),
            jwks: None,
            tenant_claim: "tenant".into(),
            tier_claim: Some("tier".into()),
        }
    }

    fn claims() -> Value {
        json!({"iss": "https://auth.example", "aud": "meridian", "exp": now() + 60,
               "sub": "u-1", "tenant": "acme", "tier": "pro"})
    }

    fn hs256(claims: &Value) -> String {
        encode(
            &Header::default(),
            claims,
            &EncodingKey::from_secret(SECRET),
        )
        .expect("signed")
    }

    fn code(r: Result<Principal, ApiError>) -> String {
        r.expect_err("refused").code.unwrap_or_default()
    }

    #[test]
    fn hs256_tokens_give_tenant_tier_and_user() {
        let v = JwtVerifier::new(settings()).expect("verifier");
        let p = v.verify(&hs256(&claims())).expect("valid");
        assert_eq!(
            (&*p.tenant, p.user.as_deref(), p.tier.as_deref()),
            ("acme", Some("u-1"), Some("pro"))
        );
        assert!(looks_like_jwt(&hs256(&claims())));
    }

    #[test]
    fn every_bad_token_is_refused_with_its_reason() {
        let v = JwtVerifier::new(settings()).expect("verifier");
        let mut c = claims();
        c["exp"] = json!(now() - 120);
        assert_eq!(code(v.verify(&hs256(&c))), "expired_token");
        let mut c = claims();
        c["aud"] = json!("someone-else");
        assert_eq!(code(v.verify(&hs256(&c))), "invalid_audience");
        let mut c = claims();
        c["iss"] = json!("https://evil.example");
        assert_eq!(code(v.verify(&hs256(&c))), "invalid_issuer");
        let mut c = claims();
        c.as_object_mut().expect("object").remove("exp");
        assert_eq!(code(v.verify(&hs256(&c))), "missing_claim");
        let mut c = claims();
        c.as_object_mut().expect("object").remove("tenant");
        assert_eq!(code(v.verify(&hs256(&c))), "missing_claim");
        // Not valid before a minute from now (the leeway is 5 s); within the leeway it is.
        let mut c = claims();
        c["nbf"] = json!(now() + 60);
        assert_eq!(code(v.verify(&hs256(&c))), "token_not_yet_valid");
        c["nbf"] = json!(now() + 2);
        assert!(v.verify(&hs256(&c)).is_ok());
        // A tenant claim that could reach into another scope's keys, or is no name at all.
        for bad in ["acme/user/x", "", "a b", &"x".repeat(65)] {
            let mut c = claims();
            c["tenant"] = json!(bad);
            assert_eq!(code(v.verify(&hs256(&c))), "invalid_claim", "{bad:?}");
        }
        let forged = encode(
            &Header::default(),
            &claims(),
            &EncodingKey::from_secret(b"guess"),
        )
        .expect("signed");
        assert_eq!(code(v.verify(&forged)), "invalid_signature");
        // alg: none, hand-made: the header is {"alg":"none","typ":"JWT"}.
        let none = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            hs256(&claims()).split('.').nth(1).expect("payload")
        );
        let refused = v.verify(&none).expect_err("alg none");
        assert!(
            matches!(
                refused.code.as_deref(),
                Some("unsupported_algorithm" | "malformed_token")
            ),
            "{refused:?}"
        );
        assert_eq!(code(v.verify("not.a.jwt")), "malformed_token");
    }

    #[test]
    fn eddsa_keys_come_from_the_jwks_and_cannot_be_used_as_hmac_secrets() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519 key");
        let x = base64url(pair.public_key_raw());
        let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "k1", "alg": "EdDSA"}]})
            .to_string();
        let mut s = settings();
        s.hs256_secret = None;
        s.jwks = Some(jwks);
        let v = JwtVerifier::new(s).expect("verifier");
        let signing = EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).expect("pem");
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("k1".into());
        let token = encode(&header, &claims(), &signing).expect("signed");
        assert_eq!(&*v.verify(&token).expect("valid").tenant, "acme");
        let mut other = header.clone();
        other.kid = Some("k9".into());
        let token = encode(&other, &claims(), &signing).expect("signed");
        assert_eq!(code(v.verify(&token)), "unknown_key");
        // Algorithm confusion: HS256 "signed" with the public key as the secret.
        let confused = encode(
            &Header::default(),
            &claims(),
            &EncodingKey::from_secret(pair.public_key_raw()),
        )
        .expect("signed");
        assert_eq!(code(v.verify(&confused)), "unsupported_algorithm");
    }

    #[test]
    fn rs256_keys_come_from_the_jwks() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("rsa key");
        let signing = EncodingKey::from_rsa_pem(pair.serialize_pem().as_bytes()).expect("pem");
        let mut jwk =
            jsonwebtoken::jwk::Jwk::from_encoding_key(&signing, Algorithm::RS256).expect("jwk");
        jwk.common.key_id = Some("rsa-1".into());
        let jwks =
            serde_json::to_string(&jsonwebtoken::jwk::JwkSet { keys: vec![jwk] }).expect("jwks");
        let mut s = settings();
        s.jwks = Some(jwks);
        let v = JwtVerifier::new(s).expect("verifier");
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("rsa-1".into());
        let token = encode(&header, &claims(), &signing).expect("signed");
        assert_eq!(&*v.verify(&token).expect("valid").tenant, "acme");
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("rsa key");
        let forged = encode(
            &header,
            &claims(),
            &EncodingKey::from_rsa_pem(other.serialize_pem().as_bytes()).expect("pem"),
        )
        .expect("signed");
        assert_eq!(code(v.verify(&forged)), "invalid_signature");
        // An RS256 token presented as EdDSA finds no key of that type.
        let mut eddsa = header.clone();
        eddsa.alg = Algorithm::EdDSA;
        let parts: Vec<&str> = token.split('.').collect();
        let relabelled = format!(
            "{}.{}.{}",
            base64url(&serde_json::to_vec(&eddsa).expect("header")),
            parts[1],
            parts[2]
        );
        assert_eq!(code(v.verify(&relabelled)), "unsupported_algorithm");
    }

    fn base64url(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            }
        }
        out
    }
}
