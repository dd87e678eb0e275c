//! Batch verification (`batch::verify`), the gate every batch from a peer passes. Raw bytes
//! exercise the envelope and header checks; to reach what lies behind the signature, the
//! input is also signed as the payload of a batch by a fixed key (optionally zstd-compressed
//! first, or with a dictionary taken from the input, as a peer may send one; the header made
//! to match the payload where it decodes), as a peer holding a key could send it. A batch it accepts must be readable: its ops decode, as many as the
//! header says, in the header's time range.
#![no_main]

use blazedb_identity::Keypair;
use blazedb_protocol::batch::{self, BatchHeader, SIGNING_CONTEXT};
use blazedb_protocol::codec::decode;
use blazedb_protocol::{Dict, DictSet, Hlc};
use libfuzzer_sys::fuzz_target;

fn bstr(out: &mut Vec<u8>, b: &[u8]) {
    out.push(0x5a);
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

fn envelope(kp: &Keypair, header: &BatchHeader, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    ciborium::into_writer(header, &mut h).expect("a header encodes");
    let mut signed = SIGNING_CONTEXT.to_vec();
    signed.extend_from_slice(&h);
    let sig = kp.sign(&signed);
    let mut out = vec![0x83];
    // Parts under 24 bytes with a one-byte head, the others with a 4-byte length (sealing
    // writes the shortest head; the envelope parser takes any definite one).
    for part in [&h[..], &sig[..], payload] {
        if part.len() < 24 {
            out.push(0x40 | part.len() as u8);
            out.extend_from_slice(part);
        } else {
            bstr(&mut out, part);
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    // Unsigned bytes as they come.
    let _ = batch::verify(data.to_vec());
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let kp = Keypair::from_seed([3; 32]);
    // With a dictionary (enc 4), the input is the dictionary's length (a byte, in 64-byte
    // units), the dictionary, then the plain payload: compressed with it, or (odd modes) the
    // bytes as they are, claiming to be.
    let mut dicts = DictSet::new();
    let mut dict = None;
    let mut plain = rest;
    if mode % 8 >= 4 {
        let Some((&units, tail)) = rest.split_first() else {
            return;
        };
        let (bytes, tail) = tail.split_at((usize::from(units) * 64).min(tail.len()));
        let Ok(d) = Dict::new(bytes.to_vec()) else {
            return;
        };
        dicts.insert(d.clone());
        dict = Some(d);
        plain = tail;
    }
    // The payload as signed: the input itself, or the input compressed (enc 3, 4).
    let (enc, payload) = match (&dict, mode % 4) {
        (None, 0) => (2, plain.to_vec()),
        (None, 1) => (3, zstd::bulk::compress(plain, 1).expect("compresses")),
        (None, 2) => (mode >> 3, plain.to_vec()), // any encoding byte, legacy ones among them
        (None, _) => (3, plain.to_vec()),         // bytes that claim to be compressed
        (Some(d), m) if m % 2 == 0 => {
            let Ok(mut c) = zstd::bulk::Compressor::with_dictionary(1, d.bytes()) else {
                return;
            };
            let Ok(frame) = c.compress(plain) else {
                return;
            };
            (4, frame)
        }
        (Some(_), _) => (4, plain.to_vec()),
    };
    // A header that matches the payload where the plain payload decodes.
    let (ops, hlc_min, hlc_max) = match decode(plain) {
        Ok(v) if !v.is_empty() => (v.len() as u32, v.ops()[0].hlc(), v.ops()[v.len() - 1].hlc()),
        _ => (1, Hlc(1), Hlc(1)),
    };
    let header = BatchHeader {
        v: batch::HEADER_VERSION,
        ns: "default".into(),
        author: *kp.public().as_bytes(),
        seq: 1,
        prev: None,
        hlc_min,
        hlc_max,
        ops,
        payload_len: payload.len() as u32,
        payload_hash: match &dict {
            None => *blake3::hash(&payload).as_bytes(),
            Some(d) => *blake3::keyed_hash(&d.id().0, &payload).as_bytes(),
        },
        cap: None,
        enc,
        dict: dict.as_ref().map(Dict::dict_ref),
    };
    let Ok(vb) = batch::verify_with(envelope(&kp, &header, &payload), &dicts) else {
        return;
    };
    let view = vb.ops.view().expect("an accepted batch's ops decode");
    assert_eq!(
        view.len(),
        vb.header.ops as usize,
        "op count as the header says"
    );
    let first = view.ops().first().expect("at least one op").hlc();
    let last = view.ops().last().expect("at least one op").hlc();
    assert_eq!((first, last), (vb.header.hlc_min, vb.header.hlc_max));
    let owned = vb
        .ops
        .to_vec()
        .expect("an accepted batch's ops are read as owned ops");
    assert_eq!(owned.len(), view.len());
});
