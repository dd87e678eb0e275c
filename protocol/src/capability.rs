//! Capability tokens: who may read, write or administer an owned namespace.
//!
//! An owned namespace's id derives from its owner's ed25519 key ([`namespace_id`]). The owner
//! grants rights by signing a *token* to another key (its `did:key`); an admin may delegate
//! further, each step narrowing rights (`Read ⊂ Write ⊂ Admin`), record scope (a
//! `"collection/key"` prefix) and validity window. A [`Chain`] is the list of tokens from the
//! owner's (root) to the holder's (leaf); anyone can verify it offline, with no server.
//!
//! Every token is canonical CBOR (a body that re-encodes to other bytes is rejected, so token
//! ids — blake3 of the body — are not malleable), signed with strict ed25519 over a
//! domain-separated message. Chains are at most [`MAX_CHAIN_DEPTH`] long.
//!
//! Revocation is not part of the token: it is an op in the namespace's log (see
//! [`crate::engine`]), so every replica reaches the same verdict. Time checks take the time
//! they are given: for writes that is the batch's own timestamp, never the receiver's clock.

use serde::{Deserialize, Serialize};

use blazedb_identity::{Keypair, PublicKey};

/// Most links in a chain, root first.
pub const MAX_CHAIN_DEPTH: usize = 8;
/// Largest encoded token body, in bytes.
pub const MAX_TOKEN_BYTES: usize = 1024;
/// Domain separation for token signatures.
pub const TOKEN_SIGNING_CONTEXT: &[u8] = b"blazedb/capability/v1\0";
/// Prefix of the text form of a chain.
pub const TEXT_PREFIX: &str = "blzcap1";
/// Longest scope prefix, in bytes (a `collection/key` path is at most 64 + 1 + 256).
const MAX_PREFIX_LEN: usize = 322;
/// Largest encoded chain.
const MAX_CHAIN_BYTES: usize = MAX_CHAIN_DEPTH * (MAX_TOKEN_BYTES + 80);

/// Rights, ordered: `Read ⊂ Write ⊂ Admin`. Encoded as 1, 2, 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rights {
    /// Receive the namespace's data.
    Read = 1,
    /// Read, and write records in scope.
    Write = 2,
    /// Write, delegate capabilities and revoke them.
    Admin = 3,
}

impl Rights {
    /// `read`, `write` or `admin`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Rights::Read => "read",
            Rights::Write => "write",
            Rights::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Rights {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Rights::Read),
            "write" => Ok(Rights::Write),
            "admin" => Ok(Rights::Admin),
            other => Err(format!(
                "unknown rights {other:?} (expected read, write or admin)"
            )),
        }
    }
}

impl Serialize for Rights {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(*self as u8)
    }
}

impl<'de> Deserialize<'de> for Rights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u8::deserialize(d)? {
            1 => Ok(Rights::Read),
            2 => Ok(Rights::Write),
            3 => Ok(Rights::Admin),
            n => Err(serde::de::Error::custom(format!("invalid rights {n}"))),
        }
    }
}

/// Id of a token: blake3 of its body bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct TokenId(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl TokenId {
    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 lowercase hex digits.
    pub fn from_hex(s: &str) -> Option<TokenId> {
        if s.len() != 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(chunk).ok()?;
            out[i] = u8::from_str_radix(hex, 16).ok()?;
        }
        Some(TokenId(out))
    }
}

/// The signed part of a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBody {
    /// Version, 1.
    pub v: u8,
    /// Namespace.
    pub ns: String,
    /// Signer.
    #[serde(with = "serde_bytes")]
    pub issuer: [u8; 32],
    /// Holder.
    #[serde(with = "serde_bytes")]
    pub audience: [u8; 32],
    /// Rights granted.
    pub rights: Rights,
    /// Scope: records whose `"collection/key"` starts with this; `None` = whole namespace.
    pub prefix: Option<String>,
    /// Not valid before (unix ms).
    pub nbf_ms: u64,
    /// Not valid from (unix ms); `None` = no expiry.
    pub exp_ms: Option<u64>,
    /// Id of the parent token; `None` iff issued by the owner.
    pub parent: Option<TokenId>,
    /// Makes otherwise equal grants distinct (and separately revocable).
    pub nonce: u64,
}

/// A signed token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// Decoded body.
    pub body: TokenBody,
    /// Exact body bytes (canonical CBOR).
    pub body_bytes: Vec<u8>,
    /// Issuer's signature over `TOKEN_SIGNING_CONTEXT || body_bytes`.
    pub signature: [u8; 64],
    /// blake3 of `body_bytes`.
    pub id: TokenId,
}

/// What is wrong with a capability.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CapError {
    /// Not a well-formed token or chain.
    #[error("malformed capability: {0}")]
    Malformed(String),
    /// A body that does not re-encode to the same bytes.
    #[error("capability is not canonically encoded")]
    NotCanonical,
    /// A signature that does not verify.
    #[error("bad capability signature")]
    BadSignature,
    /// Links that do not chain.
    #[error("broken delegation chain: {0}")]
    BrokenChain(String),
    /// Too many links.
    #[error("capability chain deeper than {MAX_CHAIN_DEPTH}")]
    TooDeep,
    /// Outside a link's validity window.
    #[error("capability not valid at this time")]
    NotValidAt,
    /// For another namespace.
    #[error("capability is for another namespace")]
    WrongNamespace,
    /// For another key.
    #[error("capability is for another principal")]
    WrongAudience,
    /// Not enough rights.
    #[error("capability grants {have:?}, {need:?} needed")]
    InsufficientRights {
        /// Granted.
        have: Rights,
        /// Needed.
        need: Rights,
    },
    /// Record outside the scope.
    #[error("record outside the capability's scope")]
    OutOfScope,
}

fn to_cbor<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("serializing to a Vec cannot fail");
    out
}

fn signed_message(body_bytes: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(TOKEN_SIGNING_CONTEXT.len() + body_bytes.len());
    m.extend_from_slice(TOKEN_SIGNING_CONTEXT);
    m.extend_from_slice(body_bytes);
    m
}

/// Namespace id derived from the owner key: `n` + 40 hex digits.
pub fn namespace_id(owner: &PublicKey) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"blazedb/ns/v1\0");
    h.update(owner.as_bytes());
    let digest = h.finalize();
    let hex: String = digest.as_bytes()[..20]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("n{hex}")
}

/// Whether `key` owns `ns`.
pub fn is_owner(ns: &str, key: &[u8; 32]) -> bool {
    PublicKey::from_bytes(key).is_ok_and(|k| namespace_id(&k) == ns)
}

impl Token {
    /// Signs a body; `issuer` must be the body's issuer.
    pub fn sign(issuer: &Keypair, body: TokenBody) -> Result<Token, CapError> {
        if issuer.public().as_bytes() != &body.issuer {
            return Err(CapError::Malformed(
                "issuer key does not match the body".into(),
            ));
        }
        let body_bytes = to_cbor(&body);
        if body_bytes.len() > MAX_TOKEN_BYTES {
            return Err(CapError::Malformed("token body too large".into()));
        }
        let signature = issuer.sign(&signed_message(&body_bytes));
        let id = TokenId(*blake3::hash(&body_bytes).as_bytes());
        Ok(Token {
            body,
            body_bytes,
            signature,
            id,
        })
    }

    fn decode(body_bytes: &[u8], signature: &[u8]) -> Result<Token, CapError> {
        if body_bytes.len() > MAX_TOKEN_BYTES {
            return Err(CapError::Malformed("token body too large".into()));
        }
        let body: TokenBody = ciborium::from_reader(body_bytes)
            .map_err(|e| CapError::Malformed(format!("token body: {e}")))?;
        if to_cbor(&body) != body_bytes {
            return Err(CapError::NotCanonical);
        }
        if body.v != 1 {
            return Err(CapError::Malformed(format!(
                "unsupported token version {}",
                body.v
            )));
        }
        let signature: [u8; 64] = signature
            .try_into()
            .map_err(|_| CapError::Malformed("signature length".into()))?;
        let issuer = PublicKey::from_bytes(&body.issuer)
            .map_err(|_| CapError::Malformed("issuer is not an ed25519 key".into()))?;
        if !issuer.verify(&signed_message(body_bytes), &signature) {
            return Err(CapError::BadSignature);
        }
        let id = TokenId(*blake3::hash(body_bytes).as_bytes());
        Ok(Token {
            body,
            body_bytes: body_bytes.to_vec(),
            signature,
            id,
        })
    }
}

/// Rules on a single body: a prefix is 1..=[`MAX_PREFIX_LEN`] bytes (an empty prefix would be
/// a second spelling of `None`), and a window with an expiry is not empty.
fn check_own(body: &TokenBody) -> Result<(), CapError> {
    if let Some(p) = &body.prefix {
        if p.is_empty() || p.len() > MAX_PREFIX_LEN {
            return Err(CapError::Malformed(format!(
                "prefix must be 1..={MAX_PREFIX_LEN} bytes"
            )));
        }
    }
    if body.exp_ms.is_some_and(|exp| exp <= body.nbf_ms) {
        return Err(CapError::Malformed("expiry is not after not-before".into()));
    }
    Ok(())
}

/// `child` must narrow `parent` in every respect.
fn check_link(parent: &Token, child: &Token) -> Result<(), CapError> {
    let (p, c) = (&parent.body, &child.body);
    let broken = |m: &str| Err(CapError::BrokenChain(m.to_string()));
    if c.ns != p.ns {
        return broken("links name different namespaces");
    }
    if c.issuer != p.audience {
        return broken("issuer is not the parent's holder");
    }
    if c.parent != Some(parent.id) {
        return broken("parent id does not match");
    }
    if p.rights != Rights::Admin {
        return broken("only an admin may delegate");
    }
    if c.rights > p.rights {
        return broken("rights widen");
    }
    match (&p.prefix, &c.prefix) {
        (Some(pp), Some(cp)) if !cp.starts_with(pp.as_str()) => return broken("scope widens"),
        (Some(_), None) => return broken("scope widens"),
        _ => {}
    }
    if c.nbf_ms < p.nbf_ms {
        return broken("validity starts before the parent's");
    }
    match (p.exp_ms, c.exp_ms) {
        (Some(pe), Some(ce)) if ce > pe => return broken("validity ends after the parent's"),
        (Some(_), None) => return broken("validity ends after the parent's"),
        _ => {}
    }
    Ok(())
}

/// A delegation chain, root (issued by the owner) first, leaf last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    tokens: Vec<Token>,
}

impl Chain {
    /// A root token from the namespace owner (`ns` must be `namespace_id(owner.public())`,
    /// else [`CapError::WrongNamespace`]).
    #[allow(clippy::too_many_arguments)]
    pub fn issue_root(
        owner: &Keypair,
        ns: &str,
        audience: &PublicKey,
        rights: Rights,
        prefix: Option<String>,
        nbf_ms: u64,
        exp_ms: Option<u64>,
        nonce: u64,
    ) -> Result<Chain, CapError> {
        if namespace_id(&owner.public()) != ns {
            return Err(CapError::WrongNamespace);
        }
        let body = TokenBody {
            v: 1,
            ns: ns.to_string(),
            issuer: *owner.public().as_bytes(),
            audience: *audience.as_bytes(),
            rights,
            prefix,
            nbf_ms,
            exp_ms,
            parent: None,
            nonce,
        };
        check_own(&body)?;
        Ok(Chain {
            tokens: vec![Token::sign(owner, body)?],
        })
    }

    /// Extends the chain from its holder (`issuer`) to `audience`.
    ///
    /// `issuer` must be the leaf's audience and the leaf must grant [`Rights::Admin`]. Nothing
    /// is inherited or clamped: rights and prefix may only narrow (a parent with a prefix needs
    /// a child prefix starting with it), and the child's window must lie within the parent's
    /// (`nbf_ms` not earlier; `exp_ms` not later, and present when the parent's is). Anything
    /// else is a [`CapError::BrokenChain`], exactly as [`Chain::decode`] would judge it.
    #[allow(clippy::too_many_arguments)]
    pub fn delegate(
        &self,
        issuer: &Keypair,
        audience: &PublicKey,
        rights: Rights,
        prefix: Option<String>,
        nbf_ms: u64,
        exp_ms: Option<u64>,
        nonce: u64,
    ) -> Result<Chain, CapError> {
        if self.tokens.len() >= MAX_CHAIN_DEPTH {
            return Err(CapError::TooDeep);
        }
        let leaf = self.leaf();
        let body = TokenBody {
            v: 1,
            ns: leaf.body.ns.clone(),
            issuer: *issuer.public().as_bytes(),
            audience: *audience.as_bytes(),
            rights,
            prefix,
            nbf_ms,
            exp_ms,
            parent: Some(leaf.id),
            nonce,
        };
        check_own(&body)?;
        let token = Token::sign(issuer, body)?;
        check_link(leaf, &token)?;
        let mut tokens = self.tokens.clone();
        tokens.push(token);
        Ok(Chain { tokens })
    }

    /// The tokens, root first.
    pub fn tokens(&self) -> &[Token] {
        &self.tokens
    }

    /// The holder's token.
    pub fn leaf(&self) -> &Token {
        self.tokens.last().expect("a chain has at least one token")
    }

    /// Namespace.
    pub fn ns(&self) -> &str {
        &self.tokens[0].body.ns
    }

    /// Holder's key.
    pub fn audience(&self) -> [u8; 32] {
        self.leaf().body.audience
    }

    /// Holder's rights.
    pub fn rights(&self) -> Rights {
        self.leaf().body.rights
    }

    /// Ids of every token, root first.
    pub fn ids(&self) -> impl Iterator<Item = TokenId> + '_ {
        self.tokens.iter().map(|t| t.id)
    }

    /// CBOR array of `[body bytes, signature]` pairs, root first.
    pub fn encode(&self) -> Vec<u8> {
        let pairs: Vec<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)> = self
            .tokens
            .iter()
            .map(|t| {
                (
                    serde_bytes::ByteBuf::from(t.body_bytes.clone()),
                    serde_bytes::ByteBuf::from(t.signature.to_vec()),
                )
            })
            .collect();
        to_cbor(&pairs)
    }

    /// Parses and structurally verifies a chain: bounded size, `1..=MAX_CHAIN_DEPTH` links,
    /// canonical bodies (and chain) of version 1, strict signatures by each body's issuer, a
    /// root without parent issued by the namespace owner, and links that chain (same
    /// namespace, issued by the parent's holder, naming the parent's id, parent is admin) and
    /// only narrow rights, scope and validity window. Whether it authorizes anything *now* is
    /// [`Chain::authorizes`]' business.
    pub fn decode(bytes: &[u8]) -> Result<Chain, CapError> {
        if bytes.len() > MAX_CHAIN_BYTES {
            return Err(CapError::Malformed("chain too large".into()));
        }
        let pairs: Vec<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)> =
            ciborium::from_reader(bytes).map_err(|e| CapError::Malformed(e.to_string()))?;
        if pairs.is_empty() {
            return Err(CapError::Malformed("empty chain".into()));
        }
        if pairs.len() > MAX_CHAIN_DEPTH {
            return Err(CapError::TooDeep);
        }
        let mut tokens: Vec<Token> = Vec::with_capacity(pairs.len());
        for (body, sig) in &pairs {
            let token = Token::decode(body, sig)?;
            check_own(&token.body)?;
            match tokens.last() {
                None => {
                    if token.body.parent.is_some() {
                        return Err(CapError::BrokenChain("root has a parent".into()));
                    }
                    if !is_owner(&token.body.ns, &token.body.issuer) {
                        return Err(CapError::BrokenChain(
                            "root is not issued by the namespace owner".into(),
                        ));
                    }
                }
                Some(parent) => check_link(parent, &token)?,
            }
            tokens.push(token);
        }
        let chain = Chain { tokens };
        if chain.encode() != bytes {
            return Err(CapError::NotCanonical);
        }
        Ok(chain)
    }

    /// Text form: `blzcap1` + base58btc of [`Chain::encode`].
    pub fn to_text(&self) -> String {
        format!("{TEXT_PREFIX}{}", bs58::encode(self.encode()).into_string())
    }

    /// Parses the text form.
    pub fn from_text(s: &str) -> Result<Chain, CapError> {
        let s = s.trim();
        let rest = s
            .strip_prefix(TEXT_PREFIX)
            .ok_or_else(|| CapError::Malformed(format!("must start with {TEXT_PREFIX}")))?;
        // base58 expands by ~1.37: bound the text before decoding it.
        if rest.len() > MAX_CHAIN_BYTES * 14 / 10 + 8 {
            return Err(CapError::Malformed("token text too long".into()));
        }
        let bytes = bs58::decode(rest)
            .into_vec()
            .map_err(|_| CapError::Malformed("not base58".into()))?;
        Chain::decode(&bytes)
    }

    /// Whether this chain lets `principal` act with `need` rights in `ns` at unix time `at_ms`:
    /// the namespace matches, the leaf is `principal`'s, grants at least `need`, and `at_ms` is
    /// within `[nbf_ms, exp_ms)` of every link.
    pub fn authorizes(
        &self,
        ns: &str,
        principal: &[u8; 32],
        need: Rights,
        at_ms: u64,
    ) -> Result<(), CapError> {
        if self.ns() != ns {
            return Err(CapError::WrongNamespace);
        }
        if &self.audience() != principal {
            return Err(CapError::WrongAudience);
        }
        if self.rights() < need {
            return Err(CapError::InsufficientRights {
                have: self.rights(),
                need,
            });
        }
        for t in &self.tokens {
            if at_ms < t.body.nbf_ms || t.body.exp_ms.is_some_and(|exp| at_ms >= exp) {
                return Err(CapError::NotValidAt);
            }
        }
        Ok(())
    }

    /// Whether the record `collection`/`key` is inside the holder's scope: no prefix, or
    /// `"collection/key"` starts with it.
    pub fn covers(&self, collection: &str, key: &str) -> bool {
        match &self.leaf().body.prefix {
            None => true,
            Some(p) => {
                let path = format!("{collection}/{key}");
                path.starts_with(p.as_str())
            }
        }
    }
}
