//! A coordinator decoding a worker's reply: refused whole unless it has exactly the shape of
//! the batch it answers.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;
use switchyard_wire::{pb, ExpertReply};

fuzz_target!(|data: &[u8]| {
    let (shape, body) = data.split_at(data.len().min(2));
    let (rows, hidden) = match shape {
        [r, h] => (*r as usize % 32, *h as usize % 64),
        _ => (1, 4),
    };
    let Ok(r) = pb::ExpertResult::decode(body) else {
        return;
    };
    if let Ok(d) = ExpertReply::decode(&r, rows, hidden) {
        assert_eq!(d.output.len(), rows * hidden);
    }
});
