//! The cluster's PKI: a cluster CA and one certificate per node, and the mutual-TLS configs
//! that nodes will use between themselves (the QUIC transport is not built yet; these configs
//! are what it will take).
//!
//! Files in the certs directory: `ca.crt`, `node-<id>.crt`, `node-<id>.key` (PEM; keys are
//! created mode 0600 and never overwritten). The CA's private key is written apart, to a file
//! of its own outside that directory: the directory (or a Secret made from it) goes to the
//! nodes, the CA key never does — a node holding it could mint a certificate for any node id.
//! A node certificate names `node-<id>.meridian` (plus any extra hosts), so a peer checks that
//! it reached the node it meant to.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::HandshakeSignatureValid;
pub use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use meridian_proto::cluster::NodeId;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: not a valid PEM {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("TLS configuration failed: {0}")]
    Tls(String),
}

/// The DNS name a node's certificate carries and its peers verify.
pub fn node_name(id: NodeId) -> String {
    format!("node-{id}.meridian")
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), CertError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => CertError::Exists(path.to_path_buf()),
            _ => CertError::Io {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| CertError::Io {
            path: path.to_path_buf(),
            source: e,
        })
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|e| CertError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

/// The CA's parameters. Issuing re-creates the issuer from these and the stored key (the same
/// subject and key usages the CA certificate carries), so no certificate parser is needed.
fn ca_params() -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "Meridian cluster CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// The SHA-256 (hex) of a certificate's DER encoding: what a revocation names.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    use sha2::Digest;
    meridian_proto::ids::hex(&sha2::Sha256::digest(cert.as_ref()))
}

/// Whether `cert` is valid for node `id`'s name (`node-<id>.meridian`).
pub fn names_node(cert: &CertificateDer<'_>, id: NodeId) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    ServerName::try_from(node_name(id))
        .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
}

/// The fingerprint of the first certificate in the PEM file `path`.
pub fn fingerprint_file(path: &Path) -> Result<String, CertError> {
    let cert = CertificateDer::from_pem_file(path).map_err(|e| CertError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    })?;
    Ok(fingerprint(&cert))
}

/// Where the CA key of the certs directory `dir` is kept unless told otherwise: beside the
/// directory, not in it (`./meridian-certs` → `./meridian-certs-ca.key`).
pub fn ca_key_beside(dir: &Path) -> PathBuf {
    let name = dir.file_name().map_or_else(
        || "meridian-certs".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    dir.parent()
        .unwrap_or(Path::new("."))
        .join(format!("{name}-ca.key"))
}

/// The file name a CA key is looked for under in a certs directory: only to say that it must
/// not be there (see the module's doc).
pub const CA_KEY_IN_CERTS_DIR: &str = "ca.key";

/// Creates the cluster CA: its certificate `ca.crt` in `dir`, its private key at `ca_key` (mode
/// 0600), which must be outside `dir`.
pub fn init_ca(dir: &Path, ca_key: &Path) -> Result<(), CertError> {
    for d in [Some(dir), ca_key.parent()].into_iter().flatten() {
        if d.as_os_str().is_empty() {
            continue;
        }
        std::fs::create_dir_all(d).map_err(|e| CertError::Io {
            path: d.to_path_buf(),
            source: e,
        })?;
    }
    let same_dir = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if ca_key.parent().is_some_and(|p| {
        same_dir(
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            },
            dir,
        )
    }) {
        return Err(CertError::Io {
            path: ca_key.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the CA key must be kept outside the certs directory the nodes are given",
            ),
        });
    }
    let params = ca_params()?;
    let key = KeyPair::generate()?;
    let key_pem = key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(params, key)?;
    write_new(ca_key, &key_pem, 0o600)?;
    write_new(&dir.join("ca.crt"), &ca.pem(), 0o644)
}

/// Issues node `id`'s certificate into `dir`, signed with the CA key at `ca_key`, for
/// `node-<id>.meridian` and `hosts` (DNS names or IP addresses). It serves both as server and
/// client certificate.
pub fn issue(dir: &Path, ca_key: &Path, id: NodeId, hosts: &[String]) -> Result<(), CertError> {
    let ca_key = KeyPair::from_pem(&read(ca_key)?)?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let mut names = vec![node_name(id)];
    names.extend(hosts.iter().cloned());
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, node_name(id));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_new(
        &dir.join(format!("node-{id}.key")),
        &key.serialize_pem(),
        0o600,
    )?;
    write_new(&dir.join(format!("node-{id}.crt")), &cert.pem(), 0o644)
}

/// Why a client certificate is refused beyond the CA's check (`None`: it is not).
pub type Refuse = Arc<dyn Fn(&CertificateDer<'_>) -> Option<String> + Send + Sync>;

/// Node `id`'s mutual-TLS configs: the server side requires a client certificate from the
/// cluster CA; the client side presents this node's certificate and trusts only the cluster CA.
pub fn mtls_configs(
    dir: &Path,
    id: NodeId,
) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>), CertError> {
    mtls_configs_refusing(dir, id, Arc::new(|_: &CertificateDer<'_>| None))
}

/// [`mtls_configs`] whose server side also refuses, in the handshake, a client certificate
/// `refuse` has a reason against (a revoked one, one that names no member).
pub fn mtls_configs_refusing(
    dir: &Path,
    id: NodeId,
    refuse: Refuse,
) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>), CertError> {
    let ca_path = dir.join("ca.crt");
    let ca =
        CertificateDer::from_pem_slice(read(&ca_path)?.as_bytes()).map_err(|_| CertError::Pem {
            path: ca_path.clone(),
            what: "certificate",
        })?;
    let mut roots = RootCertStore::empty();
    roots.add(ca).map_err(|e| CertError::Tls(e.to_string()))?;
    let roots = Arc::new(roots);
    let cert_path = dir.join(format!("node-{id}.crt"));
    let key_path = dir.join(format!("node-{id}.key"));
    let chain = CertificateDer::pem_slice_iter(read(&cert_path)?.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| CertError::Pem {
            path: cert_path.clone(),
            what: "certificate",
        })?;
    let key_pem = read(&key_path)?;
    let key = || {
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| CertError::Pem {
            path: key_path.clone(),
            what: "private key",
        })
    };
    let verifier = WebPkiClientVerifier::builder(Arc::clone(&roots))
        .build()
        .map_err(|e| CertError::Tls(e.to_string()))?;
    let verifier = Arc::new(Refusing {
        inner: verifier,
        refuse,
    });
    let server = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key()?)
        .map_err(|e| CertError::Tls(e.to_string()))?;
    let client = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key()?)
        .map_err(|e| CertError::Tls(e.to_string()))?;
    Ok((Arc::new(server), Arc::new(client)))
}

/// The cluster CA's client-certificate check, after the caller's own refusals.
struct Refusing {
    inner: Arc<dyn ClientCertVerifier>,
    refuse: Refuse,
}

impl std::fmt::Debug for Refusing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refusing").finish_non_exhaustive()
    }
}

impl ClientCertVerifier for Refusing {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // The CA first: a certificate nobody here signed costs no more than the CA's check, and
        // its refusal says so.
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Some(why) = (self.refuse)(end_entity) {
            tracing::warn!("refused a peer's certificate: {why}");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The name a client verifies when it connects to node `id`.
pub fn server_name(id: NodeId) -> Result<ServerName<'static>, CertError> {
    ServerName::try_from(node_name(id)).map_err(|e| CertError::Tls(e.to_string()))
}
