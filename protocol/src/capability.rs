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

    /// [`Chain::delegate`] that fills in what the caller left open from the leaf: no prefix
    /// means the leaf's prefix, no expiry means the leaf's, a later expiry is cut to the
    /// leaf's, and validity starts with the leaf's. What an admin usually means by "invite".
    pub fn delegate_within(
        &self,
        issuer: &Keypair,
        audience: &PublicKey,
        rights: Rights,
        prefix: Option<String>,
        exp_ms: Option<u64>,
        nonce: u64,
    ) -> Result<Chain, CapError> {
        let parent = &self.leaf().body;
        let prefix = prefix.or_else(|| parent.prefix.clone());
        let exp_ms = match (exp_ms, parent.exp_ms) {
            (Some(asked), Some(limit)) => Some(asked.min(limit)),
            (asked, limit) => asked.or(limit),
        };
        self.delegate(
            issuer,
            audience,
            rights,
            prefix,
            parent.nbf_ms,
            exp_ms,
            nonce,
        )
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
            // Whether "collection/key" starts with `p`, without building the path.
            Some(p) => match p.as_bytes().split_at_checked(collection.len()) {
                None => collection.as_bytes().starts_with(p.as_bytes()),
                Some((head, rest)) => {
                    head == collection.as_bytes()
                        && rest.split_first().is_none_or(|(slash, tail)| {
                            *slash == b'/' && key.as_bytes().starts_with(tail)
                        })
                }
            },
        }
    }

    /// Whether the holder's scope is the whole namespace (no prefix): then
    /// [`Chain::covers`] holds for every record.
    pub fn covers_everything(&self) -> bool {
        self.leaf().body.prefix.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    struct World {
        owner: Keypair,
        ns: String,
        admin: Keypair,
        user: Keypair,
    }

    fn world() -> World {
        let owner = Keypair::from_seed([1; 32]);
        let ns = namespace_id(&owner.public());
        World {
            owner,
            ns,
            admin: Keypair::from_seed([2; 32]),
            user: Keypair::from_seed([3; 32]),
        }
    }

    /// owner -> admin (Admin, whole namespace, [0, 1000)) -> user (Write, "docs/", [10, 500)).
    fn two_links(w: &World) -> Chain {
        let root = Chain::issue_root(
            &w.owner,
            &w.ns,
            &w.admin.public(),
            Rights::Admin,
            None,
            0,
            Some(1_000),
            1,
        )
        .unwrap();
        root.delegate(
            &w.admin,
            &w.user.public(),
            Rights::Write,
            Some("docs/".into()),
            10,
            Some(500),
            2,
        )
        .unwrap()
    }

    fn body(w: &World, issuer: &Keypair, parent: Option<TokenId>, rights: Rights) -> TokenBody {
        TokenBody {
            v: 1,
            ns: w.ns.clone(),
            issuer: *issuer.public().as_bytes(),
            audience: *w.user.public().as_bytes(),
            rights,
            prefix: None,
            nbf_ms: 0,
            exp_ms: None,
            parent,
            nonce: 7,
        }
    }

    /// Encodes tokens as a chain without any of the checks `delegate` makes.
    fn encode_tokens(tokens: &[Token]) -> Vec<u8> {
        Chain {
            tokens: tokens.to_vec(),
        }
        .encode()
    }

    /// A `[body, signature]` chain of one token, with the body bytes as given.
    fn raw_chain(signer: &Keypair, body_bytes: Vec<u8>) -> Vec<u8> {
        let sig = signer.sign(&signed_message(&body_bytes));
        to_cbor(&vec![(
            serde_bytes::ByteBuf::from(body_bytes),
            serde_bytes::ByteBuf::from(sig.to_vec()),
        )])
    }

    fn is_broken(r: Result<Chain, CapError>) -> bool {
        matches!(r, Err(CapError::BrokenChain(_)))
    }

    #[test]
    fn roundtrips_in_binary_and_text() {
        let w = world();
        let chain = two_links(&w);
        assert_eq!(Chain::decode(&chain.encode()).unwrap(), chain);
        let text = chain.to_text();
        assert!(text.starts_with(TEXT_PREFIX));
        assert_eq!(Chain::from_text(&format!("  {text}\n")).unwrap(), chain);
        assert_eq!(chain.tokens().len(), 2);
        assert_eq!(chain.ns(), w.ns);
        assert_eq!(chain.audience(), *w.user.public().as_bytes());
        assert_eq!(chain.rights(), Rights::Write);
        let ids: Vec<TokenId> = chain.ids().collect();
        assert_eq!(ids, vec![chain.tokens()[0].id, chain.leaf().id]);
        assert_eq!(chain.leaf().body.parent, Some(ids[0]));
        assert_eq!(
            chain.leaf().id,
            TokenId(*blake3::hash(&chain.leaf().body_bytes).as_bytes())
        );
        assert_eq!(
            TokenId::from_hex(&chain.leaf().id.to_hex()),
            Some(chain.leaf().id)
        );
        assert_eq!(TokenId::from_hex("00"), None);
        assert_eq!(TokenId::from_hex(&"g".repeat(64)), None);
        // The wire form is plain CBOR: an array of [body, signature] byte-string pairs.
        let pairs: Vec<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)> =
            ciborium::from_reader(&chain.encode()[..]).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[1].0.as_slice(), chain.leaf().body_bytes.as_slice());
        assert_eq!(pairs[1].1.as_slice(), chain.leaf().signature.as_slice());
    }

    #[test]
    fn text_form_rejects_garbage() {
        let w = world();
        let text = two_links(&w).to_text();
        assert!(Chain::from_text("").is_err());
        assert!(Chain::from_text(TEXT_PREFIX).is_err());
        assert!(Chain::from_text(&text[TEXT_PREFIX.len()..]).is_err());
        assert!(Chain::from_text(&format!("{text}0")).is_err()); // '0' is not base58
        assert!(Chain::from_text(&format!("{text}1")).is_err()); // one more base58 digit
        assert!(Chain::from_text(&format!("{TEXT_PREFIX}{}", "z".repeat(1 << 20))).is_err());
    }

    #[test]
    fn authorizes_by_time_audience_rights_namespace() {
        let w = world();
        let chain = two_links(&w);
        let user = w.user.public();
        let u = user.as_bytes();
        assert_eq!(chain.authorizes(&w.ns, u, Rights::Write, 100), Ok(()));
        assert_eq!(chain.authorizes(&w.ns, u, Rights::Read, 10), Ok(()));
        assert_eq!(chain.authorizes(&w.ns, u, Rights::Write, 499), Ok(()));
        for t in [0, 9, 500, 999, 1_000, u64::MAX] {
            assert_eq!(
                chain.authorizes(&w.ns, u, Rights::Write, t),
                Err(CapError::NotValidAt),
                "at {t}"
            );
        }
        assert_eq!(
            chain.authorizes(&w.ns, u, Rights::Admin, 100),
            Err(CapError::InsufficientRights {
                have: Rights::Write,
                need: Rights::Admin
            })
        );
        assert_eq!(
            chain.authorizes(&w.ns, w.admin.public().as_bytes(), Rights::Read, 100),
            Err(CapError::WrongAudience)
        );
        let other_ns = namespace_id(&w.user.public());
        assert_eq!(
            chain.authorizes(&other_ns, u, Rights::Read, 100),
            Err(CapError::WrongNamespace)
        );
        // The admin's own one-link chain: valid over the root's window only.
        let root = Chain::decode(&encode_tokens(&chain.tokens()[..1])).unwrap();
        let a = w.admin.public();
        assert_eq!(
            root.authorizes(&w.ns, a.as_bytes(), Rights::Admin, 0),
            Ok(())
        );
        assert_eq!(
            root.authorizes(&w.ns, a.as_bytes(), Rights::Admin, 1_000),
            Err(CapError::NotValidAt)
        );
        // No expiry: valid forever from nbf.
        let open =
            Chain::issue_root(&w.owner, &w.ns, &user, Rights::Read, None, 50, None, 9).unwrap();
        assert_eq!(open.authorizes(&w.ns, u, Rights::Read, u64::MAX), Ok(()));
        assert_eq!(
            open.authorizes(&w.ns, u, Rights::Read, 49),
            Err(CapError::NotValidAt)
        );
    }

    #[test]
    fn covers_by_prefix() {
        let w = world();
        let chain = two_links(&w);
        assert!(chain.covers("docs", "a"));
        assert!(chain.covers("docs", ""));
        assert!(!chain.covers("doc", "sa"));
        assert!(!chain.covers("docs2", "a"));
        assert!(!chain.covers("users", "a"));
        let user = w.user.public();
        let whole =
            Chain::issue_root(&w.owner, &w.ns, &user, Rights::Read, None, 0, None, 1).unwrap();
        assert!(whole.covers("anything", "at-all"));
        let keys = Chain::issue_root(
            &w.owner,
            &w.ns,
            &user,
            Rights::Write,
            Some("docs/ab".into()),
            0,
            None,
            1,
        )
        .unwrap();
        assert!(keys.covers("docs", "ab"));
        assert!(keys.covers("docs", "abc"));
        assert!(!keys.covers("docs", "a"));
        assert!(!keys.covers("docs", "b"));
    }

    #[test]
    fn rights_forms_and_order() {
        assert!(Rights::Read < Rights::Write && Rights::Write < Rights::Admin);
        for r in [Rights::Read, Rights::Write, Rights::Admin] {
            assert_eq!(r.as_str().parse::<Rights>(), Ok(r));
            let bytes = to_cbor(&r);
            assert_eq!(bytes, vec![r as u8]); // CBOR small unsigned int
            assert_eq!(ciborium::from_reader::<Rights, _>(&bytes[..]).unwrap(), r);
        }
        assert!("Admin".parse::<Rights>().is_err());
        assert!("".parse::<Rights>().is_err());
        for bad in [&[0x00][..], &[0x04], &[0x18, 0xff], &[0x20], &[0x61, b'1']] {
            assert!(ciborium::from_reader::<Rights, _>(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn namespace_ids_are_valid_and_owned() {
        let w = world();
        assert_eq!(w.ns.len(), 41);
        assert!(w.ns.starts_with('n'));
        assert!(w.ns[1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert!(crate::op::validate_namespace(&w.ns).is_ok());
        assert_eq!(namespace_id(&w.owner.public()), w.ns);
        assert_ne!(namespace_id(&w.admin.public()), w.ns);
        assert!(is_owner(&w.ns, w.owner.public().as_bytes()));
        assert!(!is_owner(&w.ns, w.admin.public().as_bytes()));
        assert!(!is_owner("default", w.owner.public().as_bytes()));
    }

    #[test]
    fn issuing_checks_keys_and_bodies() {
        let w = world();
        let user = w.user.public();
        let issue = |ns: &str, prefix: Option<String>, nbf: u64, exp: Option<u64>| {
            Chain::issue_root(&w.owner, ns, &user, Rights::Read, prefix, nbf, exp, 1)
        };
        let not_mine = namespace_id(&w.admin.public());
        assert_eq!(
            issue(&not_mine, None, 0, None),
            Err(CapError::WrongNamespace)
        );
        assert!(issue(&w.ns, None, 10, Some(10)).is_err());
        assert!(issue(&w.ns, None, 10, Some(9)).is_err());
        assert!(issue(&w.ns, None, 10, Some(11)).is_ok());
        assert!(issue(&w.ns, Some(String::new()), 0, None).is_err());
        assert!(issue(&w.ns, Some("p".repeat(MAX_PREFIX_LEN)), 0, None).is_ok());
        assert!(issue(&w.ns, Some("p".repeat(MAX_PREFIX_LEN + 1)), 0, None).is_err());
        // Token::sign refuses a key that is not the body's issuer.
        assert!(matches!(
            Token::sign(&w.admin, body(&w, &w.owner, None, Rights::Read)),
            Err(CapError::Malformed(_))
        ));
    }

    #[test]
    fn delegate_only_narrows() {
        let w = world();
        let root = Chain::issue_root(
            &w.owner,
            &w.ns,
            &w.admin.public(),
            Rights::Admin,
            Some("a/".into()),
            10,
            Some(100),
            1,
        )
        .unwrap();
        let user = w.user.public();
        let del = |issuer: &Keypair, rights, prefix: Option<&str>, nbf, exp| {
            root.delegate(
                issuer,
                &user,
                rights,
                prefix.map(str::to_string),
                nbf,
                exp,
                2,
            )
        };
        let ok = del(&w.admin, Rights::Write, Some("a/b"), 10, Some(100)).unwrap();
        assert_eq!(Chain::decode(&ok.encode()).unwrap(), ok);
        assert!(del(&w.admin, Rights::Admin, Some("a/"), 20, Some(90)).is_ok());
        // Nothing is inherited: a missing prefix or expiry widens, hence fails.
        assert!(is_broken(del(&w.admin, Rights::Read, None, 10, Some(100))));
        assert!(is_broken(del(
            &w.admin,
            Rights::Read,
            Some("b/"),
            10,
            Some(100)
        )));
        assert!(is_broken(del(
            &w.admin,
            Rights::Read,
            Some("a"),
            10,
            Some(100)
        )));
        assert!(is_broken(del(
            &w.admin,
            Rights::Read,
            Some("a/"),
            9,
            Some(100)
        )));
        assert!(is_broken(del(
            &w.admin,
            Rights::Read,
            Some("a/"),
            10,
            Some(101)
        )));
        assert!(is_broken(del(&w.admin, Rights::Read, Some("a/"), 10, None)));
        // Only the holder may delegate, and only with admin rights.
        assert!(is_broken(del(
            &w.user,
            Rights::Read,
            Some("a/"),
            10,
            Some(100)
        )));
        let writer = ok;
        assert!(is_broken(writer.delegate(
            &w.user,
            &w.admin.public(),
            Rights::Read,
            Some("a/b".into()),
            10,
            Some(100),
            3
        )));
        // An empty own window is malformed, not a broken link.
        assert!(matches!(
            del(&w.admin, Rights::Read, Some("a/"), 50, Some(50)),
            Err(CapError::Malformed(_))
        ));
        // An unbounded parent accepts bounded and unbounded children.
        let open = Chain::issue_root(
            &w.owner,
            &w.ns,
            &w.admin.public(),
            Rights::Admin,
            None,
            0,
            None,
            1,
        )
        .unwrap();
        assert!(open
            .delegate(&w.admin, &user, Rights::Write, None, 0, None, 2)
            .is_ok());
        assert!(open
            .delegate(
                &w.admin,
                &user,
                Rights::Write,
                Some("x/".into()),
                5,
                Some(6),
                2
            )
            .is_ok());
    }

    #[test]
    fn decode_enforces_structural_rules() {
        let w = world();
        let root = Chain::issue_root(
            &w.owner,
            &w.ns,
            &w.admin.public(),
            Rights::Admin,
            Some("a/".into()),
            10,
            Some(100),
            1,
        )
        .unwrap();
        let r = root.leaf().clone();
        // A child of `r`, signed directly (bypassing delegate's checks) after `f` edits it.
        let child = |f: &dyn Fn(&mut TokenBody)| {
            let mut b = body(&w, &w.admin, Some(r.id), Rights::Write);
            b.prefix = Some("a/b".into());
            b.nbf_ms = 10;
            b.exp_ms = Some(100);
            f(&mut b);
            let signer = [&w.owner, &w.admin, &w.user]
                .into_iter()
                .find(|k| k.public().as_bytes() == &b.issuer)
                .unwrap();
            Token::sign(signer, b).unwrap()
        };
        let good = child(&|_| {});
        assert!(Chain::decode(&encode_tokens(&[r.clone(), good.clone()])).is_ok());
        let other_ns = namespace_id(&w.admin.public());
        let bad: Vec<(&str, Token)> = vec![
            (
                "wrong parent id",
                child(&|b| b.parent = Some(TokenId([9; 32]))),
            ),
            ("no parent id", child(&|b| b.parent = None)),
            (
                "issuer is not the parent's audience",
                child(&|b| b.issuer = *w.user.public().as_bytes()),
            ),
            ("other namespace", child(&|b| b.ns = other_ns.clone())),
            ("prefix widens", child(&|b| b.prefix = Some("b/".into()))),
            ("prefix shortens", child(&|b| b.prefix = Some("a".into()))),
            ("prefix dropped", child(&|b| b.prefix = None)),
            ("earlier start", child(&|b| b.nbf_ms = 9)),
            ("later end", child(&|b| b.exp_ms = Some(101))),
            ("no end", child(&|b| b.exp_ms = None)),
        ];
        for (what, t) in bad {
            let res = Chain::decode(&encode_tokens(&[r.clone(), t]));
            assert!(is_broken(res.clone()), "{what}: {res:?}");
        }
        // Per-token rules.
        let own: Vec<(&str, Token)> = vec![
            ("empty window", child(&|b| b.nbf_ms = 100)),
            ("empty prefix", child(&|b| b.prefix = Some(String::new()))),
            (
                "prefix too long",
                child(&|b| b.prefix = Some(format!("a/{}", "b".repeat(MAX_PREFIX_LEN)))),
            ),
            ("version 2", child(&|b| b.v = 2)),
        ];
        for (what, t) in own {
            let res = Chain::decode(&encode_tokens(&[r.clone(), t]));
            assert!(
                matches!(res, Err(CapError::Malformed(_))),
                "{what}: {res:?}"
            );
        }
        // A non-admin may not delegate, nor widen rights while at it.
        let writer_root = Chain::issue_root(
            &w.owner,
            &w.ns,
            &w.admin.public(),
            Rights::Write,
            None,
            0,
            None,
            3,
        )
        .unwrap();
        for rights in [Rights::Read, Rights::Write, Rights::Admin] {
            let t = Token::sign(
                &w.admin,
                body(&w, &w.admin, Some(writer_root.leaf().id), rights),
            )
            .unwrap();
            let res = Chain::decode(&encode_tokens(&[writer_root.leaf().clone(), t]));
            assert!(is_broken(res), "{rights:?} from a writer");
        }
        // Roots: issued by the owner, without a parent.
        let fake_root = Token::sign(&w.admin, body(&w, &w.admin, None, Rights::Admin)).unwrap();
        assert!(is_broken(Chain::decode(&encode_tokens(&[fake_root]))));
        let mut b = body(&w, &w.admin, None, Rights::Admin);
        b.ns = other_ns.clone();
        // (The admin owns its own namespace: that root is fine.)
        let admins_own_root = Token::sign(&w.admin, b).unwrap();
        assert!(Chain::decode(&encode_tokens(&[admins_own_root])).is_ok());
        let mut b = body(&w, &w.owner, None, Rights::Admin);
        b.ns = other_ns.clone();
        let owner_in_other_ns = Token::sign(&w.owner, b).unwrap();
        assert!(is_broken(Chain::decode(&encode_tokens(&[
            owner_in_other_ns
        ]))));
        let rooted_child = Token::sign(
            &w.owner,
            body(&w, &w.owner, Some(TokenId([1; 32])), Rights::Admin),
        )
        .unwrap();
        assert!(is_broken(Chain::decode(&encode_tokens(&[rooted_child]))));
        // A valid chain in the wrong order.
        assert!(Chain::decode(&encode_tokens(&[good, r.clone()])).is_err());
        // Empty chain, non-arrays, wrong pair shapes.
        for junk in [
            &[0x80][..],
            &[],
            &[0xa0],
            &[0x81, 0x80],
            &[0x81, 0x81, 0x40],
            &[0x81, 0x83, 0x40, 0x40, 0x40],
        ] {
            assert!(
                matches!(Chain::decode(junk), Err(CapError::Malformed(_))),
                "{junk:?}"
            );
        }
        // Oversized input is refused before parsing.
        assert!(Chain::decode(&vec![0x80; MAX_CHAIN_BYTES + 1]).is_err());
    }

    #[test]
    fn decode_rejects_more_than_max_depth() {
        let w = world();
        let keys: Vec<Keypair> = (0..=MAX_CHAIN_DEPTH as u8)
            .map(|i| Keypair::from_seed([100 + i; 32]))
            .collect();
        let mut chain = Chain::issue_root(
            &w.owner,
            &w.ns,
            &keys[0].public(),
            Rights::Admin,
            None,
            0,
            None,
            0,
        )
        .unwrap();
        for i in 1..MAX_CHAIN_DEPTH {
            chain = chain
                .delegate(
                    &keys[i - 1],
                    &keys[i].public(),
                    Rights::Admin,
                    None,
                    0,
                    None,
                    i as u64,
                )
                .unwrap();
        }
        assert_eq!(chain.tokens().len(), MAX_CHAIN_DEPTH);
        assert_eq!(Chain::decode(&chain.encode()).unwrap(), chain);
        assert_eq!(
            chain.delegate(
                &keys[MAX_CHAIN_DEPTH - 1],
                &keys[MAX_CHAIN_DEPTH].public(),
                Rights::Read,
                None,
                0,
                None,
                99
            ),
            Err(CapError::TooDeep)
        );
        // A ninth link, signed by hand: otherwise a perfectly good link.
        let leaf = chain.leaf();
        let ninth = Token::sign(
            &keys[MAX_CHAIN_DEPTH - 1],
            TokenBody {
                v: 1,
                ns: w.ns.clone(),
                issuer: *keys[MAX_CHAIN_DEPTH - 1].public().as_bytes(),
                audience: *keys[MAX_CHAIN_DEPTH].public().as_bytes(),
                rights: Rights::Read,
                prefix: None,
                nbf_ms: 0,
                exp_ms: None,
                parent: Some(leaf.id),
                nonce: 99,
            },
        )
        .unwrap();
        let mut tokens = chain.tokens().to_vec();
        tokens.push(ninth);
        let bytes = encode_tokens(&tokens);
        assert!(bytes.len() <= MAX_CHAIN_BYTES);
        assert_eq!(Chain::decode(&bytes), Err(CapError::TooDeep));
    }

    #[test]
    fn decode_rejects_bad_signatures() {
        let w = world();
        let chain = two_links(&w);
        for link in 0..2 {
            for byte in [0, 31, 32, 63] {
                let mut tokens = chain.tokens().to_vec();
                tokens[link].signature[byte] ^= 0x01;
                assert_eq!(
                    Chain::decode(&encode_tokens(&tokens)),
                    Err(CapError::BadSignature),
                    "link {link} byte {byte}"
                );
            }
        }
        // A valid signature by another key.
        let mut tokens = chain.tokens().to_vec();
        tokens[1].signature = w.user.sign(&signed_message(&tokens[1].body_bytes));
        assert_eq!(
            Chain::decode(&encode_tokens(&tokens)),
            Err(CapError::BadSignature)
        );
        // Signed without the domain separation.
        let mut tokens = chain.tokens().to_vec();
        tokens[1].signature = w.admin.sign(&tokens[1].body_bytes);
        assert_eq!(
            Chain::decode(&encode_tokens(&tokens)),
            Err(CapError::BadSignature)
        );
        // A short signature.
        let root = chain.tokens()[0].clone();
        let short = to_cbor(&vec![(
            serde_bytes::ByteBuf::from(root.body_bytes.clone()),
            serde_bytes::ByteBuf::from(root.signature[..63].to_vec()),
        )]);
        assert!(matches!(Chain::decode(&short), Err(CapError::Malformed(_))));
    }

    #[test]
    fn non_canonical_encodings_are_rejected() {
        let w = world();
        let root = Chain::issue_root(
            &w.owner,
            &w.ns,
            &w.user.public(),
            Rights::Read,
            None,
            0,
            None,
            5,
        )
        .unwrap();
        let t = root.leaf();
        assert_eq!(
            Chain::decode(&raw_chain(&w.owner, t.body_bytes.clone())).unwrap(),
            root
        );

        // Same body, nonce written in a longer integer form (0x1b + 8 bytes instead of 0x05).
        let mut long_int = t.body_bytes.clone();
        assert_eq!(long_int.last(), Some(&0x05));
        long_int.pop();
        long_int.extend_from_slice(&[0x1b, 0, 0, 0, 0, 0, 0, 0, 5]);

        // Same fields, map keys in another order.
        let value: ciborium::Value = ciborium::from_reader(&t.body_bytes[..]).unwrap();
        let ciborium::Value::Map(entries) = value else {
            panic!("a body is a map")
        };
        let reordered = to_cbor(&ciborium::Value::Map(
            entries.iter().rev().cloned().collect(),
        ));
        assert_eq!(
            ciborium::from_reader::<TokenBody, _>(&reordered[..]).unwrap(),
            t.body
        );

        // An extra, unknown field.
        let mut more = entries.clone();
        more.push((
            ciborium::Value::Text("extra".into()),
            ciborium::Value::Integer(1.into()),
        ));
        let extra_field = to_cbor(&ciborium::Value::Map(more));

        // The same map with an indefinite-length header (0xbf ... 0xff).
        assert_eq!(t.body_bytes[0], 0xaa); // map of 10
        let mut indefinite = t.body_bytes.clone();
        indefinite[0] = 0xbf;
        indefinite.push(0xff);

        // A tag in front of the body.
        let mut tagged = vec![0xd8, 0x18];
        tagged.extend_from_slice(&t.body_bytes);

        for (what, bytes) in [
            ("long integer", long_int),
            ("reordered keys", reordered),
            ("extra field", extra_field),
            ("indefinite map", indefinite),
            ("tagged", tagged),
        ] {
            assert_eq!(
                Chain::decode(&raw_chain(&w.owner, bytes)),
                Err(CapError::NotCanonical),
                "{what}"
            );
        }

        // The chain itself: array length in long form, indefinite array, trailing bytes.
        let good = root.encode();
        assert_eq!(good[0], 0x81);
        let mut long_len = vec![0x98, 0x01];
        long_len.extend_from_slice(&good[1..]);
        let mut indefinite = vec![0x9f];
        indefinite.extend_from_slice(&good[1..]);
        indefinite.push(0xff);
        let mut trailing = good.clone();
        trailing.push(0x00);
        for (what, bytes) in [
            ("long length", long_len),
            ("indefinite array", indefinite),
            ("trailing byte", trailing),
        ] {
            assert!(Chain::decode(&bytes).is_err(), "{what}");
        }
    }

    /// One valid three-link chain (owner -> admin -> user, an admin -> admin, a writer) and its
    /// encoding, built once.
    fn fixture() -> &'static (Chain, Vec<u8>) {
        static FIXTURE: OnceLock<(Chain, Vec<u8>)> = OnceLock::new();
        FIXTURE.get_or_init(|| {
            let w = world();
            let root = Chain::issue_root(
                &w.owner,
                &w.ns,
                &w.admin.public(),
                Rights::Admin,
                None,
                0,
                Some(1_000),
                1,
            )
            .unwrap();
            let chain = root
                .delegate(
                    &w.admin,
                    &w.user.public(),
                    Rights::Admin,
                    Some("docs/".into()),
                    10,
                    Some(500),
                    2,
                )
                .unwrap()
                .delegate(
                    &w.user,
                    &w.admin.public(),
                    Rights::Write,
                    Some("docs/x".into()),
                    20,
                    Some(400),
                    3,
                )
                .unwrap();
            let bytes = chain.encode();
            (chain, bytes)
        })
    }

    proptest! {
        /// `covers` is exactly "collection/key starts with the prefix".
        #[test]
        fn covers_is_a_path_prefix_test(
            collection in "[ab/]{0,4}",
            key in "[ab/]{0,4}",
            prefix in "[ab/]{0,6}",
        ) {
            let w = world();
            let root = |prefix: Option<String>| {
                Chain::issue_root(&w.owner, &w.ns, &w.admin.public(), Rights::Admin, prefix, 0, None, 1)
            };
            if let Ok(chain) = root(Some(prefix.clone())) {
                let want = format!("{collection}/{key}").starts_with(prefix.as_str());
                prop_assert_eq!(chain.covers(&collection, &key), want);
                prop_assert!(!chain.covers_everything());
            }
            let whole = root(None).unwrap();
            prop_assert!(whole.covers_everything() && whole.covers(&collection, &key));
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_junk(
            junk in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let _ = Chain::decode(&junk);
            let _ = Chain::from_text(&String::from_utf8_lossy(&junk));
            let mut text = TEXT_PREFIX.to_string();
            text.push_str(&bs58::encode(&junk).into_string());
            let _ = Chain::from_text(&text);
        }

        #[test]
        fn decode_never_accepts_a_mutation(
            edits in proptest::collection::vec((0u8..5, any::<usize>(), any::<u8>()), 1..4),
        ) {
            let (chain, original) = fixture();
            let mut bytes = original.clone();
            for (kind, pos, val) in edits {
                let i = pos % (bytes.len() + 1);
                match kind {
                    0 if i < bytes.len() => bytes[i] ^= 1 << (val % 8),
                    1 if i < bytes.len() => bytes[i] = val,
                    2 => bytes.insert(i, val),
                    3 if i < bytes.len() => {
                        bytes.remove(i);
                    }
                    _ => bytes.truncate(i),
                }
            }
            match Chain::decode(&bytes) {
                Err(_) => {}
                Ok(c) => {
                    // Only a "mutation" that changed nothing may decode.
                    prop_assert_eq!(&c, chain);
                    prop_assert_eq!(&bytes, original);
                }
            }
            let mut text = TEXT_PREFIX.to_string();
            text.push_str(&bs58::encode(&bytes).into_string());
            match Chain::from_text(&text) {
                Err(_) => {}
                Ok(c) => {
                    prop_assert_eq!(&c, chain);
                    prop_assert_eq!(&bytes, original);
                }
            }
        }

        #[test]
        fn delegate_and_decode_agree(
            rights in 1u8..=3,
            nbf in 0u64..200,
            exp in proptest::option::of(0u64..1_200),
            prefix in proptest::option::of("(docs/|docs|users/|d)[a-z]{0,3}"),
        ) {
            let w = world();
            let root = Chain::issue_root(
                &w.owner, &w.ns, &w.admin.public(), Rights::Admin,
                Some("docs/".into()), 100, Some(1_000), 1,
            ).unwrap();
            let rights = match rights { 1 => Rights::Read, 2 => Rights::Write, _ => Rights::Admin };
            let res = root.delegate(
                &w.admin, &w.user.public(), rights, prefix.clone(), nbf, exp, 2,
            );
            let narrows = nbf >= 100
                && exp.is_some_and(|e| e <= 1_000 && e > nbf)
                && prefix.as_deref().is_some_and(|p| p.starts_with("docs/"));
            prop_assert_eq!(res.is_ok(), narrows, "{:?}", res);
            if let Ok(chain) = res {
                prop_assert_eq!(Chain::decode(&chain.encode()).unwrap(), chain.clone());
                prop_assert_eq!(Chain::from_text(&chain.to_text()).unwrap(), chain);
            }
        }
    }
}
