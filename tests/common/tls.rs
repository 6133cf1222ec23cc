//! TLS for the integration tests: a self-signed certificate made at run
//! time (written to a fresh directory, never committed) and a rustls
//! client that trusts exactly it.

use rustls::pki_types::{CertificateDer, ServerName};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A certificate for `localhost` and 127.0.0.1 and its key, as PEM files.
pub struct TestCert {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
}

impl Drop for TestCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh self-signed certificate in its own temporary directory.
pub fn test_cert() -> TestCert {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("corecast-tls-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, signing_key.serialize_pem()).unwrap();
    TestCert {
        dir,
        cert: cert_path,
        key: key_path,
        der: cert.der().clone(),
    }
}

/// A client configuration that trusts `cert` only (TLS 1.2 and 1.3).
pub fn client_config(cert: &TestCert) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to `addr` under `config`, for the name `localhost`.
pub fn tls_connect(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> TlsStream {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn = rustls::ClientConnection::new(
        Arc::clone(config),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// A WebSocket over TLS (wss://localhost…/path), upgraded.
pub fn wss_connect(
    addr: SocketAddr,
    path: &str,
    config: &Arc<rustls::ClientConfig>,
) -> tungstenite::WebSocket<TlsStream> {
    let stream = tls_connect(addr, config);
    let url = format!("wss://localhost:{}{path}", addr.port());
    let (ws, resp) = tungstenite::client::client(url, stream).expect("wss handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// Everything the server sends on `s` until it closes (an HTTP exchange
/// with `Connection: close`).
pub fn tls_exchange(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    request: &[u8],
) -> String {
    let mut s = tls_connect(addr, config);
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}
