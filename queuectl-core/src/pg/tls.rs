//! TLS to the server when the URL asks for it, on rustls (no system library needed).
//!
//! The modes mean what they mean to libpq. `sslmode=require` encrypts the connection; the
//! server's certificate is checked against a root certificate only when one is given
//! (`sslrootcert=FILE`, or `~/.postgresql/root.crt`), and then as `verify-ca` would.
//! `verify-ca` checks that the certificate was issued from the root; `verify-full` also that
//! it names the host connected to. `sslrootcert=system` takes the system's trusted roots and
//! implies `verify-full` (a weaker mode with it is refused). Without a mode, or with
//! `prefer`, `allow` or `disable`, connections are plain. A client certificate is presented
//! from `sslcert` and `sslkey`, or `~/.postgresql/postgresql.crt` and `.key`.
//! `tokio_postgres::Config` reads none of `sslrootcert`, `sslcert`, `sslkey` and the
//! verifying modes: [`split_url`] takes them out of the URL before it is parsed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use postgres::{Client, Config, NoTls};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore};
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
    /// The connector that `config`'s `sslmode` and what [`split_url`] took out of the URL
    /// ask for, and `config`'s `sslmode` set to match. `home` is where `~/.postgresql` is.
    pub(super) fn for_url(
        config: &mut tokio_postgres::Config,
        wanted: &TlsWanted,
        home: Option<&Path>,
    ) -> Result<Self, TlsSetupError> {
        use tokio_postgres::config::Host;
        let hosts = config.get_hosts();
        let sockets_only =
            !hosts.is_empty() && hosts.iter().all(|host| matches!(host, Host::Unix(_)));
        let has_name = hosts.iter().any(|host| matches!(host, Host::Tcp(_)));
        // As libpq: a Unix socket never carries TLS, whatever the URL asks.
        if sockets_only {
            config.ssl_mode(SslMode::Disable);
            return Ok(Connector::Plain);
        }
        if wanted.verifies() {
            // The parser never saw the mode: TLS it must be.
            config.ssl_mode(SslMode::Require);
        }
        let check = wanted.check(config.get_ssl_mode(), home)?;
        if check != Check::Plain && !has_name {
            return Err(TlsSetupError::NoHostName);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match check {
            Check::Plain => return Ok(Connector::Plain),
            Check::EncryptOnly => Arc::new(Lenient {
                provider: provider.clone(),
                issuer: None,
            }),
            Check::Roots { roots, names } => {
                let roots = Arc::new(roots.load()?);
                let full = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| TlsSetupError::Rustls(rustls::Error::General(e.to_string())))?;
                if names {
                    full
                } else {
                    Arc::new(Lenient {
                        provider: provider.clone(),
                        issuer: Some(full),
                    })
                }
            }
        };
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsSetupError::Rustls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let tls = match wanted.client_identity(home)? {
            Some((chain, key)) => tls
                .with_client_auth_cert(chain, key)
                .map_err(TlsSetupError::Rustls)?,
            None => tls.with_no_client_auth(),
        };
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

/// The user's home directory, where libpq looks for `.postgresql/`.
pub(super) fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(PathBuf::from)
}

/// Whether `error` is rustls refusing the handshake (a certificate it does not trust, most
/// often), rather than the connection breaking.
pub(super) fn is_handshake_failure(error: &postgres::Error) -> bool {
    // `tokio_postgres` says so in words only (its error kinds are private): a server that
    // does not offer TLS ends up here too.
    if error
        .to_string()
        .starts_with("error performing TLS handshake")
    {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        // `io::Error::source` skips the error it wraps: look into it.
        let inner = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        if cause.is::<rustls::Error>() || inner.is_some_and(|inner| inner.is::<rustls::Error>()) {
            return true;
        }
        source = cause.source();
    }
    false
}

/// The checks short of `verify-full`: with no issuer, any certificate (libpq's `require`);
/// with one, a certificate issued from it for any name (`verify-ca`). Either way the
/// handshake must be signed by the certificate's key.
#[derive(Debug)]
struct Lenient {
    provider: Arc<CryptoProvider>,
    issuer: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(issuer) = &self.issuer else {
            return Ok(ServerCertVerified::assertion());
        };
        match issuer.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Why TLS could not be set up as the URL asks.
#[derive(Debug, thiserror::Error)]
pub(super) enum TlsSetupError {
    /// A mode that checks the server's certificate, and no root certificate to check it with.
    #[error(
        "sslmode={mode} checks the server's certificate against a root certificate, and none \
         was given: add sslrootcert=FILE (PEM) or sslrootcert=system to the URL, or put the \
         root certificate at {default}"
    )]
    NoRoot {
        /// The mode asked for.
        mode: &'static str,
        /// Where a root certificate is looked for when the URL names none.
        default: String,
    },
    /// `sslrootcert=system` with a mode weaker than `verify-full`.
    #[error(
        "sslrootcert=system checks the server's name too: it needs sslmode=verify-full, not {mode}"
    )]
    SystemNeedsFull {
        /// The mode asked for.
        mode: String,
    },
    /// A certificates' file could not be read.
    #[error("could not read the {what} in {path}")]
    Read {
        /// Which certificates: the root certificates, the client certificate.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rustls::pki_types::pem::Error,
    },
    /// A certificates' file holds none that can be used.
    #[error("{path} holds no {what} that can be used (PEM, BEGIN CERTIFICATE)")]
    NoCertificate {
        /// Which certificates.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// TLS over TCP without a host name (`hostaddr` alone).
    #[error(
        "TLS needs the server's host name: give it in the URL (postgres://NAME/… or host=NAME), \
         with hostaddr if the name does not resolve"
    )]
    NoHostName,
    /// A client certificate without its private key.
    #[error(
        "the client certificate {cert} has no private key at {key}: give its file with sslkey=FILE"
    )]
    NoKey {
        /// The certificate's file.
        cert: PathBuf,
        /// Where the key was looked for.
        key: PathBuf,
    },
    /// The client certificate named by `sslcert` is not there.
    #[error("the client certificate sslcert={0} does not exist")]
    NoClientCert(PathBuf),
    /// The private key could not be read (or is encrypted, which is not supported).
    #[error("could not read the private key in {path} (PEM, unencrypted)")]
    ReadKey {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rustls::pki_types::pem::Error,
    },
    /// The private key can be read by others (libpq refuses it too).
    #[error(
        "the private key {0} can be read or written by others: make it u=rw (chmod 0600), or \
         u=rw,g=r (0640) if root owns it"
    )]
    KeyExposed(PathBuf),
    /// The private key's file could not be looked at.
    #[error("could not look at the private key {path}")]
    KeyMetadata {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// None of the system's trusted root certificates could be loaded.
    #[error("could not load the system's root certificates (sslrootcert=system): {0}")]
    System(String),
    /// rustls refused the configuration.
    #[error("{0}")]
    Rustls(rustls::Error),
}

/// What the URL asks of TLS that `tokio_postgres::Config` does not read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct TlsWanted {
    /// The `sslmode` the URL gave, if any.
    pub(super) mode: Option<String>,
    /// `sslrootcert`, if given.
    pub(super) root_cert: Option<String>,
    /// `sslcert`, if given: the client certificate (chain) to present.
    pub(super) cert: Option<String>,
    /// `sslkey`, if given: the client certificate's private key.
    pub(super) key: Option<String>,
}

/// How a server's certificate is checked.
#[derive(Debug, PartialEq, Eq)]
enum Check {
    /// No TLS.
    Plain,
    /// TLS, any certificate.
    EncryptOnly,
    /// TLS, a certificate issued from `roots`, for the host's name too with `names`.
    Roots { roots: Roots, names: bool },
}

/// Where the trusted roots come from.
#[derive(Debug, PartialEq, Eq)]
enum Roots {
    File(PathBuf),
    System,
}

impl Roots {
    fn load(&self) -> Result<RootCertStore, TlsSetupError> {
        let mut store = RootCertStore::empty();
        match self {
            Roots::File(path) => {
                let what = "root certificates";
                let (added, _) = store.add_parsable_certificates(read_certificates(path, what)?);
                if added == 0 {
                    return Err(TlsSetupError::NoCertificate {
                        what,
                        path: path.clone(),
                    });
                }
            }
            Roots::System => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = store.add_parsable_certificates(found.certs);
                if added == 0 {
                    let why = match found.errors.first() {
                        Some(error) => error.to_string(),
                        None => "none was found".to_owned(),
                    };
                    return Err(TlsSetupError::System(why));
                }
            }
        }
        Ok(store)
    }
}

impl TlsWanted {
    /// How to check the server, given the mode `tokio_postgres` read (`Require` when the
    /// URL asked a verifying mode) and the home directory.
    fn check(&self, mode: SslMode, home: Option<&Path>) -> Result<Check, TlsSetupError> {
        let default = home.map(|home| home.join(".postgresql").join("root.crt"));
        let explicit = self.root_cert.as_deref();
        if explicit == Some("system") {
            return match self.mode.as_deref() {
                None | Some("verify-full") => Ok(Check::Roots {
                    roots: Roots::System,
                    names: true,
                }),
                Some(other) => Err(TlsSetupError::SystemNeedsFull {
                    mode: other.to_owned(),
                }),
            };
        }
        let roots = match explicit {
            Some(path) => Some(Roots::File(PathBuf::from(path))),
            None => default
                .as_ref()
                .filter(|path| path.is_file())
                .map(|path| Roots::File(path.clone())),
        };
        let verify = match self.mode.as_deref() {
            Some("verify-ca") => Some(("verify-ca", false)),
            Some("verify-full") => Some(("verify-full", true)),
            _ => None,
        };
        Ok(match (verify, roots) {
            (Some((_, names)), Some(roots)) => Check::Roots { roots, names },
            (Some((mode, _)), None) => {
                return Err(TlsSetupError::NoRoot {
                    mode,
                    default: match &default {
                        Some(path) => path.display().to_string(),
                        None => "~/.postgresql/root.crt".to_owned(),
                    },
                });
            }
            // As libpq: `require` with a root certificate checks the issuer.
            (None, Some(roots)) if mode == SslMode::Require => Check::Roots {
                roots,
                names: false,
            },
            (None, _) if mode == SslMode::Require => Check::EncryptOnly,
            (None, _) => Check::Plain,
        })
    }

    /// The client certificate (chain) and private key to present: `sslcert` and `sslkey`, or
    /// else `~/.postgresql/postgresql.crt` and `.key` when the certificate is there, as libpq
    /// looks for them. A certificate named in the URL must exist (libpq would go on without
    /// it, and the server's refusal would not say why), and so must the key of a certificate.
    /// The key must not be open to others, as libpq requires.
    fn client_identity(
        &self,
        home: Option<&Path>,
    ) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsSetupError> {
        let at_home = |name: &str| home.map(|home| home.join(".postgresql").join(name));
        let cert = match &self.cert {
            Some(cert) => {
                let cert = PathBuf::from(cert);
                if !cert.is_file() {
                    return Err(TlsSetupError::NoClientCert(cert));
                }
                cert
            }
            None => match at_home("postgresql.crt").filter(|path| path.is_file()) {
                Some(cert) => cert,
                None => return Ok(None),
            },
        };
        let key = match (&self.key, at_home("postgresql.key")) {
            (Some(key), _) => PathBuf::from(key),
            (None, Some(key)) => key,
            (None, None) => PathBuf::from("~/.postgresql/postgresql.key"),
        };
        if !key.is_file() {
            return Err(TlsSetupError::NoKey { cert, key });
        }
        check_key_access(&key)?;
        let chain = read_certificates(&cert, "client certificate")?;
        let private =
            PrivateKeyDer::from_pem_file(&key).map_err(|source| TlsSetupError::ReadKey {
                path: key.clone(),
                source,
            })?;
        Ok(Some((chain, private)))
    }

    /// Whether a verifying mode was asked (`tokio_postgres` must then be told `require`).
    fn verifies(&self) -> bool {
        matches!(self.mode.as_deref(), Some("verify-ca" | "verify-full"))
            || self.root_cert.as_deref() == Some("system")
    }
}

/// The certificates of a PEM file (`what` they are, for errors): at least one.
fn read_certificates(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsSetupError::Read {
            what,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Refuses a private key that others may read or write (libpq's rule, [`key_exposed`]).
fn check_key_access(key: &Path) -> Result<(), TlsSetupError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(key).map_err(|source| TlsSetupError::KeyMetadata {
        path: key.to_owned(),
        source,
    })?;
    if key_exposed(meta.uid(), meta.mode()) {
        return Err(TlsSetupError::KeyExposed(key.to_owned()));
    }
    Ok(())
}

/// Whether a key file of owner `uid` and permissions `mode` is open to others, as libpq
/// decides it: owned by root, the group may read it (a key shared with a group of services);
/// owned by anyone else, nothing for group or others.
fn key_exposed(uid: u32, mode: u32) -> bool {
    if uid == 0 {
        mode & 0o037 != 0
    } else {
        mode & 0o077 != 0
    }
}

/// Takes out of `url` what `tokio_postgres::Config` does not read: `sslrootcert`, `sslcert`,
/// `sslkey`, and
/// `sslmode` when it is `verify-ca` or `verify-full` (it reads the other modes, which stay).
/// Both forms of a connection string are read: `postgres://…?key=value&…` and
/// `key=value key='value' …`. Returns the rest, to be parsed, and what was taken.
pub(super) fn split_url(url: &str) -> Result<(String, TlsWanted), String> {
    let mut wanted = TlsWanted::default();
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    if is_url {
        // As libpq reads a URL: credentials run to the first `@` or `/` after the scheme (a
        // password may hold `?`), and the query starts at the first `?` after them.
        let scheme_end = url.find("://").map_or(0, |at| at + 3);
        let after_scheme = &url[scheme_end..];
        let host_start = scheme_end
            + match after_scheme.find(['@', '/']) {
                Some(at) if after_scheme.as_bytes()[at] == b'@' => at + 1,
                _ => 0,
            };
        let Some(query_start) = url[host_start..].find('?').map(|at| host_start + at) else {
            return Ok((url.to_owned(), wanted));
        };
        let (base, query) = (&url[..query_start], &url[query_start + 1..]);
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decoded = |text: &str| {
                percent_encoding::percent_decode_str(text)
                    .decode_utf8()
                    .map(|text| text.into_owned())
                    .map_err(|_| format!("the URL's {key} is not UTF-8 once decoded"))
            };
            if wanted.take(&decoded(key)?, || decoded(value))? {
                continue;
            }
            kept.push(pair);
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, wanted));
    }
    let mut kept = Vec::new();
    for (key, value) in key_values(url)? {
        if wanted.take(&key, || Ok(value.clone()))? {
            continue;
        }
        let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
        kept.push(format!("{key}='{quoted}'"));
    }
    Ok((kept.join(" "), wanted))
}

impl TlsWanted {
    /// Keeps `key`'s value if it is one of ours; whether it was.
    fn take(
        &mut self,
        key: &str,
        value: impl FnOnce() -> Result<String, String>,
    ) -> Result<bool, String> {
        // As libpq: an empty value is no value (the default applies).
        let given = |value: String| (!value.is_empty()).then_some(value);
        match key {
            "sslrootcert" => {
                self.root_cert = given(value()?);
                Ok(true)
            }
            "sslcert" => {
                self.cert = given(value()?);
                Ok(true)
            }
            "sslkey" => {
                self.key = given(value()?);
                Ok(true)
            }
            "sslmode" => {
                let mode = given(value()?);
                // `allow` (plain first, TLS only if the server insists) connects as `disable`
                // here: the parser does not know it, and a server that insists says so
                // (`DatabaseFault::NeedsTls`).
                let ours = matches!(
                    mode.as_deref(),
                    Some("verify-ca" | "verify-full" | "allow") | None
                );
                self.mode = mode;
                Ok(ours)
            }
            _ => Ok(false),
        }
    }
}

/// The pairs of a `key=value` connection string, as libpq reads it: values bare (up to the
/// next space) or in single quotes, a backslash escaping the character after it.
fn key_values(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!("`{key}` is not followed by `=`"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => return Err(format!("the quoted value of `{key}` is not closed")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, TlsWanted) {
        split_url(url).unwrap()
    }

    fn wanted(mode: Option<&str>, root: Option<&str>) -> TlsWanted {
        TlsWanted {
            mode: mode.map(str::to_owned),
            root_cert: root.map(str::to_owned),
            ..TlsWanted::default()
        }
    }

    #[test]
    fn a_url_loses_what_the_parser_does_not_read_and_keeps_the_rest() {
        let (rest, taken) = split(
            "postgres://u@h:5/db?sslmode=verify-full&application_name=a%20b\
             &sslrootcert=%2Ftmp%2Fmy%20ca.pem&connect_timeout=3",
        );
        assert_eq!(
            rest,
            "postgres://u@h:5/db?application_name=a%20b&connect_timeout=3"
        );
        assert_eq!(taken, wanted(Some("verify-full"), Some("/tmp/my ca.pem")));
        let (rest, taken) = split("postgresql://h/db?sslrootcert=system");
        assert_eq!(
            (rest.as_str(), taken),
            ("postgresql://h/db", wanted(None, Some("system")))
        );
        // Modes the parser reads stay for it, and are noted.
        let (rest, taken) = split("postgres://h/db?sslmode=require");
        assert_eq!(
            (rest.as_str(), taken),
            (
                "postgres://h/db?sslmode=require",
                wanted(Some("require"), None)
            )
        );
        assert_eq!(split("postgres://h/db").0, "postgres://h/db");
        assert!(rest.parse::<tokio_postgres::Config>().is_ok());
    }

    #[test]
    fn a_key_value_string_loses_them_too_and_its_values_keep_their_quotes() {
        let (rest, taken) = split(
            r"host=h  sslmode = verify-ca sslrootcert='/a b/it\'s.pem' password=x\ y dbname=d",
        );
        assert_eq!(taken, wanted(Some("verify-ca"), Some("/a b/it's.pem")));
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_password(), Some(&b"x y"[..]));
        assert_eq!(config.get_dbname(), Some("d"));
        assert!(split_url("host='h").unwrap_err().contains("not closed"));
        assert!(split_url("host").unwrap_err().contains("`host`"));
    }

    #[test]
    fn the_check_follows_libpq() {
        let home = tempfile::tempdir().unwrap();
        let none = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".postgresql")).unwrap();
        let default = home.path().join(".postgresql").join("root.crt");
        std::fs::write(&default, "").unwrap();
        let check = |w: TlsWanted, mode, home: &Path| w.check(mode, Some(home));
        use SslMode::{Prefer, Require};
        let given = || Roots::File(PathBuf::from("/r.pem"));
        let found = || Roots::File(default.clone());
        let roots = |roots, names| Check::Roots { roots, names };
        // (sslmode, sslrootcert, the mode tokio_postgres read, a root at home, the check)
        let cases = [
            (None, None, Prefer, true, Check::Plain),
            (Some("require"), None, Require, false, Check::EncryptOnly),
            // `require` with a root certificate, given or found at home, checks the issuer.
            (Some("require"), None, Require, true, roots(found(), false)),
            (
                Some("require"),
                Some("/r.pem"),
                Require,
                false,
                roots(given(), false),
            ),
            (
                Some("verify-full"),
                None,
                Require,
                true,
                roots(found(), true),
            ),
            (
                Some("verify-ca"),
                Some("/r.pem"),
                Require,
                true,
                roots(given(), false),
            ),
            (
                None,
                Some("system"),
                Prefer,
                false,
                roots(Roots::System, true),
            ),
        ];
        for (mode, root, read, at_home, expected) in cases {
            let dir = if at_home { home.path() } else { none.path() };
            let got = check(wanted(mode, root), read, dir).unwrap();
            assert_eq!(got, expected, "{mode:?} {root:?} at home: {at_home}");
        }
        let refused = check(wanted(Some("verify-full"), None), Require, none.path()).unwrap_err();
        let message = refused.to_string();
        assert!(message.contains("sslrootcert=FILE"), "{message}");
        assert!(
            message.contains(
                &none
                    .path()
                    .join(".postgresql/root.crt")
                    .display()
                    .to_string()
            ),
            "{message}"
        );
        let weaker = check(
            wanted(Some("require"), Some("system")),
            Require,
            none.path(),
        );
        assert!(matches!(weaker, Err(TlsSetupError::SystemNeedsFull { .. })));
    }

    #[test]
    fn a_key_open_to_others_is_refused_as_libpq_refuses_it() {
        // (owner, mode, refused)
        for (uid, mode, refused) in [
            (1000, 0o600, false),
            (1000, 0o400, false),
            (1000, 0o640, true),
            (1000, 0o604, true),
            (0, 0o600, false),
            (0, 0o640, false),
            (0, 0o660, true),
            (0, 0o644, true),
        ] {
            assert_eq!(key_exposed(uid, mode), refused, "uid {uid}, mode {mode:o}");
        }
    }

    #[test]
    fn a_password_may_hold_a_question_mark_and_empty_values_are_none() {
        let (rest, taken) = split("postgres://u:pa?ss@h/db?sslmode=verify-full&sslrootcert=/r.pem");
        assert_eq!(rest, "postgres://u:pa?ss@h/db");
        assert_eq!(taken, wanted(Some("verify-full"), Some("/r.pem")));
        assert_eq!(
            split("postgres://h/db?sslrootcert=&sslcert=&sslmode=").1,
            TlsWanted::default()
        );
        // `allow` is ours to read: the parser does not know it, and it connects plain.
        let (rest, taken) = split("postgres://h/db?sslmode=allow");
        assert_eq!(
            (rest.as_str(), taken.verifies()),
            ("postgres://h/db", false)
        );
        let config: tokio_postgres::Config = rest.parse().unwrap();
        let none = tempfile::tempdir().unwrap();
        assert_eq!(
            taken
                .check(config.get_ssl_mode(), Some(none.path()))
                .unwrap(),
            Check::Plain
        );
    }

    #[test]
    fn sockets_connect_plain_and_tls_needs_a_host_name() {
        let none = tempfile::tempdir().unwrap();
        let connector = |url: &str| {
            let (rest, taken) = split(url);
            let mut config: tokio_postgres::Config = rest.parse().unwrap();
            let connector = Connector::for_url(&mut config, &taken, Some(none.path()));
            connector.map(|connector| (connector, config.get_ssl_mode()))
        };
        // No root certificate anywhere: over a socket it is not needed.
        let socket = connector("host=/run/postgresql sslmode=verify-full user=u").unwrap();
        assert!(matches!(socket, (Connector::Plain, SslMode::Disable)));
        let socket = connector("postgres:///d?host=/run/postgresql&sslmode=require").unwrap();
        assert!(matches!(socket, (Connector::Plain, SslMode::Disable)));
        assert!(matches!(
            connector("hostaddr=127.0.0.1 sslmode=require user=u"),
            Err(TlsSetupError::NoHostName)
        ));
        assert!(matches!(
            connector("host=h hostaddr=127.0.0.1 sslmode=verify-ca sslrootcert=/r.pem user=u"),
            Err(TlsSetupError::Read { .. })
        ));
        assert!(matches!(
            connector("host=h hostaddr=127.0.0.1 sslmode=require user=u"),
            Ok((Connector::Tls(_), SslMode::Require))
        ));
    }

    #[test]
    fn a_root_file_without_a_certificate_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let error = Roots::File(path.clone()).load().unwrap_err().to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
        let missing = dir.path().join("missing.pem");
        let error = Roots::File(missing.clone()).load().unwrap_err().to_string();
        assert!(
            error.contains("could not read") && error.contains("missing.pem"),
            "{error}"
        );
    }
}
