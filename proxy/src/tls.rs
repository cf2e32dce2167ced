//! The main listener's TLS: a given certificate, or a generated one.
//!
//! A generated certificate is a small private CA plus a serving certificate
//! for the loopback names, kept in the state directory so restarts keep it
//! and `kache kubeconfig` can embed the CA (`ca.crt`). A CA rather than one
//! self-signed leaf, because rustls-based clients refuse a leaf that is its own
//! trust anchor.

use std::path::Path;
use std::sync::Arc;

use kache_config::TlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Names the generated certificate is valid for.
const GENERATED_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The CA certificate clients should trust for a generated certificate.
pub fn generated_ca_path(dir: &Path) -> std::path::PathBuf {
    dir.join("ca.crt")
}

/// Builds the acceptor's configuration (ALPN h2 and http/1.1), generating
/// the certificate first where asked and not yet there. With `client_ca`,
/// clients may present a certificate, which must then chain to one of those
/// CAs and be meant for client authentication; clients without one still
/// connect (they authenticate with a token, or are anonymous).
///
/// # Errors
/// Unreadable or invalid PEM files, a failed generation.
pub fn server_config(
    tls: &TlsConfig,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    if let TlsConfig::SelfSigned { dir } = tls {
        ensure_generated(dir)?;
    }
    let (cert_path, key_path) = tls.paths();
    let file_error = |path: &Path, e: &dyn std::fmt::Display| TlsError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| file_error(&cert_path, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(&cert_path, &e))?;
    if certs.is_empty() {
        return Err(file_error(&cert_path, &"no certificate found"));
    }
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| file_error(&key_path, &e))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| file_error(path, &e))? {
                roots
                    .add(cert.map_err(|e| file_error(path, &e))?)
                    .map_err(|e| file_error(path, &e))?;
            }
            if roots.is_empty() {
                return Err(file_error(path, &"no CA certificate found"));
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .allow_unauthenticated()
                .build()
                .map_err(|e| file_error(path, &e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn ensure_generated(dir: &Path) -> Result<(), TlsError> {
    let (ca_path, cert_path, key_path) = (
        generated_ca_path(dir),
        dir.join("serving.crt"),
        dir.join("serving.key"),
    );
    if ca_path.exists() && cert_path.exists() && key_path.exists() {
        return Ok(());
    }
    let io_error = |path: &Path, e: std::io::Error| TlsError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;

    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kache local CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;

    let names: Vec<String> = GENERATED_NAMES.iter().map(|n| n.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(names)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "kache");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;

    write_private(&key_path, key.serialize_pem().as_bytes()).map_err(|e| io_error(&key_path, e))?;
    std::fs::write(&cert_path, format!("{}{}", cert.pem(), ca.pem())).map_err(|e| io_error(&cert_path, e))?;
    std::fs::write(&ca_path, ca.pem()).map_err(|e| io_error(&ca_path, e))?;
    tracing::info!(dir = %dir.display(), "generated a serving certificate");
    Ok(())
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    options.open(path)?.write_all(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_are_reused_across_starts() {
        let dir = std::env::temp_dir().join(format!("kache-tls-{}", std::process::id()));
        let tls = TlsConfig::SelfSigned { dir: dir.clone() };
        let _ = rustls::crypto::ring::default_provider().install_default();
        server_config(&tls, None).expect("generated");
        let first = std::fs::read(generated_ca_path(&dir)).expect("ca");
        server_config(&tls, None).expect("reused");
        assert_eq!(std::fs::read(generated_ca_path(&dir)).expect("ca"), first);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn missing_files_name_the_path() {
        let tls = TlsConfig::Files {
            cert: "/nonexistent/c.pem".into(),
            key: "/nonexistent/k.pem".into(),
        };
        let err = server_config(&tls, None).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/c.pem"), "{err}");
    }
}
