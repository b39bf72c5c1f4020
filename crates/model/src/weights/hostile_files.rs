//! A checkpoint folder is input: whatever its safetensors header or index says, opening it and
//! taking tensors from it answers with a named error or with tensors whose bytes lie inside the
//! file; nothing panics, reads out of bounds or allocates by a size the file declares.

use super::Checkpoint;
use proptest::prelude::*;
use std::path::Path;

const NAMES: [&str; 4] = [
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    "model.layers.0.block_sparse_moe.gate.weight",
];

/// (name, dtype, shape, offsets to use instead of the consistent ones)
type Entry = (
    &'static str,
    &'static str,
    Vec<usize>,
    Option<(usize, usize)>,
);

fn entry() -> impl Strategy<Value = Entry> {
    (
        prop::sample::select(NAMES.to_vec()),
        prop::sample::select(vec!["F32", "F16", "BF16", "U8", "I64", "F64", "Q4"]),
        prop::collection::vec(prop_oneof![4 => 0usize..6, 1 => Just(usize::MAX / 2)], 0..3),
        prop::option::weighted(0.2, (0usize..256, 0usize..256)),
    )
}

/// A header whose offsets follow one another as the format requires, except where an entry
/// overrides them; returns it and the data length the offsets cover.
fn header(entries: &[Entry]) -> (Vec<u8>, usize) {
    let mut map = serde_json::Map::new();
    let mut at = 0usize;
    for (name, dtype, shape, over) in entries {
        let size = match *dtype {
            "F32" => 4,
            "F16" | "BF16" => 2,
            "I64" | "F64" => 8,
            _ => 1,
        };
        let bytes = shape
            .iter()
            .try_fold(size, |a: usize, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX / 4)
            .min(4096);
        let (a, b) = over.unwrap_or((at, at + bytes));
        at = at.max(b);
        map.insert(
            (*name).to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [a, b]}),
        );
    }
    (serde_json::to_vec(&map).unwrap(), at)
}

fn write(dir: &Path, header: &[u8], declared_len: Option<u64>, data: usize) {
    let mut f = Vec::new();
    f.extend_from_slice(&declared_len.unwrap_or(header.len() as u64).to_le_bytes());
    f.extend_from_slice(header);
    f.extend(std::iter::repeat_n(0x3cu8, data));
    std::fs::write(dir.join("model.safetensors"), f).unwrap();
}

fn open_and_take_everything(dir: &Path) {
    if let Ok(ck) = Checkpoint::open(dir) {
        for name in NAMES {
            let Some(e) = ck.tensors.get(name) else {
                continue;
            };
            let shape = e.shape.clone();
            if let Ok(t) = ck.tensor(name, &shape) {
                let e = t.elems();
                let n = e.len().min(64);
                let mut out = vec![0f32; n];
                e.to_f32_into(0..n, &mut out);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_safetensors_header_opens_or_is_refused(
        entries in prop::collection::vec(entry(), 0..5),
        declared in prop::option::weighted(0.1, any::<u64>()),
        data_delta in prop_oneof![4 => Just(0isize), 1 => -8isize..8],
        junk in prop::collection::vec(any::<u8>(), 0..40),
        use_junk in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            crate::tests::fixtures().join("tiny-mixtral-trained/config.json"),
            dir.path().join("config.json"),
        )
        .unwrap();
        let (header, covered) = if use_junk { (junk, 0) } else { header(&entries) };
        let data = covered.saturating_add_signed(data_delta);
        write(dir.path(), &header, declared, data);
        open_and_take_everything(dir.path());
    }

    #[test]
    fn any_index_opens_or_is_refused(
        map in prop::collection::btree_map(
            prop::sample::select(NAMES.to_vec()),
            prop::sample::select(vec!["model.safetensors", "../model.safetensors", "missing.safetensors", "", "/etc/passwd"]),
            0..4,
        ),
        extra in prop::sample::select(vec!["", "{", "{\"weight_map\": 3}", "[]"]),
    ) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            crate::tests::fixtures().join("tiny-mixtral-trained/config.json"),
            dir.path().join("config.json"),
        )
        .unwrap();
        let header = serde_json::json!({"model.norm.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}});
        write(dir.path(), &serde_json::to_vec(&header).unwrap(), None, 8);
        let index = if extra.is_empty() {
            serde_json::to_string(&serde_json::json!({"weight_map": map})).unwrap()
        } else {
            extra.to_string()
        };
        std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
        open_and_take_everything(dir.path());
    }
}
