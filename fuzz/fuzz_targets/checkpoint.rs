//! A checkpoint file (safetensors, or GGUF when it starts with the GGUF magic) beside the
//! fixture's config.json: it opens and every tensor it lists can be taken and read, or it is
//! refused with an error; nothing reads outside the file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard_model::Checkpoint;

fn dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let config = switchyard_fuzz::fixtures().join("tiny-mixtral-trained/config.json");
        std::fs::copy(config, d.path().join("config.json")).unwrap();
        d
    })
    .path()
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    let path = if data.starts_with(b"GGUF") {
        d.join("model.gguf")
    } else {
        d.join("model.safetensors")
    };
    let _ = std::fs::remove_file(d.join("model.gguf"));
    let _ = std::fs::remove_file(d.join("model.safetensors"));
    std::fs::write(&path, data).unwrap();
    let Ok(ck) = Checkpoint::open(if data.starts_with(b"GGUF") {
        path.as_path()
    } else {
        d
    }) else {
        return;
    };
    for (name, shape) in ck.tensor_shapes() {
        if let Ok(t) = ck.tensor(&name, &shape) {
            let e = t.elems();
            let n = e.len().min(64);
            let mut out = vec![0f32; n];
            e.to_f32_into(0..n, &mut out);
        }
    }
});
