//! Capability chains as peers present them (`Present`, batch headers) and as users paste
//! them (`ns join`, the HTTP API): `Chain::decode` and `Chain::from_text` refuse or accept
//! without panicking, and a chain they accept is exactly the bytes it encodes to.
#![no_main]

use blazedb_protocol::capability::Chain;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(chain) = Chain::decode(data) {
        assert_eq!(chain.encode(), data, "an accepted chain is canonical");
        let _ = chain.covers("c", "k");
        let _ = chain.authorizes(chain.ns(), &chain.audience(), chain.rights(), 0);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(chain) = Chain::from_text(text) {
            assert_eq!(Chain::from_text(&chain.to_text()).ok().as_ref(), Some(&chain));
        }
    }
});
