//! A worker decoding an expert batch off the wire: a batch either decodes into one that keeps
//! every promise (rows, experts in range and distinct, sizes that agree) or is refused.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;
use switchyard_wire::{codec::Expect, pb, ExpertRequest};

fuzz_target!(|data: &[u8]| {
    let Ok(b) = pb::ExpertBatch::decode(data) else {
        return;
    };
    let want = Expect {
        fingerprint: "fp",
        hidden: 4,
        layers: 2,
        experts: 8,
        top_k: 2,
        max_rows: 16,
    };
    if let Ok(r) = ExpertRequest::decode(&b, &want) {
        assert!(r.layer < want.layers);
        assert_eq!(r.x.len(), r.plan.rows() * want.hidden);
        assert!(r.plan.rows() <= want.max_rows);
        for row in 0..r.plan.rows() {
            let e = r.plan.row_experts(row);
            assert!(!e.is_empty() && e.len() <= want.top_k);
            for (i, x) in e.iter().enumerate() {
                assert!((*x as usize) < want.experts);
                assert!(!e[..i].contains(x), "duplicate expert");
            }
        }
    }
});
