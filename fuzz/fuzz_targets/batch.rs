//! Batch verification (`batch::verify`), the gate every batch from a peer passes. Raw bytes
//! exercise the envelope and header checks; to reach what lies behind the signature, the
//! input is also signed as the payload of a batch by a fixed key (optionally zstd-compressed
//! first, with a header made to match the payload where it decodes), as a peer holding a
//! key could send it. A batch it accepts must be readable: its ops decode, as many as the
//! header says, in the header's time range.
#![no_main]

use blazedb_identity::Keypair;
use blazedb_protocol::batch::{self, BatchHeader, SIGNING_CONTEXT};
use blazedb_protocol::codec::decode;
use blazedb_protocol::Hlc;
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
    // Shortest heads, as sealing writes them (the envelope parser takes any definite head).
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
    // The payload as signed: the input itself, or the input compressed (enc 3).
    let (enc, payload) = match mode % 4 {
        0 => (2, rest.to_vec()),
        1 => (3, zstd::bulk::compress(rest, 1).expect("compresses")),
        2 => (mode >> 2, rest.to_vec()), // any encoding byte, legacy ones among them
        _ => (3, rest.to_vec()),         // bytes that claim to be compressed
    };
    // A header that matches the payload where the plain payload decodes.
    let (ops, hlc_min, hlc_max) = match decode(rest) {
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
        payload_hash: *blake3::hash(&payload).as_bytes(),
        cap: None,
        enc,
        dict: None,
    };
    let Ok(vb) = batch::verify(envelope(&kp, &header, &payload)) else {
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
