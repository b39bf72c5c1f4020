//! Shared set-up of the fuzz targets: the reference fixtures (for a real tokenizer and
//! config) and splitting one input into parts.

use std::path::PathBuf;

/// `../shared/fixtures` beside the checkout, or `SWITCHYARD_FIXTURES`.
pub fn fixtures() -> PathBuf {
    std::env::var_os("SWITCHYARD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures"
            ))
        })
}

/// The trained fixture's tokenizer, loaded once per process.
pub fn tokenizer() -> &'static switchyard_model::Tokenizer {
    static TOK: std::sync::OnceLock<switchyard_model::Tokenizer> = std::sync::OnceLock::new();
    TOK.get_or_init(|| {
        switchyard_model::Tokenizer::from_dir(&fixtures().join("tiny-mixtral-trained"))
            .expect("the fixture tokenizer (set SWITCHYARD_FIXTURES)")
    })
}

/// Splits `data` at the first NUL byte: (before, after); no NUL: (data, empty).
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}
