//! The compact payload decoder (`codec::decode`): what every batch from a peer reaches once
//! its signature checks out. Beyond "never panics", a payload it accepts must hold only ops
//! that pass `Op::validate` in strictly increasing time, must survive re-encoding unchanged,
//! and each upsert or delete must give the stored state `RecordState::from_op` gives.
#![no_main]

use blazedb_protocol::codec::{decode, encode_ops, OpView};
use blazedb_protocol::record_codec::{decode_state, dominated_by, encode_op_state};
use blazedb_protocol::{Op, RecordState};
use libfuzzer_sys::fuzz_target;

const AUTHOR: [u8; 32] = [7; 32];

fuzz_target!(|data: &[u8]| {
    let Ok(view) = decode(data) else { return };
    let ops: Vec<Op> = view.ops().iter().map(|op| view.to_op(op)).collect();
    for op in &ops {
        op.validate().expect("a decoded op passes the op rules");
    }
    for w in ops.windows(2) {
        assert!(
            w[0].hlc() < w[1].hlc(),
            "decoded timestamps strictly increase"
        );
    }
    let mut again = Vec::new();
    encode_ops(&ops, &mut again);
    let view2 = decode(&again).expect("re-encoded ops decode");
    let ops2: Vec<Op> = view2.ops().iter().map(|op| view2.to_op(op)).collect();
    assert_eq!(ops, ops2, "decode . encode . decode is decode");

    let mut states = Vec::new();
    for (op, owned) in view.ops().iter().zip(&ops) {
        let mut out = Vec::new();
        encode_op_state(&view, op, &AUTHOR, &mut out);
        let state = decode_state(&out).expect("an op's state decodes");
        assert_eq!(
            state,
            RecordState::from_op(owned, AUTHOR),
            "encode_op_state"
        );
        states.push(out);
    }
    // The shortcut that replaces a held state without decoding it must agree with applying
    // the op (each of the first 8 ops against the states the first 8 make: 64 pairs at most).
    for (j, op) in view.ops().iter().enumerate().take(8) {
        if !matches!(op, OpView::Upsert { .. } | OpView::Delete { .. }) {
            continue;
        }
        for held in states.iter().take(8) {
            if dominated_by(held, &view, op) {
                let mut s = decode_state(held).expect("held state decodes");
                s.apply(&ops[j], AUTHOR);
                assert_eq!(s, RecordState::from_op(&ops[j], AUTHOR), "dominated_by");
            }
        }
    }
});
