//! Identities of BlazeDB nodes and authors.
//!
//! Every node has exactly one ed25519 key. The same key is, at once:
//! - the node's `did:key` (the author id on every batch it writes),
//! - its libp2p `PeerId` (the identity its links authenticate),
//! - the signer of its change-log batches.
//!
//! This crate owns the keypair type, the `did:key` codec (multicodec `0xed01` + base58btc), the
//! lossless mapping between `did:key` and `PeerId`, and the key file on disk (32-byte seed,
//! mode 0600). It never touches the network.
//!
//! Signature verification is always *strict* (`verify_strict`): malleable signatures and
//! small-order keys are rejected, so two replicas never disagree on whether a batch is valid.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand::RngCore;

/// Length in bytes of an ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length in bytes of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Length in bytes of the seed stored in a key file.
pub const SEED_LEN: usize = 32;

/// Multicodec prefix of an ed25519 public key (`0xed` as an unsigned varint).
const ED25519_MULTICODEC: [u8; 2] = [0xed, 0x01];
const DID_KEY_PREFIX: &str = "did:key:z";

/// Everything that can go wrong with identities.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The text is not a `did:key` for an ed25519 key.
    #[error("invalid did:key {did:?}: {reason}")]
    InvalidDid {
        /// The offending text (truncated).
        did: String,
        /// What was wrong.
        reason: &'static str,
    },
    /// 32 bytes that are not a valid ed25519 point.
    #[error("invalid ed25519 public key")]
    InvalidPublicKey,
    /// A PeerId that does not carry an ed25519 key inline.
    #[error("PeerId {0} does not embed an ed25519 public key")]
    UnsupportedPeerId(String),
    /// The key file could not be read or written.
    #[error("key file {path}: {source}")]
    KeyFileIo {
        /// Path of the key file.
        path: String,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The key file exists but its content or permissions are wrong.
    #[error("key file {path}: {reason}")]
    KeyFileInvalid {
        /// Path of the key file.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

/// An ed25519 public key: an author, a node, a principal.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; PUBLIC_KEY_LEN]);

impl PublicKey {
    /// Parses 32 bytes, rejecting those that are not a valid curve point.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IdentityError> {
        let arr: [u8; PUBLIC_KEY_LEN] = bytes
            .try_into()
            .map_err(|_| IdentityError::InvalidPublicKey)?;
        VerifyingKey::from_bytes(&arr).map_err(|_| IdentityError::InvalidPublicKey)?;
        Ok(Self(arr))
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.0
    }

    /// Verifies `signature` over `message` with strict ed25519 rules.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(sig) = <[u8; SIGNATURE_LEN]>::try_from(signature) else {
            return false;
        };
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        key.verify_strict(message, &ed25519_dalek::Signature::from_bytes(&sig))
            .is_ok()
    }

    /// The `did:key:z6Mk…` form.
    pub fn to_did(&self) -> String {
        let mut buf = Vec::with_capacity(2 + PUBLIC_KEY_LEN);
        buf.extend_from_slice(&ED25519_MULTICODEC);
        buf.extend_from_slice(&self.0);
        format!("{DID_KEY_PREFIX}{}", bs58::encode(buf).into_string())
    }

    /// Parses a `did:key` naming an ed25519 key.
    pub fn from_did(did: &str) -> Result<Self, IdentityError> {
        let err = |reason| IdentityError::InvalidDid {
            did: did.chars().take(80).collect(),
            reason,
        };
        let rest = did
            .strip_prefix(DID_KEY_PREFIX)
            .ok_or_else(|| err("must start with did:key:z"))?;
        if rest.len() > 64 {
            return Err(err("too long for an ed25519 did:key"));
        }
        let bytes = bs58::decode(rest)
            .into_vec()
            .map_err(|_| err("not base58btc"))?;
        let key = bytes
            .strip_prefix(&ED25519_MULTICODEC[..])
            .ok_or_else(|| err("not ed25519"))?;
        if key.len() != PUBLIC_KEY_LEN {
            return Err(err("wrong key length"));
        }
        Self::from_bytes(key).map_err(|_| err("not a valid ed25519 point"))
    }

    /// The libp2p `PeerId` of this key (identity multihash of its protobuf encoding).
    pub fn to_peer_id(&self) -> libp2p_identity::PeerId {
        self.to_libp2p().to_peer_id()
    }

    /// The libp2p public key.
    pub fn to_libp2p(&self) -> libp2p_identity::PublicKey {
        // The bytes were validated as a curve point on construction.
        let key = libp2p_identity::ed25519::PublicKey::try_from_bytes(&self.0)
            .expect("validated ed25519 point");
        libp2p_identity::PublicKey::from(key)
    }

    /// Recovers the key from a `PeerId` that embeds an ed25519 key (all BlazeDB peers do).
    pub fn from_peer_id(peer: &libp2p_identity::PeerId) -> Result<Self, IdentityError> {
        let unsupported = || IdentityError::UnsupportedPeerId(peer.to_string());
        let mh = peer.as_ref();
        // 0x00 = identity multihash: the digest is the protobuf-encoded public key.
        if mh.code() != 0x00 {
            return Err(unsupported());
        }
        let key = libp2p_identity::PublicKey::try_decode_protobuf(mh.digest())
            .map_err(|_| unsupported())?;
        let key = key.try_into_ed25519().map_err(|_| unsupported())?;
        Self::from_bytes(&key.to_bytes())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_did())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_did())
    }
}

impl FromStr for PublicKey {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_did(s)
    }
}

/// A node's ed25519 keypair.
#[derive(Clone)]
pub struct Keypair {
    signing: SigningKey,
}

impl Keypair {
    /// A fresh keypair from the operating system's entropy.
    pub fn generate() -> Self {
        let mut seed = [0u8; SEED_LEN];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        Self::from_seed(seed)
    }

    /// The keypair derived from a 32-byte seed (the RFC 8032 secret key).
    pub fn from_seed(seed: [u8; SEED_LEN]) -> Self {
        Self {
            signing: SigningKey::from_bytes(&seed),
        }
    }

    /// The 32-byte seed. Keep it secret.
    pub fn seed(&self) -> [u8; SEED_LEN] {
        self.signing.to_bytes()
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key().to_bytes())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.signing.sign(message).to_bytes()
    }

    /// The same key as a libp2p keypair (so PeerId == did:key).
    pub fn to_libp2p(&self) -> libp2p_identity::Keypair {
        let mut seed = self.seed();
        libp2p_identity::Keypair::ed25519_from_bytes(&mut seed).expect("32-byte ed25519 seed")
    }

    /// Loads the key file at `path`, or creates it (mode 0600) with a fresh key if it does not
    /// exist. An existing file that is not exactly a 32-byte seed, or that others can read, is
    /// an error: we never silently replace an identity.
    pub fn load_or_create(path: &Path) -> Result<Self, IdentityError> {
        match std::fs::metadata(path) {
            Ok(_) => Self::load(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let kp = Self::generate();
                kp.save_new(path)?;
                Ok(kp)
            }
            Err(source) => Err(IdentityError::KeyFileIo {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Loads an existing key file.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let p = path.display().to_string();
        let invalid = |reason: String| IdentityError::KeyFileInvalid {
            path: p.clone(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|source| IdentityError::KeyFileIo {
            path: p.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(invalid("not a regular file".into()));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(invalid(format!(
                    "permissions {mode:o} let other users read the secret key; run `chmod 600 {p}`"
                )));
            }
        }
        let bytes = std::fs::read(path).map_err(|source| IdentityError::KeyFileIo {
            path: p.clone(),
            source,
        })?;
        let seed: [u8; SEED_LEN] = bytes.as_slice().try_into().map_err(|_| {
            invalid(format!(
                "expected a {SEED_LEN}-byte ed25519 seed, found {} bytes",
                bytes.len()
            ))
        })?;
        Ok(Self::from_seed(seed))
    }

    /// Writes the seed to a new file with mode 0600; fails if the file exists.
    pub fn save_new(&self, path: &Path) -> Result<(), IdentityError> {
        use std::io::Write;
        let p = path.display().to_string();
        let io = |source| IdentityError::KeyFileIo {
            path: p.clone(),
            source,
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(io)?;
        f.write_all(&self.seed()).map_err(io)?;
        f.sync_all().map_err(io)?;
        Ok(())
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({})", self.public().to_did())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex32(s: &str) -> [u8; 32] {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    /// libp2p peer-id spec vector: seed -> public key -> PeerId.
    #[test]
    fn libp2p_peer_id_vector() {
        let kp = Keypair::from_seed(hex32(
            "7e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d",
        ));
        assert_eq!(
            hex::encode(kp.public().as_bytes()),
            "1ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
        );
        let peer = kp.public().to_peer_id();
        assert_eq!(
            peer.to_string(),
            "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"
        );
        assert_eq!(peer, kp.to_libp2p().public().to_peer_id());
        assert_eq!(PublicKey::from_peer_id(&peer).unwrap(), kp.public());
    }

    /// did:key vectors published with two independent did:key implementations.
    #[test]
    fn did_key_vectors() {
        for (did, pk_b58) in [
            (
                "did:key:z6MkmjY8GnV5i9YTDtPETC2uUAW6ejw3nk5mXF5yci5ab7th",
                "8HH5gYEeNc3z7PYXmd54d4x6qAfCNrqQqEB3nS7Zfu7K",
            ),
            (
                "did:key:z6MkwJSaEMnE4u6LiqrZV1BJHSkc9x8S4mTm3ArNL1m19BZR",
                "HrBXe7XnjMbscM1roSDTSMCcLNraetDQM9wSVjnzDxn3",
            ),
        ] {
            let raw = bs58::decode(pk_b58).into_vec().unwrap();
            let pk = PublicKey::from_bytes(&raw).unwrap();
            assert_eq!(pk.to_did(), did);
            assert_eq!(PublicKey::from_did(did).unwrap(), pk);
        }
    }

    #[test]
    fn did_and_peer_id_roundtrip() {
        let kp = Keypair::generate();
        let pk = kp.public();
        assert!(pk.to_did().starts_with("did:key:z6Mk"));
        assert_eq!(PublicKey::from_did(&pk.to_did()).unwrap(), pk);
        assert_eq!(PublicKey::from_peer_id(&pk.to_peer_id()).unwrap(), pk);
    }

    #[test]
    fn bad_dids_are_rejected() {
        for bad in [
            "",
            "did:key:",
            "did:web:example.com",
            "did:key:z0OIl",
            "did:key:zDnaerDaTF5BXEavCrfRZEk316dpbLsfPDZ3WJ5hRTPFU2169", // P-256, not ed25519
            "did:key:z6MkmjY8GnV5i9YTDtPETC2uUAW6ejw3nk5mXF5yci5ab7t",   // truncated
        ] {
            assert!(PublicKey::from_did(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn signatures_verify_strictly() {
        let kp = Keypair::generate();
        let sig = kp.sign(b"hello");
        assert!(kp.public().verify(b"hello", &sig));
        assert!(!kp.public().verify(b"hellO", &sig));
        let mut bad = sig;
        bad[5] ^= 1;
        assert!(!kp.public().verify(b"hello", &bad));
        assert!(!kp.public().verify(b"hello", &sig[..63]));
    }

    #[test]
    fn key_file_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let kp = Keypair::load_or_create(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let again = Keypair::load_or_create(&path).unwrap();
        assert_eq!(kp.public(), again.public());
    }

    #[test]
    fn key_file_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short.key");
        Keypair::generate().save_new(&short).unwrap();
        std::fs::write(&short, b"garbage").unwrap();
        let err = Keypair::load(&short).unwrap_err().to_string();
        assert!(err.contains("32-byte"), "{err}");

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let open = dir.path().join("open.key");
            Keypair::generate().save_new(&open).unwrap();
            std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = Keypair::load(&open).unwrap_err().to_string();
            assert!(err.contains("chmod 600"), "{err}");
        }
        let missing = Keypair::load(&dir.path().join("missing.key")).unwrap_err();
        assert!(matches!(missing, IdentityError::KeyFileIo { .. }));
    }
}
