//! TLS to the server when the URL asks for it (`sslmode=require`), on rustls (no system
//! library needed).
//!
//! `require` means what it means to libpq: the connection is encrypted, and the server's
//! certificate is not checked (that is what `verify-ca`/`verify-full` add, which the
//! `postgres` crate's URLs do not offer). Any other mode connects without TLS, as the
//! embedded default `prefer` would against a server that does not offer it.

use std::sync::Arc;

use postgres::{Client, Config, NoTls};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The task that reads and writes a connection's socket.
pub(super) type Driver =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), postgres::Error>> + Send>>;

/// How connections to one server are made.
#[derive(Clone)]
pub(super) enum Connector {
    /// Without TLS.
    Plain,
    /// With TLS (`sslmode=require`).
    Tls(MakeRustlsConnect),
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Connector::Plain => "Plain",
            Connector::Tls(_) => "Tls",
        })
    }
}

impl Connector {
    /// The connector `config`'s `sslmode` asks for.
    pub(super) fn for_config(config: &tokio_postgres::Config) -> Result<Self, rustls::Error> {
        if config.get_ssl_mode() != SslMode::Require {
            return Ok(Connector::Plain);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth();
        Ok(Connector::Tls(MakeRustlsConnect::new(tls)))
    }

    /// A new connection, and the task that drives its socket (to be spawned on a runtime).
    pub(super) async fn connect_async(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<(tokio_postgres::Client, Driver), postgres::Error> {
        Ok(match self {
            Connector::Plain => {
                let (client, connection) = config.connect(NoTls).await?;
                (client, Box::pin(connection))
            }
            Connector::Tls(tls) => {
                let (client, connection) = config.connect(tls.clone()).await?;
                (client, Box::pin(connection))
            }
        })
    }

    /// A new connection (synchronous client).
    pub(super) fn connect(&self, config: &Config) -> Result<Client, postgres::Error> {
        match self {
            Connector::Plain => config.connect(NoTls),
            Connector::Tls(tls) => config.connect(tls.clone()),
        }
    }
}

/// Accepts any certificate but checks that the handshake was signed by it (libpq's
/// `sslmode=require`).
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
