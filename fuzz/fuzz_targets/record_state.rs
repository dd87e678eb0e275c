//! The stored form of record states (`record_codec`): read back from the view file, which a
//! damaged disk or a hostile copy may have changed. A state it accepts must re-encode to a
//! state that decodes the same; the byte-level shortcut `absorbs` must agree with the full
//! join wherever it says yes and both states decode, and never panic on damaged bytes.
#![no_main]

use blazedb_protocol::record_codec::{absorbs, decode_state, encode_state};
use blazedb_protocol::RecordState;
use libfuzzer_sys::fuzz_target;

/// Whether `bytes` are a state as the store writes one: compacted, as every apply and merge
/// leaves a state (joining the empty state changes nothing), and encoded canonically (values
/// in their shortest form, as `encode_state` writes them).
fn stored_form(bytes: &[u8], s: &RecordState) -> bool {
    let mut c = s.clone();
    c.merge(&RecordState::default());
    let mut out = Vec::new();
    encode_state(&c, &mut out);
    out == bytes
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = decode_state(data) {
        let mut e = Vec::new();
        encode_state(&s, &mut e);
        let s2 = decode_state(&e).expect("an encoded state decodes");
        assert_eq!(s, s2, "decode . encode is the identity on decoded states");
        let mut e2 = Vec::new();
        encode_state(&s2, &mut e2);
        assert_eq!(e, e2, "encoding is canonical");
    }
    // Two states: the first byte says where the second starts.
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let cut = (cut as usize).min(rest.len());
    let (delta, file) = rest.split_at(cut);
    if !absorbs(delta, file) {
        return;
    }
    // `absorbs` walks both states' layout but steps over values, names' UTF-8 and author
    // indices (documented): where both decode, the join must be `delta` itself. The delta
    // is one the store can hold (`stored_form`): a state holding a field its tombstone
    // covers, or a value in a longer form than needed, is never made, and its join with
    // anything would drop or shorten it.
    let (Ok(mut joined), Ok(f)) = (decode_state(delta), decode_state(file)) else {
        return;
    };
    if !stored_form(delta, &joined) {
        return;
    }
    joined.merge(&f);
    let mut out = Vec::new();
    encode_state(&joined, &mut out);
    assert_eq!(out, delta, "absorbs: the join is the delta, byte for byte");
});
