//! Link security for BlazeDB: libp2p's TLS 1.3 security upgrade, with the hybrid post-quantum
//! key exchange **required**, not merely preferred.
//!
//! libp2p-tls (rustls + aws-lc-rs) offers X25519MLKEM768 first, but a peer that offers only
//! classical X25519 still completes a handshake with it. [`PqTlsConfig`] is a drop-in
//! replacement for `libp2p::tls::Config` that, after every handshake, reads the key-exchange
//! group rustls negotiated and, under the default [`KxPolicy::Strict`], refuses the connection
//! unless it is `X25519MLKEM768` — on both the dialing and the listening side. The negotiated
//! group of every accepted link is recorded in a [`LinkRegistry`] so the node can show it.
//!
//! It builds its rustls configs itself, around libp2p's certificate format and checks
//! (`libp2p::tls::certificate::generate` / `parse`: the same certificates, so stock libp2p TLS
//! peers interoperate, tested both ways), for two reasons: it never writes TLS secrets to a
//! key-log file (libp2p-tls would, when `SSLKEYLOGFILE` is set), and it orders the cipher
//! suites for the CPU ([`cipher_suites`]: AES-GCM first where the CPU has AES instructions;
//! libp2p-tls lists ChaCha20-Poly1305 first everywhere).
//!
//! No other security protocol should be offered next to this one: protocol negotiation
//! (multistream-select) is unauthenticated, so offering Noise as well would let an active
//! attacker push both sides to it.
//!
//! This crate never touches storage.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::{AsyncRead, AsyncWrite, FutureExt};
use futures_rustls::TlsStream;
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade};
use libp2p::core::UpgradeInfo;
use libp2p::identity::{Keypair, PeerId};
use rustls::pki_types::ServerName;
use rustls::{CommonState, NamedGroup};

/// The name BlazeDB requires and reports for the hybrid group.
pub const HYBRID_GROUP: &str = "X25519MLKEM768";

/// Which key exchanges a link may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KxPolicy {
    /// Only the hybrid X25519MLKEM768 group; anything else is refused on both ends.
    #[default]
    Strict,
    /// Prefer the hybrid group but accept classical X25519 (logged as a warning per link).
    /// For interoperating with peers that cannot do post-quantum yet; off by default.
    Compat,
}

impl std::str::FromStr for KxPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "strict" => Ok(KxPolicy::Strict),
            "compat" => Ok(KxPolicy::Compat),
            other => Err(format!(
                "unknown policy {other:?} (expected strict or compat)"
            )),
        }
    }
}

/// What was negotiated on an accepted link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// Key-exchange group, e.g. `X25519MLKEM768`.
    pub key_exchange: String,
    /// TLS version, e.g. `TLSv1_3`.
    pub protocol: String,
    /// Cipher suite.
    pub cipher_suite: String,
}

/// Negotiated parameters of the latest link with each peer. Shared between the security
/// upgrade (which writes) and the node (which reads, and forgets peers that disconnect).
#[derive(Clone, Debug, Default)]
pub struct LinkRegistry {
    inner: Arc<Mutex<HashMap<PeerId, LinkInfo>>>,
}

impl LinkRegistry {
    /// Link parameters of `peer`, if connected through a [`PqTlsConfig`].
    pub fn get(&self, peer: &PeerId) -> Option<LinkInfo> {
        self.inner.lock().ok()?.get(peer).cloned()
    }

    /// Forgets `peer` (call when its last connection closes).
    pub fn remove(&self, peer: &PeerId) {
        if let Ok(mut m) = self.inner.lock() {
            m.remove(peer);
        }
    }

    fn record(&self, peer: PeerId, info: LinkInfo) {
        if let Ok(mut m) = self.inner.lock() {
            m.insert(peer, info);
        }
    }
}

/// Errors of the security upgrade.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// Our certificate could not be generated.
    #[error("generating the TLS certificate: {0}")]
    Certificate(#[from] libp2p::tls::certificate::GenError),
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    /// The peer's certificate is not a valid libp2p certificate.
    #[error("bad peer certificate: {0}")]
    BadCertificate(String),
    /// The handshake completed with a key exchange the policy does not allow.
    #[error("refusing link: key exchange {got} is not {HYBRID_GROUP} (policy: strict)")]
    ClassicalKeyExchange {
        /// The group that was negotiated.
        got: String,
    },
}

/// Seeds AWS-LC's random generator on a background thread, once per process, so that the
/// first TLS handshake does not wait for it. AWS-LC seeds its generator from CPU jitter
/// entropy at its first use, ~35–45 ms of computation on the 2-vCPU machine (perf of a fresh
/// node: `jent_*` functions were nearly all of its samples until its first link was up). Done
/// in line, that first use was the first handshake: a fresh node's first link, and the first
/// link a node that had not yet handshaken accepted, each waited for it. A node calls this
/// first thing when it starts, so the seeding overlaps opening its store. Later calls do
/// nothing; a handshake that starts before the seeding ends waits for the rest of it, as it
/// did before.
pub fn warm_up() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let seed = || {
            let mut byte = [0u8; 1];
            // The result does not matter here: a generator that cannot seed fails the
            // handshakes that need it, with their own errors.
            let _ = rustls::crypto::aws_lc_rs::default_provider()
                .secure_random
                .fill(&mut byte);
        };
        if std::thread::Builder::new()
            .name("blazedb-rng-seed".into())
            .spawn(seed)
            .is_err()
        {
            seed();
        }
    });
}

/// libp2p TLS 1.3 security upgrade that enforces a [`KxPolicy`].
#[derive(Clone)]
pub struct PqTlsConfig {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    policy: KxPolicy,
    registry: LinkRegistry,
    /// Warn about every classical link (off only for the deliberately classical test peer).
    warn_classical: bool,
}

impl PqTlsConfig {
    /// A config for `keypair` under `policy`, recording links in `registry`.
    pub fn new(
        keypair: &Keypair,
        policy: KxPolicy,
        registry: LinkRegistry,
    ) -> Result<Self, LinkError> {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.cipher_suites = cipher_suites();
        let (server, client) =
            configs(keypair, Arc::new(provider), Arc::new(Verifier(Libp2pRules)))?;
        debug_assert_eq!(
            client.crypto_provider().kx_groups.first().map(|g| g.name()),
            Some(NamedGroup::X25519MLKEM768),
            "aws-lc-rs should offer the hybrid group first"
        );
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
            policy,
            registry,
            warn_classical: true,
        })
    }

    /// A peer that offers **only** classical X25519, as an old or downgrading peer would,
    /// as dialer and as listener. For tests and interoperability checks; never used by a node.
    pub fn classical_only(keypair: &Keypair) -> Result<Self, LinkError> {
        let registry = LinkRegistry::default();
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
        let (server, client) = configs(keypair, Arc::new(provider), Arc::new(Verifier(AcceptAny)))?;
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
            policy: KxPolicy::Compat,
            registry,
            warn_classical: false,
        })
    }

    /// The registry this config records links in.
    pub fn registry(&self) -> &LinkRegistry {
        &self.registry
    }

    /// The policy in force.
    pub fn policy(&self) -> KxPolicy {
        self.policy
    }

    fn check(&self, state: &CommonState) -> Result<(PeerId, LinkInfo), LinkError> {
        let Some([cert]) = state.peer_certificates() else {
            return Err(LinkError::BadCertificate(
                "expected exactly one certificate".into(),
            ));
        };
        let peer = libp2p::tls::certificate::parse(cert)
            .map_err(|e| LinkError::BadCertificate(e.to_string()))?
            .peer_id();
        let group = state.negotiated_key_exchange_group().map(|g| g.name());
        let key_exchange = match group {
            Some(NamedGroup::X25519MLKEM768) => HYBRID_GROUP.to_string(),
            Some(other) => format!("{other:?}"),
            None => "none".to_string(),
        };
        if group != Some(NamedGroup::X25519MLKEM768) {
            match self.policy {
                KxPolicy::Strict => {
                    return Err(LinkError::ClassicalKeyExchange { got: key_exchange })
                }
                KxPolicy::Compat if !self.warn_classical => {}
                KxPolicy::Compat => tracing::warn!(
                    %peer,
                    key_exchange = %key_exchange,
                    "CLASSICAL key exchange accepted (pq-policy=compat): this link is not post-quantum secure"
                ),
            }
        }
        let info = LinkInfo {
            key_exchange,
            protocol: state
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default(),
            cipher_suite: state
                .negotiated_cipher_suite()
                .map(|c| format!("{:?}", c.suite()))
                .unwrap_or_default(),
        };
        Ok((peer, info))
    }
}

impl UpgradeInfo for PqTlsConfig {
    type Info = &'static str;
    type InfoIter = std::iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        std::iter::once("/tls/1.0.0")
    }
}

impl<C> InboundConnectionUpgrade<C> for PqTlsConfig
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, TlsStream<C>);
    type Error = LinkError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            let stream = futures_rustls::TlsAcceptor::from(self.server.clone())
                .accept(socket)
                .await
                .map_err(LinkError::Handshake)?;
            let (peer, info) = self.check(stream.get_ref().1)?;
            self.registry.record(peer, info);
            Ok((peer, stream.into()))
        }
        .boxed()
    }
}

impl<C> OutboundConnectionUpgrade<C> for PqTlsConfig
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, TlsStream<C>);
    type Error = LinkError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            // libp2p TLS spec: no SNI (an unspecified address disables it).
            let name = ServerName::IpAddress(rustls::pki_types::IpAddr::from(IpAddr::V4(
                Ipv4Addr::UNSPECIFIED,
            )));
            let stream = futures_rustls::TlsConnector::from(self.client.clone())
                .connect(name, socket)
                .await
                .map_err(LinkError::Handshake)?;
            let (peer, info) = self.check(stream.get_ref().1)?;
            self.registry.record(peer, info);
            Ok((peer, stream.into()))
        }
        .boxed()
    }
}

/// TLS 1.3 cipher suites in the order this node prefers them: AES-GCM first where the CPU
/// has AES and carry-less multiply instructions (there it costs a fraction of
/// ChaCha20-Poly1305's CPU per byte: ~3% of all CPU in B3's replication before, when libp2p's
/// ChaCha-first order was used), ChaCha20-Poly1305 first where it has not. A TLS 1.3 server
/// picks the first suite of the client's list that it supports, so links this node dials
/// use its order.
pub fn cipher_suites() -> Vec<rustls::SupportedCipherSuite> {
    use rustls::crypto::aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    if aes_hardware() {
        vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ]
    } else {
        vec![
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
        ]
    }
}

/// Whether this CPU has instructions that make AES-GCM cheap.
pub fn aes_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// A server and a client TLS 1.3 config for `keypair`: libp2p's self-signed certificate (the
/// public key signed by the libp2p identity key in a critical extension), `provider`'s suites
/// and groups, the ALPN libp2p uses, client certificates required, no key log.
fn configs<V>(
    keypair: &Keypair,
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: Arc<V>,
) -> Result<(rustls::ServerConfig, rustls::ClientConfig), LinkError>
where
    V: rustls::client::danger::ServerCertVerifier
        + rustls::server::danger::ClientCertVerifier
        + 'static,
{
    let (cert, key) = libp2p::tls::certificate::generate(keypair)?;
    configs_with(cert, key, provider, verifier)
}

/// [`configs`] with a given certificate and its key.
fn configs_with<V>(
    cert: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: Arc<V>,
) -> Result<(rustls::ServerConfig, rustls::ClientConfig), LinkError>
where
    V: rustls::client::danger::ServerCertVerifier
        + rustls::server::danger::ClientCertVerifier
        + 'static,
{
    let err = |e: rustls::Error| LinkError::BadCertificate(e.to_string());
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).map_err(err)?;
    let fixed = Arc::new(FixedCert(Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert],
        signer,
    ))));
    let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_client_cert_resolver(fixed.clone());
    client.alpn_protocols = vec![b"libp2p".to_vec()];
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(err)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(fixed);
    server.alpn_protocols = vec![b"libp2p".to_vec()];
    Ok((server, client))
}

/// What one end accepts of its peer's certificate and handshake signatures; [`Verifier`]
/// applies the same rules as client and as server (rustls has one trait for each).
trait CertRules: std::fmt::Debug + Send + Sync + 'static {
    /// The peer's certificate chain.
    fn certificate(
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
    ) -> Result<(), rustls::Error>;
    /// A TLS 1.3 handshake signature by `cert`'s key.
    fn signature(
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<(), rustls::Error>;
}

/// The libp2p TLS certificate rules, on both ends (the libp2p TLS spec): exactly one
/// certificate, which `libp2p::tls::certificate::parse` accepts (self-signed, within its
/// validity period, with the critical extension carrying the libp2p public key and its
/// signature over the certificate's key), and handshake signatures made by that
/// certificate's key. The peer's identity is read from the certificate after the handshake
/// ([`PqTlsConfig`]'s check); the swarm compares it with the peer it dialed.
#[derive(Debug)]
struct Libp2pRules;

impl CertRules for Libp2pRules {
    fn certificate(
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "libp2p TLS requires exactly one certificate".into(),
            ));
        }
        libp2p::tls::certificate::parse(end_entity)?;
        Ok(())
    }

    fn signature(
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<(), rustls::Error> {
        libp2p::tls::certificate::parse(cert)?.verify_signature(
            dss.scheme,
            message,
            dss.signature(),
        )?;
        Ok(())
    }
}

/// The rules of the classical test peer: anything goes (that peer exists to be refused, not
/// to authenticate anyone).
#[derive(Debug)]
struct AcceptAny;

impl CertRules for AcceptAny {
    fn certificate(
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        Ok(())
    }

    fn signature(
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<(), rustls::Error> {
        Ok(())
    }
}

/// A rustls certificate verifier for both ends applying `R`; TLS 1.2 is never offered.
#[derive(Debug)]
struct Verifier<R>(R);

/// The schemes libp2p certificates may use, elliptic curves first.
fn schemes() -> Vec<rustls::SignatureScheme> {
    use rustls::SignatureScheme as S;
    vec![
        S::ECDSA_NISTP384_SHA384,
        S::ECDSA_NISTP256_SHA256,
        S::ED25519,
        S::RSA_PSS_SHA512,
        S::RSA_PSS_SHA384,
        S::RSA_PSS_SHA256,
        S::RSA_PKCS1_SHA512,
        S::RSA_PKCS1_SHA384,
        S::RSA_PKCS1_SHA256,
    ]
}

fn no_tls12() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is not offered".into())
}

impl<R: CertRules> rustls::client::danger::ServerCertVerifier for Verifier<R> {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        R::certificate(end_entity, intermediates)?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        R::signature(message, cert, dss)?;
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        schemes()
    }
}

impl<R: CertRules> rustls::server::danger::ClientCertVerifier for Verifier<R> {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        R::certificate(end_entity, intermediates)?;
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        R::signature(message, cert, dss)?;
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        schemes()
    }
}

/// A config's one certificate (libp2p's self-signed certificate with its critical extension,
/// which rustls' own certificate loading would refuse).
#[derive(Debug)]
struct FixedCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedCert {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::tcp::tokio::TcpStream;

    type Peer = Result<PeerId, LinkError>;

    /// Runs one handshake over real loopback TCP: `client` dials `server`.
    async fn handshake(server: PqTlsConfig, client: PqTlsConfig) -> (Peer, Peer) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            server
                .upgrade_inbound(TcpStream(s), "/tls/1.0.0")
                .await
                .map(|(p, _)| p)
        });
        let c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let client_res = client
            .upgrade_outbound(TcpStream(c), "/tls/1.0.0")
            .await
            .map(|(p, _)| p);
        (srv.await.unwrap(), client_res)
    }

    fn strict(kp: &Keypair) -> PqTlsConfig {
        PqTlsConfig::new(kp, KxPolicy::Strict, LinkRegistry::default()).unwrap()
    }

    #[tokio::test]
    async fn strict_peers_negotiate_the_hybrid_group() {
        let (ks, kc) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (server, client) = (strict(&ks), strict(&kc));
        let (sreg, creg) = (server.registry().clone(), client.registry().clone());
        let (s, c) = handshake(server, client).await;
        assert_eq!(s.unwrap(), kc.public().to_peer_id());
        assert_eq!(c.unwrap(), ks.public().to_peer_id());
        let info = sreg.get(&kc.public().to_peer_id()).unwrap();
        assert_eq!(info.key_exchange, HYBRID_GROUP);
        assert_eq!(info.protocol, "TLSv1_3");
        assert_eq!(
            creg.get(&ks.public().to_peer_id()).unwrap().key_exchange,
            HYBRID_GROUP
        );
    }

    #[tokio::test]
    async fn strict_listener_refuses_a_classical_dialer() {
        let (ks, kc) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let server = strict(&ks);
        let reg = server.registry().clone();
        let (s, _) = handshake(server, PqTlsConfig::classical_only(&kc).unwrap()).await;
        match s {
            Err(LinkError::ClassicalKeyExchange { got }) => assert_eq!(got, "X25519"),
            other => panic!("classical dialer accepted: {other:?}"),
        }
        assert!(reg.get(&kc.public().to_peer_id()).is_none());
    }

    #[tokio::test]
    async fn strict_dialer_refuses_a_classical_listener() {
        let (ks, kc) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (_, c) = handshake(PqTlsConfig::classical_only(&ks).unwrap(), strict(&kc)).await;
        assert!(
            matches!(c, Err(LinkError::ClassicalKeyExchange { .. })),
            "{c:?}"
        );
    }

    #[tokio::test]
    async fn compat_policy_accepts_classical_and_reports_it() {
        let (ks, kc) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let server = PqTlsConfig::new(&ks, KxPolicy::Compat, LinkRegistry::default()).unwrap();
        let reg = server.registry().clone();
        let (s, _) = handshake(server, PqTlsConfig::classical_only(&kc).unwrap()).await;
        assert_eq!(s.unwrap(), kc.public().to_peer_id());
        assert_eq!(
            reg.get(&kc.public().to_peer_id()).unwrap().key_exchange,
            "X25519"
        );
    }

    #[tokio::test]
    async fn links_use_the_cipher_this_cpu_runs_cheapest() {
        let (ks, kc) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (server, client) = (strict(&ks), strict(&kc));
        let (sreg, creg) = (server.registry().clone(), client.registry().clone());
        let (s, c) = handshake(server, client).await;
        let (s, c) = (s.unwrap(), c.unwrap());
        let want = if aes_hardware() {
            "TLS13_AES_128_GCM_SHA256"
        } else {
            "TLS13_CHACHA20_POLY1305_SHA256"
        };
        assert_eq!(sreg.get(&s).unwrap().cipher_suite, want);
        assert_eq!(creg.get(&c).unwrap().cipher_suite, want);
    }

    /// A stock libp2p TLS peer (libp2p-tls's own configs and verifier) and a BlazeDB node
    /// accept each other's certificates, in both directions, over the hybrid group.
    #[tokio::test]
    async fn stock_libp2p_tls_peers_interoperate() {
        let (ks, kc) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        // Stock dialer, BlazeDB listener.
        let server = strict(&ks);
        let reg = server.registry().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            server.upgrade_inbound(TcpStream(s), "/tls/1.0.0").await
        });
        let c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (peer, _) = libp2p::tls::Config::new(&kc)
            .unwrap()
            .upgrade_outbound(TcpStream(c), "/tls/1.0.0")
            .await
            .unwrap();
        assert_eq!(peer, ks.public().to_peer_id());
        let (peer, _) = srv.await.unwrap().unwrap();
        assert_eq!(peer, kc.public().to_peer_id());
        assert_eq!(reg.get(&peer).unwrap().key_exchange, HYBRID_GROUP);

        // BlazeDB dialer, stock listener.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stock = libp2p::tls::Config::new(&ks).unwrap();
        let srv = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            stock.upgrade_inbound(TcpStream(s), "/tls/1.0.0").await
        });
        let client = strict(&kc);
        let reg = client.registry().clone();
        let c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (peer, _) = client
            .upgrade_outbound(TcpStream(c), "/tls/1.0.0")
            .await
            .unwrap();
        assert_eq!(peer, ks.public().to_peer_id());
        assert_eq!(reg.get(&peer).unwrap().key_exchange, HYBRID_GROUP);
        let (peer, _) = srv.await.unwrap().unwrap();
        assert_eq!(peer, kc.public().to_peer_id());
    }

    /// A peer whose certificate's self-signature is damaged (its key and its libp2p extension
    /// intact): whichever end it is, the handshake fails and nothing is recorded.
    #[tokio::test]
    async fn a_damaged_certificate_is_refused_on_both_ends() {
        let damaged = |kp: &Keypair| {
            let (cert, key) = libp2p::tls::certificate::generate(kp).unwrap();
            let mut der = cert.to_vec();
            let last = der.len() - 1;
            der[last] ^= 0x01;
            assert!(
                libp2p::tls::certificate::parse(&rustls::pki_types::CertificateDer::from(
                    der.clone()
                ))
                .is_err(),
                "the damage should be detectable"
            );
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            // The damaged peer itself accepts anything, so only the honest end can refuse.
            let (server, client) =
                configs_with(der.into(), key, provider, Arc::new(Verifier(AcceptAny))).unwrap();
            PqTlsConfig {
                server: Arc::new(server),
                client: Arc::new(client),
                policy: KxPolicy::Strict,
                registry: LinkRegistry::default(),
                warn_classical: true,
            }
        };
        let (ks, kc) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let honest = strict(&ks);
        let reg = honest.registry().clone();
        let (s, _) = handshake(honest, damaged(&kc)).await;
        assert!(matches!(s, Err(LinkError::Handshake(_))), "{s:?}");
        assert!(reg.get(&kc.public().to_peer_id()).is_none());

        let honest = strict(&kc);
        let reg = honest.registry().clone();
        let (_, c) = handshake(damaged(&ks), honest).await;
        assert!(matches!(c, Err(LinkError::Handshake(_))), "{c:?}");
        assert!(reg.get(&ks.public().to_peer_id()).is_none());
    }

    #[test]
    fn policy_parses() {
        assert_eq!("strict".parse::<KxPolicy>().unwrap(), KxPolicy::Strict);
        assert_eq!("compat".parse::<KxPolicy>().unwrap(), KxPolicy::Compat);
        assert!("none".parse::<KxPolicy>().is_err());
    }
}
