//! Sync messages as a peer sends them: CBOR read by libp2p's request-response codec
//! (cbor4ii + serde, what the node runs) and by `decode_message` (ciborium, what the
//! simulator and tools use). Both must refuse or accept without panicking, and a message
//! accepted by one must re-encode to one the other reads the same.
#![no_main]

use blazedb_protocol::{decode_message, encode_message, SyncMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = cbor4ii::serde::from_slice::<SyncMessage>(data) {
        let bytes = encode_message(&msg);
        let back = decode_message(&bytes).expect("a re-encoded message decodes");
        assert_eq!(msg, back);
    }
    if let Ok(msg) = decode_message(data) {
        let bytes = cbor4ii::serde::to_vec(Vec::new(), &msg).expect("encodes");
        let back: SyncMessage = cbor4ii::serde::from_slice(&bytes).expect("decodes");
        assert_eq!(msg, back);
    }
});
