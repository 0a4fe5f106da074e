//! HTTPS with ALPN: `h2` preferred, `http/1.1` accepted (rustls). The LL-HLS server profile wants HTTP/2 for
//! playlists and media, and browsers speak HTTP/2 only over TLS. The connections themselves are served by
//! [`kiln_http::server`].

use std::sync::Arc;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

/// A TLS acceptor from PEM files, advertising `h2` then `http/1.1`.
pub fn acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    acceptor_with(files, &[b"h2", b"http/1.1"])
}

/// A TLS acceptor from PEM files advertising `alpn` (none for RTMPS).
pub fn acceptor_with(files: &TlsFiles, alpn: &[&[u8]]) -> anyhow::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .with_context(|| format!("reading certificates from {}", files.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", files.cert.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "no certificate in {}",
        files.cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("reading the private key from {}", files.key.display()))?;
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}
