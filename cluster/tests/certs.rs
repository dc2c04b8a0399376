//! The cluster PKI: certificates from `certs init`/`certs issue` complete a mutual-TLS handshake;
//! a certificate from another CA, or none, is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::path::Path;
use std::sync::Arc;

use meridian_cluster::certs::{self, CertError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Serves one TLS connection as node `server_id`; connects with `client`. Returns whether the
/// client got the server's byte back.
async fn handshake(dir: &Path, server_id: u64, client: Arc<rustls::ClientConfig>) -> bool {
    let (server_cfg, _) = certs::mtls_configs(dir, server_id).unwrap();
    handshake_with(server_cfg, server_id, client).await
}

async fn handshake_with(
    server_cfg: Arc<rustls::ServerConfig>,
    server_id: u64,
    client: Arc<rustls::ClientConfig>,
) -> bool {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match TlsAcceptor::from(server_cfg).accept(tcp).await {
            Ok(mut tls) => {
                let _ = tls.write_all(b"!").await;
                let _ = tls.flush().await;
                true
            }
            Err(_) => false,
        }
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = certs::server_name(server_id).unwrap();
    let got = match TlsConnector::from(client).connect(name, tcp).await {
        Ok(mut tls) => {
            let mut b = [0u8; 1];
            // With TLS 1.3 a rejected client certificate surfaces on the first read.
            tls.read_exact(&mut b).await.is_ok() && b == *b"!"
        }
        Err(_) => false,
    };
    let accepted = server.await.unwrap();
    got && accepted
}

#[tokio::test]
async fn nodes_of_one_cluster_authenticate_each_other_and_strangers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    certs::init_ca(dir.path(), &dir.path().join("issuer/ca.key")).unwrap();
    certs::issue(
        dir.path(),
        &dir.path().join("issuer/ca.key"),
        1,
        &["127.0.0.1".into()],
    )
    .unwrap();
    certs::issue(dir.path(), &dir.path().join("issuer/ca.key"), 2, &[]).unwrap();
    assert!(
        matches!(
            certs::init_ca(dir.path(), &dir.path().join("issuer/ca.key")),
            Err(CertError::Exists(_))
        ),
        "never overwrites"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("node-1.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "private keys are not readable by others");

    let (_, node2) = certs::mtls_configs(dir.path(), 2).unwrap();
    assert!(
        handshake(dir.path(), 1, node2).await,
        "same-cluster peers connect"
    );

    // A node certified by another cluster's CA.
    let other = tempfile::tempdir().unwrap();
    certs::init_ca(other.path(), &other.path().join("issuer/ca.key")).unwrap();
    certs::issue(other.path(), &other.path().join("issuer/ca.key"), 3, &[]).unwrap();
    let (_, stranger) = certs::mtls_configs(other.path(), 3).unwrap();
    assert!(
        !handshake(dir.path(), 1, stranger).await,
        "a foreign certificate is refused"
    );

    // A client that presents no certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(dir.path().join("ca.crt")).unwrap();
    use rustls::pki_types::pem::PemObject;
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(&ca).unwrap())
        .unwrap();
    let anonymous = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    assert!(
        !handshake(dir.path(), 1, Arc::new(anonymous)).await,
        "no certificate, no entry"
    );

    // A revoked certificate of the cluster's own CA is refused in the handshake.
    let revoked = certs::fingerprint_file(&dir.path().join("node-2.crt")).unwrap();
    let (refusing, _) = certs::mtls_configs_refusing(
        dir.path(),
        1,
        Arc::new(move |cert: &certs::CertificateDer<'_>| {
            (certs::fingerprint(cert) == revoked).then(|| "revoked".to_owned())
        }),
    )
    .unwrap();
    let (_, node2) = certs::mtls_configs(dir.path(), 2).unwrap();
    assert!(
        !handshake_with(Arc::clone(&refusing), 1, node2).await,
        "a revoked certificate is refused"
    );
    certs::issue(dir.path(), &dir.path().join("issuer/ca.key"), 3, &[]).unwrap();
    let (_, node3) = certs::mtls_configs(dir.path(), 3).unwrap();
    assert!(
        handshake_with(refusing, 1, node3).await,
        "one that is not revoked still connects"
    );
}
